"""Listing pages at the queue level: tenants' views and cursors that outlive their anchor."""

from __future__ import annotations

import asyncio

from redis import Redis

from runq.queue import constants
from runq.queue.cancel import Cancel
from runq.queue.connection import async_redis
from runq.queue.delete import Delete
from runq.queue.listing import TaskList
from runq.queue.tasks import TaskStatus
from runq.settings import FunctionSettings
from tests.helpers import submit_tasks

FUNCTION = "listing"
QUEUE = constants.queue_name(FUNCTION)


def listed(url: str, limit: int, **filters: object) -> list[str]:
    """The ids of every page's tasks, paging until the cursor is None."""

    async def run() -> list[str]:
        redis = async_redis(url)
        try:
            listing, task_ids, cursor = TaskList(redis), [], None
            while True:
                page = await listing.page(FUNCTION, cursor=cursor, limit=limit, **filters)
                task_ids += [task["id"] for task in page.tasks]
                if page.cursor is None:
                    return task_ids
                cursor = page.cursor
        finally:
            await redis.aclose()

    return asyncio.run(run())


def test_a_tenant_sees_only_its_own_tasks_in_any_status(own_db: tuple[Redis, str]) -> None:
    _, url = own_db
    mine = submit_tasks(url, FUNCTION, 3, FunctionSettings())
    # Another tenant's tasks wait in that tenant's own queue (fair share).
    theirs = submit_tasks(url, FUNCTION, 3, FunctionSettings(), tenant="acme")
    assert listed(url, 2, tenant="acme") == theirs
    assert listed(url, 2, tenant=constants.DEFAULT_TENANT) == mine
    assert listed(url, 2, tenant="nobody") == []
    # Every tenant's: the default tenant's queues first, then the others' by name.
    assert listed(url, 2, tenant=None) == mine + theirs


def test_a_registry_cursor_whose_entry_went_resumes_right_after_it(
    own_db: tuple[Redis, str],
) -> None:
    """Tasks that ended in the same second share a score: the cursor still finds its place."""
    redis, url = own_db
    task_ids = submit_tasks(url, FUNCTION, 9, FunctionSettings())

    async def cancel_all() -> None:
        connection = async_redis(url)
        cancel = Cancel(connection)
        for task_id in task_ids:
            await cancel(task_id, QUEUE, which="queued", error='{"code":"canceled"}')
        await connection.aclose()

    asyncio.run(cancel_all())
    registry = constants.canceled_registry_key(QUEUE)
    # As the worker scores the entries of a batch that ended within one second.
    redis.zadd(registry, dict.fromkeys(task_ids, 4102444800))
    in_order = sorted(task_ids)  # equal scores: Redis orders by member, bytewise

    async def page_then_delete_its_last() -> tuple[list[str], str | None, list[str]]:
        connection = async_redis(url)
        listing = TaskList(connection)
        first = await listing.page(FUNCTION, status=TaskStatus.CANCELED, limit=4)
        shown = [task["id"] for task in first.tasks]
        # The anchor and a task before it go; the rest must follow, none skipped or repeated.
        for gone in (shown[-1], shown[0]):
            await Delete(connection)(gone, QUEUE)
        rest = await listing.page(FUNCTION, status=TaskStatus.CANCELED, cursor=first.cursor)
        await connection.aclose()
        return shown, rest.cursor, [task["id"] for task in rest.tasks]

    shown, cursor, rest = asyncio.run(page_then_delete_its_last())
    assert shown == in_order[:4]
    assert rest == in_order[4:]
    assert cursor is None
