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

import hashlib
from collections.abc import Sequence
from typing import Any

from redis import Redis
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
