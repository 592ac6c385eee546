"""Recording a batch: every task's outcome, in RQ's own layout, in one script call.

The script writes what RQ 3's worker would (the job hash, the results stream, the finished or
failed registry, the end of the execution the claim created, the worker's counters and state)
and runq's own bookkeeping (leases, slots, stats, webhook deliveries), then publishes one reply
per waiting gateway with all of that gateway's tasks, and each task's id on its own channel.
RQ's tools (`rq info`, `rq requeue`, rq-dashboard, ``Job.fetch``) read what it writes; the RQ
compatibility tests hold it to that, and the ``rq>=3,<4`` pin guards the layout.

A task is written only while it is still this worker's (started, by this worker), checked in
the same atomic step: a cancel or delete that landed while the batch ran stands, and a task
whose lease lapsed and was re-queued to another worker is no longer this one's to end.
"""

from __future__ import annotations

import json
import zlib
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rq.job import JobStatus
from rq.results import Result
from rq.utils import now, utcformat
from rq.worker import WorkerStatus

from runq.queue import constants, lua, replies, stats
from runq.queue.claim import RawHash, Started
from runq.queue.line import Line
from runq.queue.tasks import (
    OUTPUT_REF,
    Outcome,
    error_json,
    final_status,
    output_json,
    task_json,
    task_view,
)

# Arguments per task, after the batch's own four.
_TASK_ARGS = 11

