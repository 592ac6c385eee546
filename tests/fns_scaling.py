"""Functions the autoscaling and crash-safety tests serve, apart from tests/fns.py so that an
autoscaler started on them never starts workers for the other tests' functions."""

from __future__ import annotations

import time

import runq


@runq.function(
    max_batch_size=2, max_latency_ms=1, target_per_replica=2, max_replicas=3, scale_down_delay_s=1
)
def burst(seconds: list[float]) -> list[float]:
    time.sleep(max(seconds))
    return seconds


@runq.function(max_batch_size=4, max_replicas=1, scale_down_delay_s=1)
class Cold:
    """Takes a second to set up, like a model loading its weights."""

    SETUP_S = 1.0

    def setup(self) -> None:
        time.sleep(self.SETUP_S)

    def __call__(self, inputs: list[str]) -> list[str]:
        return inputs


@runq.function(max_batch_size=5, max_latency_ms=1, retries=5, target_per_replica=5, max_replicas=3)
def fragile(seconds: list[float]) -> list[float]:
    """Its workers get killed while it runs; retries let every task finish anyway."""
    time.sleep(max(seconds))
    return seconds


@runq.function(batch=False, retries=0, max_replicas=1, timeout_s=120)
def doomed(seconds: float) -> float:
    """No retries: a task whose worker is killed ends failed, worker_lost."""
    time.sleep(seconds)
    return seconds
