"""Metrics, logs and live configuration of a running `runq serve`, as an operator sees them."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis import Redis

from tests.conftest import ROOT, Proc, free_port, run_runq, wait_until
from tests.fns import CALLS_KEY

TARGET = str(ROOT / "tests" / "fns_observed.py")
SECRET_INPUT = "payload-that-must-never-be-logged"
# runq_request_duration_seconds buckets: 1 ms, 2 ms, ... doubling up to the first above 10 s.
BUCKETS = {"min": 0.001, "max": 10, "factor": 2}


@pytest.fixture(scope="module")
def served(procs: Callable[..., Proc], valkey_url: str) -> Iterator[tuple[str, Proc]]:
    """`runq serve` with two API processes on the suite's Valkey, logging JSON."""
    redis = Redis.from_url(valkey_url)
    redis.delete(CALLS_KEY.format("counted"), "runq:deployed", "runq:deployed:version")
    port = free_port()
    proc = procs(
        "serve",
        TARGET,
        "--port",
        str(port),
        "--api-workers",
        "2",
        "--log-format",
        "json",
        env={"RUNQ_REQUEST_BUCKETS": json.dumps(BUCKETS)},
    )
    wait_until(lambda: "runq is serving" in proc.output() or not proc.alive(), 60, "serve")
    assert proc.alive(), proc.output()
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: httpx.get(f"{url}/v1/functions/counted").json()["replicas"]["current"] == 1,
        60,
        "the worker",
    )
    yield url, proc
    redis.delete("runq:deployed", "runq:deployed:version")
    redis.close()


