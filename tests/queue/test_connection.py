"""runq's Redis clients pack commands with hiredis and still say what redis-py says."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import UnixDomainSocketConnection
from redis.exceptions import DataError

from runq.embedded import EmbeddedValkey
from runq.queue.connection import HiredisPacker, async_redis, sync_redis
from tests.helpers import free_port


def test_values_of_every_kind_go_and_come_back_as_redis_py_sends_them(valkey_url: str) -> None:
    async def scenario() -> list[object]:
        redis = async_redis(valkey_url)
        try:
            values = {"s": "héllo wörld", "b": b"\x00\xff", "i": 10**30, "f": 0.1, "e": ""}
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset("test:packing", mapping=values)
                pipe.hmget("test:packing", list(values))
                pipe.delete("test:packing")
                replies: list[object] = await pipe.execute()
            with pytest.raises(DataError):
                await redis.set("test:packing", True)  # type: ignore[arg-type]
            return replies
        finally:
            await redis.aclose()

    replies = asyncio.run(scenario())
    assert replies[1] == ["héllo wörld".encode(), b"\x00\xff", b"1" + b"0" * 30, b"0.1", b""]


def test_a_blocking_client_packs_as_the_gateways_does(valkey_url: str) -> None:
    with sync_redis(valkey_url) as redis:
        values = {"s": "héllo wörld", "b": b"\x00\xff", "i": 10**30, "f": 0.1, "e": ""}
        with redis.pipeline(transaction=False) as pipe:
            pipe.hset("test:sync-packing", mapping=values)
            pipe.hmget("test:sync-packing", list(values))
            pipe.delete("test:sync-packing")
            replies = pipe.execute()
        assert replies[1] == ["héllo wörld".encode(), b"\x00\xff", b"1" + b"0" * 30, b"0.1", b""]
        assert redis.script_load("return 1")  # a command redis-py names in two words
        with pytest.raises(DataError):
            redis.set("test:sync-packing", True)  # type: ignore[arg-type]
        assert isinstance(redis.connection_pool.connection_kwargs["command_packer"], HiredisPacker)


def test_the_url_still_chooses_the_transport() -> None:
    redis = async_redis("unix:///tmp/runq-no-such.sock")
    assert issubclass(redis.connection_pool.connection_class, UnixDomainSocketConnection)


def test_connections_a_redis_restart_closed_are_replaced_before_anyone_sees_them() -> None:
    port = free_port()
    valkey = EmbeddedValkey(port=port)
    valkey.start()

    async def scenario() -> list[object]:
        redis = async_redis(valkey.url)
        try:
            # Concurrent, so the pool opens (and then holds) a connection for each.
            assert await asyncio.gather(*(redis.ping() for _ in range(8))) == [True] * 8
            assert len(redis.connection_pool._available_connections) == 8
            restart()
            return list(await asyncio.gather(*(redis.ping() for _ in range(8))))
        finally:
            await redis.aclose()

    def restart() -> None:
        nonlocal valkey
        valkey.stop()
        valkey = EmbeddedValkey(port=port)
        valkey.start()

    try:
        assert asyncio.run(scenario()) == [True] * 8
    finally:
        valkey.stop()
