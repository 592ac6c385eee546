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
import threading

from redis import Redis
from redis.exceptions import RedisError

from runq.queue import constants as k
from runq.queue import scripts

logger = logging.getLogger("runq.worker")


class LeaseKeeper:
    """Renews the worker's presence among the function's live workers, and its tasks' leases."""

    def __init__(self, connection: Redis, function: str, worker_name: str) -> None:
        self._renew = connection.register_script(scripts.RENEW)
        self._connection = connection
        self._keys = [k.leases_key(function), k.alive_key(function)]
        self._worker_name = worker_name
        # Replaced whole, never mutated: the thread reads it without a lock.
        self._held: tuple[str, ...] = ()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runq-leases", daemon=True)

    def start(self) -> None:
        """Announces the worker live (it is ready for tasks) and starts renewing."""
        self._renew_once()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        # A renewal stuck on an unreachable Redis must not hold up the worker's exit.
        self._thread.join(timeout=k.LEASE_RENEW_INTERVAL_S)
        with contextlib.suppress(RedisError):
            self._connection.zrem(self._keys[1], self._worker_name)

    def hold(self, task_ids: list[str]) -> None:
        self._held = tuple(task_ids)

    def release(self) -> None:
        # The leases themselves go in the worker's record transaction; renewal never re-adds one.
        self._held = ()

    def _loop(self) -> None:
        while not self._stopping.wait(k.LEASE_RENEW_INTERVAL_S):
            self._renew_once()

    def _renew_once(self) -> None:
        held = self._held
        try:
            lost = self._renew(keys=self._keys, args=[k.LEASE_TTL_S, self._worker_name, *held])
        except RedisError as exc:
            # The next renewal may get through before the leases lapse; if not, the tasks are
            # treated as lost, which is what an unreachable worker is.
            logger.warning("cannot renew the worker's heartbeat and %d leases: %s", len(held), exc)
            return
        except Exception:
            # Anything else would end the thread silently and every later lease with it.
            logger.exception("renewing the worker's heartbeat and leases failed")
            return
        if lost:
            # Their outcomes will not be recorded: the tasks are no longer this worker's.
            logger.warning(
                "%d task lease(s) lapsed before renewal (the worker stalled); "
                "those tasks go back to the queue or fail worker_lost",
                len(lost),
            )
