"""BatchWorker: an RQ SimpleWorker that runs one function, a batch of tasks per model call.

Lifecycle: start (register, ``setup()``) → loop (collect, run, record) → drain (finish the batch
in hand) → stop (deregister). Signals only set a flag; the loop notices it within
WORKER_DEQUEUE_TIMEOUT_S. Every task's outcome is recorded with RQ's own job, result, registry and
execution bookkeeping, pipelined: one round trip per batch, not per task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from runq.functions import Function
from runq.live import LiveSettings
from runq.metrics import metrics
from runq.queue import constants as k
from runq.queue import scripts, stats
from runq.queue.reaper import Reaper
from runq.queue.tasks import (
    TIMED_OUT_CODE,
    TaskStatus,
    error_json,
    finish_by,
    job_input,
    reply_channel,
    task_view,
)
from runq.settings import FunctionSettings
from runq.worker.collect import BatchCollector, Claimed, RawHash
from runq.worker.leases import LeaseKeeper
from runq.worker.runner import BatchTimeout, ModelRunner, Outcome, failure

logger = logging.getLogger("runq.worker")

HEARTBEAT_INTERVAL_S = 10.0


@dataclass
class Running:
    """A task of the batch in hand."""

    task_id: str
    fields: RawHash
    job: Job
    execution: Execution


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        function: Function,
        settings: FunctionSettings,
        connection: Redis,
        live: LiveSettings | None = None,
    ) -> None:
        # One RQ queue per priority, so `rq info` lists this worker on each.
        queues = [
            Queue(
                k.queue_name(function.name, priority),
                connection=connection,
                serializer=JSONSerializer,
            )
            for priority in k.PRIORITIES
        ]
        super().__init__(queues, connection=connection, serializer=JSONSerializer)
        self.function = function
        self.settings = settings
        self.runner = ModelRunner(function)
        self.collector = BatchCollector(connection, function, settings, self.name)
        self.leases = LeaseKeeper(connection, function.name, self.name)
        self.reaper = Reaper(connection, function.name, settings.retries)
        self._last_reap = 0.0
        self.leases_key = k.leases_key(function.name)
        self.slots_key = k.slots_key(function.name)
        self._last_heartbeat = 0.0
        self.live = live
        self._last_live_poll = 0.0
        self.batches_run = 0

    # lifecycle ------------------------------------------------------------------------------

    def run(self) -> None:
        """start → loop → drain → stop; returns once a stop was requested and the batch is done."""
        self._install_signal_handlers()
        started = time.monotonic()
        self.runner.setup()
        logger.info(
            "worker %s: %s ready in %.2f s",
            self.name,
            self.function.name,
            time.monotonic() - started,
        )
        self.bootstrap(logging_level=None)
        self.leases.start()
        try:
            while not self._stop_requested:
                claimed = self.collector.collect(block_s=k.WORKER_DEQUEUE_TIMEOUT_S)
                if claimed is not None:
                    self.process(claimed)
                self._maybe_heartbeat()
                self._maybe_reap()
                self._maybe_follow_deployed()
        finally:
            self.leases.stop()
            super().teardown()
            logger.info("worker %s: stopped after %d batches", self.name, self.batches_run)

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        # A flag only: the batch in hand finishes and is recorded. A second signal gets the
        # default action, for whoever really means it.
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _maybe_heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self.heartbeat()
            self._last_heartbeat = time.monotonic()

    def _maybe_follow_deployed(self) -> None:
        since = time.monotonic() - self._last_live_poll
        if self.live is None or since < k.DEPLOYED_POLL_INTERVAL_S:
            return
        self._last_live_poll = time.monotonic()
        changed = self.live.poll(self.connection)
        if changed is not None and changed[self.function.name] != self.settings:
            self.apply(changed[self.function.name])

    def apply(self, settings: FunctionSettings) -> None:
        """Takes new settings between batches (the batch in hand keeps the ones it started with)."""
        self.settings = settings
        self.collector.settings = settings
        self.reaper.retries = settings.retries
        logger.info("worker %s: settings now %s", self.name, settings.model_dump())

    def _maybe_reap(self) -> None:
        if time.monotonic() - self._last_reap >= k.REAP_INTERVAL_S:
            self.reaper.reap()
            self._last_reap = time.monotonic()

    # one batch ------------------------------------------------------------------------------

    def process(self, claimed: Claimed) -> None:
        running = self._start(claimed)
        if not running:
            return
        self.leases.hold([task.task_id for task in running])
        keys = [task.job.key for task in running]
        with self.connection.pipeline() as pipe:
            # Watch the batch's job hashes from here to the record, and re-check them once
            # watched: a cancel or delete that lands at any point after the claim is seen, and
            # its new state stands instead of the outcome.
            pipe.watch(*keys)
            owned = self._owned(pipe, keys)
            mine = [task for task, ours in zip(running, owned, strict=True) if ours]
            run_started = time.perf_counter()
            outcomes = iter(self._execute(mine, claimed))
            run_ms = (time.perf_counter() - run_started) * 1000
            results = self._record(
                pipe, running, [next(outcomes) if ours else None for ours in owned]
            )
        self.leases.release()
        self.batches_run += 1
        self._observe(running, results, run_ms)

    def _observe(
        self, running: list[Running], results: list[Outcome | None], run_ms: float
    ) -> None:
        """The batch's metrics and its log line (task ids, never inputs or outputs)."""
        name = self.function.name
        statuses = [final_status(outcome) for outcome in results]
        m = metrics()
        m.batch_size.labels(name).observe(len(running))
        m.execution.labels(name).observe(run_ms / 1000)
        for task in running:
            waited = task.execution.created_at - task.job.created_at
            m.queue_wait.labels(name).observe(max(waited.total_seconds(), 0.0))
        counts = Counter(statuses)
        for status, count in counts.items():
            m.tasks.labels(name, status).inc(count)
        logger.info(
            "batch %s of %d ran in %.1f ms: %d succeeded, %d failed, %d timed out, "
            "%d canceled meanwhile",
            name,
            len(running),
            run_ms,
            counts["succeeded"],
            counts["failed"],
            counts["timed_out"],
            counts["canceled"],
            extra={
                "function": name,
                "batch_size": len(running),
                "duration_ms": round(run_ms, 3),
                "task_ids": [task.task_id for task in running],
            },
        )

    def _owned(self, pipe: Pipeline, keys: list[str]) -> list[bool]:
        owned = pipe.eval(scripts.OWNED, len(keys), *keys, self.name)
        return [bool(flag) for flag in owned]

    def _start(self, claimed: Claimed) -> list[Running]:
        """Creates RQ executions for the claimed tasks and announces expired ones."""
        running = []
        with self.connection.pipeline(transaction=False) as pipe:
            for task_id, fields in claimed.started:
                job = Job(task_id, connection=self.connection, serializer=JSONSerializer)
                job.restore(fields)
                execution = Execution.create(
                    job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name
                )
                self.executions[execution.id] = execution
                running.append(Running(task_id, fields, job, execution))
            for task_id, fields in claimed.expired:
                _publish(pipe, task_id, fields, task_view(task_id, fields))
            if claimed.expired:
                expired = metrics().tasks.labels(self.function.name, TaskStatus.TIMED_OUT.value)
                expired.inc(len(claimed.expired))
            if running:
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        return running

    def _execute(self, running: list[Running], claimed: Claimed) -> list[Outcome]:
        if not running:
            return []
        limit_s, why = self._time_limit(running, claimed)
        if limit_s <= 0:
            return [failure(TIMED_OUT_CODE, why)] * len(running)
        payloads = [job_input(task.fields) for task in running]
        try:
            with _time_limit(limit_s):
                return self.runner.run(payloads)
        except BatchTimeout:
            logger.warning("worker %s: batch of %d stopped: %s", self.name, len(running), why)
            return [failure(TIMED_OUT_CODE, why)] * len(running)

    def _time_limit(self, running: list[Running], claimed: Claimed) -> tuple[float, str]:
        """How long the batch may run, and what to say when it is stopped.

        The function's timeout_s always holds. A batch whose every task has its own end-by
        deadline (submitted with timeout_s) stops once the last of them has passed: by then
        nobody is owed its output.
        """
        limit = self.settings.timeout_s
        why = f"the batch ran past the function's timeout_s ({limit} s) and was stopped"
        deadlines = [finish_by(task.fields) for task in running]
        if all(d is not None for d in deadlines):
            left = claimed.seconds_left(max(d for d in deadlines if d is not None))
            if left < limit:
                limit = left
                why = "the task's timeout_s passed while it ran, and it was stopped"
        return limit, why

    def _record(
        self, pipe: Pipeline, running: list[Running], outcomes: list[Outcome | None]
    ) -> list[Outcome | None]:
        """Writes the outcomes (None: the task is no longer ours); returns those written."""
        ended = now()
        keys = [task.job.key for task in running]
        while True:
            try:
                pipe.multi()
                for task, outcome in zip(running, outcomes, strict=True):
                    if outcome is not None:
                        self._record_one(pipe, task, outcome, ended)
                    self.cleanup_execution(task.job, pipeline=pipe, execution=task.execution)
                self._release_slots(pipe, running)
                stats.record(
                    pipe,
                    self.function.name,
                    [
                        (final_status(outcome), (ended - task.job.created_at).total_seconds())
                        for task, outcome in zip(running, outcomes, strict=True)
                        if outcome is not None
                    ],
                    ended.timestamp(),
                )
                self.set_state(WorkerStatus.IDLE, pipeline=pipe)
                pipe.execute()
                return outcomes
            except WatchError:
                # A task of this batch was canceled or deleted while it ran: record outcomes
                # only for tasks still marked started.
                pipe.reset()
                pipe.watch(*keys)
                still = self._owned(pipe, keys)
                outcomes = [o if ours else None for o, ours in zip(outcomes, still, strict=True)]

    def _release_slots(self, pipe: Pipeline, running: list[Running]) -> None:
        pipe.zrem(self.leases_key, *(task.task_id for task in running))
        if self.settings.max_concurrency is not None:
            # Wake as many workers as slots were freed; more tokens than slots wake no one new.
            pipe.lpush(self.slots_key, *[1] * len(running))
            pipe.ltrim(self.slots_key, 0, self.settings.max_concurrency - 1)

    def _record_one(self, pipe: Pipeline, task: Running, outcome: Outcome, ended: Any) -> None:
        job, execution = task.job, task.execution
        job.ended_at = ended
        timing = {
            "worker_name": self.name,
            "execution_id": execution.id,
            "execution_started_at": execution.created_at,
            "execution_ended_at": ended,
        }
        fields = dict(task.fields)
        fields[b"ended_at"] = utcformat(ended).encode()
        if outcome.ok:
            job._result = outcome.output
            job._handle_success(job.result_ttl, pipeline=pipe, **timing)
            job.cleanup(job.result_ttl, pipeline=pipe, remove_from_queue=False)
            self.increment_successful_job_count(pipeline=pipe)
            fields[b"status"] = JobStatus.FINISHED.value.encode()
            view = task_view(task.task_id, fields)
            view["output"] = outcome.output
        else:
            assert outcome.error_code is not None
            error = error_json(outcome.error_code, outcome.error_message)
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure(outcome.traceback, pipeline=pipe, **timing)
            pipe.hset(job.key, mapping={k.ERROR_FIELD: error, "ended_at": utcformat(ended)})
            pipe.expire(job.key, job.failure_ttl or k.DEFAULT_RESULT_TTL_S)
            self.increment_failed_job_count(pipeline=pipe)
            fields[b"status"] = JobStatus.FAILED.value.encode()
            fields[k.ERROR_FIELD.encode()] = error.encode()
            view = task_view(task.task_id, fields)
        _publish(pipe, task.task_id, fields, view)


def final_status(outcome: Outcome | None) -> str:
    """The task status an outcome ends in; None: canceled or deleted while it ran."""
    if outcome is None:
        return TaskStatus.CANCELED.value
    if outcome.ok:
        return TaskStatus.SUCCEEDED.value
    if outcome.error_code == TIMED_OUT_CODE:
        return TaskStatus.TIMED_OUT.value
    return TaskStatus.FAILED.value


def _publish(pipe: Pipeline, task_id: str, fields: RawHash, view: dict[str, Any]) -> None:
    reply_to = reply_channel(fields)
    if reply_to is not None:
        pipe.publish(reply_to, json.dumps(view))
    pipe.publish(k.task_channel(task_id), task_id)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raises BatchTimeout into the batch after ``seconds`` (RQ's death penalty has 1 s steps)."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise BatchTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
