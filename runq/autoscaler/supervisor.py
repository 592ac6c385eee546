"""The local process supervisor behind `runq serve`: one gateway, one worker per function."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger("runq.supervisor")

RESTART_BACKOFF_MAX_S = 10.0


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    last_start: float = field(default=0.0)


class Supervisor:
    """Starts its children, restarts workers that die, and stops them all, gently then firmly."""

    def __init__(self, env: Mapping[str, str], target: str, functions: Sequence[str]) -> None:
        self.env = dict(env)
        runq = [sys.executable, "-m", "runq"]
        self.gateway = Child("gateway", [*runq, "gateway", target])
        self.workers = [
            Child(f"worker {fn}", [*runq, "worker", target, "--function", fn]) for fn in functions
        ]

    @property
    def children(self) -> list[Child]:
        return [self.gateway, *self.workers]

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def poll(self) -> bool:
        """Restarts dead workers; False once the gateway has died (nothing can be served)."""
        if self.gateway.process is None or self.gateway.process.poll() is not None:
            return False
        for child in self.workers:
            if child.process is not None and child.process.poll() is None:
                continue
            if child.process is not None:
                code = child.process.returncode
                child.process = None
                child.restarts += 1
                backoff = min(2.0 ** min(child.restarts, 10) / 4, RESTART_BACKOFF_MAX_S)
                if time.monotonic() - child.last_start > 60:
                    backoff = 0.0
                child.next_start = time.monotonic() + backoff
                logger.warning("%s exited with %s; restarting in %.1f s", child.name, code, backoff)
            if time.monotonic() >= child.next_start:
                self._spawn(child)
        return True

    def stop(self, grace_s: float) -> None:
        live = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in live:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in live:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", child.name, grace_s)
                child.process.kill()
                child.process.wait()

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, env=self.env)  # noqa: S603
        child.last_start = time.monotonic()
        logger.info("started %s (pid %d)", child.name, child.process.pid)
