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
from typing import Any

import redis.asyncio as aioredis
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from runq.errors import (
    Conflict,
    ErrorCode,
    IdempotencyConflict,
    QueueFull,
    QuotaExceeded,
    RateLimited,
)
from runq.queue import constants, storage
from runq.queue.cancel import Cancel, Purge
from runq.queue.connection import sync_redis
from runq.queue.delete import Delete
from runq.queue.enqueue import Enqueue, Enqueued, Quota, Reply, Request
from runq.queue.figures import AsyncFigures, FunctionFigures
from runq.queue.listing import LIMIT_DEFAULT, Page, TaskList
from runq.queue.retry import Outcome, Retry
from runq.queue.storage import ClaimCheck, ObjectStore
from runq.queue.tasks import (
    OUTPUT_REF,
    TaskStatus,
    deadline_passed_error,
    error_json,
    field_text,
    new_job_fields,
    queued_view,
    result_output,
    task_view,
    text,
)
from runq.settings import FunctionSettings


def new_task_id() -> str:
    """128 random bits, URL-safe: unguessable, so a task id is also its read capability.

    Never starting with '-', which command-line tools (`rq requeue ID`) would read as an option.
    """
    while True:
        task_id = secrets.token_urlsafe(16)
        if not task_id.startswith("-"):
            return task_id


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

    priority: str = constants.DEFAULT_PRIORITY
    # Seconds from admission: start by (else timed_out, never run) and end by.
    start_within_s: float | None = None
    finish_within_s: float | None = None
    reply_to: str | None = None
    idempotency_key: str | None = None
    body_digest: str = ""
    # Checked already (runq.webhooks.check_url).
    webhook: str | None = None
    # Whose task it is: recorded on it, and the scope of its idempotency key.
    tenant: str = constants.DEFAULT_TENANT
    # The caller's limits, when it has any.
    quota: Quota | None = None


