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
