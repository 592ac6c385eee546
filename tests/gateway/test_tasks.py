"""Operators' task views over HTTP: listing a function's tasks, retrying one, purging a queue.

Real gateways (two processes for what must reach across them), real workers, real Valkey.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from redis import Redis

from runq.cli import main
from runq.queue import constants
from runq.settings import FunctionSettings
from tests.gateway.test_api import submit
from tests.helpers import (
    PARKED_QUEUE,
    queued,
    submit_tasks,
    wait_until,
)


@pytest.fixture
def other_gateway(gateways: list[str]) -> str:
    """A gateway process other than the `client` fixture's, on the same Valkey."""
    return gateways[1]


@pytest.fixture
def capped(redis: Redis) -> Iterator[None]:
    """`capped` (no worker, max_queue 3 on the suite's gateway) starts each test empty."""
    redis.delete(*constants.queue_keys("capped"))
    yield
    redis.delete(*constants.queue_keys("capped"))


def listed(
    client: httpx.Client, function: str, **params: object
) -> tuple[list[dict], list[httpx.Response]]:
    """Every task of the listing, paging until next_cursor is null; and each page's answer."""
    tasks: list[dict] = []
    pages: list[httpx.Response] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/functions/{function}/tasks", params=query)
        assert page.status_code == 200, page.text
        pages.append(page)
        tasks += page.json()["tasks"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return tasks, pages
        assert len(pages) < 100, "the listing never ends"


def ids(tasks: list[dict]) -> list[str]:
    return [task["id"] for task in tasks]


def ended(client: httpx.Client, task_id: str) -> dict:
    answer = client.get(f"/v1/tasks/{task_id}/result?wait=10")
    assert answer.status_code == 200, answer.text
    return answer.json()


# listing --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("parked")
def test_queued_tasks_page_in_the_order_they_will_run(client: httpx.Client) -> None:
    normal = [submit(client, "parked", i)["id"] for i in range(4)]
    high = client.post("/v1/functions/parked/tasks", json={"input": "h", "priority": "high"})
    low = client.post("/v1/functions/parked/tasks", json={"input": "l", "priority": "low"})

    tasks, pages = listed(client, "parked", status="queued", limit=2)
    assert ids(tasks) == [high.json()["id"], *normal, low.json()["id"]]
    assert [len(page.json()["tasks"]) for page in pages] == [2, 2, 2]
    assert {task["status"] for task in tasks} == {"queued"}
    assert tasks[0]["priority"] == "high" and "output" not in tasks[0]
    # The whole queue in one page when it fits: no empty page to fetch at the end.
    whole = client.get("/v1/functions/parked/tasks", params={"status": "queued"}).json()
    assert ids(whole["tasks"]) == ids(tasks) and whole["next_cursor"] is None


@pytest.mark.usefixtures("parked")
def test_paging_neither_skips_nor_repeats_tasks_that_stay_while_others_go(
    client: httpx.Client,
) -> None:
    task_ids = [submit(client, "parked", i)["id"] for i in range(6)]
    first = client.get("/v1/functions/parked/tasks", params={"status": "queued", "limit": 2})
    assert ids(first.json()["tasks"]) == task_ids[:2]
    # The page's last task goes, and one before it: the next page starts where it left off.
    assert client.delete(f"/v1/tasks/{task_ids[1]}").status_code == 204
    assert client.delete(f"/v1/tasks/{task_ids[0]}").status_code == 204
    cursor = first.json()["next_cursor"]
    rest = client.get(
        "/v1/functions/parked/tasks", params={"status": "queued", "cursor": cursor}
    ).json()
    assert ids(rest["tasks"]) == task_ids[2:]


def test_each_status_lists_its_tasks_and_only_those(
    client: httpx.Client, redis: Redis, parked: None
) -> None:
    succeeded = client.post("/v1/functions/echo/predict", json={"input": "ok"}).json()["id"]
    failed = client.post("/v1/functions/fails/predict", json={"input": "boom"})
    failed_id = failed.json()["error"]["task_id"]
    running = submit(client, "sleepy", 1.0)["id"]
    wait_until(
        lambda: client.get(f"/v1/tasks/{running}").json()["status"] == "running",
        what="the sleepy task to start",
    )
    canceled = submit(client, "parked", "doomed")["id"]
    client.post(f"/v1/tasks/{canceled}/cancel")
    withdrawn = client.post("/v1/functions/parked/predict?timeout=0.2", json={"input": "late"})
    timed_out = withdrawn.json()["error"]["task_id"]
    waiting = submit(client, "parked", "waiting")["id"]

    expected = {
        "echo": {"succeeded": succeeded},
        "fails": {"failed": failed_id},
        "sleepy": {"running": running},
        "parked": {"canceled": canceled, "timed_out": timed_out, "queued": waiting},
    }
    statuses = ["queued", "running", "succeeded", "failed", "timed_out", "canceled"]
    for function, wanted in expected.items():
        everything = {task["id"]: task["status"] for task in listed(client, function)[0]}
        for status in statuses:
            found = ids(listed(client, function, status=status, limit=500)[0])
            for status_of, task_id in wanted.items():
                assert (task_id in found) == (status_of == status), (function, status, task_id)
                assert everything[task_id] == status_of
            assert len(found) == len(set(found)), "a task listed twice"


@pytest.mark.usefixtures("parked")
def test_a_tenant_filter_lists_that_tenants_tasks_alone(
    client: httpx.Client, valkey_url: str
) -> None:
    mine = [submit(client, "parked", i)["id"] for i in range(3)]
    # Admitted as a gateway with keys admits another tenant's tasks: into that tenant's queue.
    theirs = submit_tasks(valkey_url, "parked", 2, FunctionSettings(), tenant="acme")
    try:
        acme, _ = listed(client, "parked", tenant="acme", limit=1)
        assert ids(acme) == theirs
        default, _ = listed(client, "parked", tenant=constants.DEFAULT_TENANT, status="queued")
        assert ids(default) == mine
        assert ids(listed(client, "parked", status="queued")[0]) == mine + theirs
    finally:
        for task_id in theirs:
            client.delete(f"/v1/tasks/{task_id}")


@pytest.mark.parametrize(
    "params",
    [
        {"status": "done"},
        {"limit": 0},
        {"limit": 501},
        {"limit": "many"},
        {"cursor": "not-a-cursor"},
        {"cursor": base64.urlsafe_b64encode(b'[1,"parked",null,null,1,"x","1"]').decode()},
        {"cursor": base64.urlsafe_b64encode(b'[1,"parked",null,null,99,"x",""]').decode()},
        {"tenant": ""},
    ],
)
def test_bad_listing_parameters_are_422(client: httpx.Client, params: dict) -> None:
    response = client.get("/v1/functions/parked/tasks", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


@pytest.mark.usefixtures("parked")
def test_a_cursor_serves_only_the_listing_that_gave_it(client: httpx.Client) -> None:
    for i in range(3):
        submit(client, "parked", i)
    cursor = client.get("/v1/functions/parked/tasks?status=queued&limit=1").json()["next_cursor"]
    assert cursor is not None
    for query in ("status=canceled", "status=queued&tenant=acme"):
        response = client.get(f"/v1/functions/parked/tasks?{query}&cursor={cursor}")
        assert response.status_code == 422
        assert "another listing" in response.json()["error"]["message"]
    other = client.get(f"/v1/functions/echo/tasks?status=queued&cursor={cursor}")
    assert other.status_code == 422


def test_unknown_function_is_404_on_list_and_purge(client: httpx.Client) -> None:
    for response in (
        client.get("/v1/functions/nope/tasks"),
        client.delete("/v1/functions/nope/tasks?status=queued"),
    ):
        assert response.status_code == 404
        assert "unknown function 'nope'" in response.json()["error"]["message"]


# retry ----------------------------------------------------------------------------------------


def test_a_failed_task_runs_again_with_the_same_id(client: httpx.Client) -> None:
    failed = client.post("/v1/functions/fails/predict", json={"input": "boom"})
    task_id = failed.json()["error"]["task_id"]
    first = client.get(f"/v1/tasks/{task_id}").json()
    assert (first["status"], first["attempts"]) == ("failed", 1)

    retried = client.post(f"/v1/tasks/{task_id}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.headers["location"] == f"/v1/tasks/{task_id}"
    assert retried.json()["id"] == task_id
    # Queued again, or already run again by the time the answer was read.
    assert retried.json()["status"] in ("queued", "running") or retried.json()["attempts"] == 2
    again = ended(client, task_id)
    assert (again["status"], again["attempts"]) == ("failed", 2)
    assert again["finished_at"] > first["finished_at"]
    assert ids(listed(client, "fails", status="failed")[0]).count(task_id) == 1


def test_a_canceled_task_runs_again_once_its_run_stops_and_its_waiter_gets_the_new_run(
    client: httpx.Client, redis: Redis, other_gateway: str
) -> None:
    task_id = submit(client, "sleepy", 0.5)["id"]
    wait_until(lambda: client.get(f"/v1/tasks/{task_id}").json()["status"] == "running")
    assert client.post(f"/v1/tasks/{task_id}/cancel").json()["status"] == "canceled"
    # Its worker still runs it: a second run now would race the first one's end.
    early = client.post(f"/v1/tasks/{task_id}/retry")
    assert early.status_code == 409, early.text
    assert "retry once it stops" in early.json()["error"]["message"]
    lease = constants.leases_key("sleepy")
    wait_until(lambda: redis.zscore(lease, task_id) is None, what="the canceled run to stop")

    retried = client.post(f"/v1/tasks/{task_id}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.headers["location"] == f"/v1/tasks/{task_id}"
    task = retried.json()
    # Read back as it is now: its worker may have taken it already.
    assert (task["id"], task["finished_at"]) == (task_id, None)
    assert task["status"] in ("queued", "running") and "error" not in task
    # A long-poll on another gateway gets the new run's outcome, not the old cancel.
    answer = httpx.get(f"{other_gateway}/v1/tasks/{task_id}/result?wait=20", timeout=30)
    assert answer.status_code == 200, answer.text
    task = answer.json()
    assert (task["status"], task["output"], task["attempts"]) == ("succeeded", 0.5, 2)
    assert "error" not in task
    assert task_id not in ids(listed(client, "sleepy", status="canceled", limit=500)[0])


@pytest.mark.usefixtures("capped")
def test_a_timed_out_task_is_queued_again_without_its_old_deadline_or_error(
    client: httpx.Client,
) -> None:
    withdrawn = client.post("/v1/functions/capped/predict?timeout=0.2", json={"input": "late"})
    task_id = withdrawn.json()["error"]["task_id"]
    assert client.get(f"/v1/tasks/{task_id}").json()["status"] == "timed_out"
    retried = client.post(f"/v1/tasks/{task_id}/retry")
    assert retried.status_code == 202, retried.text
    time.sleep(0.3)  # past the old deadline: a read would end the task again if it still held
    task = client.get(f"/v1/tasks/{task_id}").json()
    assert (task["status"], task["started_at"], task["finished_at"]) == ("queued", None, None)
    assert "error" not in task
    assert ids(listed(client, "capped", status="queued")[0]) == [task_id]
    assert ids(listed(client, "capped", status="timed_out", limit=500)[0]).count(task_id) == 0


@pytest.mark.usefixtures("parked")
def test_only_an_ended_unsucceeded_task_can_be_retried(client: httpx.Client) -> None:
    succeeded = client.post("/v1/functions/echo/predict", json={"input": 1}).json()["id"]
    running = submit(client, "sleepy", 0.6)["id"]
    wait_until(lambda: client.get(f"/v1/tasks/{running}").json()["status"] == "running")
    waiting = submit(client, "parked", 1)["id"]
    for task_id, status in ((succeeded, "succeeded"), (running, "running"), (waiting, "queued")):
        refused = client.post(f"/v1/tasks/{task_id}/retry")
        assert refused.status_code == 409, (status, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "conflict" and error["task"]["status"] == status
    assert client.get(f"/v1/tasks/{succeeded}/result").json()["output"] == 1
    missing = client.post("/v1/tasks/no-such-task/retry")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.usefixtures("capped")
def test_a_retry_into_a_full_queue_is_503_and_leaves_the_task_as_it_was(
    client: httpx.Client, redis: Redis
) -> None:
    doomed = submit(client, "capped", "doomed")["id"]
    client.post(f"/v1/tasks/{doomed}/cancel")
    for i in range(3):
        submit(client, "capped", i)
    refused = client.post(f"/v1/tasks/{doomed}/retry")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert queued(redis, "capped") == 3
    assert client.get(f"/v1/tasks/{doomed}").json()["status"] == "canceled"


# purge ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("parked")
def test_purge_cancels_every_queued_task_and_tells_waiters_on_every_gateway(
    client: httpx.Client, other_gateway: str, redis: Redis
) -> None:
    task_ids = [submit(client, "parked", i)["id"] for i in range(4)]
    with ThreadPoolExecutor() as pool:
        waiting = pool.submit(
            httpx.post,
            f"{other_gateway}/v1/functions/parked/predict?timeout=20",
            json={"input": "waits"},
            timeout=30,
        )
        wait_until(lambda: redis.llen(PARKED_QUEUE) == 5, what="the predict's task queued")
        started = time.monotonic()
        purged = client.delete("/v1/functions/parked/tasks?status=queued")
        assert purged.status_code == 200, purged.text
        assert purged.json() == {"purged": 5}
        answer = waiting.result(timeout=25)
    assert time.monotonic() - started < 5, "the predict waited out its timeout"
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "conflict"
    assert queued(redis, "parked") == 0
    for task_id in task_ids:
        assert client.get(f"/v1/tasks/{task_id}").json()["status"] == "canceled"
    assert listed(client, "parked", status="queued")[0] == []
    again = client.delete("/v1/functions/parked/tasks?status=queued")
    assert again.json() == {"purged": 0}


@pytest.mark.parametrize("query", ["", "?status=failed", "?status=running", "?status=all"])
def test_purge_takes_only_status_queued(client: httpx.Client, query: str) -> None:
    response = client.delete(f"/v1/functions/parked/tasks{query}")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_purge_while_a_worker_claims_ends_each_task_once(
    client: httpx.Client, valkey_url: str
) -> None:
    task_ids = submit_tasks(valkey_url, "echo", 400, FunctionSettings())
    purged = client.delete("/v1/functions/echo/tasks?status=queued").json()["purged"]
    tasks = [wait_until(lambda t=t: _ended(client, t), what="its end") for t in task_ids]
    # Every task ran or was purged, never both; the count says how many were purged.
    outcomes = {(t["status"], t["attempts"], (t.get("error") or {}).get("message")) for t in tasks}
    assert outcomes <= {("succeeded", 1, None), ("canceled", 0, "purged from the queue")}
    assert sum(t["status"] == "canceled" for t in tasks) == purged


def _ended(client: httpx.Client, task_id: str) -> dict | None:
    task = client.get(f"/v1/tasks/{task_id}").json()
    return task if task["status"] in ("succeeded", "canceled") else None


# OpenAPI --------------------------------------------------------------------------------------


def test_openapi_documents_the_task_views_with_their_models(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    tasks = spec["paths"]["/v1/functions/{fn}/tasks"]
    assert {"get", "delete"} <= set(tasks)
    listing = tasks["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing["$ref"].endswith("/TaskPage")
    assert {p["name"] for p in tasks["get"]["parameters"]} >= {"status", "tenant", "cursor"}
    retry = spec["paths"]["/v1/tasks/{task_id}/retry"]["post"]
    assert "202" in retry["responses"] and "409" in retry["responses"]
    purge = tasks["delete"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert purge["$ref"].endswith("/Purged")


def test_async_client_lists_retries_and_purges(gateway: str, parked: None) -> None:
    import runq

    async def run() -> tuple[runq.TaskPage, runq.Task, int]:
        async with runq.AsyncClient(gateway) as client:
            task = await client.submit("parked", "x")
            await client.cancel(task.id)
            page = await client.tasks("parked", status="canceled", limit=500)
            retried = await client.retry(task.id)
            return page, retried, await client.purge("parked")

    page, retried, purged = asyncio.run(run())
    assert retried.id in [t.id for t in page.tasks]
    assert retried.status == "queued"
    assert purged == 1


# CLI ------------------------------------------------------------------------------------------


def runq_tasks(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`runq tasks ARGS` run in this process (the gateway it asks is a real one): exit code,
    stdout, stderr."""
    with pytest.raises(SystemExit) as exited:
        main(["tasks", *args])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.mark.usefixtures("parked")
def test_runq_tasks_lists_retries_and_purges_through_the_gateway(
    client: httpx.Client, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    doomed = submit(client, "parked", "doomed")["id"]
    client.post(f"/v1/tasks/{doomed}/cancel")
    waiting = [submit(client, "parked", i)["id"] for i in range(2)]

    code, out, err = runq_tasks(capsys, "list", "parked", "--status", "queued", "--url", gateway)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATUS", "PRIORITY", "ATTEMPTS", "CREATED", "FINISHED"]
    assert [row.split()[:4] for row in rows] == [[t, "queued", "normal", "0"] for t in waiting]

    code, out, err = runq_tasks(capsys, "retry", doomed, "--url", gateway)
    assert code == 0, err
    assert f"task {doomed} is queued again" in out
    code, out, _ = runq_tasks(capsys, "list", "parked", "--json", "--url", gateway)
    assert [json.loads(line)["id"] for line in out.splitlines()][:3] == [*waiting, doomed]

    code, out, err = runq_tasks(capsys, "purge", "parked", "--url", gateway)
    assert code == 0, err
    assert "purged 3 queued task(s) of parked" in out
    code, _, err = runq_tasks(capsys, "retry", "no-such-task", "--url", gateway)
    assert code == 2
    assert "runq: error: no task no-such-task" in err