# KEYS[1] leases, KEYS[2] slot list, KEYS[3] the worker's RQ hash, KEYS[4] its executions set
# ARGV[1] worker name, ARGV[2] ended_at (RQ's time format), ARGV[3] function name,
# ARGV[4] max_concurrency (0: no cap); then per task, _TASK_ARGS values: id, execution id,
# its queue, result type (RQ's: 1 succeeded, 2 failed), return value (succeeded: RQ's
# base64 JSON, '' for none) or error JSON, stored output's key ('' none) or RQ's exception
# string, its line of the reply to its waiter (replies.py), the webhook body ('' none), stats
# status field, stats latency bucket field, the execution's start (from the claim).
# Returns 1 or 0 per task: written, or no longer this worker's.
RECORD = lua.script(
    """
local now = server_now()
local worker, ended_at = ARGV[1], ARGV[2]
local replies, channels, written, counts = {}, {}, {}, {}
-- Members to add or remove, by key: one variadic call per key for the whole batch.
local finished, runs = {}, {}
-- Keys to delete: the batch's executions, and the executions indexes of the tasks it ended.
local gone, composites, leased = {}, {}, {}
local succeeded, failed, ended = 0, 0, 0
for i = 5, #ARGV, TASK_ARGS do
  local id, execution, queue, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = JOB_PREFIX .. id
  local composite = id .. ':' .. execution
  local held = redis.call('HMGET', key, STATUS, WORKER_NAME, RESULT_TTL, FAILURE_TTL, REPLY_TO,
                          WEBHOOK)
  local mine = held[1] == STARTED and held[2] == worker
  written[#written + 1] = mine and 1 or 0
  if mine then
    ended = ended + 1
    local results = RESULTS_PREFIX .. id
    local entry = {'type', kind, 'worker_name', worker}
    local ttl, registry
    if kind == SUCCESSFUL then
      succeeded = succeeded + 1
      ttl = tonumber(held[3] or DEFAULT_TTL_S)
      registry = FINISHED_PREFIX .. queue
      if ARGV[i + 5] ~= '' then
        redis.call('HSET', key, STATUS, FINISHED, ENDED_AT, ended_at, OUTPUT_REF, ARGV[i + 5])
      else
        redis.call('HSET', key, STATUS, FINISHED, ENDED_AT, ended_at)
      end
      if ARGV[i + 4] ~= '' then
        entry[#entry + 1] = 'return_value'
        entry[#entry + 1] = ARGV[i + 4]
      end
    else
      failed = failed + 1
      ttl = tonumber(held[4] or DEFAULT_TTL_S)
      registry = FAILED_PREFIX .. queue
      redis.call('HSET', key, STATUS, FAILED_STATUS, ENDED_AT, ended_at, ERROR, ARGV[i + 4])
      entry[#entry + 1] = 'exc_string'
      entry[#entry + 1] = ARGV[i + 5]
    end
    entry[#entry + 1] = 'execution_id'
    entry[#entry + 1] = execution
    entry[#entry + 1] = 'execution_started_at'
    entry[#entry + 1] = ARGV[i + 10]
    entry[#entry + 1] = 'execution_ended_at'
    entry[#entry + 1] = now
    redis.call('XADD', results, 'MAXLEN', '~', RESULTS_MAX, '*', unpack(entry))
    redis.call('EXPIRE', results, ttl)
    redis.call('EXPIRE', key, ttl)
    add(finished, registry, math.floor(now) + ttl, id)
    if held[5] then
      if not replies[held[5]] then
        replies[held[5]] = {}
        channels[#channels + 1] = held[5]
      end
      local views = replies[held[5]]
      views[#views + 1] = ARGV[i + 6]
    end
    redis.call('PUBLISH', TASK_CHANNEL_PREFIX .. id, id)
    if held[6] and ARGV[i + 7] ~= '' then
      local delivery = WEBHOOK_PREFIX .. id
      redis.call('DEL', delivery)
      redis.call('HSET', delivery, WEBHOOK_URL, held[6], WEBHOOK_BODY, ARGV[i + 7],
                 WEBHOOK_ATTEMPTS, 0)
      redis.call('EXPIRE', delivery, WEBHOOK_TTL_S)
      redis.call('ZADD', WEBHOOKS_DUE_KEY, now, id)
    end
    counts[ARGV[i + 8]] = (counts[ARGV[i + 8]] or 0) + 1
    counts[ARGV[i + 9]] = (counts[ARGV[i + 9]] or 0) + 1
  end
  -- The run is over whoever owns the task now: its execution ends with it. An ended task
  -- has no run left, so its executions index goes in the batch's one DEL; one that is
  -- another worker's now keeps that worker's run in it.
  if mine then
    gone[#gone + 1] = EXECUTIONS_PREFIX .. id
  else
    redis.call('ZREM', EXECUTIONS_PREFIX .. id, execution)
  end
  add(runs, STARTED_PREFIX .. queue, composite)
  gone[#gone + 1] = EXECUTION_PREFIX .. composite
  composites[#composites + 1] = composite
  -- Its lease ends with it too, unless its lease lapsed and it runs again elsewhere: that
  -- lease is the other worker's, and without it a crash of that worker would go unreaped.
  if mine or held[1] ~= STARTED then
    leased[#leased + 1] = id
  end
end
for registry, members in pairs(finished) do
  call_with('ZADD', registry, members)
end
for registry, members in pairs(runs) do
  call_with('ZREM', registry, members)
end
call_with('DEL', nil, gone)
call_with('SREM', KEYS[4], composites)
call_with('ZREM', KEYS[1], leased)
if succeeded > 0 then
  redis.call('HINCRBY', KEYS[3], 'successful_job_count', succeeded)
end
if failed > 0 then
  redis.call('HINCRBY', KEYS[3], 'failed_job_count', failed)
end
local cap = tonumber(ARGV[4])
if cap > 0 then
  -- Wake as many workers as slots were freed (more tokens than slots wake no one new).
  local tokens = {}
  for t = 1, math.min(#written, cap) do
    tokens[t] = '1'
  end
  call_with('LPUSH', KEYS[2], tokens)
  redis.call('LTRIM', KEYS[2], 0, cap - 1)
end
if ended > 0 then
  local stats_key = STATS_PREFIX .. ARGV[3] .. ':' .. math.floor(now)
  for field, count in pairs(counts) do
    redis.call('HINCRBY', stats_key, field, count)
  end
  redis.call('EXPIRE', stats_key, STATS_TTL_S)
  redis.call('SADD', FUNCTIONS_KEY, ARGV[3])
end
redis.call('HSET', KEYS[3], WORKER_STATE, IDLE)
for _, channel in ipairs(channels) do
  redis.call('PUBLISH', channel, table.concat(replies[channel], REPLY_SEPARATOR))
end
return written
""",
    lua.SERVER_NOW,
    lua.VARIADIC,
    TASK_ARGS=_TASK_ARGS,
    REPLY_SEPARATOR=replies.SEPARATOR,
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    EXECUTION_PREFIX=constants.RQ_EXECUTION_PREFIX,
    EXECUTIONS_PREFIX=constants.RQ_EXECUTIONS_PREFIX,
    STARTED_PREFIX=constants.RQ_STARTED_PREFIX,
    FINISHED_PREFIX=constants.RQ_FINISHED_PREFIX,
    FAILED_PREFIX=constants.RQ_FAILED_PREFIX,
    RESULTS_PREFIX=constants.RQ_RESULTS_PREFIX,
    RESULTS_MAX=constants.RQ_RESULTS_MAX,
    TASK_CHANNEL_PREFIX=constants.TASK_CHANNEL_PREFIX,
    WEBHOOK_PREFIX=constants.WEBHOOK_PREFIX,
    WEBHOOKS_DUE_KEY=constants.WEBHOOKS_DUE_KEY,
    WEBHOOK_URL=constants.WEBHOOK_URL_FIELD,
    WEBHOOK_BODY=constants.WEBHOOK_BODY_FIELD,
    WEBHOOK_ATTEMPTS=constants.WEBHOOK_ATTEMPTS_FIELD,
    WEBHOOK_TTL_S=constants.WEBHOOK_TTL_S,
    STATS_PREFIX=constants.STATS_PREFIX,
    STATS_TTL_S=constants.STATS_TTL_S,
    FUNCTIONS_KEY=constants.FUNCTIONS_KEY,
    STATUS=constants.STATUS_FIELD,
    WORKER_NAME=constants.WORKER_NAME_FIELD,
    RESULT_TTL=constants.RESULT_TTL_FIELD,
    FAILURE_TTL=constants.FAILURE_TTL_FIELD,
    REPLY_TO=constants.REPLY_TO_FIELD,
    WEBHOOK=constants.WEBHOOK_FIELD,
    ENDED_AT=constants.ENDED_AT_FIELD,
    CREATED_AT=constants.CREATED_AT_FIELD,
    ERROR=constants.ERROR_FIELD,
    OUTPUT_REF=constants.OUTPUT_REF_FIELD,
    WORKER_STATE=constants.WORKER_STATE_FIELD,
    STARTED=JobStatus.STARTED.value,
    FINISHED=JobStatus.FINISHED.value,
    FAILED_STATUS=JobStatus.FAILED.value,
    IDLE=WorkerStatus.IDLE.value,
    SUCCESSFUL=str(Result.Type.SUCCESSFUL.value),
    DEFAULT_TTL_S=constants.DEFAULT_RESULT_TTL_S,
)

