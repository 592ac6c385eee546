"""Server-sent events: a task's chunks and progress as its worker produces them.

A stream is chosen by ``Accept: text/event-stream`` (predict) or asked for by id
(``GET /v1/tasks/{id}/stream``). Events: ``chunk`` (``id:`` its index, ``data:`` its JSON),
``progress`` (``{fraction, message, at}``), then one ``end`` (the task JSON without its output)
or ``error`` (predict's ``{"error": {...}}`` body). A function that does not stream sends its
whole output as chunk 0 when it ends. ``Last-Event-ID: n`` resumes after chunk n.

Framing, pings and hang-ups are sse-starlette's. An open stream holds a subscription on the
gateway's shared pub/sub connection (``TaskWaiter.watch``) and borrows a pooled connection only
for each read: a thousand open streams do not open a thousand connections. A gateway that stops
ends its streams at once; a caller resumes on another with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.requests import Request

from runq.errors import NotFound, RunqError, Timeout, Unavailable
from runq.gateway.errors import ended_error
from runq.queue import chunks, constants
from runq.queue.store import TaskStore
from runq.queue.tasks import TERMINAL, TaskStatus, output_json, task_view
from runq.queue.waiter import TaskWaiter

logger = logging.getLogger("runq.gateway")

EVENT_STREAM = "text/event-stream"
# A comment line this often keeps proxies and load balancers from closing a quiet stream; the
# task is re-read as often (a safety net under the pub/sub notifications).
PING_INTERVAL_S = 15.0


def wants_stream(request: Request) -> bool:
    """Whether the caller asked for server-sent events (one header lookup: predict's hot path)."""
    accept = request.headers.get("accept")
    return accept is not None and EVENT_STREAM in accept


def sse(event: str, data: bytes, event_id: int | None = None) -> ServerSentEvent:
    return ServerSentEvent(
        data.decode(), event=event, id=None if event_id is None else str(event_id), sep="\n"
    )


def error_event(error: RunqError) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(error.to_body()), event="error", sep="\n")


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
) -> AsyncGenerator[ServerSentEvent, None]:
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
                        yield sse("chunk", entry.data, entry.index)
                    elif entry.index == after:
                        skipping = False
                elif not skipping:
                    yield sse("progress", entry.data)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait_s)


async def _ending(
    store: TaskStore, task: dict[str, Any], *, streams: bool, after: int
) -> AsyncGenerator[ServerSentEvent, None]:
    if task["status"] != TaskStatus.SUCCEEDED:
        yield error_event(ended_error(task))
        return
    if not streams and after < 0:
        ended = await store.read(task["id"], with_output=True)
        if ended is not None:
            ended = await store.with_output(ended)
            yield sse("chunk", output_json(ended.get("output")), 0)
    yield sse("end", json.dumps(task).encode())


def event_stream(
    events: AsyncGenerator[ServerSentEvent, None],
    headers: dict[str, str],
    *,
    hung_up: Callable[[], Awaitable[None]] | None = None,
    done: Callable[[], object],
) -> EventSourceResponse:
    """An SSE answer: ``events`` sent as they come, ``hung_up`` awaited if the caller closes the
    connection first, ``done`` called at the end whatever happened (a HEAD never starts
    ``events``, so it is the background task too; it must bear being called twice)."""

    async def closed(_: object) -> None:
        if hung_up is not None:
            await hung_up()

    return EventSourceResponse(
        _guarded(events, done),
        headers=headers,
        ping=PING_INTERVAL_S,
        sep="\n",
        client_close_handler_callable=closed,
        background=BackgroundTask(done),
    )


async def _guarded(
    events: AsyncGenerator[ServerSentEvent, None], done: Callable[[], object]
) -> AsyncGenerator[ServerSentEvent, None]:
    """``events``, ended by an error event instead of an exception."""
    try:
        async for event in events:
            yield event
    except RunqError as exc:
        yield error_event(exc)
    except (RedisError, OSError) as exc:
        logger.warning("stream lost the queue store: %s", exc)
        yield error_event(Unavailable("the queue store is unreachable"))
    except Exception:
        # The log keeps the traceback; the stream never does.
        logger.exception("unhandled error in a stream")
        yield error_event(RunqError("internal error; see the gateway log"))
    finally:
        await events.aclose()
        done()
