"""Gathering a batch: highest priority first, within max_concurrency; batch-mates join within
max_latency_ms."""

from __future__ import annotations

import time

from redis.exceptions import ConnectionError, TimeoutError

from runq.functions import Function
from runq.queue import constants
from runq.queue.claim import Claim, Claimed
from runq.queue.line import Line
from runq.settings import FunctionSettings


class BatchCollector:
    def __init__(
        self, line: Line, function: Function, settings: FunctionSettings, worker_name: str
    ) -> None:
        self.settings = settings
        self.batched = function.batch
        self._claim = Claim(line, function.name, worker_name)
        self._last_batch_size = 0
        # The last claim took less than it asked for and had slots: the queue was empty then,
        # and only a new task's wake token can bring work. The next look waits for one first
        # (at once if one is there) instead of claiming an empty queue every batch.
        self._drained = False

    @property
    def limit(self) -> int:
        # An unbatched function takes one task at a time: a task claimed is a task running, for
        # max_concurrency and for its time limit alike.
        return self.settings.max_batch_size if self.batched else 1

    def collect(self, block_s: float) -> Claimed | None:
        """Takes a batch, waiting up to ``block_s`` for work or a free slot; None when idle."""
        limit = self.limit
        if self._drained:
            self._claim.wait_for_work(False, block_s)
        claimed = self._claim_batch(limit)
        if claimed.empty and not self._drained:
            self._claim.wait_for_work(claimed.at_capacity, block_s)
            claimed = self._claim_batch(limit)
        if claimed.empty:
            self._drained = not claimed.at_capacity
            return None
        window_ends = time.monotonic() + self.settings.max_latency_ms / 1000
        # The window stays open only while batch-mates keep arriving, and only under concurrent
        # load (the last batch had company): a lone request, or a closed group of callers that
        # are all in this batch already, is not made to wait for tasks that won't come.
        # Polling, not a blocking pop: Redis times blocked clients out at its `hz` resolution
        # (100 ms by default), far coarser than a batching window.
        arriving = self._last_batch_size > 1
        while arriving and len(claimed.started) < limit:
            remaining = window_ends - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(constants.BATCH_FILL_POLL_S, remaining))
            try:
                more = self._claim_batch(limit - len(claimed.started))
            except (ConnectionError, TimeoutError):
                # The tasks in hand are leased to this worker: run them, and record them once
                # Redis is back. The claim that failed is sent again before the next batch.
                break
            arriving = not more.empty
            claimed.extend(more)
        self._last_batch_size = len(claimed.started)
        self._drained = self._last_batch_size < limit and not claimed.at_capacity
        return claimed

    def _claim_batch(self, wanted: int) -> Claimed:
        return self._claim(wanted, self.settings.max_concurrency)
