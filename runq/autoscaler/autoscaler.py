"""The autoscaler: follows each function's demand with local worker processes.

Lifecycle: start (subscribe to the demand channel) → loop (``step``: wait for a wake-up or the
tick, then per function: reap lapsed leases, read the figures, decide, scale, publish the
replica figures; then registry maintenance when due) → stop (drain every worker, then kill
what outlives the grace period).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis
from redis.client import PubSub
from redis.exceptions import RedisError

from runq.autoscaler.policy import Policy, decide
from runq.autoscaler.pool import CutShort, WorkerPool, never
from runq.background import Chore
from runq.metrics import metrics
from runq.queue import constants
from runq.queue.deployed import LiveSettings
from runq.queue.figures import Figures, publish_replicas, withdraw_replicas
from runq.queue.maintenance import Maintenance
from runq.queue.outage import Outage
from runq.queue.reaper import Reaper
from runq.settings import FunctionSettings

logger = logging.getLogger("runq.autoscaler")

# How often demand is read when nothing wakes the autoscaler: the pace of scale-up under a
# burst that arrives while workers exist, and of scale-down.
TICK_S = 0.5


@dataclass
class Managed:
    name: str
    policy: Policy
    pool: WorkerPool
    reaper: Reaper
    low_since: float | None = None


class Autoscaler:
    def __init__(
        self,
        connection: Redis,
        target: str,
        settings: Mapping[str, FunctionSettings],
        env: Mapping[str, str],
        live: LiveSettings | None = None,
        *,
        maintenance_interval_s: float,
    ) -> None:
        self.connection = connection
        maintenance = Maintenance(connection, maintenance_interval_s)
        self._maintenance = Chore(maintenance.try_interval_s, maintenance.run)
        self.live = live
        self._figures = Figures(connection)
        self._pubsub: PubSub | None = None
        self._outage = Outage("autoscaler", logger)
        self.functions = [
            Managed(
                name=name,
                policy=policy_of(fn_settings),
                pool=WorkerPool(
                    name,
                    [sys.executable, "-m", "runq", "worker", target, "--function", name],
                    env,
                ),
                reaper=Reaper(connection, name, fn_settings.retries),
            )
            for name, fn_settings in sorted(settings.items())
        ]

    def start(self) -> None:
        # Subscribed on the first step, so that a start while Redis is down is an outage too.
        self._pubsub = self.connection.pubsub(ignore_subscribe_messages=True)

    def step(self, wait_s: float = TICK_S) -> None:
        """Waits up to ``wait_s`` for an enqueue to a function with no worker, then scales.

        While Redis is unreachable it keeps its workers as they are (forgetting those that
        exit) and waits out the outage instead of ending.
        """
        if not self._outage.attempt(lambda: self._step(wait_s)):
            for managed in self.functions:
                managed.pool.poll()

    def _step(self, wait_s: float) -> None:
        self._wait_for_demand(wait_s)
        self._follow_deployed()
        for managed in self.functions:
            self._follow(managed)
        self._maintenance.run_if_due()

    def stop(self, grace_s: float, cut_short: CutShort = never) -> None:
        for managed in self.functions:
            managed.pool.scale_to(0)
        for managed in self.functions:
            managed.pool.stop(grace_s, cut_short)
        try:
            for managed in self.functions:
                withdraw_replicas(self.connection, managed.name)
        except RedisError as exc:
            # Its figures expire by themselves; the workers are stopped, which is what counts.
            logger.warning("cannot withdraw the replica counts: %s", exc)
        if self._pubsub is not None:
            self._pubsub.close()

    def _follow_deployed(self) -> None:
        changed = self.live.poll(self.connection) if self.live is not None else None
        if changed is None:
            return
        for managed in self.functions:
            managed.policy = policy_of(changed[managed.name])
            managed.reaper.retries = changed[managed.name].retries

    def _wait_for_demand(self, wait_s: float) -> None:
        assert self._pubsub is not None, "start() first"
        if not self._pubsub.subscribed:
            self._pubsub.subscribe(constants.DEMAND_CHANNEL)
        message = self._pubsub.get_message(timeout=wait_s)
        # One wake-up is enough: every function is looked at; drop the rest of the burst.
        while message is not None:
            message = self._pubsub.get_message(timeout=0)

    def _follow(self, managed: Managed) -> None:
        managed.pool.poll()
        managed.reaper.reap()
        figures = self._figures.read(managed.name)
        decision = decide(
            managed.policy,
            current=managed.pool.current,
            queued=figures.queued,
            running=figures.running,
            low_since=managed.low_since,
            now=time.monotonic(),
        )
        if decision.replicas != managed.pool.current:
            logger.info(
                "%s: %d queued, %d running: %d → %d replicas",
                managed.name,
                figures.queued,
                figures.running,
                managed.pool.current,
                decision.replicas,
            )
        before = managed.pool.current
        managed.low_since = decision.low_since
        managed.pool.scale_to(decision.replicas)
        if before == 0 and managed.pool.current > 0:
            metrics().cold_starts.labels(managed.name).inc()
        publish_replicas(self.connection, managed.name, decision.replicas)


def policy_of(settings: FunctionSettings) -> Policy:
    return Policy(
        target_per_replica=settings.target_per_replica or settings.max_batch_size,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        scale_down_delay_s=settings.scale_down_delay_s,
    )
