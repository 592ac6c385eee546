"""Repeated work: a daemon thread that repeats one step until stopped (leases, prediction logs,
webhooks), and chores a loop runs between its own steps (a worker's, the autoscaler's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class BackgroundLoop:
    """Runs ``step`` in a daemon thread, waiting the seconds it returns between runs.

    ``start()`` then ``stop()``; ``final`` runs once in the thread after the last step. The
    step must not raise: whatever it lets through ends the thread, and every later step with it.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], float],
        *,
        first_wait_s: float,
        final: Callable[[], None] | None = None,
    ) -> None:
        self._step = step
        self._first_wait_s = first_wait_s
        self._final = final
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Asks the thread to stop and waits up to ``timeout_s``; True once it has ended.

        The wait is bounded: a step stuck on an unreachable server must not hold up an exit.
        """
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        wait_s = self._first_wait_s
        while not self._stopping.wait(wait_s):
            wait_s = self._step()
        if self._final is not None:
            self._final()


@dataclass
class Chore:
    """Something a loop does between its steps, at most every ``interval_s``."""

    interval_s: float
    action: Callable[[], object]
    last: float = 0.0

    def run_if_due(self) -> None:
        if time.monotonic() - self.last >= self.interval_s:
            self.action()
            self.last = time.monotonic()
