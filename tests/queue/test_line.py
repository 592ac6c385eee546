"""The connections of their own that a worker's per-batch commands and a gateway's admissions
go over, against a real Valkey."""

from __future__ import annotations

import asyncio

import pytest
from redis import Redis
from redis.exceptions import ConnectionError, ResponseError

from runq.embedded import EmbeddedValkey
from runq.queue.connection import async_redis, sync_redis
from runq.queue.line import AsyncLine, Line
from tests.helpers import free_port, wait_until


def test_a_script_the_server_lost_is_loaded_again(redis: Redis) -> None:
    line = Line(redis)
    script = line.script("return ARGV[1] .. KEYS[1]")
    assert script(keys=["k"], args=["v"]) == b"vk"
    redis.script_flush()
    assert script(keys=["k"], args=["w"]) == b"wk"


def test_an_error_reply_is_raised_and_the_line_goes_on_on_its_connection(redis: Redis) -> None:
    line = Line(redis)
    before = line("CLIENT", "ID")
    with pytest.raises(ResponseError):
        line.script("return redis.error_reply('no')")()
    assert line("CLIENT", "ID") == before


def test_a_line_the_server_closed_while_it_was_idle_connects_again(redis: Redis) -> None:
    line = Line(redis)
    before = line("CLIENT", "ID")
    redis.client_kill_filter(_id=before)
    assert line("PING") == b"PONG"
    assert line("CLIENT", "ID") != before


def test_a_line_whose_server_restarted_connects_again() -> None:
    port = free_port()
    valkey = EmbeddedValkey(port=port)
    valkey.start()
    try:
        with sync_redis(valkey.url) as redis:
            line = Line(redis)
            assert line("PING") == b"PONG"
            valkey.stop()
            with pytest.raises(ConnectionError):
                line("PING")
            valkey = EmbeddedValkey(port=port)
            valkey.start()
            assert line("PING") == b"PONG"
    finally:
        valkey.stop()


def test_an_async_line_gives_each_caller_its_own_replies(valkey_url: str, redis: Redis) -> None:
    gate = "test:line:gate"
    redis.delete(gate)

    async def scenario() -> None:
        client = async_redis(valkey_url)
        line = AsyncLine(client)
        try:

            async def echo(i: int) -> list[object]:
                return await line([("ECHO", f"{i}"), ("ECHO", f"{i}b")])

            # Held behind a blocking pop, every call is in flight at once.
            held = asyncio.create_task(line([("BLPOP", gate, 10)]))
            calls = [asyncio.create_task(echo(i)) for i in range(300)]
            await asyncio.to_thread(
                wait_until, lambda: len(line._waiting) == 601, 10, "every call in flight"
            )
            # A caller that goes away keeps its place: the others still get their own replies.
            calls[7].cancel()
            redis.rpush(gate, "go")
            assert await held == [[gate.encode(), b"go"]]
            done = await asyncio.gather(*calls, return_exceptions=True)
            for i, replies in enumerate(done):
                if i != 7:
                    assert replies == [f"{i}".encode(), f"{i}b".encode()]
            errors = await line([("PING",), ("NO-SUCH-COMMAND",), ("PING",)])
            assert errors[0] == errors[2] == b"PONG"
            assert isinstance(errors[1], ResponseError)
        finally:
            await line.aclose()
            await client.aclose()

    asyncio.run(scenario())


def test_an_async_line_the_server_closed_fails_its_calls_and_opens_again(
    valkey_url: str, redis: Redis
) -> None:
    async def scenario() -> None:
        client = async_redis(valkey_url)
        line = AsyncLine(client)
        try:
            (before,) = await line([("CLIENT", "ID")])
            blocked = asyncio.create_task(line([("BLPOP", "test:line:never", 30)]))
            await asyncio.to_thread(
                wait_until,
                lambda: any(c["cmd"] == "blpop" for c in redis.client_list()),
                10,
                "the pop to block",
            )
            redis.client_kill_filter(_id=before)
            with pytest.raises(ConnectionError):
                await blocked
            (after,) = await line([("CLIENT", "ID")])
            assert after != before
        finally:
            await line.aclose()
            await client.aclose()

    asyncio.run(scenario())
