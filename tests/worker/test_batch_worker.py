"""A worker process's lifecycle as an operator sees it."""

from __future__ import annotations

import signal
from collections.abc import Callable

import httpx
from redis import Redis

from tests.helpers import Proc, start_worker, wait_until


def test_sigterm_drains_the_task_in_hand_and_takes_nothing_new(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    # `solo` has no worker until this test starts one, and takes one task at a time.
    redis.delete("rq:queue:runq.solo")
    tasks = [client.post("/v1/functions/solo/tasks", json={"input": 1.0}).json() for _ in range(3)]
    worker = start_worker(procs, redis, "solo")

    def status(task: dict[str, str]) -> str:
        return str(client.get(f"/v1/tasks/{task['id']}").json()["status"])

    wait_until(lambda: status(tasks[0]) == "running", what="the first task to start")
    assert worker.stop(signal.SIGTERM) == 0
    assert [status(task) for task in tasks] == ["succeeded", "queued", "queued"]

    successor = start_worker(procs, redis, "solo")
    try:
        for task in tasks:
            done = client.get(f"/v1/tasks/{task['id']}/result?wait=20").json()
            assert done["status"] == "succeeded"
    finally:
        successor.stop()
