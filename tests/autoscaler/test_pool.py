"""A function's worker processes: which exits count as a crash loop, and which do not."""

from __future__ import annotations

import os
import signal
import sys

from runq.autoscaler.pool import WorkerPool
from tests.helpers import wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
QUITTER = [sys.executable, "-c", "raise SystemExit(1)"]


def exited(pool: WorkerPool) -> bool:
    pool.poll()
    return pool.current == 0


def test_a_worker_killed_from_outside_is_replaced_at_once_every_time() -> None:
    # Preemption or the OOM killer, again and again: never a crash-loop backoff.
    pool = WorkerPool("killed", SLEEPER, os.environ)
    try:
        for _ in range(3):
            pool.scale_to(1)
            (worker,) = pool.live
            os.kill(worker.process.pid, signal.SIGKILL)
            wait_until(lambda: exited(pool), 10, "the kill to be seen")
            pool.scale_to(1)
            assert pool.current == 1, "not replaced at once"
            assert pool.live[0].process.pid != worker.process.pid
    finally:
        pool.stop(grace_s=5)


def test_a_worker_that_exits_on_its_own_at_start_is_restarted_after_a_growing_backoff() -> None:
    pool = WorkerPool("quitter", QUITTER, os.environ)
    try:
        pool.scale_to(1)
        for _ in range(2):
            wait_until(lambda: exited(pool), 10, "the worker to exit")
            pool.scale_to(1)
            assert pool.current == 0, "restarted at once after exiting on its own"
            # Restarted once its backoff (0.25 s, then 0.5 s) has passed.
            wait_until(lambda: pool.scale_to(1) or pool.current == 1, 5, "the restart")
    finally:
        pool.stop(grace_s=5)
