"""Finding tasks whose worker died: a lapsed lease re-queues its task or fails it worker_lost.

Every worker reaps its own function as it loops, and the autoscaler reaps every function it
manages, so a task is found even when its function has no worker left.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq.job import JobStatus
from rq.utils import now, utcformat

from runq.errors import ErrorCode
from runq.metrics import metrics
from runq.queue import constants, lua
from runq.queue.tasks import TaskStatus, error_json

logger = logging.getLogger("runq.reaper")

# Each task whose lease lapsed (its worker died or lost Redis) goes back to the front of its
# queue (its tenant's, counted in its quota again) while it has retries left, else ends failed
# with code worker_lost. RQ's execution records of the lost run are removed, as RQ's own
# registry cleanup would.
# KEYS[1] leases, KEYS[2] wake list, KEYS[3] the function's tenants set
# ARGV[1] retries, ARGV[2] worker_lost error JSON, ARGV[3] now (RQ's format)
# Returns {re-queued ids, failed ids}.
REAP = lua.script(
    """
local now = server_now()
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tostring(now), 'LIMIT', 0, BATCH_MAX)
local requeued, failed = {}, {}
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], id)
  local key = JOB_PREFIX .. id
  local held = redis.call('HMGET', key, STATUS, ORIGIN, ATTEMPTS, FAILURE_TTL, REPLY_TO, QUOTA)
  if held[1] == STARTED then
    local origin = held[2]
    local executions = EXECUTIONS_PREFIX .. id
    for _, execution in ipairs(redis.call('ZRANGE', executions, 0, -1)) do
      redis.call('ZREM', STARTED_PREFIX .. origin, id .. ':' .. execution)
      redis.call('DEL', EXECUTION_PREFIX .. id .. ':' .. execution)
    end
    redis.call('DEL', executions)
    if tonumber(held[3] or '0') <= tonumber(ARGV[1]) then
      redis.call('HSET', key, STATUS, QUEUED)
      redis.call('HDEL', key, WORKER_NAME)
      -- The front: it waited its turn once already.
      redis.call('LPUSH', QUEUE_PREFIX .. origin, id)
      local at = string.find(origin, TENANT_SEPARATOR, 1, true)
      if at then
        redis.call('SADD', KEYS[3], string.sub(origin, at + 1))
      end
      if held[6] then
        redis.call('ZADD', held[6], now, id)
      end
      redis.call('LPUSH', KEYS[2], '1')
      requeued[#requeued + 1] = id
    else
      local ttl = tonumber(held[4] or DEFAULT_TTL_S)
      redis.call('HSET', key, STATUS, FAILED, ENDED_AT, ARGV[3], ERROR, ARGV[2])
      redis.call('ZADD', FAILED_PREFIX .. origin, now + ttl, id)
      redis.call('EXPIRE', key, ttl)
      redis.call('PUBLISH', TASK_CHANNEL_PREFIX .. id, id)
      if held[5] then
        redis.call('PUBLISH', held[5], id)
      end
      failed[#failed + 1] = id
    end
  end
end
return {requeued, failed}
""",
    lua.SERVER_NOW,
    BATCH_MAX=constants.REAP_BATCH_MAX,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    QUEUE_PREFIX=constants.RQ_QUEUE_PREFIX,
    STARTED_PREFIX=constants.RQ_STARTED_PREFIX,
    FAILED_PREFIX=constants.RQ_FAILED_PREFIX,
    EXECUTION_PREFIX=constants.RQ_EXECUTION_PREFIX,
    EXECUTIONS_PREFIX=constants.RQ_EXECUTIONS_PREFIX,
    TASK_CHANNEL_PREFIX=constants.TASK_CHANNEL_PREFIX,
    STATUS=constants.STATUS_FIELD,
    ORIGIN=constants.ORIGIN_FIELD,
    ATTEMPTS=constants.ATTEMPTS_FIELD,
    FAILURE_TTL=constants.FAILURE_TTL_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    QUOTA=constants.QUOTA_FIELD,
    TENANT_SEPARATOR=constants.TENANT_QUEUE_SEPARATOR,
    WORKER_NAME=constants.WORKER_NAME_FIELD,
    ENDED_AT=constants.ENDED_AT_FIELD,
    ERROR=constants.ERROR_FIELD,
    QUEUED=JobStatus.QUEUED.value,
    STARTED=JobStatus.STARTED.value,
    FAILED=JobStatus.FAILED.value,
    DEFAULT_TTL_S=constants.DEFAULT_RESULT_TTL_S,
)


class Reaper:
    def __init__(self, connection: Redis, function: str, retries: int) -> None:
        self.function = function
        self.retries = retries
        self._keys = [
            constants.leases_key(function),
            constants.wake_key(function),
            constants.tenants_key(function),
        ]
        self._reap = connection.register_script(REAP)

    def reap(self) -> tuple[list[str], list[str]]:
        """Handles every lapsed lease of the function; returns (re-queued, failed) task ids."""
        requeued, failed = self._reap(
            keys=self._keys,
            args=[
                self.retries,
                error_json(
                    ErrorCode.WORKER_LOST,
                    f"the worker running it stopped answering, and its retries "
                    f"({self.retries}) are spent",
                ),
                utcformat(now()),
            ],
        )
        ids = [x.decode() for x in requeued], [x.decode() for x in failed]
        if ids[1]:
            metrics().tasks.labels(self.function, TaskStatus.FAILED.value).inc(len(ids[1]))
        if ids[0] or ids[1]:
            logger.warning(
                "%s: %d task(s) of a lost worker re-queued, %d failed worker_lost",
                self.function,
                len(ids[0]),
                len(ids[1]),
            )
        return ids
