"""Deleting a task and everything RQ keeps about it, in one step."""

from __future__ import annotations

import redis.asyncio as aioredis

from runq.queue import constants, lua

# KEYS[1] job hash, KEYS[2] queue list, KEYS[3] results stream, KEYS[4] the job's executions,
# KEYS[5] started, KEYS[6] finished, KEYS[7] failed, KEYS[8] canceled registry,
# KEYS[9] the task's webhook delivery, KEYS[10] the webhook due set, KEYS[11] its chunks
# ARGV[1] task id, ARGV[2] the task's channel
# Returns 1 when deleted, 0 when there was no such task. Waiters hear the bare task id on the
# task's channel and on its reply channel, re-read it, find nothing and answer 404 at once
# instead of at their timeout. A queued task leaves its quota's count. A webhook delivery not
# yet sent goes with the task: a deleted task is never announced (one a sender holds at this
# moment may still go out, once).
DELETE = lua.script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for _, execution in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  local composite = ARGV[1] .. ':' .. execution
  redis.call('ZREM', KEYS[5], composite)
  redis.call('DEL', EXECUTION_PREFIX .. composite)
end
redis.call('LREM', KEYS[2], 0, ARGV[1])
local held = redis.call('HMGET', KEYS[1], IDEMPOTENCY, REPLY_TO, QUOTA)
if held[1] then
  redis.call('DEL', held[1])
end
local reply_to = held[2]
if held[3] then
  redis.call('ZREM', held[3], ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[9], KEYS[11])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
redis.call('ZREM', KEYS[10], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
if reply_to then
  redis.call('PUBLISH', reply_to, ARGV[1])
end
return 1
""",
    EXECUTION_PREFIX=constants.RQ_EXECUTION_PREFIX,
    IDEMPOTENCY=constants.IDEMPOTENCY_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    QUOTA=constants.QUOTA_FIELD,
)


class Delete:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(DELETE)

    async def __call__(self, task_id: str, queue: str) -> bool:
        deleted = await self._script(
            keys=[
                constants.job_key(task_id),
                constants.queue_key(queue),
                constants.results_key(task_id),
                constants.executions_key(task_id),
                constants.started_registry_key(queue),
                constants.finished_registry_key(queue),
                constants.failed_registry_key(queue),
                constants.canceled_registry_key(queue),
                constants.webhook_key(task_id),
                constants.WEBHOOKS_DUE_KEY,
                constants.chunks_key(task_id),
            ],
            args=[task_id, constants.task_channel(task_id)],
        )
        return bool(deleted)
