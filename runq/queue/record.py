"""Recording a batch in RQ's own layout: executions at the start, outcomes at the end.

This is the one module that uses RQ's private API (``Job._handle_success``,
``Job._handle_failure``, ``Job._result``), so the ``rq>=3,<4`` pin has one place to audit: RQ's
tools (`rq info`, `rq requeue`, rq-dashboard, ``Job.fetch``) read what it writes. Every write of
a batch is pipelined: one round trip per batch, not per task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from runq.metrics import metrics
from runq.queue import constants, lua, stats, webhooks
from runq.queue.claim import Claimed, RawHash
from runq.queue.tasks import (
    OUTPUT_REF,
    Outcome,
    TaskStatus,
    error_json,
    field_text,
    final_status,
    reply_channel,
    task_view,
)

# Which tasks of a batch a worker still owns: started, and by this worker. A task whose lease
# lapsed may have been re-queued and started by another worker; its outcome is no longer ours.
# KEYS job hashes; ARGV[1] worker name. Returns 1 or 0 per key.
OWNED = lua.script(
    """
local result = {}
for i, key in ipairs(KEYS) do
  local held = redis.call('HMGET', key, STATUS, WORKER_NAME)
  result[i] = (held[1] == STARTED and held[2] == ARGV[1]) and 1 or 0
