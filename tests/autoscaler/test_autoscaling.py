"""`runq autoscale` on real processes: cold starts, scaling with demand, crashes, drains."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from runq.embedded import EmbeddedValkey
from runq.queue.figures import Figures
from runq.settings import FunctionSettings
from tests.helpers import (
    FNS,
    GATEWAY_ENV,
    ROOT,
    Proc,
    alive,
    descendants,
    free_port,
    run_runq,
    start_gateway,
    submit_tasks,
    wait_until,
)

TARGET = str(ROOT / "tests" / "fns_scaling.py")


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def autoscaler(procs: Callable[..., Proc]) -> Iterator[Proc]:
    proc = procs("autoscale", TARGET, "--metrics-port", str(METRICS_PORT))
    wait_until(lambda: "autoscaling" in proc.output() or not proc.alive(), 30, "the autoscaler")
    assert proc.alive(), proc.output()
    yield proc
    family = descendants(proc.pid)
    assert proc.stop() == 0
    # It drained and stopped every worker it ran.
    assert not [pid for pid in family if alive(pid)]


@pytest.fixture(scope="module")
def scaled(procs: Callable[..., Proc], autoscaler: Proc) -> httpx.Client:
    """A client of a gateway serving tests/fns_scaling.py, whose workers the autoscaler runs."""
    url = start_gateway(
        procs, env={k: v for k, v in GATEWAY_ENV.items() if "CAPPED" not in k}, target=TARGET
    )
    return httpx.Client(base_url=url, timeout=60)


def replicas(client: httpx.Client, function: str) -> dict[str, int | None]:
    return client.get(f"/v1/functions/{function}").json()["replicas"]


def workers_of(autoscaler: Proc, function: str) -> list[int]:
    """Worker processes the autoscaler runs for ``function``, read from /proc."""
    pids = []
    for pid in descendants(autoscaler.pid):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")  # noqa: SIM115
        except OSError:
            continue
        if b"worker" in cmdline and function.encode() in cmdline and alive(pid):
            pids.append(pid)
    return pids


def all_ended(client: httpx.Client, task_ids: list[str]) -> list[dict[str, object]] | None:
    tasks = [client.get(f"/v1/tasks/{task_id}").json() for task_id in task_ids]
    ended = ("succeeded", "failed", "canceled", "timed_out")
    return tasks if all(task["status"] in ended for task in tasks) else None


def test_zero_replicas_stays_ready_and_a_cold_start_answers(
    scaled: httpx.Client, autoscaler: Proc
) -> None:
    wait_until(lambda: replicas(scaled, "cold") == {"current": 0, "desired": 0}, what="zero")
    assert scaled.get("/readyz").status_code == 200
    response = scaled.post("/v1/functions/cold/predict?timeout=30", json={"input": "wake up"})
    assert response.status_code == 200, response.text
    assert response.json()["output"] == "wake up"
    assert replicas(scaled, "cold")["current"] == 1
    # Idle past scale_down_delay_s (1 s): back to zero, the worker drained and gone.
    wait_until(lambda: replicas(scaled, "cold")["current"] == 0, 15, "scale to zero")
    wait_until(lambda: not workers_of(autoscaler, "cold"), 15, "the worker to exit")


def test_a_burst_scales_up_to_max_replicas_and_back_to_zero(
    scaled: httpx.Client, autoscaler: Proc
) -> None:
    tasks = [
        scaled.post("/v1/functions/burst/tasks", json={"input": 0.3}).json()["id"]
        for _ in range(24)
    ]
    wait_until(lambda: replicas(scaled, "burst") == {"current": 3, "desired": 3}, 15, "3 replicas")
    assert len(workers_of(autoscaler, "burst")) == 3
    done = wait_until(lambda: all_ended(scaled, tasks), 60, "the burst to finish")
    assert {task["status"] for task in done} == {"succeeded"}
    wait_until(lambda: replicas(scaled, "burst")["current"] == 0, 20, "scale to zero")
    # The autoscaler's --metrics-port shows its workers' figures, drained ones included.
    scraped = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text
    families = {f.name: f.samples for f in text_string_to_metric_families(scraped)}
    succeeded = [
        s.value
        for s in families["runq_tasks"]
        if s.name == "runq_tasks_total" and s.labels == {"function": "burst", "status": "succeeded"}
    ]
    assert succeeded == [24]
    cold = [s.value for s in families["runq_cold_starts"] if s.labels.get("function") == "burst"]
    assert cold and cold[0] >= 1


@pytest.mark.slow
def test_sigkill_storm_loses_no_task(scaled: httpx.Client, autoscaler: Proc, redis: Redis) -> None:
    tasks = [
        scaled.post("/v1/functions/fragile/tasks", json={"input": 0.3}).json()["id"]
        for _ in range(500)
    ]
    wait_until(lambda: len(workers_of(autoscaler, "fragile")) == 3, 20, "3 fragile workers")
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 120
    while not all_ended(scaled, tasks) and time.monotonic() < deadline:
        pids = workers_of(autoscaler, "fragile")
        if pids and kills < 6:
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            kills += 1
        time.sleep(3)
    done = wait_until(lambda: all_ended(scaled, tasks), 60, "every task to end")
    statuses = [task["status"] for task in done]
    assert statuses.count("succeeded") == 500, {s: statuses.count(s) for s in set(statuses)}
    assert kills >= 3
    # Killed batches ran again: some tasks needed a second attempt.
    assert max(int(task["attempts"]) for task in done) >= 2
    assert redis.zcard("runq:leases:fragile") == 0


def test_a_predict_whose_worker_dies_without_retries_answers_worker_lost(
    scaled: httpx.Client, autoscaler: Proc, redis: Redis
) -> None:
    key = {"Idempotency-Key": f"doomed-{time.time_ns()}"}
    # 12 s: longer than the 8 s lease that must lapse, short enough that a worker still running
    # the retry below drains before this module's autoscaler is stopped.
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            scaled.post,
            "/v1/functions/doomed/predict?timeout=28",
            json={"input": 12},
            headers=key,
            timeout=35,
        )
        running = wait_until(lambda: running_task(redis, "doomed"), 30, "the task to start")
        (pid,) = workers_of(autoscaler, "doomed")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        response = answer.result()
    # Not the model's fault, and not a model_error: its own code, a 5xx a client may retry.
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "worker_lost"
    assert response.json()["error"]["task_id"] == running
    ended = scaled.get(f"/v1/tasks/{running}").json()
    assert (ended["status"], ended["error"]["code"]) == ("failed", "worker_lost")
    # Leases lapse in 8 s and are looked for every second.
    assert time.monotonic() - killed_at < 15
    # The same request again runs anew instead of answering with the lost task.
    again = scaled.post("/v1/functions/doomed/tasks", json={"input": 12}, headers=key)
    assert again.status_code == 202
    assert again.json()["id"] != running
    assert "idempotent-replayed" not in again.headers
    assert scaled.post(f"/v1/tasks/{again.json()['id']}/cancel").status_code == 200


def running_task(redis: Redis, function: str) -> str | None:
    """The id of a task of `function` a worker holds a lease on."""
    held = redis.zrange(f"runq:leases:{function}", 0, 0)
    return held[0].decode() if held else None


def test_a_deployed_max_replicas_holds_a_running_autoscaler(
    scaled: httpx.Client, autoscaler: Proc, redis: Redis, valkey_url: str, tmp_path: Path
) -> None:
    deploy_file = tmp_path / "deploy.yaml"
    deploy_file.write_text("functions:\n  burst: {max_replicas: 1}\n")
    deployed = run_runq("deploy", str(deploy_file), TARGET, "--redis-url", valkey_url)
    assert deployed.returncode == 0, deployed.stderr
    try:
        wait_until(lambda: "deployed settings (version" in autoscaler.output(), 10, "the deploy")
        tasks = [
            scaled.post("/v1/functions/burst/tasks", json={"input": 0.2}).json()["id"]
            for _ in range(12)
        ]
        wait_until(lambda: replicas(scaled, "burst") == {"current": 1, "desired": 1}, 15, "1")
        done = wait_until(lambda: all_ended(scaled, tasks), 60, "the burst to finish")
        assert {task["status"] for task in done} == {"succeeded"}
        assert len(workers_of(autoscaler, "burst")) <= 1
    finally:
        redis.delete("runq:deployed", "runq:deployed:version")


def test_sigterm_to_the_autoscaler_drains_the_batch_in_hand(procs: Callable[..., Proc]) -> None:
    # Scaling to zero and then stopping signalled a draining worker twice; the second signal
    # killed it mid-batch (3 drains in 5). Every try must drain; two keep make test in budget.
    target = str(ROOT / "tests" / "fns_drain.py")
    client = httpx.Client(base_url=start_gateway(procs, target=target), timeout=30)
    for attempt in range(2):
        ended, output = stopped_while_running(procs, client, target)
        assert ended["status"] == "succeeded", (attempt, ended, output)


def stopped_while_running(
    procs: Callable[..., Proc], client: httpx.Client, target: str
) -> tuple[dict[str, Any], str]:
    """A task's state once the autoscaler running it got SIGTERM mid-task, and its output."""
    autoscaler = procs("autoscale", target)
    task = client.post("/v1/functions/lingering/tasks", json={"input": 1.5}).json()
    url = f"/v1/tasks/{task['id']}"
    wait_until(lambda: client.get(url).json()["status"] == "running", 30, "the task to start")
    assert autoscaler.stop(signal.SIGTERM) == 0
    return client.get(url).json(), autoscaler.output()


