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
from runq.queue.line import AsyncLine

# KEYS[1] the task's queue list (its tenant's), KEYS[2] its job hash, KEYS[3] RQ's set of queue
# keys, KEYS[4..6] the function's queue lists (DEFAULT_TENANT's, every priority), KEYS[7] wake
# list, KEYS[8] drain hash, KEYS[9] the function's live workers, KEYS[10] its tenants set; with
# a quota (ARGV[8] '1') KEYS[11] its token bucket and KEYS[12] its queued set; then the
# idempotency key (absent: none)
# ARGV[1] max_queue, ARGV[2] task id, ARGV[3] idempotency TTL s, ARGV[4] body digest,
# ARGV[5] seconds from now it must start by ('' none), ARGV[6] seconds from now it must end by
# ('' none), ARGV[7] function name, ARGV[8] '1' with a quota, ARGV[9] its rate per second ('' no
# rate), ARGV[10] its burst, ARGV[11] its most queued tasks ('' no cap), ARGV[12] the task's
# tenant ('' DEFAULT_TENANT), ARGV[13..] job hash field/value pairs. With no live worker, the
# function name is published on the demand channel: an autoscaler at zero replicas starts one
# at once instead of on its next look.
# Returns {Reply, value}: the task id; when refused, nothing written, the drain rate (FULL,
# QUOTA_EXCEEDED) or the seconds until the bucket holds a token (RATE_LIMITED). A replay spends
# no token: it admits nothing. A key whose task was withdrawn before it ever started (a predict
# that timed out in the queue), or whose worker was lost with its retries spent, is free again:
# a retry must be able to run what never ran, or never finished through no fault of its own. So
# is a key whose task record is gone (deleted, emptied by `rq empty`, expired): there is no
# task left to answer with, and a caller told "gone" could only pick a new key for the same
# request. max_queue counts every tenant's queued tasks.
ENQUEUE = lua.script(
    """
local quota = ARGV[8] == '1'
local idempotency = KEYS[quota and 13 or 11]
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
local rate, burst, tokens
if quota and ARGV[9] ~= '' then
  rate, burst = tonumber(ARGV[9]), tonumber(ARGV[10])
  local bucket = redis.call('HMGET', KEYS[11], RATE_TOKENS, RATE_AT)
  tokens = burst
  if bucket[1] then
    local refill = math.max(now - tonumber(bucket[2]), 0) * rate
    tokens = math.min(burst, tonumber(bucket[1]) + refill)
  end
  if tokens < 1 then
    return {RATE_LIMITED, tostring((1 - tokens) / rate)}
  end
end
local cap = quota and tonumber(ARGV[11])
if cap and redis.call('ZCARD', KEYS[12]) >= cap then
  -- Entries of tasks that left the queue without runq's word (`rq empty`) go, oldest first.
  for _, id in ipairs(redis.call('ZRANGE', KEYS[12], 0, QUOTA_HEAL_MAX - 1)) do
    if redis.call('HGET', JOB_PREFIX .. id, STATUS) ~= QUEUED then
      redis.call('ZREM', KEYS[12], id)
    end
  end
  if redis.call('ZCARD', KEYS[12]) >= cap then
    return {QUOTA_EXCEEDED, tostring(drain_rate(KEYS[8], now, DRAIN_WINDOW_S))}
  end
end
local queued = redis.call('LLEN', KEYS[4]) + redis.call('LLEN', KEYS[5])
  + redis.call('LLEN', KEYS[6])
for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[10])) do
  for q = 4, 6 do
    queued = queued + redis.call('LLEN', KEYS[q] .. TENANT_SEPARATOR .. tenant)
  end
end
if queued >= tonumber(ARGV[1]) then
  return {FULL, tostring(drain_rate(KEYS[8], now, DRAIN_WINDOW_S))}
end
redis.call('HSET', KEYS[2], unpack(ARGV, 13))
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], DEADLINE, tostring(now + tonumber(ARGV[5])))
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], FINISH_BY, tostring(now + tonumber(ARGV[6])))
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
if ARGV[12] ~= '' then
  redis.call('SADD', KEYS[10], ARGV[12])
end
if tokens then
  redis.call('HSET', KEYS[11], RATE_TOKENS, tostring(tokens - 1), RATE_AT, tostring(now))
  -- Past this the bucket is full again: as good as absent.
  redis.call('EXPIRE', KEYS[11], math.ceil(burst / rate) + 1)
end
if cap then
  redis.call('ZADD', KEYS[12], now, ARGV[2])
  -- Whatever takes the task off the queue takes it out of the quota's count.
  redis.call('HSET', KEYS[2], QUOTA, KEYS[12])
end
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
    RATE_LIMITED=4,
    QUOTA_EXCEEDED=5,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    STATUS=constants.STATUS_FIELD,
    STARTED_AT=constants.STARTED_AT_FIELD,
    QUEUED=JobStatus.QUEUED.value,
    CANCELED=JobStatus.CANCELED.value,
    FAILED=JobStatus.FAILED.value,
    ERROR=constants.ERROR_FIELD,
    WORKER_LOST=ErrorCode.WORKER_LOST.value,
    DEADLINE=constants.DEADLINE_FIELD,
    FINISH_BY=constants.FINISH_BY_FIELD,
    IDEMPOTENCY=constants.IDEMPOTENCY_FIELD,
    IDEM_TASK=constants.IDEMPOTENCY_TASK_FIELD,
    IDEM_BODY=constants.IDEMPOTENCY_BODY_FIELD,
    QUOTA=constants.QUOTA_FIELD,
    RATE_TOKENS=constants.RATE_TOKENS_FIELD,
    RATE_AT=constants.RATE_AT_FIELD,
    QUOTA_HEAL_MAX=constants.QUOTA_HEAL_MAX,
    TENANT_SEPARATOR=constants.TENANT_QUEUE_SEPARATOR,
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
    # Over the request's quota: its rate, or its count of queued tasks.
    RATE_LIMITED = 4
    QUOTA_EXCEEDED = 5


@dataclass(frozen=True)
class Enqueued:
    reply: Reply
    # The task id; for FULL and QUOTA_EXCEEDED, the function's recent drain rate (tasks/s); for
    # RATE_LIMITED, the seconds until the quota's bucket holds a token.
    value: str


@dataclass(frozen=True)
class Quota:
    """Limits on one caller (an API key, a tenant) that every gateway enforces together.

    ``name`` keys the state in Redis: requests with the same name share it, whatever their
    function. A token bucket allows ``rate_per_s`` requests a second on average and ``burst``
    (default one second's worth, at least 1) at once; ``max_queued`` caps the caller's queued
    tasks, all functions together.
    """

    name: str
    rate_per_s: float | None = None
    burst: float | None = None
    max_queued: int | None = None

    def args(self) -> list[Any]:
        """The enqueue script's ARGV[8..11]."""
        rate = self.rate_per_s
        burst = self.burst if self.burst is not None else max(1.0, rate or 0.0)
        cap = self.max_queued
        return ["1", "" if rate is None else repr(rate), repr(burst), "" if cap is None else cap]


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
    quota: Quota | None = None


class Enqueue:
    """Admits tasks; admissions that arrive in the same event-loop tick share one round trip.

    Each admission is still its own script call, atomic against the caps; only the trip to
    Redis is shared (one write of all of them, on the process's admissions line), so a busy
    gateway pays the client's per-call cost once per tick instead of once per request.
    """

    def __init__(self, redis: aioredis.Redis, idempotency_ttl_s: int) -> None:
        self._line = AsyncLine(redis)
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
        fields = request.fields
        tenant = fields.get(constants.TENANT_FIELD) or constants.DEFAULT_TENANT
        queue = constants.queue_name(function, request.priority, tenant)
        if tenant != constants.DEFAULT_TENANT:
            # RQ's tools, cancel and delete find a job's queue by its origin.
            fields = {**fields, constants.ORIGIN_FIELD: queue}
        keys = [
            constants.queue_key(queue),
            constants.job_key(request.task_id),
            constants.RQ_QUEUES_KEY,
            *constants.queue_keys(function),
            constants.wake_key(function),
            constants.drain_key(function),
            constants.alive_key(function),
            constants.tenants_key(function),
        ]
        quota = request.quota
        if quota is not None:
            keys += (constants.rate_key(quota.name), constants.quota_queued_key(quota.name))
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
            *(_NO_QUOTA if quota is None else quota.args()),
            "" if tenant == constants.DEFAULT_TENANT else tenant,
        ]
        for name, value in fields.items():
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

    async def aclose(self) -> None:
        await self._line.aclose()

    async def _run(self, batch: list[_Pending]) -> list[Any]:
        replies = await self._line(
            [("EVALSHA", self._script.sha, len(p.keys), *p.keys, *p.args) for p in batch]
        )
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


_NO_QUOTA = ("", "", "", "")


def _seconds(value: float | None) -> str:
    return "" if value is None else repr(value)
