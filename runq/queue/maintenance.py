"""Registry maintenance: what RQ's own worker would prune, pruned by whichever runq process runs.

A task's job hash and result stream expire with its TTL, but its entry in RQ's finished, failed
or canceled registry (scored by that expiry) stays until someone removes it, and RQ's sets of
workers keep a killed worker's key for good. RQ's worker prunes them in its maintenance; runq's
workers never run RQ's work loop, so every runq process (gateway, worker, autoscaler) tries
this cleanup every quarter of ``maintenance_interval_s``, and a lock lets one run per period.

RQ's ``clean_registries`` is not used: its StartedJobRegistry cleanup would fail as abandoned a
runq task running longer than its RQ execution's TTL (runq's leases say it is alive, not RQ's
execution heartbeat), RQ 3's CanceledJobRegistry cleanup does nothing, and RQ reads expiry on
the client's clock where runq scores registries on the server's.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis import Redis
from redis.exceptions import RedisError

from runq.queue import constants, lua

logger = logging.getLogger("runq.maintenance")

# The lock is held this share of the period; each process tries once per (1 - share) of it.
_LOCK_SHARE = 0.75

# KEYS[1] the lock; ARGV[1] how long to hold it (ms)
# Returns false when another process holds the lock, else {registry entries, workers removed}.
# Negative scores are kept, as RQ's cleanup keeps them: RQ scores an entry that never expires -1.
# A tenant's queue that holds tasks while its tenant is not in its function's tenants set (a
# tool outside runq, such as `rq requeue`, pushed them) puts it back, so the claim sees them.
CLEAN = lua.script(
    """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return false
end
local now = tostring(server_now())
local entries, workers = 0, 0
local queues = {}
for _, key in ipairs(redis.call('SMEMBERS', QUEUES_KEY)) do
  local queue = string.sub(key, #QUEUE_PREFIX + 1)
  if string.sub(queue, 1, #NAME_PREFIX) == NAME_PREFIX then
    queues[#queues + 1] = queue
    for _, registry in ipairs({FINISHED_PREFIX, FAILED_PREFIX, CANCELED_PREFIX}) do
      entries = entries + redis.call('ZREMRANGEBYSCORE', registry .. queue, 0, now)
    end
    local name = string.sub(queue, #NAME_PREFIX + 1)
    local at = string.find(name, TENANT_SEPARATOR, 1, true)
    if at and redis.call('LLEN', key) > 0 then
      local function_name = string.match(string.sub(name, 1, at - 1), '^[^.]+')
      redis.call('SADD', TENANTS_PREFIX .. function_name, string.sub(name, at + 1))
    end
  end
end
for _, worker in ipairs(redis.call('SMEMBERS', WORKERS_KEY)) do
  if redis.call('EXISTS', worker) == 0 then
    workers = workers + redis.call('SREM', WORKERS_KEY, worker)
    for _, queue in ipairs(queues) do
      redis.call('SREM', WORKERS_BY_QUEUE_PREFIX .. queue, worker)
    end
  end
end
return {entries, workers}
""",
    lua.SERVER_NOW,
    QUEUES_KEY=constants.RQ_QUEUES_KEY,
    QUEUE_PREFIX=constants.RQ_QUEUE_PREFIX,
    NAME_PREFIX=constants.QUEUE_NAME_PREFIX,
    FINISHED_PREFIX=constants.RQ_FINISHED_PREFIX,
    FAILED_PREFIX=constants.RQ_FAILED_PREFIX,
    CANCELED_PREFIX=constants.RQ_CANCELED_PREFIX,
    TENANT_SEPARATOR=constants.TENANT_QUEUE_SEPARATOR,
    TENANTS_PREFIX=constants.TENANTS_PREFIX,
    WORKERS_KEY=constants.RQ_WORKERS_KEY,
    WORKERS_BY_QUEUE_PREFIX=constants.RQ_WORKERS_BY_QUEUE_PREFIX,
)


_KEYS = [constants.MAINTENANCE_LOCK_KEY]


def _args(interval_s: float) -> list[int]:
    """The script's ARGV: how long the lock is held, in ms."""
    return [max(1, int(interval_s * _LOCK_SHARE * 1000))]


def _logged(reply: list[int] | None) -> bool:
    if reply and any(reply):
        logger.debug("maintenance removed %d registry entries and %d gone workers", *reply)
    return reply is not None


class Maintenance:
    """The cleanup over a sync connection (workers, the autoscaler): ``run`` every
    ``try_interval_s``. With the lock held 3/4 of the period, runs are at least 3/4 and at most
    one period apart while any process runs."""

    def __init__(self, connection: Redis, interval_s: float) -> None:
        self._script = connection.register_script(CLEAN)
        self._args = _args(interval_s)
        self.try_interval_s = interval_s * (1 - _LOCK_SHARE)

    def run(self) -> bool:
        """Cleans unless another process did within the period; True when this one did."""
        # A RedisError is the caller's outage to wait out; the next run cleans what this missed.
        return _logged(self._script(keys=_KEYS, args=self._args))


class AsyncMaintenance:
    """The same cleanup over the gateway's asyncio connection."""

    def __init__(self, redis: aioredis.Redis, interval_s: float) -> None:
        self._script = redis.register_script(CLEAN)
        self._args = _args(interval_s)
        self.try_interval_s = interval_s * (1 - _LOCK_SHARE)

    async def run(self) -> None:
        try:
            reply = await self._script(keys=_KEYS, args=self._args)
        except (RedisError, OSError) as exc:
            # As the gateway's other loops: the next run cleans what this one could not.
            logger.debug("registry maintenance failed: %s", exc)
            return
        _logged(reply)