# A Redis outage run (make bench-faults soaks the same under load): make test-all.
@pytest.mark.slow
def test_the_autoscaler_rides_out_redis_being_down_at_start_and_restarting(
    procs: Callable[..., Proc],
) -> None:
    port = free_port()
    env = {"RUNQ_REDIS_URL": f"redis://127.0.0.1:{port}"}
    target = str(ROOT / "tests" / "fns_drain.py")
    autoscaler = procs("autoscale", target, env=env)
    wait_until(lambda: "Redis unreachable" in autoscaler.output(), 30, "the outage to be noticed")
    valkey = EmbeddedValkey(port=port)
    valkey.start()
    try:
        url = start_gateway(procs, env=env, target=target)

        def answered() -> bool:
            try:
                response = httpx.post(
                    f"{url}/v1/functions/lingering/predict?timeout=5", json={"input": 0.01}
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        wait_until(answered, 30, "a predict answered once Redis is up")
        valkey.stop()
        wait_until(lambda: autoscaler.output().count("Redis unreachable") >= 2, 30, "the restart")
        valkey = EmbeddedValkey(port=port)
        valkey.start()
        wait_until(answered, 30, "a predict answered after the restart")
        assert autoscaler.alive()
        assert "Redis answers again" in autoscaler.output()
        assert "Traceback" not in autoscaler.output()
        assert autoscaler.stop(signal.SIGTERM) == 0
    finally:
        valkey.stop()


def test_a_hung_worker_is_no_current_replica_until_it_answers_again(
    procs: Callable[..., Proc], own_db: tuple[Redis, str]
) -> None:
    redis, url = own_db
    autoscaler = procs(
        "autoscale",
        FNS,
        env={
            "RUNQ_REDIS_URL": url,
            "RUNQ_FUNCTIONS__ECHO__MIN_REPLICAS": "1",
            "RUNQ_HEARTBEAT_TTL_S": "1",
        },
    )
    figures = Figures(redis)
    try:
        wait_until(lambda: figures.read("echo").replicas_current == 1, 60, "the echo worker")
        (worker,) = workers_of(autoscaler, "echo")
        os.kill(worker, signal.SIGSTOP)
        try:
            submit_tasks(url, "echo", 3, FunctionSettings())
            # Its process runs, as far as the autoscaler knows; its heartbeat is 1 s stale.
            hung = wait_until(
                lambda: (read := figures.read("echo")).replicas_current == 0 and read,
                5,
                "the stopped worker to drop out of replicas.current",
            )
            assert (hung.queued, hung.desired) == (3, 1)
            assert workers_of(autoscaler, "echo") == [worker]
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(
            lambda: (read := figures.read("echo")).replicas_current == 1 and read.queued == 0,
            10,
            "the worker to count again and take the tasks",
        )
    finally:
        autoscaler.stop()
