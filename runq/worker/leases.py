"""Keeping the leases of the batch in hand alive while the model runs.

A lease says "this task is running and its worker is alive". The claim script grants it for
LEASE_TTL_S; a thread renews it every LEASE_RENEW_INTERVAL_S, so a model call of any length keeps
it, and a worker that dies loses it within LEASE_TTL_S (and with it its max_concurrency slots).
The thread needs the GIL: a model whose native code holds the GIL for longer than LEASE_TTL_S
loses its leases, and its tasks are re-queued as a dead worker's would be (numpy, torch and
most I/O release it).
"""

from __future__ import annotations

import contextlib
import logging

from redis import Redis
from redis.exceptions import RedisError

from runq.background import BackgroundLoop
from runq.queue import constants
from runq.queue.leases import Heartbeat

logger = logging.getLogger("runq.worker")


class LeaseKeeper:
    """Renews the worker's presence among the function's live workers, and its tasks' leases."""

    def __init__(
        self, connection: Redis, function: str, worker_name: str, heartbeat_ttl_s: float
    ) -> None:
        self._heartbeat = Heartbeat(connection, function, worker_name, heartbeat_ttl_s)
        # Often enough that a few missed renewals do not drop a live worker's presence.
        self._interval_s = min(constants.LEASE_RENEW_INTERVAL_S, heartbeat_ttl_s / 4)
        # Replaced whole, never mutated: the thread reads it without a lock.
        self._held: tuple[str, ...] = ()
        self._loop = BackgroundLoop("runq-leases", self._renew, first_wait_s=self._interval_s)

    def start(self) -> None:
        """Announces the worker live (it is ready for tasks) and starts renewing."""
        self._renew()
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop(timeout_s=constants.LEASE_RENEW_INTERVAL_S)
        with contextlib.suppress(RedisError):
            self._heartbeat.withdraw()

    def hold(self, task_ids: list[str]) -> None:
        self._held = tuple(task_ids)

    def release(self) -> None:
        # The leases themselves go in the worker's record transaction; renewal never re-adds one.
        self._held = ()

    def _renew(self) -> float:
        held = self._held
        try:
            lost = self._heartbeat.renew(held)
        except RedisError as exc:
            # The next renewal may get through before the leases lapse; if not, the tasks are
            # treated as lost, which is what an unreachable worker is.
            logger.warning("cannot renew the worker's heartbeat and %d leases: %s", len(held), exc)
        except Exception:
            # Anything else would end the thread silently and every later lease with it.
            logger.exception("renewing the worker's heartbeat and leases failed")
        else:
            if lost:
                # Their outcomes will not be recorded: the tasks are no longer this worker's.
                logger.warning(
                    "%d task lease(s) lapsed before renewal (the worker stalled); "
                    "those tasks go back to the queue or fail worker_lost",
                    len(lost),
                )
        return self._interval_s
