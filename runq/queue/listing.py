"""A function's tasks, page by page, read off the index RQ already keeps: its queue lists and its
started, finished, failed and canceled registries (one each per priority).

A page's cursor names the last entry it looked at, so the next page starts right after it
however the index moved meanwhile: a registry entry by its score and member (exact: an entry
that stays is listed once), a queued task by its id (a task that stays queued is never
skipped; one canceled out of the middle meanwhile may make the next page repeat a few).
Registries are read oldest first (by the expiry RQ scores them with), queues next to run first.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from runq.errors import ValidationFailed
from runq.queue import constants, lua
from runq.queue.tasks import TaskStatus, task_view, text

# Reads up to ARGV[1] index entries from KEYS[ARGV[2]] on, starting after the anchor (member
# ARGV[3] with score ARGV[4]; '' for the start of that key), each with its job hash's fields.
# ARGV[5] says per key whether it is a list ('l') or a sorted set ('z'); ARGV[6..] the job hash
# fields to read. Returns {key index, member, score ('' for a list), task id, fields...} per
# entry, stale ones (no job hash) included: fewer than ARGV[1] means the index is exhausted.
PAGE = lua.script(
    """
-- Whether a sorts after b as Redis sorts members: byte by byte (Lua's own comparison follows
-- the server's locale).
local function after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return #a > #b
end

-- The first position past the anchor.
local function resume(key, zset, member, score)
  if not zset then
    local pos = redis.call('LPOS', key, member)
    -- Gone: claimed, as everything before it was (or canceled: the page may repeat some).
    return pos and pos + 1 or 0
  end
  local rank = redis.call('ZRANK', key, member)
  if rank then
    return rank + 1
  end
  -- Gone: the first entry after it among those of its score, found by bisection.
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. score)
  local hi = redis.call('ZCOUNT', key, '-inf', score)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if after(redis.call('ZRANGE', key, mid, mid)[1], member) then
      hi = mid
    else
      lo = mid + 1
    end
  end
  return lo
end