_SUCCESSFUL = str(Result.Type.SUCCESSFUL.value)
_FAILED = str(Result.Type.FAILED.value)
_CREATED_AT = constants.CREATED_AT_FIELD.encode()


@dataclass
class Running:
    """A task of the batch in hand."""

    task_id: str
    execution_id: str
    execution_started: str
    fields: RawHash
    # When it was created, epoch seconds (for latencies).
    created_s: float
    # The input, once loaded (kept for the prediction log).
    payload: Any = None

    @classmethod
    def claimed(cls, started: Started) -> Running:
        # RQ's format, which fromisoformat reads ten times faster than RQ's own utcparse.
        created = datetime.fromisoformat(started.fields[_CREATED_AT].decode())
        return cls(
            started.task_id,
            started.execution_id,
            started.execution_started,
            started.fields,
            created.timestamp(),
        )

    @property
    def queue(self) -> str:
        return self.fields[constants.ORIGIN_FIELD.encode()].decode()


class Recorder:
    """Writes one worker's batches, one script call each."""

    def __init__(self, line: Line, function: str, worker_name: str) -> None:
        self._script = line.script(RECORD)
        self._function = function
        self._worker_name = worker_name
        self._keys = [
            constants.leases_key(function),
            constants.slots_key(function),
            constants.worker_key(worker_name),
            constants.worker_executions_key(worker_name),
        ]

    def record(
        self, tasks: Sequence[Running], outcomes: Sequence[Outcome], max_concurrency: int | None
    ) -> list[Outcome | None]:
        """Writes the outcomes; returns those written (None: the task was no longer ours)."""
        ended = now()
        ended_at = utcformat(ended)
        args: list[Any] = [self._worker_name, ended_at, self._function, max_concurrency or 0]
        for task, outcome in zip(tasks, outcomes, strict=True):
            args += _task_args(task, outcome, ended_at, ended.timestamp() - task.created_s)
        written = self._script(keys=self._keys, args=args)
        return [o if w else None for o, w in zip(outcomes, written, strict=True)]


def _task_args(task: Running, outcome: Outcome, ended_at: str, latency_s: float) -> list[Any]:
    fields = dict(task.fields)
    fields[constants.ENDED_AT_FIELD.encode()] = ended_at.encode()
    if outcome.ok:
        kind, extra = _SUCCESSFUL, outcome.output_ref or ""
        encoded = outcome.output_json or output_json(outcome.output)
        # RQ's results stream holds the serialized return value, base64 encoded; none for None.
        value = "" if outcome.output is None else b64encode(encoded).decode()
        fields[constants.STATUS_FIELD.encode()] = JobStatus.FINISHED.value.encode()
    else:
        assert outcome.error_code is not None
        kind, value = _FAILED, error_json(outcome.error_code, outcome.error_message)
        extra = b64encode(zlib.compress(outcome.traceback.encode())).decode()
        fields[constants.STATUS_FIELD.encode()] = JobStatus.FAILED.value.encode()
        fields[constants.ERROR_FIELD.encode()] = value.encode()
    view = task_view(task.task_id, fields)
    answer = outcome.ok and outcome.output_ref is None
    if answer:
        public = reply = task_json(view, encoded)
    else:
        # A stored output is not sent with the task: its waiter and the webhook fetch it.
        public = json.dumps(view).encode()
        reply = public if outcome.output_ref is None else _with_output_ref(view, outcome)
    webhook_body = public if constants.WEBHOOK_FIELD.encode() in fields else b""
    return [
        task.task_id,
        task.execution_id,
        task.queue,
        kind,
        value,
        extra,
        replies.reply_line(task.task_id, reply, answer=answer),
        webhook_body,
        str(final_status(outcome)),
        stats.bucket_field(latency_s),
        task.execution_started,
    ]


def _with_output_ref(view: dict[str, Any], outcome: Outcome) -> bytes:
    return json.dumps({**view, OUTPUT_REF: outcome.output_ref}).encode()
