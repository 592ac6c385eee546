"""A connection of its own for a worker's per-batch commands: the wait for work, the claim and
the record.

redis-py's client runs each command through its pool, retry, health-check and event machinery:
about 60-70 µs of client CPU per command here against 33-40 µs for the same command sent and
read on a connection held for the purpose. A worker sends three per batch, and a lone predict
waits on two of them. What redis-py's client gives that is wanted here stays: the connection
connects again on the next command after one that failed, or after the server closed it while it
sat idle (the check redis-py's pool makes when it hands a connection out), and a script the
server lost (a restart, SCRIPT FLUSH) is loaded again, as redis-py's Script does. Nothing is
sent twice on its own: a claim whose reply was lost is sent again by Claim, under its token.

One thread only: a worker's main loop. Anything else of the worker uses the shared client.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from redis.asyncio.connection import AbstractConnection as AsyncConnection
from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError


class Line:
    def __init__(self, redis: Redis) -> None:
        # Held for the worker's life; the pool still closes it when the client is closed.
        self._connection = redis.connection_pool.get_connection()

    def __call__(self, *args: Any) -> Any:
        """Sends a command and reads its reply; an error reply is raised, as redis-py does."""
        connection = self._connection
        if connection.is_connected and _stale(connection):
            connection.disconnect()
        try:
            connection.send_command(*args)
            return connection.read_response()
        except ResponseError:
            # An error reply, read: the connection is in step.
            raise
        except BaseException:
            # Sending and reading disconnect on their own failures; this is for the moment
            # between the two (an interruption), whose reply, left unread, would answer the
            # next command.
            connection.disconnect()
            raise

    def script(self, source: str) -> LineScript:
        return LineScript(self, source)


def _stale(connection: AbstractConnection) -> bool:
    """What redis-py's pool checks before it hands a connection out: one that the server (or
    a proxy) closed while it sat idle, for its `timeout` or a restart, reads as ready or
    closed."""
    try:
        return bool(connection.can_read())
    except (ConnectionError, OSError):
        return True


class LineScript:
    """A Lua script run with EVALSHA on a line, loaded again if the server lost it."""

    def __init__(self, line: Line, source: str) -> None:
        self._line = line
        self._source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return self._line("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self._line("SCRIPT", "LOAD", self._source)
            return self._line("EVALSHA", self.sha, len(keys), *keys, *args)


class AsyncLine:
    """A gateway process's admissions on one connection of their own, which every coroutine
    of the process shares: commands go out in the order they are sent, Redis answers in that
    order, and one reader hands each reply to its caller. An admission skips redis-py's pool
    checkout and release and its retry and event hooks, the largest part of the client's cost
    of a lone predict (cProfile). A failed connection fails the calls waiting on it and is
    opened again by the next call; nothing is sent twice."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pool = redis.connection_pool
        self._connection: AsyncConnection | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()

    async def __call__(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Sends the commands at once; their replies, an error reply as its exception."""
        connection = await self._open()
        loop = asyncio.get_running_loop()
        replies = [loop.create_future() for _ in commands]
        # No await from the reader's check in _open to the write below: the replies are
        # queued in the order the commands go out.
        self._waiting.extend(replies)
        try:
            packed = connection.pack_commands(commands)
            await connection.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            self._broken(exc)
            raise
        return [await reply for reply in replies]

    async def aclose(self) -> None:
        self._broken(ConnectionError("closed"))
        if self._connection is not None:
            await self._connection.disconnect()

    async def _open(self) -> AsyncConnection:
        async with self._opening:
            if self._connection is None:
                self._connection = await self._pool.get_connection()
            elif self._reader is None:
                # Failed: a reply left in it must not answer a later command.
                await self._connection.disconnect(nowait=True)
            if self._reader is None:
                await self._connection.connect()
                self._reader = asyncio.create_task(self._read(self._connection))
            return self._connection

    async def _read(self, connection: AsyncConnection) -> None:
        while True:
            try:
                reply = await connection.read_response(timeout=math.inf)
            except ResponseError as exc:
                reply = exc
            except Exception as exc:
                self._broken(exc)
                return
            waiting = self._waiting.popleft()
            # A caller that went away (its request cancelled) still held its place.
            if not waiting.done():
                waiting.set_result(reply)

    def _broken(self, exc: BaseException) -> None:
        failed = ConnectionError(f"the admissions' connection failed: {exc}")
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.done():
                waiting.set_exception(failed)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
