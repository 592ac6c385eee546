"""The webhook delivery queue: a hash per delivery and a sorted set of them by due time.

A delivery is added inside the transaction that records its task's outcome, so a recorded
outcome always has its delivery and an unrecorded one none. A sender claims due ones by pushing
their due time WEBHOOK_LEASE_S ahead, so two senders never send one delivery at once; one that
dies while sending leaves the delivery to be sent again once the lease passes (at least once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from runq.queue import constants, lua

_FIELDS = {
    "URL": constants.WEBHOOK_URL_FIELD,
    "BODY": constants.WEBHOOK_BODY_FIELD,
    "ATTEMPTS": constants.WEBHOOK_ATTEMPTS_FIELD,
}

# A new delivery, due now. Runs inside the caller's MULTI (the worker's record transaction).
# KEYS[1] delivery hash, KEYS[2] due set; ARGV[1] url, ARGV[2] body, ARGV[3] task id
ENQUEUE = lua.script(
    """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], URL, ARGV[1], BODY, ARGV[2], ATTEMPTS, 0)
redis.call('EXPIRE', KEYS[1], TTL_S)
redis.call('ZADD', KEYS[2], server_now(), ARGV[3])
return 1
""",
    lua.SERVER_NOW,
    TTL_S=constants.WEBHOOK_TTL_S,
    **_FIELDS,
)

# Claims due deliveries: counts the attempt and pushes the due time ARGV[1] s ahead (a lease), so
# no other sender takes them meanwhile. Ids whose hash has expired are dropped from the set.
# KEYS[1] due set; ARGV[1] lease s, ARGV[2] most to claim
# Returns {{task id, url, body, attempt}, ...}
CLAIM = lua.script(
    """
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(due) do
  local key = PREFIX .. id
  local delivery = redis.call('HMGET', key, URL, BODY)
  if delivery[1] and delivery[2] then
    local attempt = redis.call('HINCRBY', key, ATTEMPTS, 1)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    claimed[#claimed + 1] = {id, delivery[1], delivery[2], attempt}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
""",
    lua.SERVER_NOW,
    PREFIX=constants.WEBHOOK_PREFIX,
    **_FIELDS,
)

# Makes a claimed delivery due again ARGV[2] s from now; ARGV[3] '1': the claimed attempt was
# never made (the sender is stopping), so it is not counted. XX: a delivery another sender has
# finished meanwhile is not brought back.
# KEYS[1] due set, KEYS[2] delivery hash; ARGV[1] task id, ARGV[2] delay s, ARGV[3] '1' or '0'
RESCHEDULE = lua.script(
    """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[2], ATTEMPTS, -1)
end
redis.call('ZADD', KEYS[1], 'XX', server_now() + tonumber(ARGV[2]), ARGV[1])
return 1
""",
    lua.SERVER_NOW,
    **_FIELDS,
)


def enqueue(pipe: Pipeline, task_id: str, url: str, body: bytes) -> None:
    """Adds a delivery of ``body`` to ``url``, due now, as one command in ``pipe``.

    Called inside the transaction that records the task's outcome, it is written with it or not
    at all. The URL is the one ``runq.webhooks.check_url`` accepted at submit; the sender checks
    it again.
    """
    pipe.eval(
        ENQUEUE, 2, constants.webhook_key(task_id), constants.WEBHOOKS_DUE_KEY, url, body, task_id
    )


@dataclass(frozen=True)
class Delivery:
    task_id: str
    url: str
    body: bytes
    # 1 for the first attempt.
    attempt: int

    @classmethod
    def from_reply(cls, row: Sequence[Any]) -> Delivery:
        task_id, url, body, attempt = row
        return cls(_text(task_id), _text(url), _bytes(body), int(attempt))


class DeliveryQueue:
    def __init__(self, connection: Redis) -> None:
        self._connection = connection
        self._claim = connection.register_script(CLAIM)
        self._reschedule = connection.register_script(RESCHEDULE)

    def claim(self, lease_s: float, most: int) -> list[Delivery]:
        """Up to ``most`` due deliveries, each held for ``lease_s`` and its attempt counted."""
        rows = self._claim(keys=[constants.WEBHOOKS_DUE_KEY], args=[lease_s, most])
        return [Delivery.from_reply(row) for row in rows]

    def retry_in(self, delivery: Delivery, delay_s: float, *, attempted: bool = True) -> None:
        """Due again in ``delay_s``; ``attempted=False``: the claimed attempt was never made."""
        self._reschedule(
            keys=[constants.WEBHOOKS_DUE_KEY, constants.webhook_key(delivery.task_id)],
            args=[delivery.task_id, delay_s, "0" if attempted else "1"],
        )

    def done(self, delivery: Delivery) -> None:
        """Delivered, or given up on."""
        with self._connection.pipeline() as pipe:
            pipe.delete(constants.webhook_key(delivery.task_id))
            pipe.zrem(constants.WEBHOOKS_DUE_KEY, delivery.task_id)
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
