"""Canceling a task that has not ended, atomically against the worker that may be running it."""

from __future__ import annotations

from typing import Literal

import redis.asyncio as aioredis
from rq.job import JobStatus
from rq.utils import now, utcformat

from runq.queue import constants, lua

# A queued task leaves its queue and its quota's queued set. A running task is marked canceled
# at once; the worker that runs it sees the change (WATCH)
# and leaves the status alone when its batch ends. Waiters hear the bare task id on the task's
# channel and on its reply channel, and re-read the task.
# KEYS[1] job hash, KEYS[2] queue list, KEYS[3] canceled registry
# ARGV[1] task id, ARGV[2] ended_at (RQ's time format), ARGV[3] runq error JSON,
# ARGV[4] the task's channel, ARGV[5] which tasks (CancelScope)
# Returns the RQ status the task had, false when there is no such task, or 'not_due' when
# 'due' found nothing to end.
CANCEL = lua.script(
    """
local status = redis.call('HGET', KEYS[1], STATUS)
if not status then
  return false
end
local now = server_now()
if ARGV[5] == 'due' then
  local deadline = tonumber(redis.call('HGET', KEYS[1], DEADLINE) or '')
  if status ~= QUEUED or not deadline or deadline > now then
    return 'not_due'
  end
end
if status == QUEUED or (status == STARTED and ARGV[5] == 'any') then
  if status == QUEUED then
    redis.call('LREM', KEYS[2], 0, ARGV[1])
    local quota = redis.call('HGET', KEYS[1], QUOTA)
    if quota then
      redis.call('ZREM', quota, ARGV[1])
    end
  end
  local ttl = tonumber(redis.call('HGET', KEYS[1], RESULT_TTL) or DEFAULT_TTL_S)
  redis.call('HSET', KEYS[1], STATUS, CANCELED, ENDED_AT, ARGV[2], ERROR, ARGV[3])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  local reply_to = redis.call('HGET', KEYS[1], REPLY_TO)
  if reply_to then
    redis.call('PUBLISH', reply_to, ARGV[1])
  end
end
return status
""",
    lua.SERVER_NOW,
    STATUS=constants.STATUS_FIELD,
    DEADLINE=constants.DEADLINE_FIELD,
    RESULT_TTL=constants.RESULT_TTL_FIELD,
    ENDED_AT=constants.ENDED_AT_FIELD,
    ERROR=constants.ERROR_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    QUOTA=constants.QUOTA_FIELD,
    QUEUED=JobStatus.QUEUED.value,
    STARTED=JobStatus.STARTED.value,
    CANCELED=JobStatus.CANCELED.value,
    DEFAULT_TTL_S=constants.DEFAULT_RESULT_TTL_S,
)

# Which tasks a cancel may end: any not ended yet, only queued ones, or only queued ones whose
# deadline to start has passed (a read ends a task no worker has looked at yet).
CancelScope = Literal["any", "queued", "due"]


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
            args=[task_id, utcformat(now()), error, constants.task_channel(task_id), which],
        )
        return before.decode() if before else None
