"""The gateway's side of the queue: admit, read, cancel and delete tasks (asyncio Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis import Redis
from rq.job import JobStatus
from rq.utils import now, utcformat

from runq import storage
from runq.errors import Gone, IdempotencyConflict, QueueFull
from runq.queue import constants as k
from runq.queue import scripts
from runq.queue.tasks import (
    DEADLINE_FIELD,
    INPUT_REF_FIELD,
    OUTPUT_REF,
    OUTPUT_REF_FIELD,
    TaskStatus,
    deadline_passed_error,
    field_text,
    new_job_fields,
    queued_view,
    result_output,
    task_view,
    text,
)
from runq.settings import FunctionSettings
from runq.storage import ObjectStore


def new_task_id() -> str:
    """128 random bits, URL-safe: unguessable, so a task id is also its read capability."""
    return secrets.token_urlsafe(16)


# Retry-After bounds when a queue is full: at least a second, never so long that a caller gives
# up on a queue that drains; with no drain seen (no worker yet) a cold start is a few seconds.
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60
RETRY_AFTER_NO_DRAIN_S = 5


def retry_after_s(drain_rate: float, max_queue: int) -> int:
    """Seconds until the full queue has drained by half at the recent drain rate.

    Half, not one slot: callers told to come back when a single slot frees all come back at
    once and find the queue full again.
    """
    if drain_rate <= 0.01:
        return RETRY_AFTER_NO_DRAIN_S
    estimate = math.ceil(max_queue / 2 / drain_rate)
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, estimate))


@dataclass(frozen=True)
class Admission:
    """How a task asks to be run; ``body_digest`` identifies the request for idempotency."""

    priority: str = k.DEFAULT_PRIORITY
    # Seconds from admission: start by (else timed_out, never run) and end by.
    start_within_s: float | None = None
    finish_within_s: float | None = None
    reply_to: str | None = None
    idempotency_key: str | None = None
    body_digest: str = ""
    # Checked already (runq.webhooks.check_url).
    webhook: str | None = None


@dataclass(frozen=True)
class Admitted:
    task_id: str
    # True when an Idempotency-Key named a task that already existed; `task` is then None and
    # the caller reads or waits on it.
    replayed: bool
    task: dict[str, Any] | None


@dataclass(frozen=True)
class FunctionFigures:
    queued: int
    running: int
    # Live workers, and the autoscaler's view when one manages the function.
    workers: int
    current: int | None
    desired: int | None

    @property
    def replicas_current(self) -> int:
        """The autoscaler's count when one manages the function, else the live workers."""
        return self.workers if self.current is None else self.current

    @classmethod
    def from_reply(cls, reply: list[Any]) -> FunctionFigures:
        queued, running, workers, current, desired = reply
        return cls(
            queued=queued,
            running=running,
            workers=workers,
            current=None if current is None else int(current),
            desired=None if desired is None else int(desired),
        )


class TaskStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        redis_url: str,
        *,
        objects: ObjectStore,
        inline_max_bytes: int,
        idempotency_ttl_s: int = 86_400,
    ) -> None:
        self.redis = redis
        self.objects = objects
        self.inline_max_bytes = inline_max_bytes
        self.idempotency_ttl_s = idempotency_ttl_s
        # RQ's Job wants a connection object to build a job; it never does I/O with it here.
        self._job_connection = Redis.from_url(redis_url)
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._delete = redis.register_script(scripts.DELETE)
        self._figures = redis.register_script(scripts.FIGURES)

    async def enqueue(
        self,
        function: str,
        settings: FunctionSettings,
        payload: Any,
        admission: Admission,
        *,
        task_id: str | None = None,
    ) -> Admitted:
        """Admits a task under the queue cap, or finds the task its idempotency key names."""
        task_id = task_id or new_task_id()
        input_ref = await self._store_if_big(storage.input_key(function, task_id), payload)
        fields = new_job_fields(
            function=function,
            settings=settings,
            task_id=task_id,
            payload=payload,
            priority=admission.priority,
            reply_to=admission.reply_to,
            connection=self._job_connection,
            input_ref=input_ref,
            webhook=admission.webhook,
        )
        keys = [
            k.queue_key(k.queue_name(function, admission.priority)),
            k.job_key(task_id),
            k.RQ_QUEUES_KEY,
            *k.queue_keys(function),
            k.wake_key(function),
            k.drain_key(function),
            k.alive_key(function),
        ]
        if admission.idempotency_key is not None:
            keys.append(k.idempotency_key(function, _digest(admission.idempotency_key)))
        flat: list[Any] = []
        for name, value in fields.items():
            flat += (name, value)
        outcome, value = await self._enqueue(
            keys=keys,
            args=[
                settings.max_queue,
                task_id,
                k.DRAIN_RATE_WINDOW_S,
                self.idempotency_ttl_s,
                admission.body_digest,
                k.RQ_JOB_PREFIX,
                k.WAKE_TOKENS_MAX,
                _seconds(admission.start_within_s),
                _seconds(admission.finish_within_s),
                k.DEMAND_CHANNEL,
                function,
                *flat,
            ],
        )
        held = value.decode()
        if outcome == _ENQUEUED:
            return Admitted(task_id, replayed=False, task=queued_view(task_id, fields))
        if input_ref is not None:
            await asyncio.to_thread(self.objects.delete, [input_ref])
        if outcome == _REPLAYED:
            return Admitted(held, replayed=True, task=None)
        if outcome == _CONFLICT:
            raise IdempotencyConflict(
                f"Idempotency-Key already names task {held}, asked with a different body; "
                "use a new key for a new request",
                task_id=held,
            )
        if outcome == _EXPIRED:
            raise Gone(
                f"Idempotency-Key names task {held}, whose record has expired (result_ttl_s); "
                "use a new key to run it again",
                task_id=held,
            )
        raise QueueFull(
            f"function {function!r} already has {settings.max_queue} queued tasks",
            retry_after_s=retry_after_s(float(held), settings.max_queue),
        )

    async def read(self, task_id: str, *, with_output: bool) -> dict[str, Any] | None:
        """The task JSON, with ``output`` once succeeded when asked; None if there is no task."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.job_key(task_id))
            if with_output:
                pipe.xrevrange(k.results_key(task_id), count=1)
            replies = await pipe.execute()
        fields = replies[0]
        if not fields:
            return None
        if _overdue_in_queue(fields) and await self._end_if_due(task_id, fields):
            return await self.read(task_id, with_output=with_output)
        task = task_view(task_id, fields)
        if with_output and task["status"] == TaskStatus.SUCCEEDED:
            output_ref = field_text(fields, OUTPUT_REF_FIELD)
            if output_ref is not None:
                task[OUTPUT_REF] = output_ref
            elif replies[1]:
                task["output"] = result_output(replies[1][0][1])
        return task

    async def with_output(self, task: dict[str, Any]) -> dict[str, Any]:
        """The task with a stored output (``output_ref``) read back in place of its key."""
        output_ref = task.pop(OUTPUT_REF, None)
        if output_ref is not None:
            task["output"] = json.loads(await asyncio.to_thread(self.objects.get, output_ref))
        return task

    async def _store_if_big(self, key: str, payload: Any) -> str | None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        if len(data) <= self.inline_max_bytes:
            return None
        await asyncio.to_thread(self.objects.put, key, data)
        return key

    async def cancel(
        self, task_id: str, queue: str, *, which: CancelScope, error: str
    ) -> str | None:
        """Cancels a task that has not ended; returns the RQ status it had (None: no task)."""
        before = await self._cancel(
            keys=[k.job_key(task_id), k.queue_key(queue), k.canceled_registry_key(queue)],
            args=[task_id, utcformat(now()), error, k.task_channel(task_id), which],
        )
        return before.decode() if before else None

    async def _end_if_due(self, task_id: str, fields: Mapping[bytes, bytes]) -> bool:
        """Ends a queued task past its deadline to start, as a worker's claim would."""
        queue = fields[b"origin"].decode()
        before = await self.cancel(task_id, queue, which="due", error=deadline_passed_error())
        return before == JobStatus.QUEUED.value

    async def queue_of(self, task_id: str) -> str | None:
        """The RQ queue the task was enqueued on (its function and priority); None: no task."""
        return text(await self.redis.hget(k.job_key(task_id), "origin"))

    async def delete(self, task_id: str, queue: str) -> bool:
        refs = await self.redis.hmget(k.job_key(task_id), INPUT_REF_FIELD, OUTPUT_REF_FIELD)
        deleted = await self._delete(
            keys=[
                k.job_key(task_id),
                k.queue_key(queue),
                k.results_key(task_id),
                k.executions_key(task_id),
                k.started_registry_key(queue),
                k.finished_registry_key(queue),
                k.failed_registry_key(queue),
                k.canceled_registry_key(queue),
            ],
            args=[task_id, k.RQ_EXECUTION_PREFIX],
        )
        stored = [str(text(ref)) for ref in refs if ref]
        if deleted and stored:
            await asyncio.to_thread(self.objects.delete, stored)
        return bool(deleted)

    async def figures(self, function: str) -> FunctionFigures:
        return FunctionFigures.from_reply(await self._figures(keys=k.figures_keys(function)))


_ENQUEUED, _FULL, _REPLAYED, _CONFLICT, _EXPIRED = 1, 0, 2, 3, 4

# Which tasks a cancel may end: any not ended yet, only queued ones, or only queued ones whose
# deadline to start has passed.
CancelScope = Literal["any", "queued", "due"]


def _overdue_in_queue(fields: Mapping[bytes, bytes]) -> bool:
    # A cheap local pre-check on this host's clock; the script decides on the server's.
    deadline = fields.get(DEADLINE_FIELD.encode())
    return fields.get(b"status") == JobStatus.QUEUED.value.encode() and (
        deadline is not None and float(deadline) <= time.time()
    )


def _digest(value: str) -> str:
    # Keys are caller-chosen text of any length; their digest is a bounded, safe key name.
    return hashlib.sha256(value.encode()).hexdigest()


def _seconds(value: float | None) -> str:
    return "" if value is None else repr(value)
