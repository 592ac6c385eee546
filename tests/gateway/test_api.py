"""The HTTP API as a caller sees it: real gateway, real workers, real Valkey."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue

from runq.queue.constants import WAIT_EXISTS_INTERVAL_S
from tests.helpers import (
    GATEWAY_ENV,
    PARKED_QUEUE,
    Proc,
    ran,
    start_gateway,
    start_worker,
    wait_until,
)


def post_raw(client: httpx.Client, path: str, body: bytes | Iterator[bytes]) -> httpx.Response:
    """POSTs bytes as JSON: what a client that builds its own body (or none) sends."""
    return client.post(path, content=body, headers={"content-type": "application/json"})


def submit(client: httpx.Client, function: str, value: object) -> dict:
    response = client.post(f"/v1/functions/{function}/tasks", json={"input": value})
    assert response.status_code == 202, response.text
    return response.json()


# predict --------------------------------------------------------------------------------------


def test_predict_answers_with_the_output(client: httpx.Client) -> None:
    response = client.post("/v1/functions/echo/predict", json={"input": {"a": [1, 2]}})
    assert response.status_code == 200
    task = response.json()
    assert task["status"] == "succeeded"
    assert task["output"] == {"a": [1, 2]}
    assert task["function"] == "echo"
    assert task["attempts"] == 1
    assert len(task["id"]) == 22  # 128 random bits, URL-safe base64
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]


def test_unbatched_function_takes_one_input(client: httpx.Client) -> None:
    response = client.post("/v1/functions/double/predict", json={"input": 21})
    assert response.json()["output"] == 42


def test_class_is_set_up_once_per_worker(client: httpx.Client) -> None:
    answers = [
        client.post("/v1/functions/stateful/predict", json={"input": i}).json() for i in range(3)
    ]
    outputs = [a["output"] for a in answers]
    assert {o["pid"] for o in outputs} == {outputs[0]["pid"]}
    assert {o["setups"] for o in outputs} == {1}
    assert [o["calls"] for o in outputs] == sorted(o["calls"] for o in outputs)
    assert outputs[-1]["calls"] - outputs[0]["calls"] == 2


def test_pydantic_input_is_validated_and_typed(client: httpx.Client) -> None:
    ok = client.post("/v1/functions/norm/predict", json={"input": {"x": 3, "y": 4}})
    assert ok.json()["output"] == 5.0
    bad = client.post("/v1/functions/norm/predict", json={"input": {"x": "far"}})
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["code"] == "validation_error"
    assert "input.x" in error["message"] and "input.y" in error["message"]


def test_concurrent_predicts_share_batches_within_the_bound(gateway: str) -> None:
    import asyncio

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
            calls = [
                http.post("/v1/functions/batches/predict", json={"input": i}) for i in range(24)
            ]
            return [r.json() for r in await asyncio.gather(*calls)]

    answers = asyncio.run(burst())
    assert sorted(a["output"]["value"] for a in answers) == list(range(24))
    sizes = [a["output"]["batch_size"] for a in answers]
    assert max(sizes) <= 4
    assert max(sizes) > 1, sizes


# errors ---------------------------------------------------------------------------------------


def test_unknown_function_is_404(client: httpx.Client) -> None:
    for response in (
        client.post("/v1/functions/nope/predict", json={"input": 1}),
        client.post("/v1/functions/nope/tasks", json={"input": 1}),
        client.get("/v1/functions/nope"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert "nope" in response.json()["error"]["message"]


def test_unknown_task_is_404(client: httpx.Client) -> None:
    for response in (
        client.get("/v1/tasks/missing"),
        client.get("/v1/tasks/missing/result"),
        client.get("/v1/tasks/missing/result?wait=0.2"),
        client.post("/v1/tasks/missing/cancel"),
        client.delete("/v1/tasks/missing"),
    ):
        assert response.status_code == 404, response.request.url
        assert response.json()["error"]["code"] == "not_found"


def test_malformed_body_is_400(client: httpx.Client) -> None:
    response = post_raw(client, "/v1/functions/echo/predict", b'{"input": ')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_body_without_content_type_is_read_as_json(client: httpx.Client) -> None:
    response = client.post("/v1/functions/echo/predict", content=b'{"input": "plain"}')
    assert response.status_code == 200
    assert response.json()["output"] == "plain"


def test_form_content_type_is_415_naming_json(client: httpx.Client) -> None:
    # What `curl -d` sends when the user forgets -H 'content-type: application/json'.
    response = client.post(
        "/v1/functions/echo/tasks",
        content=b'{"input": "x"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [{}, {"input": 1, "extra": True}, {"input": "not a number"}],
    ids=["missing-input", "unknown-field", "wrong-type"],
)
def test_body_not_matching_the_schema_is_422(client: httpx.Client, body: dict) -> None:
    response = client.post("/v1/functions/double/predict", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    big = {"input": "x" * 70_000}
    assert client.post("/v1/functions/echo/predict", json=big).status_code == 413

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the limit must hold while the body streams in.
        yield b'{"input": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    response = post_raw(client, "/v1/functions/echo/predict", chunks())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_model_error_is_500_without_traceback_and_the_worker_carries_on(
    client: httpx.Client,
) -> None:
    response = client.post("/v1/functions/fails/predict", json={"input": "boom"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "model_error"
    assert error["message"] == "ValueError: cannot digest 'boom'"
    assert "Traceback" not in response.text
    task = client.get(f"/v1/tasks/{error['task_id']}/result").json()
    assert task["status"] == "failed"
    assert task["error"]["message"] == "ValueError: cannot digest 'boom'"
    assert client.post("/v1/functions/fails/predict", json={"input": "fine"}).status_code == 200


def test_expose_errors_off_answers_a_generic_message_and_logs_the_detail(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    # A model's message may hold internals (hosts, paths, other callers' data).
    worker = start_worker(procs, redis, "secretive")
    try:
        response = client.post("/v1/functions/secretive/predict", json={"input": "x"})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "model_error"
        assert "postgres" not in response.text
        assert error["message"] == (
            f"the model raised an error; the worker log has it under task {error['task_id']}"
        )
        read = client.get(f"/v1/tasks/{error['task_id']}/result").text
        assert "postgres" not in read
        wait_until(
            lambda: (
                f"task {error['task_id']}: secretive raised ValueError: cannot reach postgres"
                in worker.output()
            ),
            10,
            "the detail in the worker log",
        )
    finally:
        worker.stop()


def test_wrong_number_of_outputs_fails_with_a_clear_message(client: httpx.Client) -> None:
    response = client.post("/v1/functions/wrong_count/predict", json={"input": 1})
    assert response.status_code == 500
    assert "returned 2 outputs for a batch of 1 inputs" in response.json()["error"]["message"]


def test_an_output_that_json_cannot_hold_fails_its_task_and_the_worker_goes_on(
    client: httpx.Client,
) -> None:
    # Doubled, 4,300 nines have 4,301 digits: past what Python prints as JSON by default.
    nines = int("9" * 4300)
    response = client.post("/v1/functions/double/predict", json={"input": nines})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "invalid_output"
    assert "double returned an output that is not strict JSON" in error["message"]
    task = client.get(f"/v1/tasks/{error['task_id']}/result").json()
    assert (task["status"], task["error"]["code"]) == ("failed", "invalid_output")
    assert client.post("/v1/functions/double/predict", json={"input": 21}).json()["output"] == 42


def test_an_input_nested_too_deep_to_encode_is_a_422_not_a_500(client: httpx.Client) -> None:
    # JSON parses and validates at 300 levels, but pydantic-core will not serialize it.
    nested = b"[" * 300 + b"0" + b"]" * 300
    response = post_raw(client, "/v1/functions/echo/predict", b'{"input": ' + nested + b"}")
    assert response.status_code == 422, response.text[:300]
    assert response.json()["error"]["code"] == "validation_error"
    assert "input cannot be encoded as JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("route", ["predict", "tasks"])
def test_an_input_with_nan_or_infinity_is_a_422_and_nothing_is_enqueued(
    client: httpx.Client, redis: Redis, parked: None, token: str, route: str
) -> None:
    # Python's json read them, and pydantic wrote NaN on as null: the model saw None.
    response = post_raw(
        client, f"/v1/functions/parked/{route}", f'{{"input": [1.5, {token}]}}'.encode()
    )
    assert response.status_code == 422, response.text
    assert f"the body holds {token}" in response.json()["error"]["message"]
    assert redis.llen(PARKED_QUEUE) == 0


def test_an_input_with_a_lone_surrogate_is_a_422(
    client: httpx.Client, redis: Redis, parked: None
) -> None:
    response = post_raw(
        client,
        "/v1/functions/parked/predict",
        b'{"input": ["\\ud800", "a pair is fine: \\ud83d\\ude00"]}',
    )
    assert response.status_code == 422, response.text
    assert "lone UTF-16 surrogate" in response.json()["error"]["message"]
    assert redis.llen(PARKED_QUEUE) == 0
    pair = post_raw(client, "/v1/functions/parked/tasks", b'{"input": "\\ud83d\\ude00"}')
    assert pair.status_code == 202, pair.text
    client.delete(f"/v1/tasks/{pair.json()['id']}")


def test_a_function_whose_type_allows_nan_takes_it(client: httpx.Client, redis: Redis) -> None:
    response = post_raw(client, "/v1/functions/lenient/tasks", b'{"input": NaN}')
    assert response.status_code == 202, response.text
    client.delete(f"/v1/tasks/{response.json()['id']}")


@pytest.mark.parametrize(
    ("route", "body"),
    [("double/predict", {"input": True}), ("echo/tasks", {"input": 1, "timeout_s": True})],
    ids=["an int input", "timeout_s"],
)
def test_a_boolean_is_not_a_number(client: httpx.Client, route: str, body: dict) -> None:
    # pydantic reads true as 1: `timeout_s: true` was accepted as one second.
    response = client.post(f"/v1/functions/{route}", json=body)
    assert response.status_code == 422, response.text
    assert "must be a number, not a boolean" in response.json()["error"]["message"]


def test_timeout_above_the_limit_is_422_naming_it(client: httpx.Client) -> None:
    response = client.post("/v1/functions/echo/predict?timeout=31", json={"input": 1})
    assert response.status_code == 422
    assert "max_timeout_s (30.0)" in response.json()["error"]["message"]
    response = client.get("/v1/tasks/whatever/result?wait=31")
    assert response.status_code == 422


# timeouts -------------------------------------------------------------------------------------


def test_predict_timeout_is_504_on_time_and_names_the_running_task(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.post("/v1/functions/sleepy/predict?timeout=1", json={"input": 1.3})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert 1.0 <= elapsed <= 1.5, elapsed
    error = response.json()["error"]
    assert error["code"] == "timeout"
    assert "still running" in error["message"]
    # The task went on and its result stays readable.
    task = client.get(f"/v1/tasks/{error['task_id']}/result?wait=5").json()
    assert task["status"] == "succeeded"
    assert task["output"] == 1.3


@pytest.mark.usefixtures("parked")
def test_predict_timeout_withdraws_a_task_that_never_started(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    started = time.monotonic()
    response = client.post("/v1/functions/parked/predict?timeout=1", json={"input": "late"})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert 1.0 <= elapsed <= 1.5, elapsed
    task_id = response.json()["error"]["task_id"]
    task = client.get(f"/v1/tasks/{task_id}").json()
    assert task["status"] == "timed_out"
    assert task["started_at"] is None
    assert redis.llen(PARKED_QUEUE) == 0


def test_batch_past_timeout_s_ends_timed_out_and_the_worker_stays_healthy(
    client: httpx.Client,
) -> None:
    response = client.post("/v1/functions/sleepy/predict?timeout=10", json={"input": 5})
    assert response.status_code == 504
    task = client.get(f"/v1/tasks/{response.json()['error']['task_id']}").json()
    assert task["status"] == "timed_out"
    assert "timeout_s (1.5 s)" in task["error"]["message"]
    assert client.post("/v1/functions/sleepy/predict", json={"input": 0}).status_code == 200


@pytest.mark.usefixtures("parked")
def test_task_whose_deadline_passed_in_the_queue_never_runs(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    response = client.post("/v1/functions/parked/tasks", json={"input": "expired", "ttl_s": 0.2})
    task_id = response.json()["id"]
    time.sleep(0.3)
    fresh = submit(client, "parked", "fresh")
    worker = start_worker(procs, redis, "parked")
    try:
        done = client.get(f"/v1/tasks/{fresh['id']}/result?wait=10").json()
        assert done["status"] == "succeeded"
        expired = client.get(f"/v1/tasks/{task_id}").json()
        assert expired["status"] == "timed_out"
        assert expired["attempts"] == 0
        assert expired["started_at"] is None
        assert ran(redis) == ["'fresh'"]
    finally:
        worker.stop()


def test_over_max_queue_is_503_queue_full_and_nothing_is_enqueued(
    client: httpx.Client, redis: Redis
) -> None:
    # The decorator says 5; the gateway's environment overrides it to 3.
    assert client.get("/v1/functions/capped").json()["settings"]["max_queue"] == 3
    redis.delete("rq:queue:runq.capped")
    for value in range(3):
        submit(client, "capped", value)
    refused = client.post("/v1/functions/capped/tasks", json={"input": "one too many"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert redis.llen("rq:queue:runq.capped") == 3


# background tasks -----------------------------------------------------------------------------


def test_submit_then_poll(client: httpx.Client) -> None:
    response = client.post("/v1/functions/echo/tasks", json={"input": "later"})
    assert response.status_code == 202
    task = response.json()
    assert response.headers["location"] == f"/v1/tasks/{task['id']}"
    assert task["status"] == "queued"
    assert "output" not in task
    done = client.get(f"{response.headers['location']}/result?wait=10")
    assert done.status_code == 200
    assert done.json()["output"] == "later"
    status = client.get(response.headers["location"]).json()
    assert status["status"] == "succeeded"
    assert "output" not in status


@pytest.mark.usefixtures("parked")
def test_result_is_202_while_pending_and_long_poll_answers_when_it_ends(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    task = submit(client, "parked", "waiting")
    pending = client.get(f"/v1/tasks/{task['id']}/result")
    assert pending.status_code == 202
    assert pending.headers["retry-after"] == "1"
    assert pending.json()["status"] == "queued"

    started = time.monotonic()
    still = client.get(f"/v1/tasks/{task['id']}/result?wait=0.5")
    assert still.status_code == 202
    assert time.monotonic() - started >= 0.5

    import threading

    answer: dict = {}

    def long_poll() -> None:
        answer["response"] = client.get(f"/v1/tasks/{task['id']}/result?wait=20")

    poller = threading.Thread(target=long_poll)
    poller.start()
    worker = start_worker(procs, redis, "parked")
    try:
        poller.join(20)
        assert answer["response"].status_code == 200
        assert answer["response"].json()["output"] == "waiting"
    finally:
        worker.stop()


@pytest.mark.usefixtures("parked")
def test_canceled_queued_task_never_runs(
    client: httpx.Client, procs: Callable[..., Proc], redis: Redis
) -> None:
    doomed = submit(client, "parked", "doomed")
    response = client.post(f"/v1/tasks/{doomed['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    again = client.post(f"/v1/tasks/{doomed['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"

    fresh = submit(client, "parked", "fresh")
    worker = start_worker(procs, redis, "parked")
    try:
        assert client.get(f"/v1/tasks/{fresh['id']}/result?wait=10").json()["status"] == "succeeded"
        assert ran(redis) == ["'fresh'"]
        assert client.get(f"/v1/tasks/{doomed['id']}").json()["status"] == "canceled"
    finally:
        worker.stop()


def test_cancel_of_a_running_task_keeps_it_canceled(client: httpx.Client, redis: Redis) -> None:
    task = submit(client, "sleepy", 0.6)
    wait_until(
        lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "running",
        what="the task to start",
    )
    assert client.post(f"/v1/tasks/{task['id']}/cancel").json()["status"] == "canceled"
    # Once the worker has closed the execution, its outcome must not have overwritten the cancel.
    wait_until(lambda: redis.zcard("rq:wip:runq.sleepy") == 0, what="the batch to end")
    final = client.get(f"/v1/tasks/{task['id']}/result").json()
    assert final["status"] == "canceled"
    assert "output" not in final


def test_delete_removes_the_task_and_its_records(client: httpx.Client, redis: Redis) -> None:
    task = client.post("/v1/functions/echo/predict", json={"input": "gone"}).json()
    assert redis.exists(f"rq:job:{task['id']}", f"rq:results:{task['id']}") == 2
    assert client.delete(f"/v1/tasks/{task['id']}").status_code == 204
    assert client.get(f"/v1/tasks/{task['id']}").status_code == 404
    assert redis.exists(f"rq:job:{task['id']}", f"rq:results:{task['id']}") == 0
    assert redis.zscore("rq:finished:runq.echo", task["id"]) is None


def test_another_rq_apps_job_is_not_a_task_and_is_left_alone(
    client: httpx.Client, redis: Redis
) -> None:
    theirs = Queue("other-app", connection=redis)
    job = theirs.enqueue("os.getcwd")
    before = redis.hgetall(job.key)
    try:
        for response in (
            client.get(f"/v1/tasks/{job.id}"),
            client.get(f"/v1/tasks/{job.id}/result"),
            client.get(f"/v1/tasks/{job.id}/result?wait=0.2"),
            client.post(f"/v1/tasks/{job.id}/cancel"),
            client.delete(f"/v1/tasks/{job.id}"),
        ):
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "not_found"
        assert redis.hgetall(job.key) == before
        assert theirs.job_ids == [job.id]
    finally:
        theirs.empty()


# Far below the waits below (30 s): a waiter answers when its task goes, not at its timeout.
GONE_WITHIN_S = 3


@pytest.mark.usefixtures("parked")
def test_delete_wakes_a_waiting_predict_with_404_at_once(gateway: str, redis: Redis) -> None:
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            httpx.post, f"{gateway}/v1/functions/parked/predict?timeout=30", json={"input": 1}
        )
        task_id = wait_until(lambda: redis.lindex(PARKED_QUEUE, 0), what="the task queued")
        assert httpx.delete(f"{gateway}/v1/tasks/{task_id.decode()}").status_code == 204
        response = waiting.result(timeout=GONE_WITHIN_S)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.usefixtures("parked")
def test_a_task_emptied_by_rq_wakes_its_long_poll_with_404(
    client: httpx.Client, gateway: str, redis: Redis
) -> None:
    task = submit(client, "parked", 1)
    channel = f"runq:task:{task['id']}"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.get, f"{gateway}/v1/tasks/{task['id']}/result?wait=30")
        wait_until(lambda: redis.pubsub_numsub(channel)[0][1] == 1, what="the long-poll")
        # What `rq empty runq.parked` runs: the job hash goes with no word to runq.
        assert Queue("runq.parked", connection=redis).empty() == 1
        response = waiting.result(timeout=WAIT_EXISTS_INTERVAL_S + GONE_WITHIN_S)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# functions, health, docs ----------------------------------------------------------------------


@pytest.mark.usefixtures("parked")
def test_function_detail_shows_live_figures(client: httpx.Client) -> None:
    submit(client, "parked", 1)
    submit(client, "parked", 2)
    detail = client.get("/v1/functions/parked").json()
    assert detail["queued"] == 2
    assert detail["replicas"] == {"current": 0, "desired": None}
    assert detail["demand"] == 2
    assert detail["settings"]["max_batch_size"] == 8
    echo = client.get("/v1/functions/echo").json()
    assert echo["replicas"]["current"] == 1
    listed = client.get("/v1/functions").json()["functions"]
    assert {f["name"] for f in listed} >= {"echo", "parked", "stateful"}


@pytest.mark.usefixtures("parked", "gateway")
def test_queued_work_with_no_worker_past_the_budget_is_shown_stranded(
    procs: Callable[..., Proc],
) -> None:
    url = start_gateway(procs, env={**GATEWAY_ENV, "RUNQ_COLD_START_BUDGET_S": "1"})
    with httpx.Client(base_url=url, timeout=10) as client:
        submit(client, "parked", 1)
        stranded = wait_until(
            lambda: client.get("/v1/functions/parked").json()["stranded"], 10, "stranded"
        )
        assert stranded["queued"] == 1 and stranded["for_s"] >= 1
        assert "no live worker" in stranded["message"]
        assert client.get("/v1/functions/echo").json()["stranded"] is None  # it has a worker
        scraped = text_string_to_metric_families(client.get("/metrics").text)
        unserved = {
            s.labels["function"]: s.value
            for family in scraped
            if family.name == "runq_unserved_seconds"
            for s in family.samples
        }
        assert unserved["parked"] > 1 and unserved["echo"] == 0


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_openapi_documents_each_function_schema(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/functions/norm/predict"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    point_ref = spec["components"]["schemas"][ref]["properties"]["input"]["$ref"]
    assert point_ref.endswith("/Point")
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("page", "renders"), [("/docs", "SwaggerUIBundle"), ("/redoc", "<redoc spec-url")]
)
def test_docs_pages_load_every_asset_from_the_gateway(
    client: httpx.Client, page: str, renders: str
) -> None:
    """A machine with no internet gets working /docs and /redoc: no asset from a CDN."""
    html = client.get(page).text
    assert renders in html
    assert not re.findall(r"(?:https?:)?//[\w.-]+", html), "an outside host"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    answers = [client.get(asset) for asset in assets]
    assert [answer.status_code for answer in answers] == [200] * len(assets), assets
    types = {answer.headers["content-type"].split(";")[0] for answer in answers}
    assert types == (
        {"text/javascript", "text/css", "image/png"}
        if page == "/docs"
        else {"text/javascript", "image/png"}
    )
