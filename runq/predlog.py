"""Prediction logging: sampled inputs and outputs as JSON Lines, for drift analysis.

A worker adds records as its batches end; a thread writes them, every FLUSH_INTERVAL_S, as one
new object per flush (`<function>/<YYYY-MM-DD>/<HHMMSS>-<worker>-<n>.jsonl`) to a file:// or
s3:// store. Adding never blocks and never fails a task: when the writer falls behind, records
past MAX_BUFFERED are dropped, and a failed write is logged and dropped; both are counted
(runq_predictions_dropped_total).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any

from runq.background import BackgroundLoop
from runq.errors import StorageError
from runq.metrics import metrics
from runq.queue.storage import ObjectStore
from runq.queue.tasks import Outcome, final_status

logger = logging.getLogger("runq.predlog")

FLUSH_INTERVAL_S = 5.0
MAX_BUFFERED = 10_000


def prediction_record(
    function: str, task_id: str, tenant: str, payload: Any, outcome: Outcome, latency_s: float
) -> dict[str, Any]:
    """One line of the log: the task's input and its output (or stored output's key, or error)."""
    record: dict[str, Any] = {
        "time": time.time(),
        "function": function,
        "task_id": task_id,
        "tenant": tenant,
        "status": final_status(outcome).value,
        "latency_s": latency_s,
        "input": payload,
    }
    if outcome.output_ref is not None:
        record["output_ref"] = outcome.output_ref
    elif outcome.ok:
        record["output"] = outcome.output
    else:
        record["error"] = {"code": outcome.error_code, "message": outcome.error_message}
    return record


class PredictionLog:
    def __init__(self, store: ObjectStore, worker_name: str) -> None:
        self.store = store
        self.worker_name = worker_name
        self._records: deque[dict[str, Any]] = deque()
        self._written = 0
        self._loop = BackgroundLoop(
            "runq-predlog", self._flush_step, first_wait_s=FLUSH_INTERVAL_S, final=self.flush
        )

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """Writes what is buffered, then stops."""
        self._loop.stop(timeout_s=2 * FLUSH_INTERVAL_S)

    def add(self, record: dict[str, Any]) -> None:
        if len(self._records) >= MAX_BUFFERED:
            metrics().predictions_dropped.labels(record["function"]).inc()
            return
        self._records.append(record)

    def flush(self) -> None:
        taken: list[dict[str, Any]] = []
        while self._records:
            taken.append(self._records.popleft())
        by_function: dict[str, list[dict[str, Any]]] = {}
        for record in taken:
            by_function.setdefault(record["function"], []).append(record)
        for function, records in by_function.items():
            self._write(function, records)

    def _flush_step(self) -> float:
        self.flush()
        return FLUSH_INTERVAL_S

    def _write(self, function: str, records: list[dict[str, Any]]) -> None:
        now = time.gmtime()
        self._written += 1
        key = (
            f"{function}/{time.strftime('%Y-%m-%d', now)}/"
            f"{time.strftime('%H%M%S', now)}-{self.worker_name}-{self._written}.jsonl"
        )
        body = "".join(json.dumps(record, default=str) + "\n" for record in records)
        try:
            self.store.put(key, body.encode())
        except (StorageError, OSError) as exc:
            metrics().predictions_dropped.labels(function).inc(len(records))
            logger.warning("dropped %d logged predictions of %s: %s", len(records), function, exc)