@dataclass(frozen=True)
class Admitted:
    task_id: str
    # True when an Idempotency-Key named a task that already existed; `task` is then None and
    # the caller reads or waits on it.
    replayed: bool
    task: dict[str, Any] | None


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
        self.claim_check = ClaimCheck(objects, inline_max_bytes)
        # RQ's Job wants a connection object to build a job; it never does I/O with it here.
        self._job_connection = sync_redis(redis_url)
        self._enqueue = Enqueue(redis, idempotency_ttl_s)
        self.cancel = Cancel(redis)
        self._delete = Delete(redis)
        self._figures = AsyncFigures(redis)
        self._list = TaskList(redis)
        self._retry = Retry(redis)
        self._purge = Purge(redis)

    async def aclose(self) -> None:
        await self._enqueue.aclose()
        self._job_connection.close()

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
        # Encoded once: the size check, the stored object and the job's data all use it.
        payload_json = JSONSerializer.dumps(payload)
        input_ref = await self.claim_check.check_in_async(
            storage.input_key(function, task_id), payload_json
        )
        fields = new_job_fields(
            function=function,
            settings=settings,
            payload_json=payload_json,
            priority=admission.priority,
            reply_to=admission.reply_to,
            connection=self._job_connection,
            input_ref=input_ref,
            webhook=admission.webhook,
            tenant=admission.tenant,
        )
        key = admission.idempotency_key
        enqueued = await self._enqueue(
            Request(
                function=function,
                task_id=task_id,
                priority=admission.priority,
                fields=fields,
                max_queue=settings.max_queue,
                start_within_s=admission.start_within_s,
                finish_within_s=admission.finish_within_s,
                key_digest=None if key is None else _key_digest(key, admission.tenant),
                body_digest=admission.body_digest,
                quota=admission.quota,
            )
        )
        if enqueued.reply == Reply.ENQUEUED:
            return Admitted(task_id, replayed=False, task=queued_view(task_id, fields))
        if input_ref is not None:
            await asyncio.to_thread(self.objects.delete, [input_ref])
        return _refused(function, settings, admission.quota, enqueued)

    async def read(self, task_id: str, *, with_output: bool) -> dict[str, Any] | None:
        """The task JSON, with ``output`` once succeeded when asked; None if there is no task."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(constants.job_key(task_id))
            if with_output:
                pipe.xrevrange(constants.results_key(task_id), count=1)
            replies = await pipe.execute()
        fields = replies[0]
        if not fields or not constants.is_runq_queue(fields.get(b"origin", b"").decode()):
            return None
        if _overdue_in_queue(fields) and await self._end_if_due(task_id, fields):
            return await self.read(task_id, with_output=with_output)
        task = task_view(task_id, fields)
        if with_output and task["status"] == TaskStatus.SUCCEEDED:
            output_ref = field_text(fields, constants.OUTPUT_REF_FIELD)
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

    async def _end_if_due(self, task_id: str, fields: Mapping[bytes, bytes]) -> bool:
        """Ends a queued task past its deadline to start, as a worker's claim would."""
        queue = fields[b"origin"].decode()
        before = await self.cancel(task_id, queue, which="due", error=deadline_passed_error())
        return before == JobStatus.QUEUED.value

    async def missing(self, task_ids: list[str]) -> list[str]:
        """The tasks of ``task_ids`` that have no record, read in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.exists(constants.job_key(task_id))
            found = await pipe.execute()
        return [task_id for task_id, exists in zip(task_ids, found, strict=True) if not exists]

    async def queue_of(self, task_id: str, tenant: str | None = None) -> str | None:
        """The RQ queue the task was enqueued on (its function and priority); None: no task of
        runq's, or (``tenant`` given) not that tenant's."""
        raw_queue, raw_tenant = await self.redis.hmget(
            constants.job_key(task_id), constants.ORIGIN_FIELD, constants.TENANT_FIELD
        )
        queue = text(raw_queue)
        if queue is None or not constants.is_runq_queue(queue):
            return None
        if tenant is not None and (text(raw_tenant) or constants.DEFAULT_TENANT) != tenant:
            return None
        return queue

    async def delete(self, task_id: str, queue: str) -> bool:
        refs = await self.redis.hmget(
            constants.job_key(task_id), constants.INPUT_REF_FIELD, constants.OUTPUT_REF_FIELD
        )
        deleted = await self._delete(task_id, queue)
        stored = [str(text(ref)) for ref in refs if ref]
        if deleted and stored:
            await asyncio.to_thread(self.objects.delete, stored)
        return deleted

    async def figures(self, function: str) -> FunctionFigures:
        return await self._figures.read(function)

    async def page(
        self,
        function: str,
        *,
        status: TaskStatus | None = None,
        tenant: str | None = None,
        cursor: str | None = None,
        limit: int = LIMIT_DEFAULT,
    ) -> Page:
        """A page of the function's tasks; ``tenant`` None lists every tenant's."""
        return await self._list.page(
            function, status=status, tenant=tenant, cursor=cursor, limit=limit
        )

    async def retry(
        self, task_id: str, queue: str, settings: FunctionSettings, *, tenant: str | None
    ) -> dict[str, Any] | None:
        """Queues a failed, timed-out or canceled task again; returns it, or None when there
        is no such task (or it is not ``tenant``'s, when given). Raises QueueFull under the
        function's cap, Conflict for a task that has not ended or succeeded."""
        retried = await self._retry(task_id, queue, max_queue=settings.max_queue, tenant=tenant)
        if retried.outcome == Outcome.MISSING:
            return None
        if retried.outcome == Outcome.FULL:
            function = constants.function_of_queue(queue)
            raise _queue_full(function, settings, float(retried.value))
        task = await self.read(task_id, with_output=False)
        if task is None:
            return None
        if retried.outcome == Outcome.NOT_ENDED:
            if task["status"] == TaskStatus.CANCELED:
                message = f"task {task_id} was canceled while it ran, and its run goes on"
                raise Conflict(f"{message}; retry once it stops", task=task)
            raise Conflict(
                f"task {task_id} is {task['status']}: only a failed, timed-out or canceled "
                "task runs again",
                task=task,
            )
        return task

    async def purge(self, function: str) -> int:
        """Cancels every task queued for ``function``; returns how many."""
        return await self._purge(function, _PURGED)


def _refused(
    function: str, settings: FunctionSettings, quota: Quota | None, enqueued: Enqueued
) -> Admitted:
    """The key's task when replayed; raises for every other answer but ENQUEUED."""
    held = enqueued.value
    if enqueued.reply == Reply.REPLAYED:
        return Admitted(held, replayed=True, task=None)
    if enqueued.reply == Reply.CONFLICT:
        # Never the task's id: it is its read capability, and this caller may not own it.
        raise IdempotencyConflict(
            "Idempotency-Key is already taken by a request with a different body; "
            "use a new key for a new request"
        )
    if enqueued.reply == Reply.RATE_LIMITED:
        assert quota is not None and quota.rate_per_s is not None
        raise RateLimited(
            f"over this caller's rate limit of {quota.rate_per_s:g} requests/s",
            retry_after_s=max(RETRY_AFTER_MIN_S, math.ceil(float(held))),
        )
    if enqueued.reply == Reply.QUOTA_EXCEEDED:
        assert quota is not None and quota.max_queued is not None
        raise QuotaExceeded(
            f"this caller already has {quota.max_queued} queued tasks, its most",
            retry_after_s=retry_after_s(float(held), quota.max_queued),
        )
    raise _queue_full(function, settings, float(held))


def _queue_full(function: str, settings: FunctionSettings, drain_rate: float) -> QueueFull:
    return QueueFull(
        f"function {function!r} already has {settings.max_queue} queued tasks",
        retry_after_s=retry_after_s(drain_rate, settings.max_queue),
    )


_PURGED = error_json(ErrorCode.CANCELED, "purged from the queue")


def _overdue_in_queue(fields: Mapping[bytes, bytes]) -> bool:
    # A cheap local pre-check on this host's clock; the script decides on the server's.
    deadline = fields.get(constants.DEADLINE_FIELD.encode())
    return fields.get(b"status") == JobStatus.QUEUED.value.encode() and (
        deadline is not None and float(deadline) <= time.time()
    )


def _key_digest(key: str, tenant: str) -> str:
    # Keys are caller-chosen text of any length; their digest is a bounded, safe key name. It
    # covers the tenant, so two tenants' equal keys name two tasks; the default tenant's digest
    # is the key's alone, as it was before tenants. Tenant names hold no newline.
    scoped = key if tenant == constants.DEFAULT_TENANT else f"{tenant}\n{key}"
    return hashlib.sha256(scoped.encode()).hexdigest()
