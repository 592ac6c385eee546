"""Gathering a batch: the first task blocks, batch-mates join within max_latency_ms."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis import Redis
from rq.utils import now, utcformat

from runq.queue import constants as k
from runq.queue import scripts
from runq.queue.tasks import TIMED_OUT_CODE, error_json, text
from runq.settings import FunctionSettings

RawHash = dict[bytes, bytes]


@dataclass
class Claimed:
    """Tasks a worker now owns (marked started), and tasks it found past their deadline."""

    started: list[tuple[str, RawHash]] = field(default_factory=list)
    expired: list[tuple[str, RawHash]] = field(default_factory=list)

    def extend(self, other: Claimed) -> None:
        self.started += other.started
        self.expired += other.expired


class BatchCollector:
    def __init__(
        self, connection: Redis, function: str, settings: FunctionSettings, worker_name: str
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.worker_name = worker_name
        self.queue_key = k.queue_key(function)
        self.intermediate_key = k.intermediate_key(function)
        self.canceled_key = k.canceled_registry_key(function)
        self._claim = connection.register_script(scripts.CLAIM)
        self._last_batch_size = 0

    def collect(self, block_s: int) -> Claimed | None:
        """Blocks up to ``block_s`` for a first task, then fills the batch; None when idle."""
        first = self._blocking_move(block_s)
        if first is None:
            return None
        limit = self.settings.max_batch_size
        window_ends = time.monotonic() + self.settings.max_latency_ms / 1000
        claimed = self._claim_batch(limit - 1, first)
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
            time.sleep(min(k.BATCH_FILL_POLL_S, remaining))
            more = self._claim_batch(limit - len(claimed.started))
            arriving = bool(more.started or more.expired)
            claimed.extend(more)
        self._last_batch_size = len(claimed.started)
        return claimed

    def _blocking_move(self, timeout_s: int) -> str | None:
        return text(self.connection.blmove(self.queue_key, self.intermediate_key, timeout_s))

    def _claim_batch(self, more: int, *moved_ids: str) -> Claimed:
        right_now = now()
        started, expired = self._claim(
            keys=[self.queue_key, self.intermediate_key, self.canceled_key],
            args=[
                max(more, 0),
                self.worker_name,
                utcformat(right_now),
                right_now.timestamp(),
                error_json(TIMED_OUT_CODE, "the task's deadline passed before it could start"),
                k.RQ_JOB_PREFIX,
                *moved_ids,
            ],
        )
        return Claimed(started=_pairs(started), expired=_pairs(expired))


def _pairs(rows: list[list[object]]) -> list[tuple[str, RawHash]]:
    result = []
    for task_id, flat in rows:
        assert isinstance(task_id, bytes) and isinstance(flat, list)
        result.append((task_id.decode(), dict(zip(flat[::2], flat[1::2], strict=True))))
    return result
