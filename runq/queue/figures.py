"""A function's live figures: queued and running tasks, live workers, the autoscaler's replicas.

One script reads them on the server's clock; the gateway (asyncio), ``runq status`` and the
autoscaler (sync) share its keys and the decoding of its reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from redis.client import Pipeline

from runq.queue import constants, lua

# KEYS[1..3] the function's queue lists (DEFAULT_TENANT's), KEYS[4] leases, KEYS[5] its live
# workers, KEYS[6] the autoscaler's replicas hash, KEYS[7] when a worker was last seen,
# KEYS[8] its tenants set
# Returns {queued, running (live leases), live workers, replicas desired, now, unserved}:
# queued counts every tenant's; desired false when no autoscaler manages the function;
# unserved, only when tasks are queued and no worker is live, is {last seen or false,
# created_at of each queue's oldest task}.
FIGURES = lua.script(
    """
local queues = {KEYS[1], KEYS[2], KEYS[3]}
for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[8])) do
  for q = 1, 3 do
    queues[#queues + 1] = KEYS[q] .. TENANT_SEPARATOR .. tenant
  end
end
local queued = 0
for _, queue in ipairs(queues) do
  queued = queued + redis.call('LLEN', queue)
end
local now = server_now()
local after_now = '(' .. tostring(now)
local running = redis.call('ZCOUNT', KEYS[4], after_now, '+inf')
local workers = redis.call('ZCOUNT', KEYS[5], after_now, '+inf')
local desired = redis.call('HGET', KEYS[6], DESIRED)
local unserved = {}
if queued > 0 and workers == 0 then
  unserved[1] = redis.call('GET', KEYS[7])
  for _, queue in ipairs(queues) do
    local oldest = redis.call('LINDEX', queue, 0)
    if oldest then
      unserved[#unserved + 1] = redis.call('HGET', JOB_PREFIX .. oldest, CREATED_AT) or ''
    end
  end
end
return {queued, running, workers, desired, tostring(now), unserved}
""",
    lua.SERVER_NOW,
    DESIRED=constants.REPLICAS_DESIRED_FIELD,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    CREATED_AT=constants.CREATED_AT_FIELD,
    TENANT_SEPARATOR=constants.TENANT_QUEUE_SEPARATOR,
)


@dataclass(frozen=True)
class FunctionFigures:
    queued: int
    running: int
    # Live workers (heartbeat fresh), and what the autoscaler wants when one manages the function.
    workers: int
    desired: int | None
    # How long queued tasks have had no live worker to take them; 0 while one is live.
    unserved_s: float = 0.0

    @property
    def replicas_current(self) -> int:
        """Workers whose heartbeat is fresh: a hung one (stopped, stuck holding the GIL) drops
        out within LEASE_TTL_S, however many processes the autoscaler counts as started."""
        return self.workers

    def stranded(self, cold_start_budget_s: float) -> bool:
        """Queued work that no worker took for longer than a cold start may take."""
        return self.unserved_s > cold_start_budget_s

    @classmethod
    def from_reply(cls, reply: list[Any]) -> FunctionFigures:
        queued, running, workers, desired, now, unserved = reply
        return cls(
            queued=queued,
            running=running,
            workers=workers,
            desired=None if desired is None else int(desired),
            unserved_s=_unserved_s(float(now), unserved),
        )


def _unserved_s(now: float, unserved: list[Any]) -> float:
    """Since the later of the last worker's heartbeat and the oldest queued task's creation."""
    if not unserved:
        return 0.0
    seen, *created = unserved
    since = [float(seen)] if seen is not None else []
    oldest = [_epoch(stamp) for stamp in created if stamp]
    if oldest:
        since.append(min(oldest))
    return max(now - max(since), 0.0) if since else 0.0


def _epoch(stamp: bytes) -> float:
    # RQ writes created_at as UTC ISO 8601 with a Z.
    return datetime.fromisoformat(stamp.decode()).replace(tzinfo=UTC).timestamp()


def keys(function: str) -> list[str]:
    return [
        *constants.queue_keys(function),
        constants.leases_key(function),
        constants.alive_key(function),
        constants.replicas_key(function),
        constants.seen_key(function),
        constants.tenants_key(function),
    ]


class Figures:
    """Reads functions' figures over a sync connection (in one pipeline for many)."""

    def __init__(self, connection: Redis) -> None:
        self._script = connection.register_script(FIGURES)

    def read(self, function: str) -> FunctionFigures:
        return FunctionFigures.from_reply(self._script(keys=keys(function)))

    def queue_read(self, pipe: Pipeline, function: str) -> None:
        """Adds the read to ``pipe``; its reply decodes with ``FunctionFigures.from_reply``."""
        self._script(keys=keys(function), client=pipe)


class AsyncFigures:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(FIGURES)

    async def read(self, function: str) -> FunctionFigures:
        return FunctionFigures.from_reply(await self._script(keys=keys(function)))


def publish_replicas(connection: Redis, function: str, desired: int) -> None:
    """The autoscaler's wanted replicas of a function, readable until it stops renewing them."""
    key = constants.replicas_key(function)
    with connection.pipeline() as pipe:
        pipe.hset(key, constants.REPLICAS_DESIRED_FIELD, desired)
        pipe.expire(key, constants.REPLICAS_TTL_S)
        pipe.execute()


def withdraw_replicas(connection: Redis, function: str) -> None:
    connection.delete(constants.replicas_key(function))