end
return result
""",
    STATUS=constants.STATUS_FIELD,
    WORKER_NAME=constants.WORKER_NAME_FIELD,
    STARTED=JobStatus.STARTED.value,
)


@dataclass
class Running:
    """A task of the batch in hand."""

    task_id: str
    fields: RawHash
    job: Job
    execution: Execution
    # The input, once loaded (kept for the prediction log).
    payload: Any = None


Execute = Callable[[list[Running]], list[Outcome]]


class Recorder:
    """Writes one worker's batches: ``start`` them, then ``run_and_record`` them."""

    def __init__(self, worker: SimpleWorker, function: str) -> None:
        self.worker = worker
        self.function = function
        self._leases_key = constants.leases_key(function)
        self._slots_key = constants.slots_key(function)

    def start(self, claimed: Claimed) -> list[Running]:
        """Creates RQ executions for the claimed tasks and announces expired ones."""
        worker = self.worker
        running = []
        with worker.connection.pipeline(transaction=False) as pipe:
            for task_id, fields in claimed.started:
                job = Job(task_id, connection=worker.connection, serializer=JSONSerializer)
                job.restore(fields)
                execution = Execution.create(
                    job, worker.get_heartbeat_ttl(job), pipeline=pipe, worker_name=worker.name
                )
                worker.executions[execution.id] = execution
                running.append(Running(task_id, fields, job, execution))
            for task_id, fields in claimed.expired:
                _publish(pipe, task_id, fields, task_view(task_id, fields))
            if claimed.expired:
                expired = metrics().tasks.labels(self.function, TaskStatus.TIMED_OUT.value)
                expired.inc(len(claimed.expired))
            if running:
                worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        return running

    def run_and_record(
        self, running: list[Running], execute: Execute, max_concurrency: int | None
    ) -> list[Outcome | None]:
        """Runs the tasks still ours and writes their outcomes; None: no longer ours.

        The batch's job hashes are watched from before the run to the record, and re-checked
        once watched: a cancel or delete that lands at any point after the claim is seen, and
        its new state stands instead of the outcome.
        """
        keys = [task.job.key for task in running]
        with self.worker.connection.pipeline() as pipe:
            pipe.watch(*keys)
            owned = self._owned(pipe, keys)
            outcomes = iter(
                execute([task for task, ours in zip(running, owned, strict=True) if ours])
            )
            results = [next(outcomes) if ours else None for ours in owned]
            return self._record(pipe, running, results, max_concurrency)

    def _owned(self, pipe: Pipeline, keys: Sequence[str]) -> list[bool]:
        owned = pipe.eval(OWNED, len(keys), *keys, self.worker.name)
        return [bool(flag) for flag in owned]

    def _record(
        self,
        pipe: Pipeline,
        running: list[Running],
        outcomes: list[Outcome | None],
        max_concurrency: int | None,
    ) -> list[Outcome | None]:
        ended = now()
        keys = [task.job.key for task in running]
        while True:
            try:
                pipe.multi()
                self._write(pipe, running, outcomes, ended, max_concurrency)
                pipe.execute()
                return outcomes
            except WatchError:
                # A task of this batch was canceled or deleted while it ran: record outcomes
                # only for tasks still marked started.
                pipe.reset()
                pipe.watch(*keys)
                still = self._owned(pipe, keys)
                outcomes = [o if ours else None for o, ours in zip(outcomes, still, strict=True)]

    def _write(
        self,
        pipe: Pipeline,
        running: list[Running],
        outcomes: list[Outcome | None],
        ended: datetime,
        max_concurrency: int | None,
    ) -> None:
        for task, outcome in zip(running, outcomes, strict=True):
            if outcome is not None:
                self._write_one(pipe, task, outcome, ended)
            self.worker.cleanup_execution(task.job, pipeline=pipe, execution=task.execution)
        self._release_slots(pipe, running, max_concurrency)
        latencies = [
            (final_status(outcome), (ended - task.job.created_at).total_seconds())
            for task, outcome in zip(running, outcomes, strict=True)
            if outcome is not None
        ]
        stats.record(pipe, self.function, latencies, ended.timestamp())
        self.worker.set_state(WorkerStatus.IDLE, pipeline=pipe)

    def _release_slots(
        self, pipe: Pipeline, running: list[Running], max_concurrency: int | None
    ) -> None:
        pipe.zrem(self._leases_key, *(task.task_id for task in running))
        if max_concurrency is not None:
            # Wake as many workers as slots were freed; more tokens than slots wake no one new.
            pipe.lpush(self._slots_key, *[1] * len(running))
            pipe.ltrim(self._slots_key, 0, max_concurrency - 1)

    def _write_one(self, pipe: Pipeline, task: Running, outcome: Outcome, ended: datetime) -> None:
        job, execution = task.job, task.execution
        job.ended_at = ended
        timing: dict[str, Any] = {
            "worker_name": self.worker.name,
            "execution_id": execution.id,
            "execution_started_at": execution.created_at,
            "execution_ended_at": ended,
        }
        fields = dict(task.fields)
        fields[constants.ENDED_AT_FIELD.encode()] = utcformat(ended).encode()
        if outcome.ok:
            job._result = outcome.output
            job._handle_success(job.result_ttl, pipeline=pipe, **timing)
            job.cleanup(job.result_ttl, pipeline=pipe, remove_from_queue=False)
            self.worker.increment_successful_job_count(pipeline=pipe)
            fields[constants.STATUS_FIELD.encode()] = JobStatus.FINISHED.value.encode()
            view = task_view(task.task_id, fields)
            if outcome.output_ref is None:
                view["output"] = outcome.output
            else:
                pipe.hset(job.key, constants.OUTPUT_REF_FIELD, outcome.output_ref)
                view[OUTPUT_REF] = outcome.output_ref
        else:
            assert outcome.error_code is not None
            error = error_json(outcome.error_code, outcome.error_message)
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure(outcome.traceback, pipeline=pipe, **timing)
            pipe.hset(
                job.key,
                mapping={constants.ERROR_FIELD: error, constants.ENDED_AT_FIELD: utcformat(ended)},
            )
            pipe.expire(job.key, job.failure_ttl or constants.DEFAULT_RESULT_TTL_S)
            self.worker.increment_failed_job_count(pipeline=pipe)
            fields[constants.STATUS_FIELD.encode()] = JobStatus.FAILED.value.encode()
            fields[constants.ERROR_FIELD.encode()] = error.encode()
            view = task_view(task.task_id, fields)
        _publish(pipe, task.task_id, fields, view)
        _deliver_webhook(pipe, task, view)


def _deliver_webhook(pipe: Pipeline, task: Running, view: dict[str, Any]) -> None:
    webhook = field_text(task.fields, constants.WEBHOOK_FIELD)
    if webhook is not None:
        # A stored output is not sent: the receiver fetches it from the task's result.
        public = {key: value for key, value in view.items() if key != OUTPUT_REF}
        webhooks.enqueue(pipe, task.task_id, webhook, json.dumps(public).encode())


def _publish(pipe: Pipeline, task_id: str, fields: RawHash, view: dict[str, Any]) -> None:
    reply_to = reply_channel(fields)
    if reply_to is not None:
        pipe.publish(reply_to, json.dumps(view))
    pipe.publish(constants.task_channel(task_id), task_id)
