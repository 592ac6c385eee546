"""Admissions of one event-loop tick share a round trip, each still atomic against the cap."""

from __future__ import annotations

import asyncio
import secrets

from redis import Redis
from rq.serializers import JSONSerializer

from runq.queue import constants
from runq.queue.connection import async_redis
from runq.queue.enqueue import Enqueue, Enqueued, Reply, Request
from runq.queue.tasks import new_job_fields
from runq.settings import FunctionSettings
from tests.helpers import clear_function

FUNCTION = "tick"


def request(max_queue: int) -> Request:
    task_id = secrets.token_urlsafe(16)
    fields = new_job_fields(
        function=FUNCTION,
        settings=FunctionSettings(),
        payload_json=JSONSerializer.dumps(task_id),
        priority="normal",
        reply_to=None,
        connection=Redis(),
    )
    return Request(FUNCTION, task_id, "normal", fields, max_queue=max_queue)


async def admit_all(valkey_url: str, count: int, max_queue: int) -> list[Enqueued]:
    redis = async_redis(valkey_url)
    try:
        enqueue = Enqueue(redis, idempotency_ttl_s=60)
        return await asyncio.gather(*(enqueue(request(max_queue)) for _ in range(count)))
    finally:
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
