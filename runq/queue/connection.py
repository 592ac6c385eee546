"""runq's Redis clients, whose connections pack commands with hiredis as they are.

An admission is one EVALSHA of some 60 arguments, a batch's record one of some 50. redis-py's
asyncio connections packed them in Python, argument by argument, at about nine times hiredis's
cost (benchmarks/run.py --only echo, gateway µs per request); since 8.2 both its sync and asyncio
connections use hiredis, but pass every argument through their encoder first, which still cost a
tenth of a gateway's time under load (cProfile). hiredis's own packer takes the arguments as
they are, and refuses what the encoder would.

The gateway's pool: a pooled connection that a Redis restart closed fails its next command;
that command is tried once more on a fresh connection, so no caller sees the stale one.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, DataError

# Enough for every concurrent enqueue and read of one process; waiters hold no connection.
POOL_SIZE = 32
POOL_WAIT_S = 5.0


class HiredisPacker:
    """A command as hiredis packs it; redis-py's connections take one as their packer."""

    def pack(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:
            # redis-py names some commands in two words ("SCRIPT LOAD"): two arguments.
            args = (*command.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


_PACKER = HiredisPacker()


def sync_redis(url: str, **kwargs: Any) -> Redis:
    """A blocking client (workers, the autoscaler, the webhook sender, the CLI)."""
    return Redis.from_url(url, command_packer=_PACKER, **kwargs)


def async_redis(url: str) -> aioredis.Redis:
    """The gateway's client: one bounded pool per process."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        # Only a closed connection: a timeout may have run the command, and an admission
        # must not run twice.
        retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
    )
    # The URL chose the transport (TCP, TLS or a unix socket); packing is the same for all.
    # redis-py's asyncio connections take no packer: theirs is replaced in a subclass.
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def _hiredis_packing(transport: type[AbstractConnection]) -> type[AbstractConnection]:
    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        return _PACKER.pack(*args)

    return type(f"Hiredis{transport.__name__}", (transport,), {"pack_command": pack_command})
