"""Per-function rolling outcome stats in Redis: ended tasks and their latency, per second.

Workers add a batch's outcomes inside the transaction that records them (``record``), so the
stats count exactly the outcomes written, once. Each second of each function is one small hash
that expires on its own: any number of workers add to it, no process keeps state, and
``runq status`` merges the last minute of them (``read``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline

from runq.queue import constants
from runq.queue.tasks import TaskStatus

# The statuses an outcome can end with; each is a counter field of the per-second hash.
ENDED = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT)

# Latency histogram bounds, log-spaced from 1 ms by a factor of 1.25 up to past 10 minutes: a
# percentile read as its bucket's geometric middle is within sqrt(1.25) (under 12 %) of the
# true one. Bucket i counts latencies in (bound i-1, bound i]; one more counts those above all.
LATENCY_MIN_S = 0.001
LATENCY_MAX_S = 600.0
LATENCY_FACTOR = 1.25
LATENCY_BOUNDS_S = tuple(
    LATENCY_MIN_S * LATENCY_FACTOR**i
    for i in range(math.ceil(math.log(LATENCY_MAX_S / LATENCY_MIN_S, LATENCY_FACTOR)) + 1)
)
# Hash field of bucket i: "b<i>".
BUCKET_FIELD_PREFIX = "b"


@dataclass(frozen=True)
class WindowStats:
    """A function's ended tasks over the last ``window_s`` seconds."""

    window_s: int
    succeeded: int
    failed: int
    timed_out: int
    # Latency from a task's creation to its end, over every ended status; None with no samples.
    p50_s: float | None
    p99_s: float | None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.timed_out

    @property
    def errors(self) -> int:
        return self.failed + self.timed_out

    @property
    def throughput_per_s(self) -> float:
        return self.done / self.window_s


def record(
    pipe: Pipeline, function: str, outcomes: Sequence[tuple[str, float]], now_s: float
) -> None:
    """Adds ended tasks to the function's stats for the second ``now_s`` falls in.

    ``outcomes`` are (status, latency_s): status one of ENDED, latency_s the seconds from the
    task's creation to its end. ``now_s`` is epoch seconds, best on the Redis server's clock
    (what ``read`` defaults to); a host clock a second off only moves samples to a neighbouring
    second. The commands join ``pipe`` (the caller's MULTI): nothing is counted unless the
    outcomes themselves are written. Also lists the function in FUNCTIONS_KEY.
    """
    if not outcomes:
        return
    fields: Counter[str] = Counter()
    for status, latency_s in outcomes:
        if status not in ENDED:
            raise ValueError(f"{status!r} is not an ended status: one of {', '.join(ENDED)}")
        fields[str(status)] += 1
        fields[bucket_field(latency_s)] += 1
    key = constants.stats_key(function, math.floor(now_s))
    for field, count in fields.items():
        pipe.hincrby(key, field, count)
    pipe.expire(key, constants.STATS_TTL_S)
    pipe.sadd(constants.FUNCTIONS_KEY, function)


def read(
    connection: Redis,
    function: str,
    window_s: int = constants.STATS_WINDOW_S,
    *,
    now_s: float | None = None,
) -> WindowStats:
    """The function's stats over the ``window_s`` seconds up to ``now_s`` (the one in progress
    included), in one round trip; ``now_s`` defaults to the Redis server's clock.
    """
    if not 0 < window_s <= constants.STATS_TTL_S:
        raise ValueError(f"window_s must be within 1..{constants.STATS_TTL_S} (the stats' TTL)")
    if now_s is None:
        seconds, micros = connection.time()
        now_s = seconds + micros / 1e6
    last = math.floor(now_s)
    with connection.pipeline(transaction=False) as pipe:
        for second in range(last - window_s + 1, last + 1):
            pipe.hgetall(constants.stats_key(function, second))
        hashes = pipe.execute()
    return merged(hashes, window_s)


def merged(hashes: Iterable[Mapping[bytes, bytes]], window_s: int) -> WindowStats:
    """Sums per-second hashes (as HGETALL answers them) into one window."""
    totals: Counter[str] = Counter()
    for fields in hashes:
        for field, count in fields.items():
            totals[field.decode()] += int(count)
    buckets = [totals[BUCKET_FIELD_PREFIX + str(i)] for i in range(len(LATENCY_BOUNDS_S) + 1)]
    return WindowStats(
        window_s=window_s,
        succeeded=totals[TaskStatus.SUCCEEDED],
        failed=totals[TaskStatus.FAILED],
        timed_out=totals[TaskStatus.TIMED_OUT],
        p50_s=percentile_s(buckets, 0.50),
        p99_s=percentile_s(buckets, 0.99),
    )


def bucket_field(latency_s: float) -> str:
    """The hash field counting a latency's bucket."""
    return BUCKET_FIELD_PREFIX + str(bucket_of(latency_s))


def bucket_of(latency_s: float) -> int:
    """The histogram bucket of a latency; a negative one (hosts' clocks disagree) is the first."""
    return bisect.bisect_left(LATENCY_BOUNDS_S, latency_s)


def percentile_s(buckets: Sequence[int], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of a histogram, as its bucket's geometric middle."""
    cumulative = list(itertools.accumulate(buckets))
    if not cumulative or cumulative[-1] == 0:
        return None
    rank = max(1, math.ceil(q * cumulative[-1]))
    return bucket_middle_s(bisect.bisect_left(cumulative, rank))


def bucket_middle_s(index: int) -> float:
    """A bucket's representative latency; the open-ended first and last read as their bound."""
    if index == 0:
        return LATENCY_BOUNDS_S[0]
    if index == len(LATENCY_BOUNDS_S):
        return LATENCY_BOUNDS_S[-1]
    return math.sqrt(LATENCY_BOUNDS_S[index - 1] * LATENCY_BOUNDS_S[index])
