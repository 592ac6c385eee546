"""The gateway's Redis client: a bounded pool whose connections pack commands with hiredis.

redis-py's sync connections pack commands with hiredis when it is installed (runq requires it);
its asyncio ones always pack in Python, argument by argument. An admission is one EVALSHA of
some 60 arguments, so on the gateway's hot path that packer cost about nine times hiredis's
(benchmarks/run.py --only echo, gateway µs per request).

A pooled connection that a Redis restart closed fails its next command; that command is tried
once more on a fresh connection, so no caller sees the stale one.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError

# Enough for every concurrent enqueue and read of one process; waiters hold no connection.
POOL_SIZE = 32
POOL_WAIT_S = 5.0


def async_redis(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        # Only a closed connection: a timeout may have run the command, and an admission
        # must not run twice.
        retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
    )
    # The URL chose the transport (TCP, TLS or a unix socket); packing is the same for all.
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def _hiredis_packing(transport: type[AbstractConnection]) -> type[AbstractConnection]:
    packer = HiredisRespSerializer()

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        packed: list[bytes] = packer.pack(*args)
        return packed

    return type(f"Hiredis{transport.__name__}", (transport,), {"pack_command": pack_command})
