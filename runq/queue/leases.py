"""A worker's heartbeat: its presence among the function's live workers, and its tasks' leases."""

from __future__ import annotations

from collections.abc import Sequence

from redis import Redis

from runq.queue import constants, lua

# Renews the worker's presence and the leases of the tasks it runs. A lease released, or one
# that lapsed (the worker stalled past it: its task may be re-queued and run elsewhere), stays
# gone.
# KEYS[1] leases, KEYS[2] live workers, KEYS[3] when a worker was last seen; ARGV[1] worker
# name, ARGV[2] how long its presence lasts (s), ARGV[3..] task ids
# Returns the ids whose lease had lapsed.
RENEW = lua.script(
    """
local now = server_now()
local until_then = now + LEASE_TTL_S
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tostring(now))
redis.call('SET', KEYS[3], tostring(now))
local lost = {}
for i = 3, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  -- No lease: released by the batch's record (a renewal racing the end of the batch), or
  -- already reaped; either way it is not this renewal's to bring back.
  if expiry then
    if tonumber(expiry) > now then
      redis.call('ZADD', KEYS[1], until_then, ARGV[i])
    else
      lost[#lost + 1] = ARGV[i]
    end
  end
end
return lost
""",
    lua.SERVER_NOW,
    LEASE_TTL_S=constants.LEASE_TTL_S,
)


class Heartbeat:
    def __init__(
        self, connection: Redis, function: str, worker_name: str, presence_ttl_s: float
    ) -> None:
        self._connection = connection
        self._presence_ttl_s = presence_ttl_s
        self._script = connection.register_script(RENEW)
        self._keys = [
            constants.leases_key(function),
            constants.alive_key(function),
            constants.seen_key(function),
        ]
        self._worker_name = worker_name

    def renew(self, task_ids: Sequence[str]) -> list[str]:
        """Renews the worker's presence and these tasks' leases; returns the ids that lapsed."""
        args: list[str | float] = [self._worker_name, self._presence_ttl_s, *task_ids]
        lost = self._script(keys=self._keys, args=args)
        return [task_id.decode() for task_id in lost]

    def withdraw(self) -> None:
        """The worker is no longer live (it stops)."""
        self._connection.zrem(self._keys[1], self._worker_name)
