"""An enqueue to a function with no live worker wakes autoscalers at once."""

from __future__ import annotations

import httpx
from redis import Redis

from tests.helpers import wait_until

DEMAND_CHANNEL = "runq:demand"


def test_enqueue_publishes_demand_only_when_no_worker_is_live(
    client: httpx.Client, redis: Redis
) -> None:
    pubsub = redis.pubsub()
    pubsub.subscribe(DEMAND_CHANNEL)
    confirmed = wait_until(lambda: pubsub.get_message(timeout=0.1), what="the subscription")
    assert confirmed["type"] == "subscribe"
    try:
        # echo has a live worker: no wake-up. parked has none: one, naming it.
        assert client.post("/v1/functions/echo/tasks", json={"input": 1}).status_code == 202
        assert client.post("/v1/functions/parked/tasks", json={"input": 1}).status_code == 202
        message = wait_until(lambda: pubsub.get_message(timeout=0.1), what="a demand message")
        assert message["data"] == b"parked"
        assert pubsub.get_message(timeout=0.3) is None
    finally:
        pubsub.close()
        redis.delete("rq:queue:runq.parked")
