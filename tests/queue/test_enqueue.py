"""Admissions of one event-loop tick share a round trip, each still atomic against the cap; a
quota's rate and queued cap hold across gateways, and its count falls as tasks leave."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from redis import Redis
from rq.serializers import JSONSerializer

from runq.errors import QuotaExceeded, RateLimited
from runq.gateway.errors import error_response
from runq.queue import constants
from runq.queue.cancel import Cancel
from runq.queue.claim import Claim
from runq.queue.connection import async_redis
from runq.queue.delete import Delete
from runq.queue.enqueue import Enqueue, Enqueued, Quota, Reply, Request
from runq.queue.line import Line
from runq.queue.storage import FileStore
from runq.queue.store import Admission, TaskStore
from runq.queue.tasks import deadline_passed_error, new_job_fields
from runq.settings import FunctionSettings
from tests.helpers import clear_function, wait_until

FUNCTION = "tick"
T = TypeVar("T")
# A second function no worker serves: a quota counts every function's tasks together.
OTHER = "tock"


def request(
    max_queue: int,
    *,
    function: str = FUNCTION,
    quota: Quota | None = None,
    start_within_s: float | None = None,
) -> Request:
    task_id = secrets.token_urlsafe(16)
    fields = new_job_fields(
        function=function,
        settings=FunctionSettings(),
        payload_json=JSONSerializer.dumps(task_id),
        priority="normal",
        reply_to=None,
        connection=Redis(),
    )
    return Request(
        function,
        task_id,
        "normal",
        fields,
        max_queue=max_queue,
        quota=quota,
        start_within_s=start_within_s,
    )


def admit(valkey_url: str, *requests: Request) -> list[Enqueued]:
    """The requests admitted in one tick of one gateway."""
    return asyncio.run(admit_on_gateways(valkey_url, [list(requests)]))[0]


async def admit_on_gateways(valkey_url: str, batches: list[list[Request]]) -> list[list[Enqueued]]:
    """Each batch admitted by a gateway of its own (its own connection and Enqueue), all at
    once."""
    connections = [async_redis(valkey_url) for _ in batches]
    admitters = [Enqueue(redis, idempotency_ttl_s=60) for redis in connections]
    try:
        return list(
            await asyncio.gather(
                *(
                    asyncio.gather(*map(enqueue, batch))
                    for enqueue, batch in zip(admitters, batches, strict=True)
                )
            )
        )
    finally:
        for enqueue, redis in zip(admitters, connections, strict=True):
            await enqueue.aclose()
            await redis.aclose()


def new_quota(**limits: Any) -> Quota:
    return Quota(f"test-{secrets.token_hex(4)}", **limits)


@pytest.fixture
def quiet(redis: Redis) -> Iterator[None]:
    for function in (FUNCTION, OTHER):
        clear_function(redis, function)
    yield
    for function in (FUNCTION, OTHER):
        clear_function(redis, function)


async def admit_all(valkey_url: str, count: int, max_queue: int) -> list[Enqueued]:
    redis = async_redis(valkey_url)
    enqueue = Enqueue(redis, idempotency_ttl_s=60)
    try:
        return await asyncio.gather(*(enqueue(request(max_queue)) for _ in range(count)))
    finally:
        await enqueue.aclose()
        await redis.aclose()


def test_one_ticks_admissions_each_hold_the_queue_cap(valkey_url: str, redis: Redis) -> None:
    clear_function(redis, FUNCTION)
    replies = asyncio.run(admit_all(valkey_url, 12, max_queue=5))
    assert [r.reply for r in replies].count(Reply.ENQUEUED) == 5
    assert [r.reply for r in replies].count(Reply.FULL) == 7
    assert redis.llen(constants.queue_key(constants.queue_name(FUNCTION))) == 5
    clear_function(redis, FUNCTION)


def test_one_ticks_admissions_survive_a_server_that_lost_its_scripts(
    valkey_url: str, redis: Redis
) -> None:
    clear_function(redis, FUNCTION)
    redis.script_flush()
    replies = asyncio.run(admit_all(valkey_url, 8, max_queue=100))
    assert [r.reply for r in replies] == [Reply.ENQUEUED] * 8
    assert redis.llen(constants.queue_key(constants.queue_name(FUNCTION))) == 8
    clear_function(redis, FUNCTION)


@pytest.mark.usefixtures("quiet")
def test_over_a_quotas_rate_admission_is_refused_with_the_wait_for_a_token_and_writes_nothing(
    valkey_url: str, redis: Redis
) -> None:
    quota = new_quota(rate_per_s=0.5, burst=3)
    requests = [request(100, quota=quota) for _ in range(5)]
    replies = admit(valkey_url, *requests)
    assert [r.reply for r in replies] == [Reply.ENQUEUED] * 3 + [Reply.RATE_LIMITED] * 2
    # The bucket is empty: a token comes in 1 / 0.5 s.
    assert all(0 < float(r.value) <= 2.0 for r in replies[3:])
    assert redis.llen(constants.queue_key(constants.queue_name(FUNCTION))) == 3
    assert not any(redis.exists(constants.job_key(r.task_id)) for r in requests[3:])


@pytest.mark.usefixtures("quiet")
def test_a_quotas_bucket_refills_at_its_rate(valkey_url: str) -> None:
    quota = new_quota(rate_per_s=20, burst=1)
    first, second = admit(valkey_url, request(100, quota=quota), request(100, quota=quota))
    assert (first.reply, second.reply) == (Reply.ENQUEUED, Reply.RATE_LIMITED)
    assert float(second.value) <= 1 / 20
    wait_until(
        lambda: admit(valkey_url, request(100, quota=quota))[0].reply == Reply.ENQUEUED,
        2,
        "a token",
    )


@pytest.mark.usefixtures("quiet")
def test_two_gateways_admitting_at_once_never_pass_a_quotas_queued_cap(
    valkey_url: str, redis: Redis
) -> None:
    quota = new_quota(max_queued=7)
    batches = [
        [request(100, quota=quota, function=(FUNCTION, OTHER)[i % 2]) for i in range(20)]
        for _ in range(2)
    ]
    replies = [r for batch in asyncio.run(admit_on_gateways(valkey_url, batches)) for r in batch]
    assert [r.reply for r in replies].count(Reply.ENQUEUED) == 7
    assert [r.reply for r in replies].count(Reply.QUOTA_EXCEEDED) == 33
    lengths = [redis.llen(constants.queue_key(constants.queue_name(f))) for f in (FUNCTION, OTHER)]
    assert sum(lengths) == 7
    assert redis.zcard(constants.quota_queued_key(quota.name)) == 7
    refused = [
        r.task_id for b in batches for r in b if not redis.exists(constants.job_key(r.task_id))
    ]
    assert len(refused) == 33


@pytest.mark.usefixtures("quiet")
def test_a_quotas_count_falls_as_its_tasks_leave_the_queue_however_they_leave(
    valkey_url: str, redis: Redis
) -> None:
    quota = new_quota(max_queued=3)
    queue = constants.queue_name(FUNCTION)
    expiring, canceled, deleted = (
        request(100, quota=quota, start_within_s=0.05),
        request(100, quota=quota),
        request(100, quota=quota),
    )
    admitted = admit(valkey_url, expiring, canceled, deleted, request(100, quota=quota))
    assert [a.reply for a in admitted] == [Reply.ENQUEUED] * 3 + [Reply.QUOTA_EXCEEDED]

    def admits_one_more() -> Request:
        more, refused = request(100, quota=quota), request(100, quota=quota)
        assert [a.reply for a in admit(valkey_url, more, refused)] == [
            Reply.ENQUEUED,
            Reply.QUOTA_EXCEEDED,
        ]
        return more

    claim = Claim(Line(redis), FUNCTION, "quota-test-worker")
    # Expired in the queue: the claim ends it, never starts it.
    wait_until(lambda: redis.time()[0] + redis.time()[1] / 1e6 > _deadline(redis, expiring), 2)
    assert claim(1, None).expired == [expiring.task_id]
    claimed = admits_one_more()

    error = deadline_passed_error()
    assert on_gateway(
        valkey_url, lambda r: Cancel(r)(canceled.task_id, queue, which="any", error=error)
    )
    admits_one_more()
    assert on_gateway(valkey_url, lambda r: Delete(r)(deleted.task_id, queue))
    stranded = admits_one_more()
    # Claimed and started.
    assert [s.task_id for s in claim(1, None).started] == [claimed.task_id]
    admits_one_more()
    # Emptied behind runq's back (`rq empty`): admission at the cap drops the stale entry.
    redis.lrem(constants.queue_key(queue), 0, stranded.task_id)
    redis.delete(constants.job_key(stranded.task_id))
    admits_one_more()


def on_gateway(valkey_url: str, call: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """``call`` run with a gateway's asyncio connection."""

    async def run() -> T:
        connection = async_redis(valkey_url)
        try:
            return await call(connection)
        finally:
            await connection.aclose()

    return asyncio.run(run())


