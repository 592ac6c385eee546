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
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
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

from runq import storage, webhooks
from runq.functions import Function
from runq.live import LiveSettings
from runq.metrics import metrics
from runq.predlog import PredictionLog
from runq.queue import constants as k
from runq.queue import scripts, stats
from runq.queue.reaper import Reaper
from runq.queue.tasks import (
    INPUT_REF_FIELD,
    OUTPUT_REF,
    OUTPUT_REF_FIELD,
    TIMED_OUT_CODE,
    WEBHOOK_FIELD,
    TaskStatus,
    error_json,
    field_text,
    finish_by,
    job_input,
    reply_channel,
    task_view,
)
from runq.settings import FunctionSettings
from runq.storage import ObjectStore, StorageError
from runq.webhooks import WebhookSender
from runq.worker.collect import BatchCollector, Claimed, RawHash
from runq.worker.leases import LeaseKeeper
from runq.worker.runner import BatchTimeout, ModelRunner, Outcome, failure

logger = logging.getLogger("runq.worker")

HEARTBEAT_INTERVAL_S = 10.0
SWEEP_INTERVAL_S = 600.0
SWEEP_MARGIN_S = 24 * 3600.0
# A task whose input or output the object store could not read or write.
STORAGE_ERROR_CODE = "storage_error"


@dataclass
class Chore:
    """Something the worker does between batches, at most every ``interval_s``."""

    interval_s: float
    action: Callable[[], object]
    last: float = 0.0

    def run_if_due(self) -> None:
        if time.monotonic() - self.last >= self.interval_s:
            self.action()
            self.last = time.monotonic()


@dataclass
class Running:
    """A task of the batch in hand."""

    task_id: str
    fields: RawHash
    job: Job
    execution: Execution
    # The input, once loaded (kept for the prediction log).
    payload: Any = None


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        function: Function,
        settings: FunctionSettings,
        connection: Redis,
        objects: ObjectStore,
        *,
        inline_max_bytes: int,
        live: LiveSettings | None = None,
        predictions: PredictionLog | None = None,
        webhook_sender: WebhookSender | None = None,
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
        self.leases_key = k.leases_key(function.name)
        self.slots_key = k.slots_key(function.name)
        self.live = live
        self.objects = objects
        self.predictions = predictions
        self.webhook_sender = webhook_sender
        self.inline_max_bytes = inline_max_bytes
        # Between batches, each at most this often.
        self._chores = [
            Chore(HEARTBEAT_INTERVAL_S, self.heartbeat),
            Chore(k.REAP_INTERVAL_S, self.reaper.reap),
            Chore(k.DEPLOYED_POLL_INTERVAL_S, self._follow_deployed),
            Chore(SWEEP_INTERVAL_S, self._sweep),
        ]
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
        for helper in (self.predictions, self.webhook_sender):
            if helper is not None:
                helper.start()
        try:
            while not self._stop_requested:
                claimed = self.collector.collect(block_s=k.WORKER_DEQUEUE_TIMEOUT_S)
                if claimed is not None:
                    self.process(claimed)
                for chore in self._chores:
                    chore.run_if_due()
        finally:
            self.leases.stop()
            for helper in (self.predictions, self.webhook_sender):
                if helper is not None:
                    helper.stop()
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

    def _follow_deployed(self) -> None:
        if self.live is None:
            return
        changed = self.live.poll(self.connection)
        if changed is not None and changed[self.function.name] != self.settings:
            self.apply(changed[self.function.name])

    def apply(self, settings: FunctionSettings) -> None:
        """Takes new settings between batches (the batch in hand keeps the ones it started with)."""
        self.settings = settings
        self.collector.settings = settings
        self.reaper.retries = settings.retries
        logger.info("worker %s: settings now %s", self.name, settings.model_dump())

    def _sweep(self) -> None:
        # Stored objects outlive their task record by a day at most (file stores; S3 buckets
        # expire them by lifecycle rule): a task may wait in a queue long before it runs.
        try:
            self.objects.sweep(self.function.name, self.settings.result_ttl_s + SWEEP_MARGIN_S)
        except OSError as exc:
            logger.warning("worker %s: cannot sweep old objects: %s", self.name, exc)

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
        if self.predictions is not None and self.settings.log_predictions > 0:
            self._log_predictions(self.predictions, running, results)

    def _log_predictions(
        self, log: PredictionLog, running: list[Running], results: list[Outcome | None]
    ) -> None:
        ended = time.time()
        for task, outcome in zip(running, results, strict=True):
            if outcome is None or random.random() >= self.settings.log_predictions:
                continue
            record: dict[str, Any] = {
                "time": ended,
                "function": self.function.name,
                "task_id": task.task_id,
                "status": final_status(outcome),
                "latency_s": ended - task.job.created_at.timestamp(),
                "input": task.payload,
            }
            if outcome.output_ref is not None:
                record["output_ref"] = outcome.output_ref
            elif outcome.ok:
                record["output"] = outcome.output
            else:
                record["error"] = {"code": outcome.error_code, "message": outcome.error_message}
            log.add(record)

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
        outcomes: list[Outcome | None] = [None] * len(running)
        loaded: list[tuple[int, Any]] = []
        for i, task in enumerate(running):
            try:
                loaded.append((i, self._input(task)))
            except StorageError as exc:
                outcomes[i] = failure(STORAGE_ERROR_CODE, exc.message)
        try:
            with _time_limit(limit_s):
                ran = self.runner.run([payload for _, payload in loaded])
        except BatchTimeout:
            logger.warning("worker %s: batch of %d stopped: %s", self.name, len(running), why)
            return [failure(TIMED_OUT_CODE, why)] * len(running)
        for (i, _), outcome in zip(loaded, ran, strict=True):
            outcomes[i] = self._stored_if_big(running[i], outcome)
        return [outcome for outcome in outcomes if outcome is not None]

    def _input(self, task: Running) -> Any:
        input_ref = field_text(task.fields, INPUT_REF_FIELD)
        if input_ref is None:
            task.payload = job_input(task.fields)
        else:
            task.payload = json.loads(self.objects.get(input_ref))
        return task.payload

    def _stored_if_big(self, task: Running, outcome: Outcome) -> Outcome:
        """The outcome, its output moved to object storage when it is too big for Redis."""
        if not outcome.ok:
            return outcome
        data = json.dumps(outcome.output, separators=(",", ":")).encode()
        if len(data) <= self.inline_max_bytes:
            return outcome
        key = storage.output_key(self.function.name, task.task_id)
        try:
            self.objects.put(key, data)
        except StorageError as exc:
            return failure(STORAGE_ERROR_CODE, exc.message)
        return Outcome(output_ref=key)

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
            if outcome.output_ref is None:
                view["output"] = outcome.output
            else:
                pipe.hset(job.key, OUTPUT_REF_FIELD, outcome.output_ref)
                view[OUTPUT_REF] = outcome.output_ref
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
        webhook = field_text(task.fields, WEBHOOK_FIELD)
        if webhook is not None:
            # A stored output is not sent: the receiver fetches it from the task's result.
            public = {key: value for key, value in view.items() if key != OUTPUT_REF}
            webhooks.enqueue(pipe, task.task_id, webhook, json.dumps(public).encode())


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
