"""The scaling policy, table-driven: demand, bounds and the clock in, replicas out."""

from __future__ import annotations

import pytest

from runq.autoscaler.policy import Decision, Policy, decide

POLICY = Policy(target_per_replica=10, min_replicas=0, max_replicas=4, scale_down_delay_s=30)


@pytest.mark.parametrize(
    ("current", "queued", "running", "low_since", "now", "expected"),
    [
        # scale up at once, to the demand, within max_replicas
        (0, 1, 0, None, 100, Decision(1, None)),
        (1, 15, 5, None, 100, Decision(2, None)),
        (1, 11, 0, None, 100, Decision(2, None)),
        (2, 500, 40, None, 100, Decision(4, None)),
        # steady demand keeps the count and clears a pending scale-down
        (2, 12, 8, 90.0, 100, Decision(2, None)),
        # lower demand starts the delay, holds during it, scales down after it
        (3, 5, 0, None, 100, Decision(3, 100)),
        (3, 5, 0, 100.0, 129.9, Decision(3, 100)),
        (3, 5, 0, 100.0, 130, Decision(1, None)),
        # idle: to zero after the delay, and zero stays zero
        (1, 0, 0, None, 100, Decision(1, 100)),
        (1, 0, 0, 100.0, 130, Decision(0, None)),
        (0, 0, 0, None, 100, Decision(0, None)),
        # running tasks count as demand: a busy pool is never scaled under its work
        (2, 0, 20, 50.0, 100, Decision(2, None)),
    ],
)
def test_decide(
    current: int, queued: int, running: int, low_since: float | None, now: float, expected: Decision
) -> None:
    got = decide(
        POLICY, current=current, queued=queued, running=running, low_since=low_since, now=now
    )
    assert got == expected


def test_min_replicas_keeps_a_warm_pool() -> None:
    policy = Policy(target_per_replica=10, min_replicas=1, max_replicas=3, scale_down_delay_s=0)
    assert decide(policy, current=1, queued=0, running=0, low_since=None, now=0) == Decision(
        1, None
    )
    assert decide(policy, current=3, queued=0, running=0, low_since=None, now=0) == Decision(
        1, None
    )


def test_zero_delay_scales_down_on_the_first_low_reading() -> None:
    policy = Policy(target_per_replica=1, min_replicas=0, max_replicas=5, scale_down_delay_s=0)
    assert decide(policy, current=5, queued=2, running=0, low_since=None, now=7) == Decision(
        2, None
    )
