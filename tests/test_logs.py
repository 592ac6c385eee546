"""The log lines of a running `runq serve --log-format json`: a request line and a batch line
per task, JSON, with task ids and never a payload."""

from __future__ import annotations

import json

import httpx

from tests.helpers import Proc, wait_until

SECRET_INPUT = "payload-that-must-never-be-logged"


def test_logs_are_json_lines_with_task_ids_and_no_payloads(served: tuple[str, Proc]) -> None:
    url, proc = served
    task = httpx.post(f"{url}/v1/functions/counted/predict", json={"input": SECRET_INPUT}).json()

    def lines() -> list[dict]:
        # Whole lines only: the processes are still writing to the log.
        return [
            json.loads(line)
            for line in proc.output().splitlines(keepends=True)
            if line.startswith("{") and line.endswith("\n")
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
    assert request["endpoint"] == "predict" and request["status"] == 200
    assert batch["function"] == "counted" and batch["batch_size"] >= 1
