"""A function's live figures: queued and running tasks, live workers, the autoscaler's replicas.

One script reads them on the server's clock; the gateway (asyncio), ``runq status`` and the
autoscaler (sync) share its keys and the decoding of its reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from redis.client import Pipeline

from runq.queue import constants, lua

# KEYS[1..3] the function's queue lists, KEYS[4] leases, KEYS[5] its live workers,
# KEYS[6] the autoscaler's replicas hash
# Returns {queued, running (live leases), live workers, replicas current, replicas desired}
# (the last two false when no autoscaler manages the function).
FIGURES = lua.script(
    """
local queued = redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2])
  + redis.call('LLEN', KEYS[3])
local now = '(' .. tostring(server_now())
local running = redis.call('ZCOUNT', KEYS[4], now, '+inf')
local workers = redis.call('ZCOUNT', KEYS[5], now, '+inf')
local replicas = redis.call('HMGET', KEYS[6], CURRENT, DESIRED)
return {queued, running, workers, replicas[1], replicas[2]}
""",
    lua.SERVER_NOW,
    CURRENT=constants.REPLICAS_CURRENT_FIELD,
    DESIRED=constants.REPLICAS_DESIRED_FIELD,
)


@dataclass(frozen=True)
class FunctionFigures:
    queued: int
    running: int
    # Live workers, and the autoscaler's view when one manages the function.
    workers: int
    current: int | None
    desired: int | None

    @property
    def replicas_current(self) -> int:
        """The autoscaler's count when one manages the function, else the live workers."""
        return self.workers if self.current is None else self.current

    @classmethod
    def from_reply(cls, reply: list[Any]) -> FunctionFigures:
        queued, running, workers, current, desired = reply
        return cls(
            queued=queued,
            running=running,
            workers=workers,
            current=None if current is None else int(current),
            desired=None if desired is None else int(desired),
        )


def keys(function: str) -> list[str]:
    return [
        *constants.queue_keys(function),
        constants.leases_key(function),
        constants.alive_key(function),
        constants.replicas_key(function),
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


def publish_replicas(connection: Redis, function: str, current: int, desired: int) -> None:
    """The autoscaler's view of a function, readable until it stops renewing it."""
    key = constants.replicas_key(function)
    with connection.pipeline() as pipe:
        pipe.hset(
            key,
            mapping={
                constants.REPLICAS_CURRENT_FIELD: current,
                constants.REPLICAS_DESIRED_FIELD: desired,
            },
        )
        pipe.expire(key, constants.REPLICAS_TTL_S)
        pipe.execute()


def withdraw_replicas(connection: Redis, function: str) -> None:
    connection.delete(constants.replicas_key(function))
