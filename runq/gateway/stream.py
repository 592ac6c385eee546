"""Server-sent events: a task's chunks and progress as its worker produces them.

A stream is chosen by ``Accept: text/event-stream`` (predict) or asked for by id
(``GET /v1/tasks/{id}/stream``). Events: ``chunk`` (``id:`` its index, ``data:`` its JSON),
``progress`` (``{fraction, message, at}``), then one ``end`` (the task JSON without its output)
or ``error`` (predict's ``{"error": {...}}`` body). A function that does not stream sends its
whole output as chunk 0 when it ends. ``Last-Event-ID: n`` resumes after chunk n.

The framing is three fields of one line each, so a few lines of formatting do; runq's JSON has
no raw newline, so each event's data is one ``data:`` line. An open stream holds a subscription
on the gateway's shared pub/sub connection (``TaskWaiter.watch``) and borrows a pooled
connection only for each read: a thousand open streams do not open a thousand connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from runq.errors import NotFound, RunqError, Timeout, Unavailable
from runq.gateway.errors import ended_error
from runq.queue import chunks, constants
from runq.queue.store import TaskStore
from runq.queue.tasks import TERMINAL, TaskStatus, output_json, task_view
from runq.queue.waiter import TaskWaiter

logger = logging.getLogger("runq.gateway")

EVENT_STREAM = "text/event-stream"
# A comment line this often keeps proxies and load balancers from closing a quiet stream, and
# re-reads the task (a safety net under the pub/sub notifications).
PING_INTERVAL_S = 15.0
_PING = b": ping\n\n"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def wants_stream(request: Request) -> bool:
    """Whether the caller asked for server-sent events (one header lookup: predict's hot path)."""
    accept = request.headers.get("accept")
    return accept is not None and EVENT_STREAM in accept


def sse(event: bytes, data: bytes, event_id: int | None = None) -> bytes:
    head = b"event: " + event + b"\n"
    if event_id is not None:
        head += b"id: %d\n" % event_id
    return head + b"data: " + data + b"\n\n"


def error_event(error: RunqError) -> bytes:
    return sse(b"error", json.dumps(error.to_body()).encode())


# Called when a predict's stream reaches its timeout with the task not ended: withdraws it if it
# never started, and says what became of it.
GiveUp = Callable[[dict[str, Any]], Awaitable[str]]


async def relay(
    store: TaskStore,
    waiter: TaskWaiter,
    task_id: str,
    *,
    after: int = -1,
    streams: bool = True,
    deadline: float | None = None,
    give_up: GiveUp | None = None,
) -> AsyncGenerator[bytes, None]:
    """The task's events from the start of its stream, leaving out chunks up to ``after`` and
    what came before them; ends with its end or error, or a timeout at ``deadline`` (the loop's
    clock)."""
    loop = asyncio.get_running_loop()
    # Until the chunk named by `after` has gone by, what precedes it was sent already.
    skipping = after >= 0
    cursor: bytes | None = None
    async with waiter.watch(task_id) as changed:
        while True:
            changed.clear()
            read = await chunks.read(store.redis, task_id, cursor)
            if not read.fields or not constants.is_runq_queue(
                read.fields.get(b"origin", b"").decode()
            ):
                yield error_event(NotFound(f"task {task_id} was deleted", task_id=task_id))
                return
            for entry in read.entries:
                cursor = entry.entry_id
                if entry.kind == constants.CHUNK_KIND:
                    if entry.index > after:
                        skipping = False
                        after = entry.index
                        yield sse(b"chunk", entry.data, entry.index)
                    elif entry.index == after:
                        skipping = False
                elif not skipping:
                    yield sse(b"progress", entry.data)
            if read.more:
                continue
            task = task_view(task_id, read.fields)
            if task["status"] in TERMINAL:
                async for event in _ending(store, task, streams=streams, after=after):
                    yield event
                return
            wait_s = PING_INTERVAL_S
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    assert give_up is not None
                    message = await give_up(task)
                    yield error_event(Timeout(message, task_id=task_id))
                    return
                wait_s = min(wait_s, left)
            try:
                await asyncio.wait_for(changed.wait(), wait_s)
            except TimeoutError:
                yield _PING


async def _ending(
    store: TaskStore, task: dict[str, Any], *, streams: bool, after: int
) -> AsyncGenerator[bytes, None]:
    if task["status"] != TaskStatus.SUCCEEDED:
        yield error_event(ended_error(task))
        return
    if not streams and after < 0:
        ended = await store.read(task["id"], with_output=True)
        if ended is not None:
            ended = await store.with_output(ended)
            yield sse(b"chunk", output_json(ended.get("output")), 0)
    yield sse(b"end", json.dumps(task).encode())


class EventStream(Response):
    """An SSE answer: ``events`` sent as they come, ``hung_up`` awaited if the caller closes
    the connection first, ``done`` called at the end whatever happened."""

    media_type = EVENT_STREAM

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        headers: dict[str, str],
        *,
        hung_up: Callable[[], Awaitable[None]] | None = None,
        done: Callable[[], object] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({**_HEADERS, **headers})
        self._events = events
        self._hung_up = hung_up
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.create_task(self._pump(send), name="runq-stream")
            gone = asyncio.create_task(_disconnected(receive), name="runq-stream-hangup")
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            hung_up = gone.done() and not pump.done()
            for task in (pump, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if hung_up and self._hung_up is not None:
                await self._hung_up()
        finally:
            await self._events.aclose()
            if self._done is not None:
                self._done()

    async def _pump(self, send: Send) -> None:
        try:
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except RunqError as exc:
            await _send_last(send, error_event(exc))
            return
        except (RedisError, OSError) as exc:
            logger.warning("stream lost the queue store: %s", exc)
            await _send_last(send, error_event(Unavailable("the queue store is unreachable")))
            return
        except Exception:
            # The log keeps the traceback; the stream never does.
            logger.exception("unhandled error in a stream")
            internal = RunqError("internal error; see the gateway log")
            await _send_last(send, error_event(internal))
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_last(send: Send, event: bytes) -> None:
    await send({"type": "http.response.body", "body": event, "more_body": False})


async def _disconnected(receive: Receive) -> None:
    # A GET's empty body may still be unread: skip what is not the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
