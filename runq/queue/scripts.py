"""Lua scripts for every multi-step state change that must be atomic across processes.

Each script documents its KEYS and ARGV. Job hashes use RQ's layout (``status`` values are RQ's
JobStatus), so RQ's own tools keep reading them.
"""

from __future__ import annotations

# Server time in epoch seconds: deadlines, leases and the drain rate are all read against the
# Redis server's clock, so gateways and workers on hosts whose clocks disagree still agree.
_SERVER_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# The drain rate decayed to `now`: an exponentially weighted count of tasks per second.
_DRAIN_RATE = """
local function drain_rate(key, now, window)
  local drain = redis.call('HMGET', key, 'rate', 'at')
  if not drain[1] then
    return 0
  end
  return tonumber(drain[1]) * math.exp((tonumber(drain[2]) - now) / window)
end
"""

# Admission: replay an idempotency key, or check the queue cap and enqueue, in one step, so any
# number of gateways together never push a function past max_queue.
# KEYS[1] the task's queue list, KEYS[2] its job hash, KEYS[3] RQ's set of queue keys,
# KEYS[4..6] the function's queue lists (every priority), KEYS[7] wake list, KEYS[8] drain hash,
# KEYS[9] the function's live workers, KEYS[10] idempotency key (absent: none)
# ARGV[1] max_queue, ARGV[2] task id, ARGV[3] drain window s, ARGV[4] idempotency TTL s,
# ARGV[5] body digest, ARGV[6] prefix of job hash keys ("rq:job:"), ARGV[7] wake tokens max,
# ARGV[8] seconds from now it must start by ('' none), ARGV[9] seconds from now it must end by
# ('' none), ARGV[10] demand channel, ARGV[11] function name, ARGV[12..] job hash field/value
# pairs. With no live worker, the function name is published on the demand channel: an
# autoscaler at zero replicas starts one at once instead of on its next look.
# Returns {1, id} enqueued; {0, drain rate} the queue was full (nothing written); {2, id} the
# key's task, same body; {3, id} the key's task, another body; {4, id} the key's task has
# expired. A key whose task was withdrawn before it ever started (a predict that timed out in
# the queue) is free again: a retry must be able to run what never ran.
ENQUEUE = (
    _SERVER_NOW
    + _DRAIN_RATE
    + """
local idempotency = KEYS[10]
if idempotency then
  local held = redis.call('HMGET', idempotency, 'task', 'body')
  if held[1] then
    local task = redis.call('HMGET', ARGV[6] .. held[1], 'status', 'started_at')
    if not task[1] then
      return {4, held[1]}
    end
    local never_ran = task[1] == 'canceled' and (not task[2] or task[2] == '')
    if not never_ran then
      if held[2] == ARGV[5] then
        return {2, held[1]}
      end
      return {3, held[1]}
    end
  end
end
local now = server_now()
local queued = redis.call('LLEN', KEYS[4]) + redis.call('LLEN', KEYS[5])
  + redis.call('LLEN', KEYS[6])
if queued >= tonumber(ARGV[1]) then
  return {0, tostring(drain_rate(KEYS[8], now, tonumber(ARGV[3])))}
end
redis.call('HSET', KEYS[2], unpack(ARGV, 12))
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[2], 'runq_deadline', tostring(now + tonumber(ARGV[8])))
end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[2], 'runq_finish_by', tostring(now + tonumber(ARGV[9])))
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('LPUSH', KEYS[7], '1')
redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[7]) - 1)
if redis.call('ZCOUNT', KEYS[9], '(' .. tostring(now), '+inf') == 0 then
  redis.call('PUBLISH', ARGV[10], ARGV[11])
end
if idempotency then
  redis.call('HSET', idempotency, 'task', ARGV[2], 'body', ARGV[5])
  redis.call('EXPIRE', idempotency, tonumber(ARGV[4]))
  -- Deleting the task frees its key.
  redis.call('HSET', KEYS[2], 'runq_idempotency', idempotency)
end
return {1, ARGV[2]}
"""
)

