"""Waiting costs a future, not a thread or a Redis connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from redis import Redis

from tests.helpers import PARKED_QUEUE, Proc, start_worker, wait_until

WAITERS = 1000


def test_a_thousand_waiters_use_a_bounded_number_of_connections(
    gateway: str, procs: Callable[..., Proc], redis: Redis
) -> None:
    redis.delete(PARKED_QUEUE)
    # Connections that exist before the burst: workers, the suite's own, the gateway's so far.
    before = {c["id"] for c in redis.client_list()}

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=WAITERS)
        async with httpx.AsyncClient(base_url=gateway, timeout=60, limits=limits) as http:
            calls = [
                asyncio.create_task(
                    http.post("/v1/functions/parked/predict?timeout=30", json={"input": i})
                )
                for i in range(WAITERS)
            ]
            await asyncio.to_thread(
                wait_until, lambda: redis.llen(PARKED_QUEUE) == WAITERS, 30, "every task queued"
            )
            # Every request is now waiting on its task: count what the gateway holds.
            opened = [c for c in redis.client_list() if c["id"] not in before]
            assert len(opened) <= 40, [c["cmd"] for c in opened]
            worker = await asyncio.to_thread(start_worker, procs, redis, "parked")
            try:
                return await asyncio.gather(*calls)
            finally:
                await asyncio.to_thread(worker.stop)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * WAITERS
    assert sorted(r.json()["output"] for r in responses) == list(range(WAITERS))
