"""Lua scripts for every multi-step state change that must be atomic across processes.

Each script documents its KEYS and ARGV. Job hashes use RQ's layout (``status`` values are RQ's
JobStatus), so RQ's own tools keep reading them.
"""

from __future__ import annotations

# Admission: check the queue cap and enqueue in one step, so any number of gateways together
# never push a queue past max_queue.
# KEYS[1] queue list, KEYS[2] job hash, KEYS[3] RQ's set of queue keys
# ARGV[1] max_queue, ARGV[2] queue key, ARGV[3] task id, ARGV[4..] job hash field/value pairs
# Returns 1 when enqueued, 0 when the queue was full (nothing written).
ENQUEUE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

# Cancel a task that has not ended. A running task is marked canceled at once; the worker that
# runs it sees the change (WATCH) and leaves the status alone when its batch ends. Waiters hear
# the bare task id on the task's channel and on its reply channel, and re-read the task.
# KEYS[1] job hash, KEYS[2] queue list, KEYS[3] canceled registry
# ARGV[1] task id, ARGV[2] ended_at (RQ's time format), ARGV[3] now (epoch s),
# ARGV[4] '1' to cancel only a task that is still queued, ARGV[5] runq error JSON,
# ARGV[6] the task's channel
# Returns the RQ status the task had, or false when there is no such task.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if status == 'queued' or (status == 'started' and ARGV[4] == '0') then
  if status == 'queued' then
    redis.call('LREM', KEYS[2], 0, ARGV[1])
  end
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl') or '3600')
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', ARGV[2], 'runq_error', ARGV[5])
  redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + ttl, ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('PUBLISH', ARGV[6], ARGV[1])
  local reply_to = redis.call('HGET', KEYS[1], 'runq_reply_to')
  if reply_to then
    redis.call('PUBLISH', reply_to, ARGV[1])
  end
end
return status
"""

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
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
return 1
"""

# A worker claims a batch: takes up to ARGV[1] more ids off the queue and marks every still-queued
# task started. Tasks whose deadline has passed are ended here, never started.
# KEYS[1] queue list, KEYS[2] intermediate list (holds ids a blocking BLMOVE took),
# KEYS[3] canceled registry
# ARGV[1] how many ids to pop from the queue, ARGV[2] worker name, ARGV[3] now (RQ's format),
# ARGV[4] now (epoch s), ARGV[5] runq error JSON for tasks past their deadline,
# ARGV[6] prefix of job hash keys ("rq:job:"), ARGV[7..] ids already moved to the intermediate list
# Returns {started, expired}: started is a list of {id, flat job hash}, expired a list of
# {id, flat job hash}; canceled or deleted tasks are skipped.
CLAIM = """
local ids = {}
for i = 7, #ARGV do
  redis.call('LREM', KEYS[2], 1, ARGV[i])
  ids[#ids + 1] = ARGV[i]
end
local wanted = tonumber(ARGV[1])
if wanted > 0 then
  local popped = redis.call('LPOP', KEYS[1], wanted)
  if popped then
    for _, id in ipairs(popped) do
      ids[#ids + 1] = id
    end
  end
end
local now = tonumber(ARGV[4])
local started, expired = {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[6] .. id
  if redis.call('HGET', key, 'status') == 'queued' then
    local deadline = tonumber(redis.call('HGET', key, 'runq_deadline') or '')
    if deadline and deadline <= now then
      local ttl = tonumber(redis.call('HGET', key, 'result_ttl') or '3600')
      redis.call('HSET', key, 'status', 'canceled', 'ended_at', ARGV[3], 'runq_error', ARGV[5])
      redis.call('ZADD', KEYS[3], now + ttl, id)
      redis.call('EXPIRE', key, ttl)
      expired[#expired + 1] = {id, redis.call('HGETALL', key)}
    else
      redis.call('HSET', key, 'status', 'started', 'started_at', ARGV[3],
                 'last_heartbeat', ARGV[3], 'worker_name', ARGV[2])
      redis.call('HINCRBY', key, 'runq_attempts', 1)
      redis.call('PERSIST', key)
      started[#started + 1] = {id, redis.call('HGETALL', key)}
    end
  end
end
return {started, expired}
"""

# The RQ status of each job hash, for a worker that must re-check its batch after a conflict.
# KEYS job hashes. Returns a list of statuses, false for a job that is gone.
STATUSES = """
local result = {}
for i, key in ipairs(KEYS) do
  result[i] = redis.call('HGET', key, 'status')
end
return result
"""
