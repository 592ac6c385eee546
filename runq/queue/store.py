"""The gateway's side of the queue: admit, read, cancel and delete tasks (asyncio Redis)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from rq.utils import now, utcformat

from runq.errors import QueueFull
from runq.queue import constants as k
from runq.queue import scripts
from runq.queue.tasks import (
    TaskStatus,
    new_job_fields,
    queued_view,
    result_output,
    task_view,
    text,
)
from runq.settings import FunctionSettings


def new_task_id() -> str:
    """128 random bits, URL-safe: unguessable, so a task id is also its read capability."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class FunctionFigures:
    queued: int
    running: int
    replicas: int


class TaskStore:
    def __init__(self, redis: aioredis.Redis, redis_url: str) -> None:
        self.redis = redis
        # RQ's Job wants a connection object to build a job; it never does I/O with it here.
        self._job_connection = Redis.from_url(redis_url)
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._delete = redis.register_script(scripts.DELETE)

    async def enqueue(
        self,
        function: str,
        settings: FunctionSettings,
        payload: Any,
        *,
        deadline: float | None,
        reply_to: str | None,
        task_id: str | None = None,
    ) -> dict[str, Any]:
        """Admits a task under the queue cap; returns its task JSON (status queued)."""
        task_id = task_id or new_task_id()
        fields = new_job_fields(
            function=function,
            settings=settings,
            task_id=task_id,
            payload=payload,
            deadline=deadline,
            reply_to=reply_to,
            connection=self._job_connection,
        )
        queue_key = k.queue_key(function)
        flat: list[Any] = []
        for name, value in fields.items():
            flat += (name, value)
        admitted = await self._enqueue(
            keys=[queue_key, k.job_key(task_id), k.RQ_QUEUES_KEY],
            args=[settings.max_queue, queue_key, task_id, *flat],
        )
        if not admitted:
            raise QueueFull(
                f"function {function!r} already has {settings.max_queue} queued tasks",
                retry_after_s=1,
            )
        return queued_view(task_id, function, fields)

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
        task = task_view(task_id, fields)
        if with_output and task["status"] == TaskStatus.SUCCEEDED and replies[1]:
            task["output"] = result_output(replies[1][0][1])
        return task

    async def cancel(
        self, task_id: str, function: str, *, only_if_queued: bool, error: str
    ) -> str | None:
        """Cancels a task that has not ended; returns the RQ status it had (None: no task)."""
        before = await self._cancel(
            keys=[k.job_key(task_id), k.queue_key(function), k.canceled_registry_key(function)],
            args=[
                task_id,
                utcformat(now()),
                time.time(),
                "1" if only_if_queued else "0",
                error,
                k.task_channel(task_id),
            ],
        )
        return before.decode() if before else None

    async def function_of(self, task_id: str) -> str | None:
        origin = await self.redis.hget(k.job_key(task_id), "origin")
        name = text(origin)
        return name.removeprefix(k.QUEUE_NAME_PREFIX) if name else None

    async def delete(self, task_id: str, function: str) -> bool:
        deleted = await self._delete(
            keys=[
                k.job_key(task_id),
                k.queue_key(function),
                k.results_key(task_id),
                k.executions_key(task_id),
                k.started_registry_key(function),
                k.finished_registry_key(function),
                k.failed_registry_key(function),
                k.canceled_registry_key(function),
            ],
            args=[task_id, k.RQ_EXECUTION_PREFIX],
        )
        return bool(deleted)

    async def figures(self, function: str) -> FunctionFigures:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(k.queue_key(function))
            pipe.zcard(k.started_registry_key(function))
            pipe.scard(k.workers_key(function))
            queued, running, replicas = await pipe.execute()
        return FunctionFigures(queued=queued, running=running, replicas=replicas)
