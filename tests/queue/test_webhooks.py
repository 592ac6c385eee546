"""The webhook delivery queue on a real Valkey: enqueued in the caller's transaction, claimed
under a lease so that one delivery is never sent twice at once."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from redis import Redis

from runq.queue import constants
from runq.queue.delete import Delete
from runq.queue.webhooks import DeliveryQueue
from tests.helpers import PUBLIC, Receiver, delivered, fast_sender, submit, wait_until


def test_enqueue_writes_the_delivery_in_the_callers_transaction(store: Redis) -> None:
    body = submit(store, "t-enqueue", PUBLIC)
    fields = store.hgetall(constants.webhook_key("t-enqueue"))
    assert fields == {b"url": PUBLIC.encode(), b"body": body, b"attempts": b"0"}
    assert 0 < store.ttl(constants.webhook_key("t-enqueue")) <= constants.WEBHOOK_TTL_S
    due = store.zscore(constants.WEBHOOKS_DUE_KEY, "t-enqueue")
    assert due is not None and abs(due - time.time()) < 5


def test_two_senders_never_send_one_delivery_at_once(store: Redis, receiver: Receiver) -> None:
    receiver.delay_s = 0.5
    submit(store, "t-once", receiver.url)
    senders = [fast_sender(store) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: delivered(store, "t-once"), 10, "the delivery")
    finally:
        for sender in senders:
            sender.stop()
    assert len(receiver.requests) == 1


def test_deleting_a_task_purges_its_pending_delivery(store: Redis, valkey_url: str) -> None:
    submit(store, "t-deleted", PUBLIC)

    async def delete() -> bool:
        async with aioredis.Redis.from_url(valkey_url, db=13) as redis:
            return await Delete(redis)("t-deleted", "runq.hooked")

    assert asyncio.run(delete())
    assert not store.exists(constants.webhook_key("t-deleted"))
    assert store.zscore(constants.WEBHOOKS_DUE_KEY, "t-deleted") is None
    # No sender can ever take it: nothing is due.
    assert DeliveryQueue(store).claim(constants.WEBHOOK_LEASE_S, 10) == []
