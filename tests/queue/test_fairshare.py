"""Fair share between tenants, as a worker's claims see it: one tenant's flood delays another's
few tasks by about one batch, weights shift the share, priorities hold within a tenant, and
every reader of the queues (the cap, figures, cancel, delete, the reaper, maintenance, `rq
info`) counts every tenant's."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from redis import Redis

from runq.cli import main
from runq.errors import ErrorCode
from runq.queue import constants
from runq.queue.cancel import Cancel
from runq.queue.claim import Claim
from runq.queue.connection import async_redis
from runq.queue.delete import Delete
from runq.queue.enqueue import Enqueue, Reply, Request
from runq.queue.figures import Figures
from runq.queue.line import Line
from runq.queue.maintenance import Maintenance
from runq.queue.reaper import Reaper
from runq.queue.store import new_task_id
from runq.queue.tasks import error_json
from runq.queue.tenants import set_weight
from runq.settings import FunctionSettings
from tests.helpers import submit_tasks, tenant_fields
from tests.queue.test_rq_compat import RQ_CLI

# No worker serves it, in a database no session process uses (own_db): the claims are the test's.
FUNCTION = "fair"
SETTINGS = FunctionSettings(max_queue=100_000)
BATCH = 8


def taken(claim: Claim, wanted: int = BATCH) -> list[str]:
    return [started.task_id for started in claim(wanted, None).started]


@pytest.mark.parametrize("flooding", ["a", constants.DEFAULT_TENANT])
def test_a_tenants_few_tasks_are_served_within_a_batch_of_another_tenants_flood(
    own_db: tuple[Redis, str], flooding: str
) -> None:
    redis, url = own_db
    flood = submit_tasks(url, FUNCTION, 1000, SETTINGS, tenant=flooding)
    claim = Claim(Line(redis), FUNCTION, "fair-worker")
    # Alone, the flooding tenant's tasks are taken in order, a batch at a time.
    first = [task for _ in range(3) for task in taken(claim)]
    assert first == flood[: 3 * BATCH]
    few = submit_tasks(url, FUNCTION, 3, SETTINGS, tenant="b")
    batch = taken(claim)
    assert set(few) <= set(batch)
    # The flood goes on where it was, in its order, sharing the batch.
    assert [task for task in batch if task not in few] == flood[3 * BATCH : 3 * BATCH + 5]
    assert redis.smembers(constants.tenants_key(FUNCTION)) == ({b"a"} if flooding == "a" else set())


def test_weights_shift_each_tenants_share_of_the_claims(own_db: tuple[Redis, str]) -> None:
    redis, url = own_db
    heavy = set(submit_tasks(url, FUNCTION, 400, SETTINGS, tenant="heavy"))
    submit_tasks(url, FUNCTION, 400, SETTINGS, tenant="light")
    set_weight(redis, "heavy", 3)
    claim = Claim(Line(redis), FUNCTION, "fair-worker")
    batches = [taken(claim) for _ in range(5)]
    assert 29 <= sum(task in heavy for batch in batches for task in batch) <= 31
    # From the next claim on, on every worker.
    set_weight(redis, "light", 3)
    batches = [taken(claim) for _ in range(5)]
    assert 19 <= sum(task in heavy for batch in batches for task in batch) <= 21


def test_priorities_hold_within_each_tenant(own_db: tuple[Redis, str]) -> None:
    redis, url = own_db
    low = submit_tasks(url, FUNCTION, 5, SETTINGS, tenant="a", priority="low")
    normal = submit_tasks(url, FUNCTION, 5, SETTINGS, tenant="a")
    high = submit_tasks(url, FUNCTION, 5, SETTINGS, tenant="a", priority="high")
    other = submit_tasks(url, FUNCTION, 15, SETTINGS, tenant="b", priority="high")
    claim = Claim(Line(redis), FUNCTION, "fair-worker")
    batches = [taken(claim, 10) for _ in range(3)]
    mine = [task for batch in batches for task in batch if task not in other]
    assert mine == high + normal + low
    # The other tenant's high priority does not put it ahead: the two take turns.
    assert [len(set(batch) & set(other)) for batch in batches] == [5, 5, 5]
    assert not redis.exists(constants.wake_key(FUNCTION), constants.fair_key(FUNCTION))
    assert not redis.smembers(constants.tenants_key(FUNCTION))


def test_the_cap_figures_cancel_and_delete_count_every_tenants_tasks(
    own_db: tuple[Redis, str],
) -> None:
    redis, url = own_db
    capped = FunctionSettings(max_queue=5)
    mine = submit_tasks(url, FUNCTION, 3, capped)
    theirs = submit_tasks(url, FUNCTION, 2, capped, tenant="b")

    async def admit_and_withdraw() -> tuple[Reply, str | None, bool]:
        connection = async_redis(url)
        try:
            with Redis.from_url(url) as job_connection:
                fields = tenant_fields(job_connection, FUNCTION, "b")
            full = await Enqueue(connection, 60)(
                Request(FUNCTION, new_task_id(), "normal", fields, max_queue=5)
            )
            # Cancel and delete find a task's queue by its origin: its tenant's.
            queue = (await connection.hget(constants.job_key(theirs[0]), "origin")).decode()
            error = error_json(ErrorCode.CANCELED, "canceled")
            before = await Cancel(connection)(theirs[0], queue, which="any", error=error)
            deleted = await Delete(connection)(theirs[1], queue)
            return full.reply, before, deleted
        finally:
            await connection.aclose()

    assert Figures(redis).read(FUNCTION).queued == 5
    assert asyncio.run(admit_and_withdraw()) == (Reply.FULL, "queued", True)
    assert not redis.llen(constants.queue_key(constants.queue_name(FUNCTION, tenant="b")))
    assert Figures(redis).read(FUNCTION).queued == 3
    claim = Claim(Line(redis), FUNCTION, "fair-worker")
    assert taken(claim) == mine
    assert not redis.exists(constants.wake_key(FUNCTION))


def test_a_lost_workers_tenant_task_goes_back_to_its_tenants_queue(
    own_db: tuple[Redis, str],
) -> None:
    redis, url = own_db
    (task,) = submit_tasks(url, FUNCTION, 1, SETTINGS, tenant="b")
    claim = Claim(Line(redis), FUNCTION, "fair-worker")
    assert taken(claim) == [task]
    assert not redis.smembers(constants.tenants_key(FUNCTION))
    # The worker died: its lease lapses.
    redis.zadd(constants.leases_key(FUNCTION), {task: 0})
    assert Reaper(redis, FUNCTION, retries=1).reap() == ([task], [])
    assert redis.smembers(constants.tenants_key(FUNCTION)) == {b"b"}
    assert taken(claim) == [task]


def test_a_tenants_queue_refilled_behind_runqs_back_is_claimed_after_maintenance(
    own_db: tuple[Redis, str],
) -> None:
    redis, url = own_db
    (task,) = submit_tasks(url, FUNCTION, 1, SETTINGS, tenant="b")
    queue = constants.queue_name(FUNCTION, tenant="b")
    shown = subprocess.run(
        [RQ_CLI, "info", "--url", url, "--serializer", "json", "--raw", queue],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert f"queue {queue} 1" in shown, shown
    claim = Claim(Line(redis), FUNCTION, "fair-worker")
    assert taken(claim) == [task]
    # As `rq requeue` does: the job queued again on its origin, the tenants set left alone.
    redis.hset(constants.job_key(task), constants.STATUS_FIELD, "queued")
    redis.rpush(constants.queue_key(queue), task)
    assert taken(claim) == []
    assert Maintenance(redis, 60).run()
    assert taken(claim) == [task]


def test_runq_tenants_sets_weights_and_lists_them_with_queued_tasks(
    own_db: tuple[Redis, str], capsys: pytest.CaptureFixture[str]
) -> None:
    redis, url = own_db
    redis.sadd(constants.FUNCTIONS_KEY, FUNCTION)
    submit_tasks(url, FUNCTION, 2, SETTINGS, tenant="b")
    submit_tasks(url, FUNCTION, 1, SETTINGS)

    def runq(*args: str) -> tuple[int | str | None, str, str]:
        with pytest.raises(SystemExit) as exited:
            main(["tenants", *args, "--redis-url", url])
        out, err = capsys.readouterr()
        return exited.value.code, out, err

    assert runq("weight", "heavy", "2.5") == (0, "tenant heavy: weight 2.5\n", "")
    code, out, _ = runq("list")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["TENANT", "WEIGHT", "QUEUED"],
        ["b", "1", "2"],
        [constants.DEFAULT_TENANT, "1", "1"],
        ["heavy", "2.5", "0"],
    ]
    # Back to the default weight: nothing left to list for it.
    assert runq("weight", "heavy", "1")[0] == 0
    assert "heavy" not in runq("list")[1]
    code, _, err = runq("weight", "heavy", "0")
    assert code == 2
    assert "a weight is a number from 0.001 to 1000, not 0" in err
    assert runq("weight", "heavy")[0] == 2
