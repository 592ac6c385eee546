"""A function's local worker processes: started, drained and restarted on the autoscaler's word."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger("runq.autoscaler")

# A worker that dies within this long of starting counts as a crash loop and is restarted after
# a growing backoff (a setup() that raises would otherwise be restarted as fast as it fails).
CRASH_WINDOW_S = 60.0
RESTART_BACKOFF_MAX_S = 10.0
# How often a stop in progress looks whether it was asked again, to cut it short.
STOP_POLL_S = 0.1

# True once the user asked to stop a second time: batches in hand may be cut short.
CutShort = Callable[[], bool]


def never() -> bool:
    return False


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    started: float
    draining: bool = False


class WorkerPool:
    def __init__(self, function: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.function = function
        self.argv = list(argv)
        self.env = dict(env)
        self.live: list[WorkerProcess] = []
        self._crashes = 0
        self._next_start = 0.0

    @property
    def current(self) -> int:
        """Workers that count toward the replicas: started or starting, not draining."""
        return sum(1 for worker in self.live if not worker.draining)

    def poll(self) -> None:
        """Forgets workers that exited; a crash delays the next start when it repeats.

        A worker killed by a signal from outside (the OOM killer, a preemption, an operator's
        SIGKILL) is no crash of its own: it is replaced at once, however often it happens.
        """
        for worker in [w for w in self.live if w.process.poll() is not None]:
            self.live.remove(worker)
            code = worker.process.returncode
            if worker.draining:
                logger.info("worker %s (pid %d) drained", self.function, worker.process.pid)
                continue
            if code < 0:
                logger.warning(
                    "worker %s (pid %d) was killed by signal %d; a new one starts now",
                    self.function,
                    worker.process.pid,
                    -code,
                )
                continue
            lived = time.monotonic() - worker.started
            self._crashes = self._crashes + 1 if lived < CRASH_WINDOW_S else 1
            backoff = min(2.0 ** (self._crashes - 1) / 4, RESTART_BACKOFF_MAX_S)
            self._next_start = time.monotonic() + backoff
            logger.warning(
                "worker %s (pid %d) exited with %s; a new one starts in %.2f s",
                self.function,
                worker.process.pid,
                code,
                backoff,
            )

    def scale_to(self, replicas: int) -> None:
        while self.current < replicas and time.monotonic() >= self._next_start:
            self._spawn()
        extra = self.current - replicas
        if extra > 0:
            # Newest first: the oldest have warm caches and a record of health.
            for worker in [w for w in reversed(self.live) if not w.draining][:extra]:
                worker.draining = True
                worker.process.send_signal(signal.SIGTERM)
                logger.info("worker %s (pid %d) draining", self.function, worker.process.pid)

    def stop(self, grace_s: float, cut_short: CutShort = never) -> None:
        # One signal per worker: a worker takes a second one as "die now", mid-batch.
        for worker in self.live:
            if worker.process.poll() is None and not worker.draining:
                worker.draining = True
                worker.process.send_signal(signal.SIGTERM)
        terminate([w.process for w in self.live], grace_s, cut_short)
        self.live.clear()

    def _spawn(self) -> None:
        # A process group of its own: a Ctrl-C in the terminal reaches the autoscaler alone,
        # which drains each worker with one signal (a second one would cut its batch short).
        process = subprocess.Popen(self.argv, env=self.env, process_group=0)  # noqa: S603
        self.live.append(WorkerProcess(process, time.monotonic()))
        logger.info("worker %s (pid %d) started", self.function, process.pid)


def terminate(
    processes: Iterable[subprocess.Popen[bytes]], grace_s: float, cut_short: CutShort = never
) -> None:
    """Waits for processes already told to stop; kills those still there after ``grace_s``, or
    as soon as ``cut_short`` says the user asked again."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        while True:
            try:
                process.wait(timeout=STOP_POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if cut_short():
                logger.warning("pid %d killed: asked to stop again", process.pid)
            elif time.monotonic() < deadline:
                continue
            else:
                logger.warning("pid %d did not stop in %.0f s; killing it", process.pid, grace_s)
            process.kill()
            process.wait()
            break
