"""Canceling tasks that have not ended, atomically against the workers that may claim or run
them: one task (cancel), or every task queued for a function (purge)."""

from __future__ import annotations

from typing import Literal

import redis.asyncio as aioredis
from rq.job import JobStatus
from rq.utils import now, utcformat

from runq.queue import constants, lua
from runq.queue.tasks import text

# Ends a task as canceled, as every cancel does: kept readable for its result TTL in RQ's
# canceled registry, and out of its quota's queued set (if it was still counted there).
# Waiters hear the bare task id on the task's channel and on its reply channel, and re-read it.
END_CANCELED = lua.script(
    """
local function end_canceled(key, registry, id, ended_at, error, now)
  local ttl = tonumber(redis.call('HGET', key, RESULT_TTL) or DEFAULT_TTL_S)
  redis.call('HSET', key, STATUS, CANCELED, ENDED_AT, ended_at, ERROR, error)
  redis.call('ZADD', registry, now + ttl, id)
  redis.call('EXPIRE', key, ttl)
  local quota = redis.call('HGET', key, QUOTA)
  if quota then
    redis.call('ZREM', quota, id)
  end
  redis.call('PUBLISH', TASK_CHANNEL_PREFIX .. id, id)
  local reply_to = redis.call('HGET', key, REPLY_TO)
  if reply_to then
    redis.call('PUBLISH', reply_to, id)
  end
end
""",
    STATUS=constants.STATUS_FIELD,
    RESULT_TTL=constants.RESULT_TTL_FIELD,
    ENDED_AT=constants.ENDED_AT_FIELD,
    ERROR=constants.ERROR_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    QUOTA=constants.QUOTA_FIELD,
    CANCELED=JobStatus.CANCELED.value,
    DEFAULT_TTL_S=constants.DEFAULT_RESULT_TTL_S,
    TASK_CHANNEL_PREFIX=constants.TASK_CHANNEL_PREFIX,
)

# A queued task leaves its queue. A running task is marked canceled at once; the worker that
# runs it sees the change (its record checks the task is still its own) and leaves the status
# alone when its batch ends.
# KEYS[1] job hash, KEYS[2] queue list, KEYS[3] canceled registry
# ARGV[1] task id, ARGV[2] ended_at (RQ's time format), ARGV[3] runq error JSON,
# ARGV[4] which tasks (CancelScope)
# Returns the RQ status the task had, false when there is no such task, or 'not_due' when
# 'due' found nothing to end.
CANCEL = lua.script(
    """
local status = redis.call('HGET', KEYS[1], STATUS)
if not status then
  return false
end
local now = server_now()
if ARGV[4] == 'due' then
  local deadline = tonumber(redis.call('HGET', KEYS[1], DEADLINE) or '')
  if status ~= QUEUED or not deadline or deadline > now then
    return 'not_due'
  end
end
if status == QUEUED or (status == STARTED and ARGV[4] == 'any') then
  if status == QUEUED then
    redis.call('LREM', KEYS[2], 0, ARGV[1])
  end
  end_canceled(KEYS[1], KEYS[3], ARGV[1], ARGV[2], ARGV[3], now)
end
return status
""",
    lua.SERVER_NOW,
    END_CANCELED,
    STATUS=constants.STATUS_FIELD,
    DEADLINE=constants.DEADLINE_FIELD,
    QUEUED=JobStatus.QUEUED.value,
    STARTED=JobStatus.STARTED.value,
)

# Takes up to ARGV[1] ids off the head of one queue list and ends each still-queued one
# canceled. Popped, as a worker's claim pops them: a task is either claimed or purged, never
# both, and no LREM walks the list per task.
# KEYS[1] queue list, KEYS[2] canceled registry
# ARGV[1] most ids to take, ARGV[2] ended_at (RQ's time format), ARGV[3] runq error JSON
# Returns {ids taken off the list, tasks canceled}.
PURGE = lua.script(
    """
local now = server_now()
local ids = redis.call('LPOP', KEYS[1], tonumber(ARGV[1])) or {}
local canceled = 0
for _, id in ipairs(ids) do
  local key = JOB_PREFIX .. id
  if redis.call('HGET', key, STATUS) == QUEUED then
    end_canceled(key, KEYS[2], id, ARGV[2], ARGV[3], now)
    canceled = canceled + 1
  end
end
return {#ids, canceled}
""",
    lua.SERVER_NOW,
    END_CANCELED,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    STATUS=constants.STATUS_FIELD,
    QUEUED=JobStatus.QUEUED.value,
)

# Which tasks a cancel may end: any not ended yet, only queued ones, or only queued ones whose
# deadline to start has passed (a read ends a task no worker has looked at yet).
CancelScope = Literal["any", "queued", "due"]

# Ids one purge call takes: each call holds Redis for well under a millisecond per hundred.
PURGE_BATCH = 500


class Cancel:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(CANCEL)

    async def __call__(
        self, task_id: str, queue: str, *, which: CancelScope, error: str
    ) -> str | None:
        """Returns the RQ status the task had (None: no task, 'not_due': nothing was due)."""
        before = await self._script(
            keys=[
                constants.job_key(task_id),
                constants.queue_key(queue),
                constants.canceled_registry_key(queue),
            ],
            args=[task_id, utcformat(now()), error, which],
        )
        return before.decode() if before else None


class Purge:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(PURGE)

    async def __call__(self, function: str, error: str) -> int:
        """Cancels every task queued for ``function`` when called; returns how many.

        Only what was queued at the start is taken (its length then, per priority): tasks
        submitted meanwhile join the tail and are left queued, so a steady stream of submits
        cannot keep a purge going forever.
        """
        # Only tenants in the tenants set can have tasks queued (fair share keeps it so).
        members = await self._redis.smembers(constants.tenants_key(function))
        others = sorted(str(text(member)) for member in members)
        queues = [
            constants.queue_name(function, p, tenant)
            for tenant in [constants.DEFAULT_TENANT, *others]
            for p in constants.PRIORITIES
        ]
        async with self._redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(constants.queue_key(queue))
            lengths: list[int] = await pipe.execute()
        canceled = 0
        for queue, left in zip(queues, lengths, strict=True):
            keys = [constants.queue_key(queue), constants.canceled_registry_key(queue)]
            while left > 0:
                taken, ended = await self._script(
                    keys=keys, args=[min(left, PURGE_BATCH), utcformat(now()), error]
                )
                canceled += ended
                left = 0 if taken == 0 else left - taken
        return int(canceled)
