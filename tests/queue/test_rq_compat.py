"""RQ's own tools see runq's queues, jobs and registries as RQ's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from redis import Redis
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

RQ_CLI = str(Path(sys.executable).with_name("rq"))


def test_rq_info_shows_the_function_queue_and_its_worker(
    client: httpx.Client, valkey_url: str
) -> None:
    assert client.post("/v1/functions/echo/predict", json={"input": "x"}).status_code == 200
    shown = subprocess.run(
        [RQ_CLI, "info", "--url", valkey_url, "--serializer", "json", "--raw", "runq.echo"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "queue runq.echo" in shown, shown
    assert "runq.echo" in next(line for line in shown.splitlines() if line.startswith("worker"))


def test_a_finished_task_is_a_finished_rq_job_with_its_result(
    client: httpx.Client, valkey_url: str
) -> None:
    task_id = client.post("/v1/functions/double/predict", json={"input": 21}).json()["id"]
    with Redis.from_url(valkey_url) as redis:
        job = Job.fetch(task_id, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "finished"
        assert job.return_value() == 42
        assert job.result_ttl is not None and job.failure_ttl is not None
        registry = FinishedJobRegistry("runq.double", connection=redis)
        assert task_id in registry.get_job_ids()
