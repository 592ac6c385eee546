"""BatchWorker: an RQ SimpleWorker that runs one function, a batch of tasks per model call.

Lifecycle: start (register, ``setup()``) → loop (collect, run, record) → drain (finish the batch
in hand) → stop (deregister). Signals only set a flag; the loop notices it within
WORKER_DEQUEUE_TIMEOUT_S. What a batch writes to Redis is ``runq.queue.record``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from types import FrameType
from typing import Any

import prometheus_client
from redis import Redis
from redis.exceptions import RedisError
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from runq.background import Chore
from runq.errors import ErrorCode, StorageError
from runq.functions import Function
from runq.heap import freeze_startup_heap
from runq.metrics import metrics
from runq.predlog import PredictionLog, prediction_record
from runq.queue import constants, storage
from runq.queue.chunks import ChunkWriter
from runq.queue.claim import Claimed
from runq.queue.deployed import LiveSettings
from runq.queue.line import Line
from runq.queue.maintenance import Maintenance
from runq.queue.outage import Outage
from runq.queue.reaper import Reaper
from runq.queue.record import Recorder, Running
from runq.queue.storage import ClaimCheck
from runq.queue.tasks import (
    Outcome,
    TaskStatus,
    failure,
    field_text,
    final_status,
    finish_by,
    job_input,
    output_json,
    tenant_of,
)
from runq.settings import FunctionSettings
from runq.worker.collect import BatchCollector
from runq.worker.leases import LeaseKeeper
from runq.worker.runner import BatchTimeout, ModelRunner
from runq.worker.streaming import BatchStream

logger = logging.getLogger("runq.worker")

HEARTBEAT_INTERVAL_S = 10.0
# How long the teardown waits for RQ's pubsub thread (a daemon) before leaving it behind.
PUBSUB_STOP_S = 1.0
SWEEP_INTERVAL_S = 600.0
SWEEP_MARGIN_S = 24 * 3600.0
# What a caller reads of a model error when the function does not expose them; the task id
# finds the detail in the worker log.
HIDDEN_MODEL_ERROR = "the model raised an error; the worker log has it under task {task_id}"


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        function: Function,
        settings: FunctionSettings,
        connection: Redis,
        claim_check: ClaimCheck,
        *,
        maintenance_interval_s: float,
        heartbeat_ttl_s: float,
        live: LiveSettings | None = None,
        predictions: PredictionLog | None = None,
    ) -> None:
        # One RQ queue per priority, so `rq info` lists this worker on each.
        queues = [
            Queue(
                constants.queue_name(function.name, priority),
                connection=connection,
                serializer=JSONSerializer,
            )
            for priority in constants.PRIORITIES
        ]
        super().__init__(queues, connection=connection, serializer=JSONSerializer)
        self.function = function
        self.settings = settings
        self.runner = ModelRunner(function)
        # The wait for work, the claim and the record: the worker's one held connection.
        line = Line(connection)
        self.collector = BatchCollector(line, function, settings, self.name)
        self.recorder = Recorder(line, function.name, self.name)
        # Used only by functions that stream or report progress.
        self.chunks = ChunkWriter(connection, self.name)
        self.leases = LeaseKeeper(connection, function.name, self.name, heartbeat_ttl_s)
        self.reaper = Reaper(connection, function.name, settings.retries)
        self.live = live
        self.claim_check = claim_check
        self.predictions = predictions
        # Between batches, each at most this often.
        self._chores = [
            Chore(HEARTBEAT_INTERVAL_S, self.heartbeat),
            Chore(constants.REAP_INTERVAL_S, self.reaper.reap),
            Chore(constants.DEPLOYED_POLL_INTERVAL_S, self._follow_deployed),
            Chore(SWEEP_INTERVAL_S, self._sweep),
        ]
        maintenance = Maintenance(connection, maintenance_interval_s)
        self._chores.append(Chore(maintenance.try_interval_s, maintenance.run))
        self.batches_run = 0
        # This worker's metric children, looked up once (see _ended).
        m = metrics()
        self._batch_sizes = m.batch_size.labels(function.name)
        self._execution_seconds = m.execution.labels(function.name)
        self._queue_waits = m.queue_wait.labels(function.name)

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
        freeze_startup_heap()
        self.leases.start()
        if self.predictions is not None:
            self.predictions.start()
        try:
            outage = Outage(f"worker {self.name}", logger)
            while not self._stop_requested:
                outage.attempt(self._step)
        finally:
            self.leases.stop()
            if self.predictions is not None:
                self.predictions.stop()
            try:
                super().teardown()
            except RedisError as exc:
                logger.warning("worker %s: cannot deregister from RQ: %s", self.name, exc)
            logger.info("worker %s: stopped after %d batches", self.name, self.batches_run)

    def _step(self) -> None:
        claimed = self.collector.collect(block_s=constants.WORKER_DEQUEUE_TIMEOUT_S)
        if claimed is not None:
            self.process(claimed)
        for chore in self._chores:
            chore.run_if_due()

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        # A flag only: the batch in hand finishes and is recorded. A second signal gets the
        # default action, for whoever really means it.
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def unsubscribe(self) -> None:
        """RQ's, with the wait for its pubsub thread bounded. Since redis-py 8.2 the thread's
        stop() waits for it, and a thread that read the unsubscribe reply before the stop was
        asked sleeps out RQ's 60 s poll first: a worker told to stop took a minute to leave."""
        if self.pubsub_thread:
            self.log.info("Worker %s: unsubscribing from %s", self.name, self.pubsub_channel_name)
            self.pubsub.unsubscribe()
            self.pubsub_thread.stop(timeout=PUBSUB_STOP_S)
            self.pubsub.close()

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
            self.claim_check.objects.sweep(
                self.function.name, self.settings.result_ttl_s + SWEEP_MARGIN_S
            )
        except OSError as exc:
            logger.warning("worker %s: cannot sweep old objects: %s", self.name, exc)

    # one batch ------------------------------------------------------------------------------

    def process(self, claimed: Claimed) -> None:
        if claimed.expired:
            _ended(self.function.name, TaskStatus.TIMED_OUT).inc(len(claimed.expired))
        if not claimed.started:
            return
        tasks = [Running.claimed(started) for started in claimed.started]
        self.leases.hold([task.task_id for task in tasks])
        try:
            run_started = time.perf_counter()
            outcomes = self._execute(tasks, claimed)
            run_ms = (time.perf_counter() - run_started) * 1000
            results = self._record(tasks, outcomes)
        finally:
            self.leases.release()
        self.batches_run += 1
        self._observe(tasks, results, run_ms, claimed.server_now)
        if self.predictions is not None and self.settings.log_predictions > 0:
            self._log_predictions(self.predictions, tasks, results)

    def _record(self, tasks: list[Running], outcomes: list[Outcome]) -> list[Outcome | None]:
        # A batch that ran is not run again for want of Redis: its outcomes wait for Redis to
        # answer. Leases that lapsed meanwhile are the reaper's; the script skips their tasks.
        outage = Outage(f"worker {self.name}", logger)
        return outage.retry(
            lambda: self.recorder.record(tasks, outcomes, self.settings.max_concurrency)
        )

    def _log_predictions(
        self, log: PredictionLog, running: list[Running], results: list[Outcome | None]
    ) -> None:
        ended = time.time()
        for task, outcome in zip(running, results, strict=True):
            if outcome is None or random.random() >= self.settings.log_predictions:
                continue
            latency_s = ended - task.created_s
            log.add(
                prediction_record(
                    self.function.name,
                    task.task_id,
                    tenant_of(task.fields),
                    task.payload,
                    outcome,
                    latency_s,
                )
            )

    def _observe(
        self,
        running: list[Running],
        results: list[Outcome | None],
        run_ms: float,
        started_s: float,
    ) -> None:
        """The batch's metrics and its log line (task ids, never inputs or outputs)."""
        name = self.function.name
        self._batch_sizes.observe(len(running))
        self._execution_seconds.observe(run_ms / 1000)
        for task in running:
            self._queue_waits.observe(max(started_s - task.created_s, 0.0))
        counts = Counter(final_status(outcome) for outcome in results)
        for status, count in counts.items():
            _ended(name, status).inc(count)
        logger.info(
            "batch %s of %d ran in %.1f ms: %d succeeded, %d failed, %d timed out, "
            "%d canceled meanwhile",
            name,
            len(running),
            run_ms,
            counts[TaskStatus.SUCCEEDED],
            counts[TaskStatus.FAILED],
            counts[TaskStatus.TIMED_OUT],
            counts[TaskStatus.CANCELED],
            extra={
                "function": name,
                "batch_size": len(running),
                "duration_ms": round(run_ms, 3),
                "task_ids": [task.task_id for task in running],
            },
        )

    def _execute(self, running: list[Running], claimed: Claimed) -> list[Outcome]:
        if not running:
            return []
        limit_s, why = self._time_limit(running, claimed)
        if limit_s <= 0:
            return [failure(ErrorCode.TIMED_OUT, why)] * len(running)
        outcomes: list[Outcome | None] = [None] * len(running)
        loaded: list[tuple[int, Any]] = []
        for i, task in enumerate(running):
            try:
                loaded.append((i, self._input(task)))
            except StorageError as exc:
                outcomes[i] = failure(ErrorCode.STORAGE_UNAVAILABLE, exc.message)
        stream = BatchStream(self.chunks, self.function.name, self.settings)
        try:
            with _time_limit(limit_s):
                ran = self.runner.run(
                    [payload for _, payload in loaded],
                    [running[i].task_id for i, _ in loaded],
                    stream,
                )
        except BatchTimeout:
            logger.warning("worker %s: batch of %d stopped: %s", self.name, len(running), why)
            return [failure(ErrorCode.TIMED_OUT, why)] * len(running)
        for task in running:
            # The recorded task JSON (a predict's answer, a webhook's body) shows its progress.
            progressed = stream.progressed.get(task.task_id)
            if progressed is not None:
                task.fields[constants.PROGRESS_FIELD.encode()] = progressed
        for (i, _), outcome in zip(loaded, ran, strict=True):
            outcomes[i] = self._stored_if_big(running[i], self._told(running[i], outcome))
        return [outcome for outcome in outcomes if outcome is not None]

    def _told(self, task: Running, outcome: Outcome) -> Outcome:
        """A model error as far as the function lets its callers see it (expose_errors); the
        runner has logged it in full under the task id."""
        if outcome.error_code != ErrorCode.MODEL_ERROR or self.settings.expose_errors:
            return outcome
        return dataclasses.replace(
            outcome, error_message=HIDDEN_MODEL_ERROR.format(task_id=task.task_id)
        )

    def _input(self, task: Running) -> Any:
        input_ref = field_text(task.fields, constants.INPUT_REF_FIELD)
        if input_ref is None:
            task.payload = job_input(task.fields)
        else:
            task.payload = json.loads(self.claim_check.objects.get(input_ref))
        return task.payload

    def _stored_if_big(self, task: Running, outcome: Outcome) -> Outcome:
        """The outcome, its output moved to object storage when it is too big for Redis."""
        if not outcome.ok:
            return outcome
        key = storage.output_key(self.function.name, task.task_id)
        # Encoded once: the size check, the stored object, the record and the reply all use it.
        try:
            encoded = output_json(outcome.output)
        except (ValueError, RecursionError) as exc:
            message = f"{self.function.name} returned an output that is not strict JSON: {exc}"
            return failure(ErrorCode.INVALID_OUTPUT, message)
        try:
            stored = self.claim_check.check_in(key, encoded)
        except StorageError as exc:
            return failure(ErrorCode.STORAGE_UNAVAILABLE, exc.message)
        if stored is None:
            return dataclasses.replace(outcome, output_json=encoded)
        return Outcome(output_ref=stored)

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


@functools.lru_cache(maxsize=64)
def _ended(function: str, status: TaskStatus) -> prometheus_client.Counter:
    """The ended-tasks counter's child, looked up once per status, as the gateway's metrics
    are (labels() takes a lock and checks its arguments on every call)."""
    return metrics().tasks.labels(function, status.value)


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
