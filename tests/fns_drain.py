"""A function that only the drain tests serve, so that an autoscaler they stop runs no other."""

from __future__ import annotations

import time

import runq


@runq.function(batch=False, max_replicas=1, timeout_s=30)
def lingering(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
