"""The job hash a new task gets is the one RQ's own Job would write."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now

from runq.queue.tasks import FUNC_REF, job_input, new_job_fields
from runq.settings import FunctionSettings

PER_TASK_TIMES = ("created_at", "enqueued_at")


def rq_fields(task_id: str, payload: Any, settings: FunctionSettings) -> dict[str, Any]:
    job = Job.create(
        FUNC_REF,
        args=[payload],
        id=task_id,
        connection=Redis(),
        serializer=JSONSerializer,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        timeout=int(settings.timeout_s),
        description="runq echo",
    )
    job.origin = "runq.echo.high"
    job.enqueued_at = now()
    fields = job.to_dict()
    fields["status"] = "queued"
    return fields


@pytest.mark.parametrize("payload", ["x", {"a": [1, 2.5, None]}, None, "é☃"])
def test_a_new_tasks_job_hash_is_rqs_own(payload: Any) -> None:
    settings = FunctionSettings(result_ttl_s=120, timeout_s=7)
    fields = new_job_fields(
        function="echo",
        settings=settings,
        payload_json=JSONSerializer.dumps(payload),
        priority="high",
        reply_to=None,
        connection=Redis(),
    )
    expected = rq_fields("t1", payload, settings)
    assert set(fields) == set(expected)
    for name in set(fields) - set(PER_TASK_TIMES):
        assert fields[name] == expected[name], name
    restored = {key.encode(): str(value).encode() for key, value in fields.items() if key != "data"}
    restored[b"data"] = fields["data"]
    assert job_input(restored) == payload
    assert zlib.decompress(fields["data"]) == zlib.decompress(expected["data"])


def test_tasks_of_one_function_share_the_template_but_not_their_own_fields() -> None:
    settings = FunctionSettings()
    connection = Redis()
    first, second = (
        new_job_fields(
            function="echo",
            settings=settings,
            payload_json=JSONSerializer.dumps(task_id),
            priority="normal",
            reply_to=f"reply:{task_id}",
            connection=connection,
        )
        for task_id in ("a", "b")
    )
    assert job_input({b"data": first["data"]}) == "a"
    assert job_input({b"data": second["data"]}) == "b"
    assert first["runq_reply_to"] == "reply:a" and second["runq_reply_to"] == "reply:b"