def predict_all(url: str, inputs: list[object]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.gather(
                *(http.post("/v1/functions/counted/predict", json={"input": x}) for x in inputs)
            )

    return asyncio.run(run())


def scrape(url: str) -> dict[str, list[Sample]]:
    text = httpx.get(f"{url}/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found)


def batch_sizes(redis: Redis) -> list[int]:
    return [len(json.loads(raw)) for raw in redis.lrange(CALLS_KEY.format("counted"), 0, -1)]


def test_one_scrape_counts_every_request_and_batch_across_processes(
    served: tuple[str, Proc], redis: Redis
) -> None:
    url, _ = served
    answers = predict_all(url, list(range(40)))
    assert [a.status_code for a in answers] == [200] * 40
    for i in range(5):
        response = httpx.post(f"{url}/v1/functions/counted/tasks", json={"input": i})
        httpx.get(f"{url}/v1/tasks/{response.json()['id']}/result?wait=10")
    assert httpx.post(f"{url}/v1/functions/counted/predict", json={"nope": 1}).status_code == 422

    metrics = scrape(url)
    requests = metrics["runq_request_duration_seconds"]
    assert (
        value(requests, "runq_request_duration_seconds_count", endpoint="predict", status="200")
        == 40
    )
    assert (
        value(requests, "runq_request_duration_seconds_count", endpoint="submit", status="202") == 5
    )
    assert (
        value(requests, "runq_request_duration_seconds_count", endpoint="predict", status="422")
        == 1
    )
    # The worker process's figures agree with what the function itself saw.
    sizes = batch_sizes(redis)
    assert sum(sizes) == 45
    batches = metrics["runq_batch_size"]
    assert value(batches, "runq_batch_size_count", function="counted") == len(sizes)
    assert value(batches, "runq_batch_size_sum", function="counted") == 45
    assert value(metrics["runq_tasks"], "runq_tasks_total", status="succeeded") == 45
    assert value(metrics["runq_queue_wait_seconds"], "runq_queue_wait_seconds_count") == 45
    assert value(metrics["runq_execution_seconds"], "runq_execution_seconds_count") == len(sizes)
    # Read from Redis at scrape time.
    assert value(metrics["runq_queue_depth"], "runq_queue_depth", function="counted") == 0
    assert value(metrics["runq_replicas_current"], "runq_replicas_current") == 1
    assert value(metrics["runq_replicas_desired"], "runq_replicas_desired") == 1
    assert value(metrics["runq_cold_starts"], "runq_cold_starts_total") == 1


def test_request_buckets_follow_the_settings(served: tuple[str, Proc]) -> None:
    url, _ = served
    httpx.post(f"{url}/v1/functions/counted/predict", json={"input": 1})
    samples = scrape(url)["runq_request_duration_seconds"]
    bounds = {
        round(float(s.labels["le"]), 6)
        for s in samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    }
    assert bounds == {round(0.001 * 2**i, 6) for i in range(15)}


def test_logs_are_json_lines_with_task_ids_and_no_payloads(served: tuple[str, Proc]) -> None:
    url, proc = served
    task = httpx.post(f"{url}/v1/functions/counted/predict", json={"input": SECRET_INPUT}).json()
    wait_until(lambda: task["id"] in proc.output(), what="the request's log line")
    output = proc.output()
    assert SECRET_INPUT not in output
    # Whole lines only: the processes are still writing to the log.
    lines = [
        json.loads(line)
        for line in output.splitlines(keepends=True)
        if line.startswith("{") and line.endswith("\n")
    ]
    request = next(entry for entry in lines if entry.get("task_id") == task["id"])
    assert request["endpoint"] == "predict" and request["status"] == 200
    batch = next(entry for entry in lines if task["id"] in entry.get("task_ids", []))
    assert batch["function"] == "counted" and batch["batch_size"] >= 1


def runq_cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return run_runq(*args, "--redis-url", redis_url)


def test_deploy_changes_a_running_workers_batch_size(
    served: tuple[str, Proc], redis: Redis, valkey_url: str, tmp_path: Path
) -> None:
    url, proc = served
    redis.delete(CALLS_KEY.format("counted"))
    for _ in range(3):
        predict_all(url, list(range(16)))
    assert max(batch_sizes(redis)) <= 4

    bad = tmp_path / "bad.yaml"
    bad.write_text("functions:\n  counted: {max_batch_size: 16}\n  nowhere: {max_queue: 1}\n")
    refused = runq_cli("deploy", str(bad), TARGET, redis_url=valkey_url)
    assert refused.returncode == 2
    assert "nowhere" in refused.stderr
    assert redis.get("runq:deployed:version") is None  # nothing of it was written

    good = tmp_path / "good.yaml"
    good.write_text("functions:\n  counted: {max_batch_size: 16}\n")
    deployed = runq_cli("deploy", str(good), TARGET, redis_url=valkey_url)
    assert deployed.returncode == 0, deployed.stderr
    wait_until(
        lambda: httpx.get(f"{url}/v1/functions/counted").json()["settings"]["max_batch_size"] == 16,
        what="the gateway to pick the deploy up",
    )
    wait_until(lambda: "settings now" in proc.output(), what="the worker to pick the deploy up")

    def bigger_batch() -> bool:
        predict_all(url, list(range(16)))
        return max(batch_sizes(redis)) > 4

    wait_until(bigger_batch, 20, "a batch above the old limit")
    shown = runq_cli("config", "show", TARGET, "--function", "counted", redis_url=valkey_url)
    line = next(x for x in shown.stdout.splitlines() if "max_batch_size" in x)
    assert "16" in line and "deployed" in line


@pytest.mark.parametrize(
    "buckets",
    [
        [0.1, 0.05],
        [0, 1],
        [],
        {"min": 1, "max": 0.5, "factor": 2},
        {"min": 0.1, "max": 1, "factor": 1},
    ],
)
def test_invalid_request_buckets_stop_the_start(buckets: object) -> None:
    result = run_runq("config", "show", TARGET, env={"RUNQ_REQUEST_BUCKETS": json.dumps(buckets)})
    assert result.returncode == 2
    assert "request_buckets" in result.stderr


def test_status_shows_the_last_minute_of_a_running_function(
    served: tuple[str, Proc], valkey_url: str
) -> None:
    url, _ = served
    predict_all(url, list(range(8)))
    shown = runq_cli("status", "--json", redis_url=valkey_url)
    assert shown.returncode == 0, shown.stderr
    row = next(r for r in json.loads(shown.stdout)["functions"] if r["function"] == "counted")
    assert row["succeeded"] >= 8
    assert row["throughput_per_s"] > 0 and row["p99_s"] is not None
    assert row["replicas"] == {"current": 1, "desired": 1}
