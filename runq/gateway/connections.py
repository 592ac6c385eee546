"""The gateway's HTTP protocol: uvicorn's httptools one, bounded before a request is under way.

httptools buffers a request line and headers whole and waits for them forever, and uvicorn
accepts connections until the process runs out of file descriptors (then it resets every new
one). This protocol answers 431 past ``max_header_bytes``, closes a connection that has not
sent its headers ``header_timeout_s`` after it opened or after its previous answer, and keeps
at most ``max_connections`` open: past it the connection idle the longest (one with no request
under way, as a half-open one) is closed to make room, and only when none is idle is the
newcomer answered 503.

Idle connections sit in one ordered map per process, longest idle first, so the deadline and
the cap cost O(1) a request; one timer sweeps the map while it is not empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from runq.errors import HeadersTooLarge, Overloaded, RunqError
from runq.gateway.limits import OVERLOADED_RETRY_AFTER_S, send_error
from runq.settings import Settings

logger = logging.getLogger("runq.gateway")

# For uvicorn's `http` option: the import string its worker processes can load.
PROTOCOL = "runq.gateway.connections:GuardedHttpTools"
# File descriptors a gateway process needs beside its connections: Valkey's, the listening
# socket, logs, the metrics directory.
FD_HEADROOM = 256
# The longest a sweep waits: a deadline is kept within this (or a quarter of it, if shorter).
SWEEP_MAX_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_s, settings.max_connections)


class _Idle:
    """The process's connections with no request under way, longest idle first."""

    def __init__(self) -> None:
        self.limits = ConnectionLimits.of(Settings.model_validate({}))
        self.since: OrderedDict[GuardedHttpTools, float] = OrderedDict()
        self.sweeper: asyncio.TimerHandle | None = None

    def add(self, connection: GuardedHttpTools, loop: asyncio.AbstractEventLoop) -> None:
        self.since.pop(connection, None)
        self.since[connection] = loop.time()
        if self.sweeper is None:
            self.sweeper = loop.call_later(self._interval(), self._sweep, loop)

    def discard(self, connection: GuardedHttpTools) -> None:
        self.since.pop(connection, None)

    def close_oldest(self) -> bool:
        """Closes the connection idle the longest; False when none is idle."""
        if not self.since:
            return False
        connection, _ = self.since.popitem(last=False)
        connection.transport.close()
        return True

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = loop.time() - self.limits.header_timeout_s
        while self.since and next(iter(self.since.values())) <= deadline:
            self.close_oldest()
        self.sweeper = loop.call_later(self._interval(), self._sweep, loop) if self.since else None

    def _interval(self) -> float:
        return min(SWEEP_MAX_INTERVAL_S, self.limits.header_timeout_s / 4)


_idle = _Idle()


def configure(settings: Settings) -> None:
    """Sets this process's limits; the protocol is built by uvicorn, which cannot pass them."""
    _idle.limits = ConnectionLimits.of(settings)


class GuardedHttpTools(HttpToolsProtocol):
    # Bytes of the request line and headers received so far; None once they are complete.
    _header_bytes: int | None = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > _idle.limits.max_connections and not _idle.close_oldest():
            # Every other connection has a request under way: this one is told to retry.
            self.app = _overloaded
        _idle.add(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        _idle.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_bytes is not None:
            # An upper bound: the chunk may hold the start of the body too.
            self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._header_bytes is not None
            and self._header_bytes > _idle.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            # Still no end to the headers: httptools would buffer them on and on.
            self._refuse(_too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_bytes is None:
            # Pipelined behind a request under way: counted from the next chunk on.
            self._header_bytes = 0

    def on_headers_complete(self) -> None:
        _idle.discard(self)
        limit = _idle.limits.max_header_bytes
        if (self._header_bytes or 0) > limit and self._exact_header_bytes() > limit:
            # The request is whole: refused through uvicorn's own answer, which closes.
            self.app = _headers_too_large
        self._header_bytes = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Not when a pipelined request is under way already.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._header_bytes = 0
            _idle.add(self, self.loop)

    def _exact_header_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse(self, error: RunqError) -> None:
        """Answers before the app has seen the request, then closes the connection."""
        body = json.dumps(error.to_body()).encode()
        head = [
            STATUS_LINE[error.status_code],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def _too_large() -> HeadersTooLarge:
    limit = _idle.limits.max_header_bytes
    return HeadersTooLarge(f"the request line and headers are over max_header_bytes ({limit})")


async def _headers_too_large(scope: Scope, receive: Receive, send: Send) -> None:
    await send_error(send, _too_large())


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    message = (
        f"this gateway process has {_idle.limits.max_connections} connections open, each with "
        "a request under way (max_connections); retry shortly"
    )
    await send_error(send, Overloaded(message, retry_after_s=OVERLOADED_RETRY_AFTER_S))


def raise_open_files_limit(max_connections: int) -> None:
    """Raises the soft limit on open files to what max_connections needs, up to the hard one:
    past the limit, the kernel resets every new connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    allowed = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if allowed > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
    if allowed < wanted:
        logger.warning(
            "open files are limited to %d (the hard limit of ulimit -n): fewer than "
            "max_connections (%d) can be open; raise the limit or lower max_connections",
            allowed,
            max_connections,
        )
