"""A connection of its own for a worker's per-batch commands: the wait for work, the claim and
the record.

redis-py's client runs each command through its pool, retry, health-check and event machinery:
about 60-70 µs of client CPU per command here against 33-40 µs for the same command sent and
read on a connection held for the purpose. A worker sends three per batch, and a lone predict
waits on two of them. What redis-py's client gives that is wanted here stays: its connection
connects again on the next command after one that failed (it disconnects on any error), and
a script the server lost (a restart, SCRIPT FLUSH) is loaded again, as redis-py's Script does.

One thread only: a worker's main loop. Anything else of the worker uses the shared client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis.exceptions import NoScriptError, ResponseError


class Line:
    def __init__(self, redis: Redis) -> None:
        # Held for the worker's life; the pool still closes it when the client is closed.
        self._connection = redis.connection_pool.get_connection()

    def __call__(self, *args: Any) -> Any:
        """Sends a command and reads its reply; an error reply is raised, as redis-py does."""
        try:
            self._connection.send_command(*args)
            return self._connection.read_response()
        except ResponseError:
            # An error reply, read: the connection is in step.
            raise
        except BaseException:
            # The connection failed, or the call was interrupted between the command and its
            # reply, which left unread would answer the next command.
            self._connection.disconnect()
            raise

    def script(self, source: str) -> LineScript:
        return LineScript(self, source)


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
