"""The gateway's Redis client: a bounded pool that rides through a Redis restart.

Its connections pack commands with hiredis: redis-py's asyncio connections do so since 8.2
(runq requires it, and hiredis). Before, they packed in Python, argument by argument, and an
admission's EVALSHA of some 60 arguments cost about nine times as much gateway CPU
(benchmarks/run.py --only echo, gateway µs per request).

A pooled connection that a Redis restart closed fails its next command; that command is tried
once more on a fresh connection, so no caller sees the stale one.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
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
    return aioredis.Redis.from_pool(pool)
