"""Admission in one atomic step: replay an idempotency key, or check the queue cap and enqueue.

Any number of gateways together never push a function past max_queue: the cap is checked and
the task pushed by one script.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError
from rq.job import JobStatus

from runq.errors import ErrorCode
from runq.queue import constants, lua

# KEYS[1] the task's queue list, KEYS[2] its job hash, KEYS[3] RQ's set of queue keys,
# KEYS[4..6] the function's queue lists (every priority), KEYS[7] wake list, KEYS[8] drain hash,
# KEYS[9] the function's live workers, KEYS[10] idempotency key (absent: none)
# ARGV[1] max_queue, ARGV[2] task id, ARGV[3] idempotency TTL s, ARGV[4] body digest,
# ARGV[5] seconds from now it must start by ('' none), ARGV[6] seconds from now it must end by
# ('' none), ARGV[7] function name, ARGV[8..] job hash field/value pairs. With no live worker,
# the function name is published on the demand channel: an autoscaler at zero replicas starts
# one at once instead of on its next look.
# Returns {Reply, value}: the task id, or the drain rate when the queue was full (nothing
# written). A key whose task was withdrawn before it ever started (a predict that timed out in
# the queue), or whose worker was lost with its retries spent, is free again: a retry must be
# able to run what never ran, or never finished through no fault of its own. So is a key whose
# task record is gone (deleted, emptied by `rq empty`, expired): there is no task left to
# answer with, and a caller told "gone" could only pick a new key for the same request.
ENQUEUE = lua.script(
    """
local idempotency = KEYS[10]
local held = idempotency and redis.call('HMGET', idempotency, IDEM_TASK, IDEM_BODY) or {}
if held[1] then
  local task = redis.call('HMGET', JOB_PREFIX .. held[1], STATUS, STARTED_AT, ERROR)
  if task[1] then
    local never_ran = task[1] == CANCELED and (not task[2] or task[2] == '')
    local lost = false
    if task[1] == FAILED and task[3] then
      local ok, error = pcall(cjson.decode, task[3])
      lost = ok and type(error) == 'table' and error.code == WORKER_LOST
    end
    if not (never_ran or lost) then
      if held[2] == ARGV[4] then
        return {REPLAYED, held[1]}
      end
      return {CONFLICT, held[1]}
    end
  end
end
local now = server_now()
local queued = redis.call('LLEN', KEYS[4]) + redis.call('LLEN', KEYS[5])
  + redis.call('LLEN', KEYS[6])
if queued >= tonumber(ARGV[1]) then
  return {FULL, tostring(drain_rate(KEYS[8], now, DRAIN_WINDOW_S))}
end
redis.call('HSET', KEYS[2], unpack(ARGV, 8))
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], DEADLINE, tostring(now + tonumber(ARGV[5])))
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], FINISH_BY, tostring(now + tonumber(ARGV[6])))
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('LPUSH', KEYS[7], '1')
redis.call('LTRIM', KEYS[7], 0, WAKE_TOKENS_MAX - 1)
if redis.call('ZCOUNT', KEYS[9], '(' .. tostring(now), '+inf') == 0 then
  redis.call('PUBLISH', DEMAND_CHANNEL, ARGV[7])
end
if idempotency then
  redis.call('HSET', idempotency, IDEM_TASK, ARGV[2], IDEM_BODY, ARGV[4])
  redis.call('EXPIRE', idempotency, tonumber(ARGV[3]))
  -- Deleting the task frees its key.
  redis.call('HSET', KEYS[2], IDEMPOTENCY, idempotency)
