"""Finding tasks whose worker died: a lapsed lease re-queues its task or fails it worker_lost.

Every worker reaps its own function as it loops, and the autoscaler reaps every function it
manages, so a task is found even when its function has no worker left.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq.utils import now, utcformat

from runq.metrics import metrics
from runq.queue import constants as k
from runq.queue import scripts
from runq.queue.tasks import TaskStatus, error_json

logger = logging.getLogger("runq.reaper")

WORKER_LOST_CODE = "worker_lost"


class Reaper:
    def __init__(self, connection: Redis, function: str, retries: int) -> None:
        self.function = function
        self.retries = retries
        self._keys = [k.leases_key(function), k.wake_key(function)]
        self._reap = connection.register_script(scripts.REAP)

    def reap(self) -> tuple[list[str], list[str]]:
        """Handles every lapsed lease of the function; returns (re-queued, failed) task ids."""
        requeued, failed = self._reap(
            keys=self._keys,
            args=[
                self.retries,
                k.RQ_JOB_PREFIX,
                k.RQ_QUEUE_PREFIX,
                k.RQ_STARTED_PREFIX,
                k.RQ_FAILED_PREFIX,
                k.RQ_EXECUTION_PREFIX,
                k.RQ_EXECUTIONS_PREFIX,
                error_json(
                    WORKER_LOST_CODE,
                    f"the worker running it stopped answering, and its retries "
                    f"({self.retries}) are spent",
                ),
                utcformat(now()),
                k.TASK_CHANNEL_PREFIX,
                k.REAP_BATCH_MAX,
            ],
        )
        ids = [x.decode() for x in requeued], [x.decode() for x in failed]
        if ids[1]:
            metrics().tasks.labels(self.function, TaskStatus.FAILED.value).inc(len(ids[1]))
        if ids[0] or ids[1]:
            logger.warning(
                "%s: %d task(s) of a lost worker re-queued, %d failed worker_lost",
                self.function,
                len(ids[0]),
                len(ids[1]),
            )
        return ids
