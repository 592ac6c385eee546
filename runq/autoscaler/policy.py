"""How many workers a function wants: a pure function of its demand, its bounds and the clock."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    # Tasks (queued + running) one replica is expected to carry.
    target_per_replica: int
    min_replicas: int
    max_replicas: int
    scale_down_delay_s: float


@dataclass(frozen=True)
class Decision:
    replicas: int
    # When demand first fell below the current replica count; None while it has not.
    low_since: float | None


def decide(
    policy: Policy, *, current: int, queued: int, running: int, low_since: float | None, now: float
) -> Decision:
    """Scale up at once; scale down only after scale_down_delay_s of lower demand.

    Waiting out the delay on the way down keeps a pool from flapping when demand wobbles, and
    keeps a warm replica through short idle gaps; going up never waits, since a queued task
    with no replica to run it is the latency a cold start costs.
    """
    wanted = math.ceil((queued + running) / policy.target_per_replica)
    wanted = max(policy.min_replicas, min(policy.max_replicas, wanted))
    if wanted >= current:
        return Decision(wanted, None)
    since = now if low_since is None else low_since
    if now - since >= policy.scale_down_delay_s:
        return Decision(wanted, None)
    return Decision(current, since)
