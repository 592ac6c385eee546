"""Redis memory stays bounded: what an expired task leaves behind is cleaned by runq's processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from redis import Redis

from runq.queue import constants, stats
from runq.queue.connection import async_redis
from runq.queue.enqueue import Enqueue, Reply, Request
from runq.queue.maintenance import Maintenance
from runq.queue.store import new_task_id
from runq.queue.tasks import new_job_fields
from runq.settings import FunctionSettings
from tests.helpers import Proc, start_worker, wait_until

# A database of its own: the suite's other processes clean on database 0 with the default
# period, and would hold the maintenance lock for most of a minute.
DB = 12
TASKS = 5000
SHORT_LIVED = FunctionSettings(result_ttl_s=2)
REGISTRY_PREFIXES = (
    constants.RQ_FINISHED_PREFIX,
    constants.RQ_FAILED_PREFIX,
    constants.RQ_CANCELED_PREFIX,
)


@pytest.fixture
def db(valkey_url: str) -> Iterator[tuple[Redis, str]]:
    url = f"{valkey_url}/{DB}"
    client = Redis.from_url(url)
    client.flushdb()
    yield client, url
    client.flushdb()
    client.close()


def submit(url: str, count: int) -> None:
    """``count`` echo tasks admitted as the gateway admits them, pipelined."""

    async def run() -> list[Reply]:
        redis = async_redis(url)
        enqueue = Enqueue(redis, idempotency_ttl_s=60)
        with Redis.from_url(url) as job_connection:
            requests = [
                Request(
                    function="echo",
                    task_id=new_task_id(),
                    priority=constants.DEFAULT_PRIORITY,
                    fields=new_job_fields(
                        function="echo",
                        settings=SHORT_LIVED,
                        payload_json=b"1",
                        priority=constants.DEFAULT_PRIORITY,
                        reply_to=None,
                        connection=job_connection,
                    ),
                    max_queue=SHORT_LIVED.max_queue,
                )
                for _ in range(count)
            ]
        try:
            return [admitted.reply for admitted in await asyncio.gather(*map(enqueue, requests))]
        finally:
            await redis.aclose()

    assert set(asyncio.run(run())) == {Reply.ENQUEUED}


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
    procs: Callable[..., Proc], db: tuple[Redis, str]
) -> None:
    redis, url = db
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
        submit(url, 1)
        wait_until(lambda: stats.read(redis, "echo").succeeded == 1, what="the first task")
        before = footprint(redis)

        submit(url, TASKS)
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


def test_many_processes_clean_once_per_period(db: tuple[Redis, str]) -> None:
    redis, _ = db
    processes = [Maintenance(redis, interval_s=60) for _ in range(5)]
    assert [m.run() for m in processes] == [True, False, False, False, False]
    # Free again within the period: one cleanup at most a period apart while any process runs.
    assert 0 < redis.pttl(constants.MAINTENANCE_LOCK_KEY) <= 45_000
    assert processes[0].try_interval_s == 15
