"""Prediction logging: sampled inputs and outputs as JSON Lines, for drift analysis.

A worker adds records as its batches end; a thread writes them, every FLUSH_INTERVAL_S, as one
new object per flush (`<function>/<YYYY-MM-DD>/<HHMMSS>-<worker>-<n>.jsonl`) to a file:// or
s3:// store. Adding never blocks and never fails a task: when the writer falls behind, records
past MAX_BUFFERED are dropped and counted, and a failed write is logged and dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from runq.storage import ObjectStore, StorageError

logger = logging.getLogger("runq.predlog")

FLUSH_INTERVAL_S = 5.0
MAX_BUFFERED = 10_000


class PredictionLog:
    def __init__(self, store: ObjectStore, worker_name: str) -> None:
        self.store = store
        self.worker_name = worker_name
        self.dropped = 0
        self._records: deque[dict[str, Any]] = deque()
        self._written = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runq-predlog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Writes what is buffered, then stops."""
        self._stopping.set()
        self._thread.join(timeout=2 * FLUSH_INTERVAL_S)

    def add(self, record: dict[str, Any]) -> None:
        if len(self._records) >= MAX_BUFFERED:
            self.dropped += 1
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

    def _loop(self) -> None:
        while not self._stopping.wait(FLUSH_INTERVAL_S):
            self.flush()
        self.flush()

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
            logger.warning("dropped %d logged predictions of %s: %s", len(records), function, exc)