def _deadline(redis: Redis, req: Request) -> float:
    return float(redis.hget(constants.job_key(req.task_id), constants.DEADLINE_FIELD) or 0)


@pytest.mark.usefixtures("quiet")
def test_the_gateways_admission_answers_429_with_retry_after_over_a_quota(
    valkey_url: str, tmp_path: Path
) -> None:
    async def run() -> tuple[RateLimited, QuotaExceeded]:
        connection = async_redis(valkey_url)
        store = TaskStore(
            connection, valkey_url, objects=FileStore(tmp_path), inline_max_bytes=65536
        )
        settings = FunctionSettings()
        rated = Admission(quota=new_quota(rate_per_s=0.25))
        capped = Admission(quota=new_quota(max_queued=1))
        try:
            await store.enqueue(FUNCTION, settings, 1, rated)
            with pytest.raises(RateLimited) as limited:
                await store.enqueue(FUNCTION, settings, 1, rated)
            await store.enqueue(FUNCTION, settings, 1, capped)
            with pytest.raises(QuotaExceeded) as exceeded:
                await store.enqueue(FUNCTION, settings, 1, capped)
            return limited.value, exceeded.value
        finally:
            await connection.aclose()

    limited, exceeded = asyncio.run(run())
    # A token in 1 / 0.25 s; no drain seen yet, so a cold start's few seconds.
    assert limited.retry_after_s == math.ceil(1 / 0.25)
    assert exceeded.retry_after_s >= 1
    for error, code in ((limited, "rate_limited"), (exceeded, "quota_exceeded")):
        answer = error_response(error)
        assert answer.status_code == 429
        assert int(answer.headers["Retry-After"]) == error.retry_after_s
        assert code in bytes(answer.body).decode()
