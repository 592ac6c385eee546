"""A waiting request whose caller hangs up stops waiting at once, freeing its max_inflight slot.

ASGI tells a request of its closed connection only through ``receive()``, which a route that
has read its body no longer calls; a watcher task does, while the request waits. The watcher
starts only once the wait has lasted ``WATCH_AFTER_S``: a predict answered sooner (the hot
path) pays for a timer, not for a task.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

from runq.errors import ClientClosedRequest

# Long enough that a quick answer never starts a watcher, short enough that a stampede of
# callers who hang up frees its slots before the next callers notice.
WATCH_AFTER_S = 0.05


class HangUp:
    """Ends a wait's future with ClientClosedRequest when the caller's connection closes."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    def arm(self, future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(WATCH_AFTER_S, self._watch, loop, future)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def _watch(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self._watcher = loop.create_task(self._until_gone(future), name="runq-hangup")

    async def _until_gone(self, future: asyncio.Future[Any]) -> None:
        # A GET's empty body may still be unread: skip what is not the disconnect.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not future.done():
            future.set_exception(ClientClosedRequest("the caller closed its connection"))
