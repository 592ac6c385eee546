"""Redis memory stays bounded: what an expired task leaves behind is cleaned by runq's processes."""

from __future__ import annotations

from collections.abc import Callable

from redis import Redis

from runq.queue import constants, stats
from runq.queue.maintenance import Maintenance
from runq.settings import FunctionSettings
from tests.helpers import Proc, start_worker, submit_tasks, wait_until

TASKS = 5000
SHORT_LIVED = FunctionSettings(result_ttl_s=2)
REGISTRY_PREFIXES = (
    constants.RQ_FINISHED_PREFIX,
    constants.RQ_FAILED_PREFIX,
    constants.RQ_CANCELED_PREFIX,
)


def footprint(redis: Redis) -> tuple[int, int]:
    """(keys under RQ's and runq's prefixes, entries in the finished/failed/canceled registries).

    Not counted: the per-second stats hashes, bounded by their TTL (STATS_TTL_S per function,
    however many tasks), and the maintenance lock, there only while one holds it.
    """
    keys = [
        key.decode()
        for prefix in ("rq:", constants.RUNQ_PREFIX)
        for key in redis.scan_iter(match=prefix + "*", count=1000)
    ]
    counted = [
        key
        for key in keys
        if not key.startswith(constants.STATS_PREFIX) and key != constants.MAINTENANCE_LOCK_KEY
    ]
    registries = [key for key in counted if key.startswith(REGISTRY_PREFIXES)]
    return len(counted), sum(redis.zcard(key) for key in registries)


def test_expired_tasks_leave_no_keys_or_registry_entries_behind(
    procs: Callable[..., Proc], own_db: tuple[Redis, str]
) -> None:
    redis, url = own_db
    worker = start_worker(
        procs,
        redis,
        "echo",
        env={
            "RUNQ_REDIS_URL": url,
            "RUNQ_MAINTENANCE_INTERVAL_S": "1",
            "RUNQ_FUNCTIONS__ECHO__MAX_BATCH_SIZE": "1000",
        },
    )
    try:
        # One task first, so the function's own keys (its drain rate, its name in the function
        # list, the worker's last claim) are there before, as on any running system.
        submit_tasks(url, "echo", 1, SHORT_LIVED)
        wait_until(lambda: stats.read(redis, "echo").succeeded == 1, what="the first task")
        before = footprint(redis)

        submit_tasks(url, "echo", TASKS, SHORT_LIVED)
        wait_until(
            lambda: stats.read(redis, "echo").succeeded == TASKS + 1, what="every task to run"
        )
        # Their TTL (2 s), then one maintenance period (1 s), and some slack for a busy host.
        wait_until(
            lambda: all(a <= b for a, b in zip(footprint(redis), before, strict=True)),
            timeout_s=15,
            what=f"keys and registry entries to fall back to {before}",
        )
        # The first task's entry is gone too: nothing of an expired task is left.
        assert footprint(redis)[1] == 0
    finally:
        worker.stop()


def test_many_processes_clean_once_per_period(own_db: tuple[Redis, str]) -> None:
    redis, _ = own_db
    processes = [Maintenance(redis, interval_s=60) for _ in range(5)]
    assert [m.run() for m in processes] == [True, False, False, False, False]
    # Free again within the period: one cleanup at most a period apart while any process runs.
    assert 0 < redis.pttl(constants.MAINTENANCE_LOCK_KEY) <= 45_000
    assert processes[0].try_interval_s == 15
