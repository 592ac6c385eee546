"""Rolling outcome stats: the histogram's arithmetic, and a round trip through Valkey."""

from __future__ import annotations

import itertools
import math
import uuid

import pytest
from redis import Redis

from runq.queue import constants, stats
from runq.queue.stats import LATENCY_BOUNDS_S, bucket_of, percentile_s, record

NOW_S = 1_700_000_000.25


def histogram(*latencies_s: float) -> list[int]:
    buckets = [0] * (len(LATENCY_BOUNDS_S) + 1)
    for latency_s in latencies_s:
        buckets[bucket_of(latency_s)] += 1
    return buckets


def fresh_function() -> str:
    return f"stats_{uuid.uuid4().hex[:8]}"


def test_bounds_span_a_millisecond_to_ten_minutes_in_steps_of_a_quarter() -> None:
    assert LATENCY_BOUNDS_S[0] == 0.001
    assert LATENCY_BOUNDS_S[-2] < 600 <= LATENCY_BOUNDS_S[-1]
    for lower, upper in itertools.pairwise(LATENCY_BOUNDS_S):
        assert upper / lower == pytest.approx(1.25)


@pytest.mark.parametrize(
    ("latency_s", "bucket"),
    [
        (-2.0, 0),  # a host clock behind the other's
        (0.0, 0),
        (0.001, 0),  # a bound belongs to the bucket below it
        (0.00100001, 1),
        (0.00125, 1),
        (599.0, len(LATENCY_BOUNDS_S) - 1),
        (10_000.0, len(LATENCY_BOUNDS_S)),  # above every bound: the last, open bucket
    ],
)
def test_a_latency_falls_in_the_bucket_whose_upper_bound_holds_it(
    latency_s: float, bucket: int
) -> None:
    assert bucket_of(latency_s) == bucket


@pytest.mark.parametrize("exponent", [i / 10 for i in range(-30, 28)])
def test_a_percentile_is_within_twelve_percent_of_the_latency(exponent: float) -> None:
    latency_s = 10**exponent  # 1 ms .. about 8 min
    estimate = percentile_s(histogram(latency_s), 0.5)
    assert estimate is not None
    assert abs(estimate / latency_s - 1) < 0.12


def test_the_open_buckets_read_as_their_bound() -> None:
    assert percentile_s(histogram(0.0002), 0.5) == LATENCY_BOUNDS_S[0]
    assert percentile_s(histogram(3600.0), 0.5) == LATENCY_BOUNDS_S[-1]


def test_percentiles_take_the_nearest_rank() -> None:
    one_slow = histogram(*[0.010] * 99, 1.0)
    two_slow = histogram(*[0.010] * 98, 1.0, 1.0)
    assert percentile_s(one_slow, 0.5) == pytest.approx(0.010, rel=0.12)
    assert percentile_s(one_slow, 0.99) == pytest.approx(0.010, rel=0.12)  # rank 99 is fast
    assert percentile_s(two_slow, 0.99) == pytest.approx(1.0, rel=0.12)
    assert percentile_s(histogram(0.010, 1.0), 0.5) == pytest.approx(0.010, rel=0.12)


def test_no_samples_have_no_percentile() -> None:
    assert percentile_s(histogram(), 0.5) is None


def test_an_unknown_status_is_refused_before_anything_is_queued(redis: Redis) -> None:
    with redis.pipeline() as pipe:
        with pytest.raises(ValueError, match="canceled"):
            record(pipe, fresh_function(), [("succeeded", 0.1), ("canceled", 0.1)], NOW_S)
        assert len(pipe) == 0


def test_outcomes_written_in_a_transaction_read_back_over_the_window(redis: Redis) -> None:
    function = fresh_function()
    with redis.pipeline() as pipe:
        pipe.multi()
        record(pipe, function, [("succeeded", 0.020)] * 90, NOW_S)
        record(pipe, function, [("failed", 0.020)] * 5 + [("timed_out", 2.0)] * 5, NOW_S - 30)
        # Two batches in the same second add up.
        record(pipe, function, [("succeeded", 0.020)] * 20, NOW_S - 59)
        # A second before the window.
        record(pipe, function, [("failed", 5.0)] * 1000, NOW_S - 60)
        pipe.execute()

    window = stats.read(redis, function, now_s=NOW_S)

    assert (window.succeeded, window.failed, window.timed_out) == (110, 5, 5)
    assert (window.done, window.errors, window.window_s) == (120, 10, 60)
    assert window.throughput_per_s == pytest.approx(120 / 60)
    assert window.p50_s == pytest.approx(0.020, rel=0.12)
    assert window.p99_s == pytest.approx(2.0, rel=0.12)
    key = constants.stats_key(function, math.floor(NOW_S))
    assert 0 < redis.ttl(key) <= constants.STATS_TTL_S
    assert redis.sismember(constants.FUNCTIONS_KEY, function)


def test_a_shorter_window_sees_only_its_seconds(redis: Redis) -> None:
    function = fresh_function()
    with redis.pipeline() as pipe:
        record(pipe, function, [("succeeded", 0.5)] * 4, NOW_S)
        record(pipe, function, [("succeeded", 0.5)] * 6, NOW_S - 10)
        pipe.execute()

    window = stats.read(redis, function, 10, now_s=NOW_S)

    assert window.succeeded == 4
    assert window.throughput_per_s == pytest.approx(0.4)


def test_read_defaults_to_the_servers_clock(redis: Redis) -> None:
    function = fresh_function()
    seconds, micros = redis.time()
    with redis.pipeline() as pipe:
        record(pipe, function, [("succeeded", 0.1)], seconds + micros / 1e6)
        pipe.execute()

    assert stats.read(redis, function).succeeded == 1


def test_a_function_with_no_outcomes_reads_empty(redis: Redis) -> None:
    window = stats.read(redis, fresh_function(), now_s=NOW_S)

    assert (window.done, window.throughput_per_s) == (0, 0.0)
    assert (window.p50_s, window.p99_s) == (None, None)


def test_no_outcomes_write_nothing(redis: Redis) -> None:
    with redis.pipeline() as pipe:
        record(pipe, fresh_function(), [], NOW_S)
        assert len(pipe) == 0


@pytest.mark.parametrize("window_s", [0, constants.STATS_TTL_S + 1])
def test_a_window_the_stats_do_not_cover_is_refused(redis: Redis, window_s: int) -> None:
    with pytest.raises(ValueError, match="window_s"):
        stats.read(redis, fresh_function(), window_s, now_s=NOW_S)