end
return {ENQUEUED, ARGV[2]}
""",
    lua.SERVER_NOW,
    lua.DRAIN_RATE,
    FULL=0,
    ENQUEUED=1,
    REPLAYED=2,
    CONFLICT=3,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    STATUS=constants.STATUS_FIELD,
    STARTED_AT=constants.STARTED_AT_FIELD,
    CANCELED=JobStatus.CANCELED.value,
    FAILED=JobStatus.FAILED.value,
    ERROR=constants.ERROR_FIELD,
    WORKER_LOST=ErrorCode.WORKER_LOST.value,
    DEADLINE=constants.DEADLINE_FIELD,
    FINISH_BY=constants.FINISH_BY_FIELD,
    IDEMPOTENCY=constants.IDEMPOTENCY_FIELD,
    IDEM_TASK=constants.IDEMPOTENCY_TASK_FIELD,
    IDEM_BODY=constants.IDEMPOTENCY_BODY_FIELD,
    DRAIN_WINDOW_S=constants.DRAIN_RATE_WINDOW_S,
    WAKE_TOKENS_MAX=constants.WAKE_TOKENS_MAX,
    DEMAND_CHANNEL=constants.DEMAND_CHANNEL,
)


class Reply(IntEnum):
    FULL = 0
    ENQUEUED = 1
    # The idempotency key's task: asked with the same body, or with another one.
    REPLAYED = 2
    CONFLICT = 3


@dataclass(frozen=True)
class Enqueued:
    reply: Reply
    # The task id; for FULL, the function's recent drain rate (tasks/s).
    value: str


@dataclass(frozen=True)
class Request:
    function: str
    task_id: str
    priority: str
    # The new job hash, in RQ's layout.
    fields: Mapping[str, Any]
    max_queue: int
    # Seconds from admission: start by (else timed_out, never run), and end by.
    start_within_s: float | None = None
    finish_within_s: float | None = None
    # The digest of the caller's Idempotency-Key, and of the request's body.
    key_digest: str | None = None
    body_digest: str = ""


class Enqueue:
    """Admits tasks; admissions that arrive in the same event-loop tick share one round trip.

    Each admission is still its own script call, atomic against the caps; only the trip to
    Redis is shared (a pipeline), so a busy gateway pays the client's per-call cost (a pooled
    connection, a write, a read) once per tick instead of once per request.
    """

    def __init__(self, redis: aioredis.Redis, idempotency_ttl_s: int) -> None:
        self._redis = redis
        self._script = redis.register_script(ENQUEUE)
        self._idempotency_ttl_s = idempotency_ttl_s
        self._pending: list[_Pending] = []
        # Flushes in flight, held so that the event loop does not drop them.
        self._flushes: set[asyncio.Task[None]] = set()

    async def __call__(self, request: Request) -> Enqueued:
        loop = asyncio.get_running_loop()
        pending = _Pending(*self._keys_and_args(request), loop.create_future())
        self._pending.append(pending)
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        reply, value = await pending.reply
        return Enqueued(Reply(reply), value.decode())

    def _keys_and_args(self, request: Request) -> tuple[list[str], list[Any]]:
        function = request.function
        keys = [
            constants.queue_key(constants.queue_name(function, request.priority)),
            constants.job_key(request.task_id),
            constants.RQ_QUEUES_KEY,
            *constants.queue_keys(function),
            constants.wake_key(function),
            constants.drain_key(function),
            constants.alive_key(function),
        ]
        if request.key_digest is not None:
            keys.append(constants.idempotency_key(function, request.key_digest))
        args: list[Any] = [
            request.max_queue,
            request.task_id,
            self._idempotency_ttl_s,
            request.body_digest,
            _seconds(request.start_within_s),
            _seconds(request.finish_within_s),
            function,
        ]
        for name, value in request.fields.items():
            args += (name, value)
        return keys, args

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        flush = asyncio.create_task(self._send(batch))
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._run(batch)
        except Exception as exc:
            # Redis unreachable: every admission of the tick fails the same way.
            replies = [exc] * len(batch)
        for pending, reply in zip(batch, replies, strict=True):
            # A caller that went away meanwhile (its request cancelled) is not answered.
            if pending.reply.done():
                continue
            if isinstance(reply, Exception):
                pending.reply.set_exception(reply)
            else:
                pending.reply.set_result(reply)

    async def _run(self, batch: list[_Pending]) -> list[Any]:
        if len(batch) == 1:
            return [await self._script(keys=batch[0].keys, args=batch[0].args)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for pending in batch:
                pipe.evalsha(self._script.sha, len(pending.keys), *pending.keys, *pending.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        # A server that lost its scripts (a restart, SCRIPT FLUSH) ran none of them: the
        # script object loads it again on its first call, and the rest follow.
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                replies[i] = await self._script(keys=batch[i].keys, args=batch[i].args)
        return replies


@dataclass(frozen=True)
class _Pending:
    keys: list[str]
    args: list[Any]
    reply: asyncio.Future[Any]


def _seconds(value: float | None) -> str:
    return "" if value is None else repr(value)
