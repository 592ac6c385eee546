"""Admission control as callers see it: caps, deadlines, priorities, idempotency, poison inputs.

Several gateway processes share one Valkey; caps must hold across all of them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from redis import Redis
from rq import Queue

from runq.queue import constants
from tests.fns import CALLS_KEY, PEAK_KEY, RUNNING_KEY
from tests.helpers import (
    GATEWAY_ENV,
    Proc,
    clear_function,
    hanging_request,
    http_request,
    launch_gateway,
    queued,
    start_gateway,
    start_worker,
    wait_for_gateway,
    wait_until,
)


def calls(redis: Redis, function: str) -> list[list[object]]:
    return [json.loads(raw) for raw in redis.lrange(CALLS_KEY.format(function), 0, -1)]


@pytest.fixture(scope="module")
def gateways(gateway: str, procs: Callable[..., Proc]) -> list[str]:
    """The suite's gateway and two more processes like it."""
    more = [launch_gateway(procs, env=GATEWAY_ENV) for _ in range(2)]
    for proc, url in more:
        wait_for_gateway(proc, url)
    return [gateway, *(url for _, url in more)]


def post_all(
    requests: list[tuple[str, dict[str, object]]], **kwargs: object
) -> list[httpx.Response]:
    """Sends every (url, json body) at once and returns the answers in order."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            return await asyncio.gather(*(http.post(u, json=b, **kwargs) for u, b in requests))

    return asyncio.run(run())


# queue cap ------------------------------------------------------------------------------------


def test_max_queue_holds_exactly_across_gateway_processes(
    gateways: list[str], redis: Redis
) -> None:
    clear_function(redis, "admitted")
    requests = [
        (f"{gateways[i % len(gateways)]}/v1/functions/admitted/tasks", {"input": i})
        for i in range(200)
    ]
    answers = post_all(requests)
    codes = [a.status_code for a in answers]
    assert codes.count(202) == 50, codes
    assert codes.count(503) == 150, codes
    refused = [a for a in answers if a.status_code == 503]
    assert {a.json()["error"]["code"] for a in refused} == {"queue_full"}
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    assert queued(redis, "admitted") == 50
    clear_function(redis, "admitted")


def test_retry_after_follows_the_recent_drain_rate(client: httpx.Client, redis: Redis) -> None:
    clear_function(redis, "capped")
    for value in range(3):
        client.post("/v1/functions/capped/tasks", json={"input": value})
    redis.delete("runq:drain:capped")
    idle = client.post("/v1/functions/capped/tasks", json={"input": "no worker yet"})
    assert idle.headers["retry-after"] == "5"
    # Tasks were leaving the queue at 0.11/s: half of the 3 slots frees in about 14 s.
    seconds, micros = redis.time()
    redis.hset("runq:drain:capped", mapping={"rate": 0.11, "at": seconds + micros / 1e6})
    slow = client.post("/v1/functions/capped/tasks", json={"input": "slow drain"})
    assert slow.status_code == 503
    assert 13 <= int(slow.headers["retry-after"]) <= 15
    clear_function(redis, "capped")
    redis.delete("runq:drain:capped")


# concurrency cap ------------------------------------------------------------------------------


@pytest.mark.slow
def test_max_concurrency_bounds_running_tasks_across_workers(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    clear_function(redis, "limited")
    redis.delete(RUNNING_KEY, PEAK_KEY)
    # Four idle workers taking batches of two could run eight at once; the cap is three.
    workers = [start_worker(procs, redis, "limited") for _ in range(4)]
    tasks = [
        client.post("/v1/functions/limited/tasks", json={"input": 0.3}).json()["id"]
        for _ in range(24)
    ]
    try:
        for task_id in tasks:
            done = client.get(f"/v1/tasks/{task_id}/result?wait=30").json()
            assert done["status"] == "succeeded", done
        assert int(redis.get(PEAK_KEY) or 0) == 3
        assert int(redis.get(RUNNING_KEY) or 0) == 0
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.slow
def test_a_concurrency_slot_is_held_for_as_long_as_its_task_runs(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    # `solo` allows one task at a time. The first runs past the lease TTL (8 s): its lease is
    # renewed, so the idle second worker never takes the second task meanwhile.
    clear_function(redis, "solo")
    workers = [start_worker(procs, redis, "solo") for _ in range(2)]
    try:
        long = client.post("/v1/functions/solo/tasks", json={"input": 10}).json()["id"]
        short = client.post("/v1/functions/solo/tasks", json={"input": 0}).json()["id"]
        first = client.get(f"/v1/tasks/{long}/result?wait=30").json()
        second = client.get(f"/v1/tasks/{short}/result?wait=30").json()
        assert first["status"] == second["status"] == "succeeded"
        assert second["started_at"] >= first["finished_at"]
    finally:
        for worker in workers:
            worker.stop()


def test_a_killed_workers_concurrency_slot_lapses(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    clear_function(redis, "solo")
    first = start_worker(procs, redis, "solo")
    stuck = client.post("/v1/functions/solo/tasks", json={"input": 50}).json()["id"]
    wait_until(
        lambda: client.get(f"/v1/tasks/{stuck}").json()["status"] == "running",
        what="the long task to start",
    )
    first.stop(signal.SIGKILL)
    second = start_worker(procs, redis, "solo")
    try:
        started = time.monotonic()
        response = client.post("/v1/functions/solo/predict?timeout=20", json={"input": 0})
        assert response.status_code == 200, response.text
        # The slot came back once the dead worker's lease lapsed (8 s), not at once and not at
        # the predict timeout.
        assert 3 < time.monotonic() - started < 15
    finally:
        second.stop()


# gateway protection ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow(procs: Callable[..., Proc]) -> str:
    """A gateway process that holds at most two waiting requests."""
    return start_gateway(procs, env={**GATEWAY_ENV, "RUNQ_MAX_INFLIGHT": "2"})


def test_over_max_inflight_is_503_overloaded_at_once(narrow: str, redis: Redis) -> None:
    clear_function(redis, "parked")
    url = narrow
    waiting = [
        threading.Thread(
            target=httpx.post,
            args=(f"{url}/v1/functions/parked/predict?timeout=3",),
            kwargs={"json": {"input": i}, "timeout": 10},
        )
        for i in range(2)
    ]
    for thread in waiting:
        thread.start()
    wait_until(lambda: queued(redis, "parked") == 2, what="two predicts to be waiting")
    started = time.monotonic()
    refused = httpx.post(f"{url}/v1/functions/parked/predict?timeout=3", json={"input": "more"})
    assert time.monotonic() - started < 1
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert queued(redis, "parked") == 2
    for thread in waiting:
        thread.join()
    # Once they are answered, the gateway admits again.
    assert (
        httpx.post(f"{url}/v1/functions/parked/predict?timeout=0.2", json={"input": 1}).status_code
        == 504
    )
    clear_function(redis, "parked")


def test_waiters_that_hang_up_free_their_max_inflight_slots_at_once(
    narrow: str, redis: Redis
) -> None:
    clear_function(redis, "parked")
    task = httpx.post(f"{narrow}/v1/functions/parked/tasks", json={"input": 1}).json()
    result = f"/v1/tasks/{task['id']}/result"
    waiters = [hanging_request(narrow, http_request("GET", f"{result}?wait=20")) for _ in range(2)]

    def probe() -> int:
        return httpx.get(f"{narrow}{result}?wait=0.01").status_code

    wait_until(lambda: probe() == 503, what="both waiters to hold a slot")
    for sock in waiters:
        sock.close()
    # Not the 20 s the waiters asked for.
    wait_until(lambda: probe() == 202, 2, "a new caller to be served")
    clear_function(redis, "parked")


def test_a_predict_whose_caller_hangs_up_before_it_starts_is_withdrawn(
    client: httpx.Client, gateway: str, redis: Redis
) -> None:
    clear_function(redis, "parked")
    predict = http_request("POST", "/v1/functions/parked/predict?timeout=20", {"input": "gone"})
    sock = hanging_request(gateway, predict)
    wait_until(lambda: queued(redis, "parked") == 1, what="the predict's task to be queued")
    (task_id,) = redis.lrange(constants.queue_key(constants.queue_name("parked")), 0, -1)
    sock.close()
    url = f"/v1/tasks/{task_id.decode()}"
    task = wait_until(
        lambda: (t := client.get(url).json())["status"] == "canceled" and t,
        2,
        "the task to be withdrawn",
    )
    assert "hung up before it started" in task["error"]["message"]
    assert task["started_at"] is None
    assert queued(redis, "parked") == 0


def test_a_running_predict_whose_caller_hangs_up_goes_on(
    client: httpx.Client, gateway: str, redis: Redis
) -> None:
    key = f"hang-up-{time.monotonic()}"
    body = {"input": 0.8}
    predict = http_request(
        "POST", "/v1/functions/sleepy/predict?timeout=20", body, Idempotency_Key=key
    )
    sock = hanging_request(gateway, predict)
    running = constants.started_registry_key(constants.queue_name("sleepy"))
    wait_until(lambda: redis.zcard(running) > 0, what="the predict's task to start")
    # The key's task, which the caller cannot be told of any more.
    replay = client.post("/v1/functions/sleepy/tasks", json=body, headers={"Idempotency-Key": key})
    assert replay.headers["idempotent-replayed"] == "true"
    sock.close()
    done = client.get(f"/v1/tasks/{replay.json()['id']}/result?wait=10")
    assert done.status_code == 200
    assert done.json()["output"] == 0.8


# deadlines and polling ------------------------------------------------------------------------


def test_submitted_timeout_s_stops_the_running_task(client: httpx.Client) -> None:
    # sleepy's own timeout_s is 1.5 s; the task's 1 s ends it first.
    task = client.post("/v1/functions/sleepy/tasks", json={"input": 3, "timeout_s": 1}).json()
    done = client.get(f"/v1/tasks/{task['id']}/result?wait=10").json()
    assert done["status"] == "timed_out"
    assert "timeout_s passed while it ran" in done["error"]["message"]
    assert client.post("/v1/functions/sleepy/predict", json={"input": 0}).status_code == 200


def test_a_queued_task_past_its_ttl_reads_timed_out_without_a_worker(
    client: httpx.Client, redis: Redis
) -> None:
    clear_function(redis, "parked")
    task = client.post("/v1/functions/parked/tasks", json={"input": 1, "ttl_s": 0.3}).json()
    assert task["status"] == "queued"
    wait_until(
        lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "timed_out",
        what="the task to time out in the queue",
    )
    assert queued(redis, "parked") == 0


def test_deadline_fields_are_checked(client: httpx.Client) -> None:
    for body in ({"input": 1, "timeout_s": 0}, {"input": 1, "ttl_s": -1}, {"input": 1, "x": 1}):
        response = client.post("/v1/functions/echo/tasks", json=body)
        assert response.status_code == 422, body
    # predict's deadline is its timeout query parameter, not a body field.
    response = client.post("/v1/functions/echo/predict", json={"input": 1, "timeout_s": 1})
    assert response.status_code == 422


def test_predict_on_timeout_poll_answers_202_and_the_task_goes_on(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.post(
        "/v1/functions/sleepy/predict?timeout=0.3&on_timeout=poll", json={"input": 0.8}
    )
    assert response.status_code == 202
    assert time.monotonic() - started < 0.8
    task = response.json()
    assert task["status"] in ("queued", "running")
    assert response.headers["location"] == f"/v1/tasks/{task['id']}/result"
    done = client.get(f"{response.headers['location']}?wait=10")
    assert done.status_code == 200
    assert done.json()["output"] == 0.8


def test_on_timeout_poll_leaves_a_queued_task_queued(client: httpx.Client, redis: Redis) -> None:
    clear_function(redis, "parked")
    response = client.post(
        "/v1/functions/parked/predict?timeout=0.2&on_timeout=poll", json={"input": "later"}
    )
    assert response.status_code == 202
    assert client.get(f"/v1/tasks/{response.json()['id']}").json()["status"] == "queued"
    assert queued(redis, "parked") == 1
    clear_function(redis, "parked")


def test_on_timeout_must_be_error_or_poll(client: httpx.Client) -> None:
    response = client.post("/v1/functions/echo/predict?on_timeout=wait", json={"input": 1})
    assert response.status_code == 422


# priorities -----------------------------------------------------------------------------------


def test_higher_priority_runs_first_and_batches_never_put_lower_work_ahead(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    clear_function(redis, "ordered")
    order = [("low", "l1"), ("normal", "n1"), ("high", "h1"), ("low", "l2"), ("normal", "n2")]
    order += [("high", "h2"), ("normal", "n3")]
    for priority, value in order:
        task = client.post(
            "/v1/functions/ordered/tasks", json={"input": value, "priority": priority}
        ).json()
        assert task["priority"] == priority
    worker = start_worker(procs, redis, "ordered")
    try:
        wait_until(lambda: sum(map(len, calls(redis, "ordered"))) == 7, what="all seven to run")
        # Batches of three: every high before any normal, every normal before any low, and
        # first come first served within a priority.
        assert calls(redis, "ordered") == [["h1", "h2", "n1"], ["n2", "n3", "l1"], ["l2"]]
    finally:
        worker.stop()
    assert queued(redis, "ordered") == 0
    assert (
        client.post(
            "/v1/functions/ordered/tasks", json={"input": "x", "priority": "urgent"}
        ).status_code
        == 422
    )
    clear_function(redis, "ordered")


def test_priority_survives_cancel_and_delete(client: httpx.Client, redis: Redis) -> None:
    clear_function(redis, "parked")
    task = client.post("/v1/functions/parked/tasks", json={"input": 1, "priority": "high"}).json()
    assert redis.llen("rq:queue:runq.parked.high") == 1
    assert client.post(f"/v1/tasks/{task['id']}/cancel").json()["status"] == "canceled"
    assert queued(redis, "parked") == 0
    other = client.post("/v1/functions/parked/tasks", json={"input": 2, "priority": "low"}).json()
    assert client.delete(f"/v1/tasks/{other['id']}").status_code == 204
    assert queued(redis, "parked") == 0


# idempotency ----------------------------------------------------------------------------------


def test_submit_with_the_same_idempotency_key_returns_the_same_task(
    gateways: list[str], redis: Redis
) -> None:
    clear_function(redis, "parked")
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = httpx.post(f"{gateways[0]}/v1/functions/parked/tasks", json={"input": 7}, headers=key)
    again = httpx.post(f"{gateways[1]}/v1/functions/parked/tasks", json={"input": 7}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert queued(redis, "parked") == 1

    changed = httpx.post(f"{gateways[2]}/v1/functions/parked/tasks", json={"input": 8}, headers=key)
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    # The id reads and deletes the task: a caller who guessed the key must not learn it.
    assert first.json()["id"] not in changed.text
    # Keys are scoped per function.
    elsewhere = httpx.post(
        f"{gateways[0]}/v1/functions/admitted/tasks", json={"input": 8}, headers=key
    )
    assert elsewhere.status_code == 202
    assert elsewhere.json()["id"] != first.json()["id"]
    assert queued(redis, "parked") == 1
    clear_function(redis, "parked")
    clear_function(redis, "admitted")


def test_concurrent_predicts_with_one_key_run_once_and_share_the_answer(
    gateways: list[str],
) -> None:
    key = {"Idempotency-Key": f"embed-{time.time_ns()}"}
    requests = [(f"{url}/v1/functions/sleepy/predict", {"input": 0.3}) for url in gateways]
    answers = post_all(requests, headers=key)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert [a.headers.get("idempotent-replayed") for a in answers].count("true") == 2
    # Replayed later, the finished task answers at once.
    late = httpx.post(
        f"{gateways[1]}/v1/functions/sleepy/predict", json={"input": 0.3}, headers=key
    )
    assert late.json()["id"] == answers[0].json()["id"]
    assert late.json()["output"] == 0.3


def test_a_key_whose_predict_never_started_runs_on_retry(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    clear_function(redis, "parked")
    key = {"Idempotency-Key": f"retry-{time.time_ns()}"}
    first = client.post("/v1/functions/parked/predict?timeout=0.3", json={"input": 1}, headers=key)
    assert first.status_code == 504
    # The task was withdrawn unstarted: a retry with the key must be able to run.
    retry = client.post("/v1/functions/parked/tasks", json={"input": 1}, headers=key)
    assert retry.status_code == 202
    assert retry.json()["id"] != first.json()["error"]["task_id"]
    assert "idempotent-replayed" not in retry.headers
    clear_function(redis, "parked")


def test_a_key_whose_task_was_deleted_or_emptied_is_free_again(
    client: httpx.Client, redis: Redis
) -> None:
    clear_function(redis, "parked")
    key = {"Idempotency-Key": f"gone-{time.time_ns()}"}
    first = client.post("/v1/functions/parked/tasks", json={"input": 1}, headers=key).json()
    assert client.delete(f"/v1/tasks/{first['id']}").status_code == 204
    second = client.post("/v1/functions/parked/tasks", json={"input": 1}, headers=key)
    assert second.status_code == 202
    assert second.json()["id"] != first["id"]
    # A record gone without runq's word (`rq empty`, an expiry): the key runs the request anew.
    assert Queue("runq.parked", connection=redis).empty() == 1
    third = client.post("/v1/functions/parked/tasks", json={"input": 1}, headers=key)
    assert third.status_code == 202
    assert third.json()["id"] not in (first["id"], second.json()["id"])
    assert "idempotent-replayed" not in third.headers
    assert client.get(f"/v1/tasks/{third.json()['id']}").json()["status"] == "queued"
    clear_function(redis, "parked")


def test_idempotency_key_is_bounded(client: httpx.Client) -> None:
    response = client.post(
        "/v1/functions/echo/tasks", json={"input": 1}, headers={"Idempotency-Key": "k" * 256}
    )
    assert response.status_code == 422


# poison isolation -----------------------------------------------------------------------------


def test_one_poison_input_among_sixteen_fails_alone(
    gateway: str, procs: Callable[..., Proc], redis: Redis
) -> None:
    clear_function(redis, "poison")
    inputs = [f"ok-{i}" for i in range(16)]
    inputs[5] = "boom"
    answers: list[httpx.Response] = []
    url = f"{gateway}/v1/functions/poison/predict?timeout=30"
    sender = threading.Thread(
        target=lambda: answers.extend(post_all([(url, {"input": x}) for x in inputs]))
    )
    sender.start()
    # All sixteen wait in the queue before a worker exists: the first batch holds the poison.
    wait_until(lambda: queued(redis, "poison") == 16, what="sixteen queued predicts")
    worker = start_worker(procs, redis, "poison")
    try:
        sender.join(40)
        for value, answer in zip(inputs, answers, strict=True):
            if value == "boom":
                assert answer.status_code == 500
                assert answer.json()["error"]["message"] == "ValueError: cannot digest 'boom'"
            else:
                assert answer.status_code == 200, answer.text
                assert answer.json()["output"] == value
        # Sixteen queued make two full batches; the poison's was one of them.
        batch = next(call for call in calls(redis, "poison") if "boom" in call)
        assert len(batch) == 8
        assert ["boom"] in calls(redis, "poison")
    finally:
        worker.stop()