local want, first = tonumber(ARGV[1]), tonumber(ARGV[2])
local fields = {unpack(ARGV, 6)}
local rows = {}
for k = first, #KEYS do
  local need = want - #rows
  if need <= 0 then
    break
  end
  local zset = string.sub(ARGV[5], k, k) == 'z'
  local from = 0
  if k == first and ARGV[3] ~= '' then
    from = resume(KEYS[k], zset, ARGV[3], ARGV[4])
  end
  local entries, step
  if zset then
    entries, step = redis.call('ZRANGE', KEYS[k], from, from + need - 1, 'WITHSCORES'), 2
  else
    entries, step = redis.call('LRANGE', KEYS[k], from, from + need - 1), 1
  end
  for i = 1, #entries, step do
    local member = entries[i]
    -- A started registry's member is "id:execution".
    local id = string.match(member, '^[^:]+') or member
    local row = {k, member, zset and entries[i + 1] or '', id}
    for _, value in ipairs(redis.call('HMGET', JOB_PREFIX .. id, unpack(fields))) do
      row[#row + 1] = value
    end
    rows[#rows + 1] = row
  end
end
return rows
""",
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
)

# What a page reads of each job hash: what its task JSON shows, and whose it is.
_FIELDS = (
    constants.STATUS_FIELD,
    constants.ORIGIN_FIELD,
    constants.CREATED_AT_FIELD,
    constants.STARTED_AT_FIELD,
    constants.ENDED_AT_FIELD,
    constants.ATTEMPTS_FIELD,
    constants.ERROR_FIELD,
    constants.TENANT_FIELD,
)
_FIELD_NAMES = tuple(name.encode() for name in _FIELDS)

LIMIT_DEFAULT = 50
LIMIT_MAX = 500
# Index entries one request reads at most, and one script call: a tenant's page among many
# other tenants' tasks may come back short (or empty) with a cursor to go on from.
SCAN_MAX = 5000
SCAN_BATCH = 500
CURSOR_MAX_CHARS = 1024
_CURSOR_VERSION = 1


@dataclass(frozen=True)
class _Source:
    key: str
    queue: str
    zset: bool
    # The statuses a task listed from here may have: an entry whose task has moved on since
    # (a stale registry entry, a task retried) is listed where it is now, not here.
    statuses: frozenset[TaskStatus]


def _sources(function: str, tenants: Sequence[str]) -> list[_Source]:
    queues = [
        constants.queue_name(function, priority, tenant)
        for tenant in tenants
        for priority in constants.PRIORITIES
    ]
    kinds: list[tuple[Callable[[str], str], bool, frozenset[TaskStatus]]] = [
        (constants.queue_key, False, frozenset({TaskStatus.QUEUED})),
        (constants.started_registry_key, True, frozenset({TaskStatus.RUNNING})),
        (constants.finished_registry_key, True, frozenset({TaskStatus.SUCCEEDED})),
        # A task timed out while it ran is failed in RQ's terms; one whose deadline passed
        # in the queue, canceled.
        (
            constants.failed_registry_key,
            True,
            frozenset({TaskStatus.FAILED, TaskStatus.TIMED_OUT}),
        ),
        (
            constants.canceled_registry_key,
            True,
            frozenset({TaskStatus.CANCELED, TaskStatus.TIMED_OUT}),
        ),
    ]
    return [
        _Source(key(queue), queue, zset, statuses)
        for key, zset, statuses in kinds
        for queue in queues
    ]


@dataclass(frozen=True)
class Page:
    tasks: list[dict[str, Any]]
    # Where the next page starts; None: there is no more.
    cursor: str | None


@dataclass(frozen=True)
class _Anchor:
    """The last index entry a page looked at: its source (1-based), member and score."""

    source: int = 1
    member: str = ""
    score: str = ""


@dataclass(frozen=True)
class _Query:
    function: str
    status: TaskStatus | None
    tenant: str | None

    def encode(self, anchor: _Anchor) -> str:
        raw = json.dumps(
            [
                _CURSOR_VERSION,
                self.function,
                self.status,
                self.tenant,
                anchor.source,
                anchor.member,
                anchor.score,
            ],
            separators=(",", ":"),
        )
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def decode(self, cursor: str, sources: Sequence[_Source]) -> _Anchor:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            version, function, status, tenant, source, member, score = json.loads(raw)
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
            raise _not_a_cursor() from None
        if [function, status, tenant] != [self.function, self.status, self.tenant]:
            raise ValidationFailed(
                "cursor: it belongs to another listing; page on with the function, status "
                "and tenant that gave it"
            )
        well_formed = (
            version == _CURSOR_VERSION
            and type(source) is int
            and 1 <= source <= len(sources)
            and isinstance(member, str)
            and member
            and isinstance(score, str)
        )
        # A sorted set's anchor carries the score Redis gave it; a list's, none.
        if not well_formed or _is_score(score) != sources[source - 1].zset:
            raise _not_a_cursor()
        return _Anchor(source, member, score)


def _not_a_cursor() -> ValidationFailed:
    return ValidationFailed("cursor: not a cursor this API gave out")


# A score as Redis writes one (and reads back exactly).
_SCORE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?inf", re.ASCII)


def _is_score(value: str) -> bool:
    return _SCORE.fullmatch(value) is not None


class TaskList:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(PAGE)

    async def _tenants(self, function: str) -> list[str]:
        """Every tenant whose tasks the function ever queued: RQ's set of queues holds each
        tenant's queues (fair share), and unlike the tenants set it keeps them once empty.
        DEFAULT_TENANT first, the rest by name, so that a cursor's source stays put."""
        others = set()
        for member in await self._redis.smembers(constants.RQ_QUEUES_KEY):
            name = str(text(member)).removeprefix(constants.queue_key(""))
            tenant = constants.tenant_of_queue(name)
            is_function = constants.is_runq_queue(name) and (
                constants.function_of_queue(name) == function
            )
            if is_function and tenant != constants.DEFAULT_TENANT:
                others.add(tenant)
        return [constants.DEFAULT_TENANT, *sorted(others)]

    async def page(
        self,
        function: str,
        *,
        status: TaskStatus | None = None,
        tenant: str | None = None,
        cursor: str | None = None,
        limit: int = LIMIT_DEFAULT,
    ) -> Page:
        """Up to ``limit`` of the function's tasks with ``status`` (None: any) of ``tenant``
        (None: every tenant's), after ``cursor``."""
        tenants = [tenant] if tenant is not None else await self._tenants(function)
        sources = [s for s in _sources(function, tenants) if status is None or status in s.statuses]
        query = _Query(function, status, tenant)
        anchor = _Anchor() if cursor is None else query.decode(cursor, sources)
        keys = [s.key for s in sources]
        kinds = "".join("z" if s.zset else "l" for s in sources)
        tasks: list[dict[str, Any]] = []
        read = 0
        while True:
            # The first read asks one past the page: an unfiltered last page knows it is last.
            batch = min(SCAN_BATCH, max(limit + 1, 100), SCAN_MAX - read)
            rows = await self._script(
                keys=keys,
                args=[batch, anchor.source, anchor.member, anchor.score, kinds, *_FIELDS],
            )
            read += len(rows)
            exhausted = len(rows) < batch
            for i, row in enumerate(rows):
                if len(tasks) == limit:
                    more = any(_listed(r, sources, status, tenant) for r in rows[i:])
                    return Page(tasks, query.encode(anchor) if more or not exhausted else None)
                anchor = _Anchor(int(row[0]), row[1].decode(), row[2].decode())
                task = _listed(row, sources, status, tenant)
                if task is not None:
                    tasks.append(task)
            if exhausted:
                return Page(tasks, None)
            if read >= SCAN_MAX:
                return Page(tasks, query.encode(anchor))


def _listed(
    row: Sequence[Any],
    sources: Sequence[_Source],
    status: TaskStatus | None,
    tenant: str | None,
) -> dict[str, Any] | None:
    """The row's task JSON if the listing shows it here, else None."""
    source = sources[int(row[0]) - 1]
    fields = {name: value for name, value in zip(_FIELD_NAMES, row[4:], strict=True) if value}
    if fields.get(b"origin", b"").decode() != source.queue:
        return None  # no job hash any more (an entry not yet cleaned), or not this queue's
    owner = fields.get(_TENANT, _DEFAULT_TENANT).decode()
    if tenant is not None and owner != tenant:
        return None
    task = task_view(row[3].decode(), fields)
    shown = TaskStatus(task["status"])
    if shown not in source.statuses or (status is not None and shown != status):
        return None
    return task


_TENANT = constants.TENANT_FIELD.encode()
_DEFAULT_TENANT = constants.DEFAULT_TENANT.encode()
