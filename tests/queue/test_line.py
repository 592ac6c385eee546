"""A worker's own connection for its per-batch commands, against a real Valkey."""

from __future__ import annotations

import pytest
from redis import Redis
from redis.exceptions import ConnectionError, ResponseError

from runq.embedded import EmbeddedValkey
from runq.queue.connection import sync_redis
from runq.queue.line import Line
from tests.helpers import free_port


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
