"""The local supervisor behind `runq serve`: the gateway process, and the autoscaler's workers."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Mapping

from runq.autoscaler.autoscaler import TICK_S, Autoscaler
from runq.autoscaler.pool import CutShort, never, terminate

logger = logging.getLogger("runq.supervisor")


class Supervisor:
    def __init__(self, env: Mapping[str, str], target: str, autoscaler: Autoscaler) -> None:
        self.env = dict(env)
        self.argv = [sys.executable, "-m", "runq", "gateway", target]
        self.autoscaler = autoscaler
        self.gateway: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own process group, as the workers have: a Ctrl-C reaches `runq serve` alone, which
        # stops the gateway once the workers have recorded their batches.
        self.gateway = subprocess.Popen(self.argv, env=self.env, process_group=0)  # noqa: S603
        logger.info("started the gateway (pid %d)", self.gateway.pid)
        self.autoscaler.start()

    def poll(self) -> bool:
        """One autoscaler step; False once the gateway has died (nothing can be served)."""
        if self.gateway is None or self.gateway.poll() is not None:
            return False
        self.autoscaler.step(TICK_S)
        return True

    def stop(self, grace_s: float, cut_short: CutShort = never) -> None:
        try:
            self.autoscaler.stop(grace_s, cut_short)
        finally:
            # Whatever stopped the workers short, the gateway is not left running alone.
            if self.gateway is not None and self.gateway.poll() is None:
                self.gateway.send_signal(signal.SIGTERM)
                terminate([self.gateway], grace_s, cut_short)
