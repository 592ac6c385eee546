"""RQ's own tools see runq's queues, jobs and registries as RQ's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from redis import Redis
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import Worker

from tests.helpers import wait_until

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


def test_a_failed_task_is_a_failed_rq_job_that_rq_requeue_runs_again(
    client: httpx.Client, valkey_url: str
) -> None:
    answer = client.post("/v1/functions/fails/predict", json={"input": "boom"})
    assert answer.status_code == 500
    task_id = answer.json()["error"]["task_id"]
    with Redis.from_url(valkey_url) as redis:
        job = Job.fetch(task_id, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "failed"
        result = job.latest_result()
        assert result is not None and "cannot digest 'boom'" in (result.exc_string or "")
        assert task_id in FailedJobRegistry("runq.fails", connection=redis).get_job_ids()
        requeue = [RQ_CLI, "requeue", "--url", valkey_url, "--serializer", "json"]
        subprocess.run(
            [*requeue, "--queue", "runq.fails", task_id],
            capture_output=True,
            timeout=30,
            check=True,
        )
        # Requeued, the task runs again: it fails again, on its second attempt.
        wait_until(
            lambda: (
                client.get(f"/v1/tasks/{task_id}").json()["attempts"] == 2
                and client.get(f"/v1/tasks/{task_id}").json()["status"] == "failed"
            ),
            what="the requeued task to run again",
        )


def test_rq_sees_a_running_task_started_and_its_execution_ended_after(
    client: httpx.Client, valkey_url: str
) -> None:
    task_id = client.post("/v1/functions/sleepy/tasks", json={"input": 1.0}).json()["id"]
    with Redis.from_url(valkey_url) as redis:
        started = StartedJobRegistry("runq.sleepy", connection=redis)
        wait_until(lambda: task_id in started.get_job_ids(), what="the task to show started")
        job = Job.fetch(task_id, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "started"
        (execution,) = job.get_executions()
        assert execution.worker_name == job.worker_name
        wait_until(lambda: job.get_status(refresh=True) == "finished", what="the task to end")
        assert task_id not in started.get_job_ids()
        assert job.get_executions() == []
        assert job.latest_result() is not None
        assert job.latest_result().execution_id == execution.id  # type: ignore[union-attr]
        worker = Worker.find_by_key(f"rq:worker:{execution.worker_name}", connection=redis)
        assert worker is not None and worker.get_state() == "idle"
        assert worker.successful_job_count >= 1
