"""A worker claims a batch: tenants in turn, highest priority first within each, within
max_concurrency, under a lease."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from rq.job import JobStatus
from rq.utils import now, utcformat
from rq.worker import WorkerStatus

from runq.queue import constants, lua
from runq.queue.line import Line
from runq.queue.tasks import deadline_passed_error

# Takes up to ARGV[1] ids off the function's queues and marks every still-queued task started
# under a lease, with an RQ execution as RQ's own worker would record it (so `rq info` and
# rq-dashboard show it running). With DEFAULT_TENANT's tasks alone queued, it pops its three
# queues highest priority first, as it always did; with other tenants' too, it takes from the
# tenants in turn by their weights (stride scheduling: constants.py, at TENANT_QUEUE_SEPARATOR),
# each tenant's highest priority first, and drops from the tenants set any it finds empty.
# max_concurrency counts live leases across all workers; lapsed ones (a crashed worker's) no
# longer hold a slot. Tasks whose deadline has passed are ended here, never started; their
# waiters hear the bare id and re-read the task. A task leaves its quota's queued set either way.
# A claim carries a token: sent again with the same token (its reply was lost to a dropped
# connection, and the tasks it took are this worker's, leased), it answers the tasks it took
# that are still this worker's, and takes nothing more.
# KEYS[1..3] the function's queue lists, highest priority first, KEYS[4] leases, KEYS[5] wake
# list, KEYS[6] drain hash, KEYS[7] the worker's RQ hash, KEYS[8] the worker's executions set,
# KEYS[9] the worker's last claim, KEYS[10] the function's tenants set, KEYS[11] its fair hash,
# KEYS[12] the tenants' weights
# ARGV[1] most tasks to take, ARGV[2] worker name, ARGV[3] now (RQ's time format, for display),
# ARGV[4] runq error JSON for tasks past their deadline, ARGV[5] max_concurrency (0: no cap),
# ARGV[6] the claim's token, ARGV[7] 1 when it is sent again
# Returns {started, expired ids, at_capacity, server now}: started is a list of
# {id, execution id, the execution's start (server time), flat job hash}; canceled or
# deleted tasks are skipped; at_capacity is 1 when every concurrency slot was taken.
CLAIM = lua.script(
    """
local now = server_now()
if ARGV[7] == '1' and redis.call('HGET', KEYS[9], CLAIM_ID) == ARGV[6] then
  local started = {}
  local taken = redis.call('HGET', KEYS[9], CLAIM_TAKEN) or ''
  for id, execution in string.gmatch(taken, '(%S+):(%x+)') do
    local key = JOB_PREFIX .. id
    local job = redis.call('HMGET', key, STATUS, WORKER_NAME)
    if job[1] == STARTED and job[2] == ARGV[2] then
      local execution_key = EXECUTION_PREFIX .. id .. ':' .. execution
      local began = redis.call('HGET', execution_key, CREATED_AT) or tostring(now)
      started[#started + 1] = {id, execution, began, redis.call('HGETALL', key)}
    end
  end
  return {started, {}, 0, tostring(now)}
end
local wanted = tonumber(ARGV[1])
local cap = tonumber(ARGV[5])
local at_capacity = 0
if cap > 0 then
  local free = cap - redis.call('ZCOUNT', KEYS[4], '(' .. tostring(now), '+inf')
  if free <= 0 then
    at_capacity = 1
  end
  wanted = math.max(math.min(wanted, free), 0)
end
local ids = {}
local function pop(keys, count)
  for q = 1, 3 do
    if count <= 0 then
      break
    end
    local popped = redis.call('LPOP', keys[q], count)
    if popped then
      for _, id in ipairs(popped) do
        ids[#ids + 1] = id
      end
      count = count - #popped
    end
  end
end
local left = 0
local tenants = redis.call('SMEMBERS', KEYS[10])
if #tenants == 0 then
  pop(KEYS, wanted)
  -- A pop that came up short emptied the queues; an empty list is no key, so one EXISTS
  -- tells whether any is left.
  if #ids == wanted then
    left = redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3])
  end
