"""Limits that protect a gateway process: request body size, and how many callers may wait."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runq.errors import BadRequest, Overloaded, PayloadTooLarge, RunqError

# A waiting request holds little (a future, an open socket), but a gateway that accepts them
# without bound is one that runs out of sockets and memory under a stampede.
OVERLOADED_RETRY_AFTER_S = 1


class InflightLimit:
    """Caps the requests one gateway process holds while they wait for tasks to end.

    The event loop is single-threaded, so a plain counter is exact.
    """

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.waiting = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.waiting >= self.max_inflight:
            raise Overloaded(
                f"this gateway process already has {self.max_inflight} requests waiting "
                "(max_inflight); retry shortly or submit a background task",
                retry_after_s=OVERLOADED_RETRY_AFTER_S,
            )
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await send_error(send, BadRequest("Content-Length is not a number"))
            return
        if declared is not None and declared > self.max_body_bytes:
            await send_error(send, self._too_large())
            return

        received = 0
        answered = False

        async def limited_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    answered = True
                    await send_error(send, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is over max_body_bytes ({self.max_body_bytes})")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else -1
    return None


async def send_error(send: Send, error: RunqError) -> None:
    """Answers ``error`` and closes the connection, whose request may not have been read."""
    body = json.dumps(error.to_body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
