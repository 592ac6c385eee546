"""Gathering a batch: highest priority first, within max_concurrency; batch-mates join within
max_latency_ms."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis import Redis
from rq.utils import now, utcformat

from runq.functions import Function
from runq.queue import constants as k
from runq.queue import scripts
from runq.queue.tasks import deadline_passed_error
from runq.settings import FunctionSettings

RawHash = dict[bytes, bytes]


@dataclass
class Claimed:
    """Tasks a worker now owns (marked started, leased), and tasks found past their deadline."""

    started: list[tuple[str, RawHash]] = field(default_factory=list)
    expired: list[tuple[str, RawHash]] = field(default_factory=list)
    # Every max_concurrency slot was taken: wait for one to free, not for new work.
    at_capacity: bool = False
    # The Redis server's clock at the claim, and ours, to turn server deadlines into time left.
    server_now: float = 0.0
    claimed_at: float = field(default_factory=time.monotonic)

    @property
    def empty(self) -> bool:
        return not self.started and not self.expired

    def extend(self, other: Claimed) -> None:
        self.started += other.started
        self.expired += other.expired

    def seconds_left(self, server_deadline: float) -> float:
        return server_deadline - self.server_now - (time.monotonic() - self.claimed_at)


class BatchCollector:
    def __init__(
        self, connection: Redis, function: Function, settings: FunctionSettings, worker_name: str
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.worker_name = worker_name
        self.batched = function.batch
        name = function.name
        self.keys = [*k.queue_keys(name), k.leases_key(name), k.wake_key(name), k.drain_key(name)]
        self.wake_key = k.wake_key(name)
        self.slots_key = k.slots_key(name)
        self._claim = connection.register_script(scripts.CLAIM)
        self._last_batch_size = 0

    @property
    def limit(self) -> int:
        # An unbatched function takes one task at a time: a task claimed is a task running, for
        # max_concurrency and for its time limit alike.
        return self.settings.max_batch_size if self.batched else 1

    def collect(self, block_s: float) -> Claimed | None:
        """Takes a batch, waiting up to ``block_s`` for work or a free slot; None when idle."""
        limit = self.limit
        claimed = self._claim_batch(limit)
        if claimed.empty:
            self._wait_for_work(claimed.at_capacity, block_s)
            claimed = self._claim_batch(limit)
            if claimed.empty:
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
            time.sleep(min(k.BATCH_FILL_POLL_S, remaining))
            more = self._claim_batch(limit - len(claimed.started))
            arriving = not more.empty
            claimed.extend(more)
        self._last_batch_size = len(claimed.started)
        return claimed

    def _wait_for_work(self, at_capacity: bool, block_s: float) -> None:
        # Tokens are hints: whatever wakes this worker, the next claim decides. A lapsed lease
        # frees a slot without a token, so the timeout doubles as the retry.
        self.connection.blpop([self.slots_key if at_capacity else self.wake_key], block_s)

    def _claim_batch(self, wanted: int) -> Claimed:
        started, expired, at_capacity, server_now = self._claim(
            keys=self.keys,
            args=[
                max(wanted, 0),
                self.worker_name,
                utcformat(now()),
                deadline_passed_error(),
                k.RQ_JOB_PREFIX,
                k.RQ_CANCELED_PREFIX,
                self.settings.max_concurrency or 0,
                k.LEASE_TTL_S,
                k.DRAIN_RATE_WINDOW_S,
                k.DRAIN_TTL_S,
            ],
        )
        return Claimed(
            started=_pairs(started),
            expired=_pairs(expired),
            at_capacity=bool(at_capacity),
            server_now=float(server_now),
        )


def _pairs(rows: list[list[object]]) -> list[tuple[str, RawHash]]:
    result = []
    for task_id, flat in rows:
        assert isinstance(task_id, bytes) and isinstance(flat, list)
        result.append((task_id.decode(), dict(zip(flat[::2], flat[1::2], strict=True))))
    return result