else
  local names = {DEFAULT_TENANT}
  local fields = {FAIR_VT}
  for i, tenant in ipairs(tenants) do
    names[i + 1] = tenant
  end
  for i, name in ipairs(names) do
    fields[i + 1] = FAIR_TURN .. name
  end
  local weights = redis.call('HMGET', KEYS[12], unpack(names))
  local stored = redis.call('HMGET', KEYS[11], unpack(fields))
  local vt = tonumber(stored[1] or '') or 0
  local groups = {}
  for i, name in ipairs(names) do
    local keys = {KEYS[1], KEYS[2], KEYS[3]}
    if i > 1 then
      for q = 1, 3 do
        keys[q] = KEYS[q] .. TENANT_SEPARATOR .. name
      end
    end
    local queued = redis.call('LLEN', keys[1]) + redis.call('LLEN', keys[2])
      + redis.call('LLEN', keys[3])
    if queued > 0 then
      -- Back from idle, a tenant starts at the virtual time: no credit saved up meanwhile.
      local pass = math.max(tonumber(stored[i + 1] or '') or 0, vt)
      local weight = tonumber(weights[i] or '') or DEFAULT_WEIGHT
      groups[#groups + 1] = {name = name, keys = keys, queued = queued, take = 0,
                             pass = pass, stride = 1 / weight, tenant = i > 1}
    elseif i > 1 then
      redis.call('SREM', KEYS[10], name)
    end
  end
  for _ = 1, wanted do
    local turn = nil
    for _, group in ipairs(groups) do
      if group.queued > 0 and (turn == nil or group.pass < turn.pass) then
        turn = group
      end
    end
    if turn == nil then
      break
    end
    vt = turn.pass
    turn.pass = turn.pass + turn.stride
    turn.take = turn.take + 1
    turn.queued = turn.queued - 1
  end
  local passes = {FAIR_VT, tostring(vt)}
  for _, group in ipairs(groups) do
    pop(group.keys, group.take)
    left = left + group.queued
    passes[#passes + 1] = FAIR_TURN .. group.name
    passes[#passes + 1] = tostring(group.pass)
    if group.tenant and group.queued == 0 then
      redis.call('SREM', KEYS[10], group.name)
    end
  end
  if left == 0 then
    redis.call('DEL', KEYS[11])
  elseif #ids > 0 then
    redis.call('HSET', KEYS[11], unpack(passes))
    redis.call('EXPIRE', KEYS[11], FAIR_TTL_S)
  end
end
local lease_until = now + LEASE_TTL_S
-- The executions' start, to the microsecond, as RQ reads it and as the record passes it back.
local began = string.format('%.6f', now)
local started, expired, taken = {}, {}, {}
-- Members to add, by key: one variadic call per key for the whole batch.
local leases, runs = {}, {}
local runs_ttl = 0
for _, id in ipairs(ids) do
  local key = JOB_PREFIX .. id
  local held = redis.call('HMGET', key, STATUS, DEADLINE, RESULT_TTL, ORIGIN, TIMEOUT, REPLY_TO,
                          ATTEMPTS, QUOTA)
  if held[1] == QUEUED then
    if held[8] then
      redis.call('ZREM', held[8], id)
    end
    local deadline = tonumber(held[2] or '')
    if deadline and deadline <= now then
      local ttl = tonumber(held[3] or DEFAULT_TTL_S)
      redis.call('HSET', key, STATUS, CANCELED, ENDED_AT, ARGV[3], ERROR, ARGV[4])
      redis.call('ZADD', CANCELED_PREFIX .. held[4], now + ttl, id)
      redis.call('EXPIRE', key, ttl)
      redis.call('PUBLISH', TASK_CHANNEL_PREFIX .. id, id)
      if held[6] then
        redis.call('PUBLISH', held[6], id)
      end
      expired[#expired + 1] = id
    else
      local attempt = (tonumber(held[7] or '0') or 0) + 1
      redis.call('HSET', key, STATUS, STARTED, STARTED_AT, ARGV[3], HEARTBEAT, ARGV[3],
                 WORKER_NAME, ARGV[2], ATTEMPTS, attempt)
      redis.call('PERSIST', key)
      leases[#leases + 1] = lease_until
      leases[#leases + 1] = id
      -- RQ's execution of this run: its id only needs to be unique per job.
      local execution = string.sub(redis.sha1hex(id .. ARGV[2] .. now .. attempt), 1, 32)
      local composite = id .. ':' .. execution
      local timeout = tonumber(held[5] or '0')
      local ttl = MONITORING_S + GRACE_S
      if timeout > 0 then
        ttl = math.floor(math.min(timeout, MONITORING_S)) + GRACE_S
      end
      local execution_key = EXECUTION_PREFIX .. composite
      redis.call('HSET', execution_key, EXECUTION_ID, execution, EXECUTION_JOB, id,
                 CREATED_AT, began, HEARTBEAT, now, WORKER_NAME, ARGV[2])
      redis.call('EXPIRE', execution_key, ttl)
      redis.call('ZADD', EXECUTIONS_PREFIX .. id, math.floor(now) + ttl + GRACE_S, execution)
      redis.call('EXPIRE', EXECUTIONS_PREFIX .. id, ttl + GRACE_S)
      add(runs, STARTED_PREFIX .. held[4], math.floor(now) + ttl, composite)
      runs_ttl = math.max(runs_ttl, ttl + GRACE_S)
      started[#started + 1] = {id, execution, began, redis.call('HGETALL', key)}
      taken[#taken + 1] = composite
    end
  end
end
if #started > 0 then
  call_with('ZADD', KEYS[4], leases)
  for registry, members in pairs(runs) do
    call_with('ZADD', registry, members)
  end
  call_with('SADD', KEYS[8], taken)
  redis.call('EXPIRE', KEYS[8], runs_ttl)
  redis.call('HSET', KEYS[7], WORKER_STATE, BUSY)
  redis.call('HSET', KEYS[9], CLAIM_ID, ARGV[6], CLAIM_TAKEN, table.concat(taken, ' '))
  redis.call('EXPIRE', KEYS[9], math.ceil(LEASE_TTL_S))
end
if #ids > 0 then
  local rate = drain_rate(KEYS[6], now, DRAIN_WINDOW_S) + #ids / DRAIN_WINDOW_S
  redis.call('HSET', KEYS[6], DRAIN_RATE_FIELD, tostring(rate), DRAIN_AT_FIELD, tostring(now))
  redis.call('EXPIRE', KEYS[6], DRAIN_TTL_S)
end
if left == 0 then
  -- Nothing left to wake anyone for.
  redis.call('DEL', KEYS[5])
end
return {started, expired, at_capacity, tostring(now)}
""",
    lua.SERVER_NOW,
    lua.DRAIN_RATE,
    lua.VARIADIC,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    CANCELED_PREFIX=constants.RQ_CANCELED_PREFIX,
    STARTED_PREFIX=constants.RQ_STARTED_PREFIX,
    EXECUTION_PREFIX=constants.RQ_EXECUTION_PREFIX,
    EXECUTIONS_PREFIX=constants.RQ_EXECUTIONS_PREFIX,
    TASK_CHANNEL_PREFIX=constants.TASK_CHANNEL_PREFIX,
    STATUS=constants.STATUS_FIELD,
    ORIGIN=constants.ORIGIN_FIELD,
    TIMEOUT=constants.TIMEOUT_FIELD,
    STARTED_AT=constants.STARTED_AT_FIELD,
    CREATED_AT=constants.CREATED_AT_FIELD,
    EXECUTION_ID=constants.EXECUTION_ID_FIELD,
    EXECUTION_JOB=constants.EXECUTION_JOB_FIELD,
    WORKER_STATE=constants.WORKER_STATE_FIELD,
    BUSY=WorkerStatus.BUSY.value,
    ENDED_AT=constants.ENDED_AT_FIELD,
    HEARTBEAT=constants.HEARTBEAT_FIELD,
    WORKER_NAME=constants.WORKER_NAME_FIELD,
    RESULT_TTL=constants.RESULT_TTL_FIELD,
    DEADLINE=constants.DEADLINE_FIELD,
    ERROR=constants.ERROR_FIELD,
    ATTEMPTS=constants.ATTEMPTS_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    QUEUED=JobStatus.QUEUED.value,
    STARTED=JobStatus.STARTED.value,
    CANCELED=JobStatus.CANCELED.value,
    DEFAULT_TTL_S=constants.DEFAULT_RESULT_TTL_S,
    LEASE_TTL_S=constants.LEASE_TTL_S,
    MONITORING_S=constants.RQ_JOB_MONITORING_INTERVAL_S,
    GRACE_S=constants.RQ_EXECUTION_GRACE_S,
    DRAIN_WINDOW_S=constants.DRAIN_RATE_WINDOW_S,
    DRAIN_TTL_S=constants.DRAIN_TTL_S,
    CLAIM_ID=constants.CLAIM_ID_FIELD,
    CLAIM_TAKEN=constants.CLAIM_TAKEN_FIELD,
    QUOTA=constants.QUOTA_FIELD,
    DEFAULT_TENANT=constants.DEFAULT_TENANT,
    DEFAULT_WEIGHT=constants.DEFAULT_TENANT_WEIGHT,
    TENANT_SEPARATOR=constants.TENANT_QUEUE_SEPARATOR,
    FAIR_VT=constants.FAIR_VIRTUAL_TIME_FIELD,
    FAIR_TURN=constants.FAIR_TURN_PREFIX,
    FAIR_TTL_S=constants.FAIR_TTL_S,
)

RawHash = dict[bytes, bytes]

# Claims run every BATCH_FILL_POLL_S while a batching window is open: built once.
_DEADLINE_PASSED = deadline_passed_error()


@dataclass(frozen=True)
class Started:
    """A task the claim marked started: its RQ execution (id, and start as the server wrote
    it) and its job hash as it is now."""

    task_id: str
    execution_id: str
    execution_started: str
    fields: RawHash


@dataclass
class Claimed:
    """Tasks a worker now owns (marked started, leased), and tasks found past their deadline."""

    started: list[Started] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    # Every max_concurrency slot was taken: wait for one to free, not for new work.
    at_capacity: bool = False
    # The Redis server's clock at the claim, and ours, to turn server deadlines into time left.
    server_now: float = 0.0
    claimed_at: float = field(default_factory=time.monotonic)

    @property
    def empty(self) -> bool:
        return not self.started and not self.expired

    def extend(self, other: Claimed) -> None:
        self.started += other.started
        self.expired += other.expired

    def seconds_left(self, server_deadline: float) -> float:
        return server_deadline - self.server_now - (time.monotonic() - self.claimed_at)


class Claim:
    """Claims batches of one function's tasks for one worker."""

    def __init__(self, line: Line, function: str, worker_name: str) -> None:
        self._line = line
        self._script = line.script(CLAIM)
        self._worker_name = worker_name
        self._keys = [
            *constants.queue_keys(function),
            constants.leases_key(function),
            constants.wake_key(function),
            constants.drain_key(function),
            constants.worker_key(worker_name),
            constants.worker_executions_key(worker_name),
            constants.claim_key(worker_name),
            constants.tenants_key(function),
            constants.fair_key(function),
            constants.TENANT_WEIGHTS_KEY,
        ]
        # The token of a claim whose reply never came: the next claim sends it again.
        self._unanswered: str | None = None
        self._wake_key = constants.wake_key(function)
        self._slots_key = constants.slots_key(function)

    def __call__(self, wanted: int, max_concurrency: int | None) -> Claimed:
        """Claims up to ``wanted`` tasks; after a claim that failed on the way (Redis went away),
        what that one took, if it ran, and nothing more."""
        again = self._unanswered is not None
        token = self._unanswered or secrets.token_hex(8)
        self._unanswered = token
        started, expired, at_capacity, server_now = self._script(
            keys=self._keys,
            args=[
                max(wanted, 0),
                self._worker_name,
                utcformat(now()),
                _DEADLINE_PASSED,
                max_concurrency or 0,
                token,
                int(again),
            ],
        )
        self._unanswered = None
        return Claimed(
            started=[_started(row) for row in started],
            expired=[task_id.decode() for task_id in expired],
            at_capacity=bool(at_capacity),
            server_now=float(server_now),
        )

    def wait_for_work(self, at_capacity: bool, block_s: float) -> None:
        """Blocks until an enqueue (or, at capacity, a freed slot) leaves a token, or block_s."""
        # Tokens are hints: whatever wakes this worker, the next claim decides. A lapsed lease
        # frees a slot without a token, so the timeout doubles as the retry.
        self._line("BLPOP", self._slots_key if at_capacity else self._wake_key, block_s)


def _started(row: list[Any]) -> Started:
    task_id, execution_id, began, flat = row
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return Started(task_id.decode(), execution_id.decode(), began.decode(), fields)