# Cancel a task that has not ended. A running task is marked canceled at once; the worker that
# runs it sees the change (WATCH) and leaves the status alone when its batch ends. Waiters hear
# the bare task id on the task's channel and on its reply channel, and re-read the task.
# KEYS[1] job hash, KEYS[2] queue list, KEYS[3] canceled registry
# ARGV[1] task id, ARGV[2] ended_at (RQ's time format), ARGV[3] runq error JSON,
# ARGV[4] the task's channel, ARGV[5] which tasks: 'any' not ended, 'queued' only, or 'due':
# only a queued task whose deadline to start has passed (a read ends a task no worker has
# looked at yet)
# Returns the RQ status the task had, false when there is no such task, or 'not_due' when
# 'due' found nothing to end.
CANCEL = (
    _SERVER_NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
local now = server_now()
if ARGV[5] == 'due' then
  local deadline = tonumber(redis.call('HGET', KEYS[1], 'runq_deadline') or '')
  if status ~= 'queued' or not deadline or deadline > now then
    return 'not_due'
  end
end
if status == 'queued' or (status == 'started' and ARGV[5] == 'any') then
  if status == 'queued' then
    redis.call('LREM', KEYS[2], 0, ARGV[1])
  end
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl') or '3600')
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', ARGV[2], 'runq_error', ARGV[3])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  local reply_to = redis.call('HGET', KEYS[1], 'runq_reply_to')
  if reply_to then
    redis.call('PUBLISH', reply_to, ARGV[1])
  end
end
return status
"""
)

# Delete a task and everything RQ keeps about it.
# KEYS[1] job hash, KEYS[2] queue list, KEYS[3] results stream, KEYS[4] the job's executions,
# KEYS[5] started, KEYS[6] finished, KEYS[7] failed, KEYS[8] canceled registry
# ARGV[1] task id, ARGV[2] prefix of RQ's execution hashes ("rq:execution:")
# Returns 1 when deleted, 0 when there was no such task.
DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for _, execution in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  local composite = ARGV[1] .. ':' .. execution
  redis.call('ZREM', KEYS[5], composite)
  redis.call('DEL', ARGV[2] .. composite)
end
redis.call('LREM', KEYS[2], 0, ARGV[1])
local idempotency = redis.call('HGET', KEYS[1], 'runq_idempotency')
if idempotency then
  redis.call('DEL', idempotency)
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
return 1
"""

# A worker claims a batch: takes up to ARGV[1] ids off the function's queues, highest priority
# first, and marks every still-queued task started under a lease. max_concurrency counts live
# leases across all workers; lapsed ones (a crashed worker's) no longer hold a slot. Tasks whose
# deadline has passed are ended here, never started.
# KEYS[1..3] the function's queue lists, highest priority first, KEYS[4] leases, KEYS[5] wake
# list, KEYS[6] drain hash
# ARGV[1] most tasks to take, ARGV[2] worker name, ARGV[3] now (RQ's time format, for display),
# ARGV[4] runq error JSON for tasks past their deadline, ARGV[5] prefix of job hash keys
# ("rq:job:"), ARGV[6] prefix of canceled registries ("rq:canceled:"), ARGV[7] max_concurrency
# (0: no cap), ARGV[8] lease TTL s, ARGV[9] drain window s, ARGV[10] drain key TTL s
# Returns {started, expired, at_capacity, server now}: started and expired are lists of
# {id, flat job hash}; canceled or deleted tasks are skipped; at_capacity is 1 when every
# concurrency slot was taken.
CLAIM = (
    _SERVER_NOW
    + _DRAIN_RATE
    + """
local now = server_now()
local wanted = tonumber(ARGV[1])
local cap = tonumber(ARGV[7])
local at_capacity = 0
if cap > 0 then
  local free = cap - redis.call('ZCOUNT', KEYS[4], '(' .. tostring(now), '+inf')
  if free <= 0 then
    at_capacity = 1
  end
  wanted = math.max(math.min(wanted, free), 0)
end
local ids = {}
for q = 1, 3 do
  local need = wanted - #ids
  if need <= 0 then
    break
  end
  local popped = redis.call('LPOP', KEYS[q], need)
  if popped then
    for _, id in ipairs(popped) do
      ids[#ids + 1] = id
    end
  end
end
local lease_until = now + tonumber(ARGV[8])
local started, expired = {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[5] .. id
  if redis.call('HGET', key, 'status') == 'queued' then
    local deadline = tonumber(redis.call('HGET', key, 'runq_deadline') or '')
    if deadline and deadline <= now then
      local ttl = tonumber(redis.call('HGET', key, 'result_ttl') or '3600')
      local registry = ARGV[6] .. redis.call('HGET', key, 'origin')
      redis.call('HSET', key, 'status', 'canceled', 'ended_at', ARGV[3], 'runq_error', ARGV[4])
      redis.call('ZADD', registry, now + ttl, id)
      redis.call('EXPIRE', key, ttl)
      expired[#expired + 1] = {id, redis.call('HGETALL', key)}
    else
      redis.call('HSET', key, 'status', 'started', 'started_at', ARGV[3],
                 'last_heartbeat', ARGV[3], 'worker_name', ARGV[2])
      redis.call('HINCRBY', key, 'runq_attempts', 1)
      redis.call('PERSIST', key)
      redis.call('ZADD', KEYS[4], lease_until, id)
      started[#started + 1] = {id, redis.call('HGETALL', key)}
    end
  end
end
if #ids > 0 then
  local window = tonumber(ARGV[9])
  local rate = drain_rate(KEYS[6], now, window) + #ids / window
  redis.call('HSET', KEYS[6], 'rate', tostring(rate), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[10]))
end
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) == 0 then
  -- Nothing left to wake anyone for.
  redis.call('DEL', KEYS[5])
end
return {started, expired, at_capacity, tostring(now)}
"""
)

# A function's live figures, on the server's clock.
# KEYS[1..3] the function's queue lists, KEYS[4] leases, KEYS[5] its live workers,
# KEYS[6] the autoscaler's replicas hash
# Returns {queued, running (live leases), live workers, replicas current, replicas desired}
# (the last two false when no autoscaler manages the function).
FIGURES = (
    _SERVER_NOW
    + """
local queued = redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2])
  + redis.call('LLEN', KEYS[3])
local now = '(' .. tostring(server_now())
local running = redis.call('ZCOUNT', KEYS[4], now, '+inf')
local workers = redis.call('ZCOUNT', KEYS[5], now, '+inf')
local replicas = redis.call('HMGET', KEYS[6], 'current', 'desired')
return {queued, running, workers, replicas[1], replicas[2]}
"""
)

# A worker's heartbeat: renews its presence among the function's live workers and the leases of
# the tasks it runs. A lease released, or one that lapsed (the worker stalled past it: its task
# may be re-queued and run elsewhere), stays gone.
# KEYS[1] leases, KEYS[2] live workers; ARGV[1] TTL s, ARGV[2] worker name, ARGV[3..] task ids
# Returns the ids whose lease had lapsed.
RENEW = (
    _SERVER_NOW
    + """
local now = server_now()
local until_then = now + tonumber(ARGV[1])
redis.call('ZADD', KEYS[2], until_then, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tostring(now))
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
"""
)

# Which tasks of a batch a worker still owns: started, and by this worker. A task whose lease
# lapsed may have been re-queued and started by another worker; its outcome is no longer ours.
# KEYS job hashes; ARGV[1] worker name. Returns 1 or 0 per key.
OWNED = """
local result = {}
for i, key in ipairs(KEYS) do
  local held = redis.call('HMGET', key, 'status', 'worker_name')
  result[i] = (held[1] == 'started' and held[2] == ARGV[1]) and 1 or 0
end
return result
"""

# Tasks whose lease lapsed (their worker died or lost Redis): each goes back to the front of its
# queue while it has retries left, else ends failed with code worker_lost. RQ's execution records
# of the lost run are removed, as RQ's own registry cleanup would.
# KEYS[1] leases, KEYS[2] wake list
# ARGV[1] retries, ARGV[2] prefix of job hashes ("rq:job:"), ARGV[3] prefix of queue lists
# ("rq:queue:"), ARGV[4] prefix of started registries, ARGV[5] prefix of failed registries,
# ARGV[6] prefix of execution hashes ("rq:execution:"), ARGV[7] prefix of a job's executions set
# ("rq:executions:"), ARGV[8] worker_lost error JSON, ARGV[9] now (RQ's format), ARGV[10] prefix
# of task channels, ARGV[11] most tasks to handle
# Returns {re-queued ids, failed ids}.
REAP = (
    _SERVER_NOW
    + """
local now = server_now()
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tostring(now),
                          'LIMIT', 0, tonumber(ARGV[11]))
local requeued, failed = {}, {}
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[2] .. id
  local held = redis.call('HMGET', key, 'status', 'origin', 'runq_attempts', 'failure_ttl',
                          'runq_reply_to')
  if held[1] == 'started' then
    local origin = held[2]
    local executions = ARGV[7] .. id
    for _, execution in ipairs(redis.call('ZRANGE', executions, 0, -1)) do
      redis.call('ZREM', ARGV[4] .. origin, id .. ':' .. execution)
      redis.call('DEL', ARGV[6] .. id .. ':' .. execution)
    end
    redis.call('DEL', executions)
    if tonumber(held[3] or '0') <= tonumber(ARGV[1]) then
      redis.call('HSET', key, 'status', 'queued')
      redis.call('HDEL', key, 'worker_name')
      -- The front: it waited its turn once already.
      redis.call('LPUSH', ARGV[3] .. origin, id)
      redis.call('LPUSH', KEYS[2], '1')
      requeued[#requeued + 1] = id
    else
      local ttl = tonumber(held[4] or '3600')
      redis.call('HSET', key, 'status', 'failed', 'ended_at', ARGV[9], 'runq_error', ARGV[8])
      redis.call('ZADD', ARGV[5] .. origin, now + ttl, id)
      redis.call('EXPIRE', key, ttl)
      redis.call('PUBLISH', ARGV[10] .. id, id)
      if held[5] then
        redis.call('PUBLISH', held[5], id)
      end
      failed[#failed + 1] = id
    end
  end
end
return {requeued, failed}
"""
)
