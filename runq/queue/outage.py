"""Riding out a Redis outage: wait with a growing, capped delay, and say when it starts and ends.

A long-running process (worker, autoscaler) that cannot reach Redis must not exit: nothing
would restart it. One line when the outage starts and one when it ends, not one per retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from redis import Redis
from redis.exceptions import ConnectionError, RedisError, TimeoutError

T = TypeVar("T")

FIRST_DELAY_S = 0.25
MAX_DELAY_S = 2.0


class Outage:
    def __init__(self, who: str, logger: logging.Logger) -> None:
        self.who = who
        self.logger = logger
        self.since: float | None = None
        self.delay_s = FIRST_DELAY_S

    def failed(self, exc: Exception) -> float:
        """Notes a failed attempt; returns how long to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self.delay_s = FIRST_DELAY_S
            self.logger.warning(
                "%s: Redis unreachable (%s); retrying until it answers", self.who, exc
            )
        else:
            self.delay_s = min(self.delay_s * 2, MAX_DELAY_S)
        return self.delay_s

    def succeeded(self) -> None:
        if self.since is not None:
            down_s = time.monotonic() - self.since
            self.logger.warning("%s: Redis answers again, after %.1f s", self.who, down_s)
            self.since = None

    def attempt(self, step: Callable[[], object]) -> bool:
        """Runs ``step``; if Redis fails it, waits before the next try. True once it ran."""
        try:
            step()
        except RedisError as exc:
            time.sleep(self.failed(exc))
            return False
        self.succeeded()
        return True

    def retry(self, call: Callable[[], T]) -> T:
        """Runs ``call`` until Redis is reachable for it; what Redis refuses is still raised."""
        while True:
            try:
                value = call()
            except (ConnectionError, TimeoutError) as exc:
                time.sleep(self.failed(exc))
                continue
            self.succeeded()
            return value


def wait_until_reachable(connection: Redis, who: str, logger: logging.Logger) -> None:
    """Returns once Redis answers: a process started during an outage waits it out."""
    Outage(who, logger).retry(connection.ping)
