"""Running an ended task again, same id, under the same queue cap as a new submit, in one step.

Only a task that did not succeed is run again: failed, timed out or canceled. Its last run's
traces go (error, times, RQ's result stream and registry entry) so that its status and result
show the new run; its input, settings, webhook and idempotency key stay. The claim counts the
new run in its attempts as it counts every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import redis.asyncio as aioredis
from rq.job import JobStatus
from rq.utils import now, utcformat

from runq.queue import constants, lua

# KEYS[1] job hash, KEYS[2] its queue list, KEYS[3] RQ's set of queue keys, KEYS[4..6] the
# function's queue lists (every priority), KEYS[7] wake list, KEYS[8] drain hash, KEYS[9] the
# function's live workers, KEYS[10] its leases, KEYS[11] the task's results stream,
# KEYS[12] failed and KEYS[13] canceled registry of its queue, KEYS[14] the function's tenants set
# ARGV[1] max_queue, ARGV[2] task id, ARGV[3] enqueued_at (RQ's time format), ARGV[4] function
# name, ARGV[5] the caller's tenant ('' for any)
# Returns {Outcome, value}: the drain rate when the queue was full, the RQ status the task has
# when it is not one to run again. A canceled task whose worker has not let go of it yet (its
# lease holds) is refused too: that worker's record would end the new run's lease with its own.
# The cap, the push and the wake are the enqueue script's (enqueue.py), kept in step with it.
RETRY = lua.script(
    """
local held = redis.call('HMGET', KEYS[1], STATUS, TENANT)
if not held[1] or (ARGV[5] ~= '' and (held[2] or DEFAULT_TENANT) ~= ARGV[5]) then
  return {MISSING, ''}
end
local status = held[1]
if status ~= FAILED and status ~= STOPPED and status ~= CANCELED then
  return {NOT_ENDED, status}
end
local now = server_now()
local lease = tonumber(redis.call('ZSCORE', KEYS[10], ARGV[2]) or '')
if lease and lease > now then
  return {NOT_ENDED, STARTED}
end
local queued = redis.call('LLEN', KEYS[4]) + redis.call('LLEN', KEYS[5])
  + redis.call('LLEN', KEYS[6])
for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[14])) do
  for q = 4, 6 do
    queued = queued + redis.call('LLEN', KEYS[q] .. TENANT_SEPARATOR .. tenant)
  end
end
if queued >= tonumber(ARGV[1]) then
  return {FULL, tostring(drain_rate(KEYS[8], now, DRAIN_WINDOW_S))}
end
redis.call('ZREM', KEYS[12], ARGV[2])
redis.call('ZREM', KEYS[13], ARGV[2])
redis.call('DEL', KEYS[11])
-- A predict's waiter is long gone, and the deadlines were the last run's.
redis.call('HDEL', KEYS[1], ERROR, STARTED_AT, ENDED_AT, HEARTBEAT, WORKER_NAME, DEADLINE,
           FINISH_BY, REPLY_TO)
redis.call('HSET', KEYS[1], STATUS, QUEUED, ENQUEUED_AT, ARGV[3])
redis.call('PERSIST', KEYS[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[2])
if held[2] and held[2] ~= DEFAULT_TENANT then
  -- The claim takes from the tenants in this set only.
  redis.call('SADD', KEYS[14], held[2])
end
redis.call('LPUSH', KEYS[7], '1')
redis.call('LTRIM', KEYS[7], 0, WAKE_TOKENS_MAX - 1)
if redis.call('ZCOUNT', KEYS[9], '(' .. tostring(now), '+inf') == 0 then
  redis.call('PUBLISH', DEMAND_CHANNEL, ARGV[4])
end
return {RETRIED, ''}
""",
    lua.SERVER_NOW,
    lua.DRAIN_RATE,
    RETRIED=0,
    FULL=1,
    NOT_ENDED=2,
    MISSING=3,
    STATUS=constants.STATUS_FIELD,
    TENANT=constants.TENANT_FIELD,
    DEFAULT_TENANT=constants.DEFAULT_TENANT,
    TENANT_SEPARATOR=constants.TENANT_QUEUE_SEPARATOR,
    ERROR=constants.ERROR_FIELD,
    STARTED_AT=constants.STARTED_AT_FIELD,
    ENDED_AT=constants.ENDED_AT_FIELD,
    HEARTBEAT=constants.HEARTBEAT_FIELD,
    WORKER_NAME=constants.WORKER_NAME_FIELD,
    DEADLINE=constants.DEADLINE_FIELD,
    FINISH_BY=constants.FINISH_BY_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    ENQUEUED_AT=constants.ENQUEUED_AT_FIELD,
    QUEUED=JobStatus.QUEUED.value,
    STARTED=JobStatus.STARTED.value,
    FAILED=JobStatus.FAILED.value,
    STOPPED=JobStatus.STOPPED.value,
    CANCELED=JobStatus.CANCELED.value,
    DRAIN_WINDOW_S=constants.DRAIN_RATE_WINDOW_S,
    WAKE_TOKENS_MAX=constants.WAKE_TOKENS_MAX,
    DEMAND_CHANNEL=constants.DEMAND_CHANNEL,
)


class Outcome(IntEnum):
    RETRIED = 0
    FULL = 1
    # Queued, running or succeeded: nothing to run again (value: its RQ status).
    NOT_ENDED = 2
    # No such task, or another tenant's.
    MISSING = 3


@dataclass(frozen=True)
class Retried:
    outcome: Outcome
    # FULL: the function's recent drain rate (tasks/s); NOT_ENDED: the task's RQ status.
    value: str


class Retry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(RETRY)

    async def __call__(
        self, task_id: str, queue: str, *, max_queue: int, tenant: str | None
    ) -> Retried:
        function = constants.function_of_queue(queue)
        outcome, value = await self._script(
            keys=[
                constants.job_key(task_id),
                constants.queue_key(queue),
                constants.RQ_QUEUES_KEY,
                *constants.queue_keys(function),
                constants.wake_key(function),
                constants.drain_key(function),
                constants.alive_key(function),
                constants.leases_key(function),
                constants.results_key(task_id),
                constants.failed_registry_key(queue),
                constants.canceled_registry_key(queue),
                constants.tenants_key(function),
            ],
            args=[max_queue, task_id, utcformat(now()), function, tenant or ""],
        )
        return Retried(Outcome(outcome), value.decode())
