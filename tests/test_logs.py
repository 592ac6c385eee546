"""The log lines of `--log-format json` processes: every line JSON, uvicorn's and rq's too; a
request line with the request's id and a batch line per task, with task ids and never a
payload."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from redis import Redis

from tests.helpers import TESTS, Proc, free_port, start_worker, wait_for_gateway, wait_until

LOGGED = str(TESTS / "fns_logged.py")

SECRET_INPUT = "payload-that-must-never-be-logged"


def test_logs_are_json_lines_with_task_ids_and_no_payloads(served: tuple[str, Proc]) -> None:
    url, proc = served
    task = httpx.post(f"{url}/v1/functions/counted/predict", json={"input": SECRET_INPUT}).json()

    def lines() -> list[dict]:
        # Whole lines only: the processes are still writing to the log.
        return [
            json.loads(line)
            for line in proc.output().splitlines(keepends=True)
            if line.endswith("\n")
        ]

    def logged() -> tuple[dict, dict] | None:
        # The gateway's request line and the worker's batch line, written by two processes in
        # no fixed order.
        entries = lines()
        request = [entry for entry in entries if entry.get("task_id") == task["id"]]
        batch = [entry for entry in entries if task["id"] in entry.get("task_ids", [])]
        return (request[0], batch[0]) if request and batch else None

    request, batch = wait_until(logged, what="the request's and the batch's log lines")
    assert SECRET_INPUT not in proc.output()
    (announced,) = [entry for entry in lines() if "runq is serving" in entry["message"]]
    assert announced["url"] == url
    assert request["endpoint"] == "predict" and request["status"] == 200
    assert batch["function"] == "counted" and batch["batch_size"] >= 1


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line the process wrote, each of which must be a JSON object."""
    entries = []
    for line in proc.output().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return entries


def test_every_line_of_a_json_gateway_and_worker_is_json_with_request_and_task_ids(
    procs: Callable[..., Proc], valkey_url: str
) -> None:
    env = {"RUNQ_LOG_FORMAT": "json"}
    port = free_port()
    gateway = procs("gateway", LOGGED, "--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}"
    with Redis.from_url(valkey_url) as redis:
        worker = start_worker(procs, redis, "logged", target=LOGGED, env=env)
    wait_for_gateway(gateway, url)
    predict = f"{url}/v1/functions/logged/predict"
    sent = httpx.post(predict, json={"input": "warn"}, headers={"X-Request-ID": "caller-id-1"})
    made = httpx.post(predict, json={"input": "ok"})
    forged = httpx.post(predict, json={"input": "ok"}, headers={"X-Request-ID": 'id" level="x'})
    failed = httpx.post(predict, json={"input": "boom"})
    assert [r.status_code for r in (sent, made, forged, failed)] == [200, 200, 200, 500]
    assert sent.headers["x-request-id"] == "caller-id-1"
    made_ids = {made.headers["x-request-id"], forged.headers["x-request-id"]}
    assert len(made_ids) == 2 and all(len(i) == 32 for i in made_ids), made_ids
    failed_task = failed.json()["error"]["task_id"]
    assert worker.stop() == 0
    gateway.stop()  # uvicorn ends by the signal it was stopped with, once it has shut down

    requests = [e for e in json_lines(gateway) if e["logger"] == "runq.access"]
    by_id = {entry["request_id"]: entry for entry in requests}
    assert by_id["caller-id-1"]["method"] == "POST"
    assert by_id["caller-id-1"]["path"] == "/v1/functions/logged/predict"
    assert made_ids <= set(by_id)
    assert by_id[failed.headers["x-request-id"]]["task_id"] == failed_task
    gateway_loggers = {entry["logger"] for entry in json_lines(gateway)}
    assert "uvicorn.error" in gateway_loggers  # its start and shutdown lines, as JSON
    (gateway_error,) = [e for e in json_lines(gateway) if e["level"] == "warning"]
    assert gateway_error["task_id"] == failed_task
    worker_lines = json_lines(worker)
    (model_error,) = [e for e in worker_lines if e["level"] == "error"]
    assert model_error["task_id"] == failed_task and "ValueError" in model_error["exception"]
    assert any(e["logger"] == "py.warnings" for e in worker_lines)
