"""runq.Client and runq.AsyncClient against real gateways, including ones that go away.

Only the retry policy's clocks are faked (its own unit tests); every other test talks HTTP to a
real gateway, or to a port where none listens.
"""

from __future__ import annotations

import asyncio
import email.utils
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

import runq
from runq.client import (
    ANSWER_MARGIN_S,
    MIN_ATTEMPT_S,
    Task,
    _Attempts,
    _Call,
    _canceled,
    _deleted,
    _error,
    _Retry,
)
from tests.fns import RAN_KEY
from tests.helpers import (
    FNS,
    GATEWAY_ENV,
    Proc,
    clear_function,
    free_port,
    queued,
    start_worker,
    wait_for_gateway,
    wait_until,
)


def unique(what: str) -> str:
    return f"{what}-{time.time_ns()}"


class Recording(httpx.HTTPTransport):
    """The real transport, noting each attempt's headers (refused connections included)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[httpx.Headers] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.headers)
        return super().handle_request(request)

    def keys(self) -> list[str | None]:
        return [headers.get("idempotency-key") for headers in self.sent]


class AsyncRecording(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.headers)
        return await super().handle_async_request(request)

    def keys(self) -> list[str | None]:
        return [headers.get("idempotency-key") for headers in self.sent]


class OwnGateway:
    """A gateway on a fixed port, so a test can stop it and start it again where it was."""

    def __init__(self, procs: Callable[..., Proc], tmp_path: Path) -> None:
        self.procs, self.tmp_path = procs, tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        # Its own metrics directory: a SIGKILLed gateway cannot remove the one it would make.
        self.starts += 1
        metrics = self.tmp_path / f"metrics-{self.starts}"
        metrics.mkdir()
        env = {**GATEWAY_ENV, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
        self.proc = self.procs("gateway", FNS, "--port", str(self.port), env=env)
        wait_for_gateway(self.proc, self.url)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.alive():
            self.proc.stop(sig)


@pytest.fixture(scope="module")
def own_gateway_of_module(
    procs: Callable[..., Proc], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnGateway]:
    # One for the module: each test stops or kills it and starts it again anyway, so a fresh
    # one per test cost a start and a stop more each (most of these tests' time).
    own = OwnGateway(procs, tmp_path_factory.mktemp("own-gateway"))
    yield own
    own.stop()


@pytest.fixture
def own_gateway(own_gateway_of_module: OwnGateway) -> OwnGateway:
    """The module's own gateway, running when the test starts."""
    own = own_gateway_of_module
    if own.proc is None or not own.proc.alive():
        own.start()
    return own


@pytest.fixture
def client(gateway: str) -> Iterator[runq.Client]:
    with runq.Client(gateway, timeout=10) as client:
        yield client


@pytest.fixture
def parked(redis: Redis) -> Iterator[None]:
    """`parked` (no worker) starts and ends each test with empty queues."""
    clear_function(redis, "parked")
    yield
    clear_function(redis, "parked")


@pytest.fixture
def capped(redis: Redis) -> Iterator[None]:
    """`capped` never has a worker; the gateway lets 3 tasks into its queue."""
    clear_function(redis, "capped")
    yield
    clear_function(redis, "capped")


# happy paths ----------------------------------------------------------------------------------


def test_predict_returns_the_output_and_sends_key_and_api_key(gateway: str) -> None:
    transport = Recording()
    with runq.Client(gateway, api_key="s3cret", transport=transport) as client:
        assert client.predict("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert client.predict("double", 21, timeout=5, priority="high") == 42
        assert client.predict("norm", {"x": 3, "y": 4}, idempotency_key=unique("norm")) == 5.0
    assert [h["authorization"] for h in transport.sent] == ["Bearer s3cret"] * 3
    keys = transport.keys()
    assert all(keys) and len(set(keys)) == 3  # one fresh key per logical call
    assert keys[2] is not None and keys[2].startswith("norm-")


@pytest.mark.usefixtures("parked")
def test_submit_status_result(client: runq.Client) -> None:
    task = client.submit("echo", "in the background")
    assert isinstance(task, Task) and task.function == "echo" and task.priority == "normal"
    done = client.result(task.id, wait=10)
    assert done.ended and done.status == "succeeded"
    assert done.output == "in the background" and done.error is None
    assert done.attempts == 1 and done.finished_at is not None
    status = client.status(task.id)
    assert status.status == "succeeded" and status.output is None  # status has no output

    waiting = client.submit("parked", unique("pending"), priority="low", ttl_s=60, timeout_s=60)
    pending = client.result(waiting.id)
    assert pending.status == "queued" and not pending.ended
    started = time.monotonic()
    assert client.result(waiting.id, wait=0.3).status == "queued"
    assert time.monotonic() - started >= 0.3


@pytest.mark.usefixtures("parked")
def test_cancel_and_delete(client: runq.Client) -> None:
    task = client.submit("parked", unique("cancel me"))
    canceled = client.cancel(task.id)
    assert canceled.id == task.id and canceled.status == "canceled"
    with pytest.raises(runq.Conflict) as again:
        client.cancel(task.id)  # answered at once: nothing was retried, so nothing is assumed
    assert again.value.details["task"]["status"] == "canceled"
    assert client.delete(task.id) is None
    with pytest.raises(runq.NotFound):
        client.status(task.id)
    with pytest.raises(runq.NotFound):
        client.delete(task.id)


def test_task_ignores_keys_it_does_not_know() -> None:
    task = Task.from_json(
        {"id": "t", "function": "f", "priority": "high", "status": "failed", "new": 1}
    )
    assert task == Task("t", "f", "high", "failed")
    assert task.ended and task.output is None and task.attempts == 0


# typed errors ---------------------------------------------------------------------------------


def test_unknown_function_or_task_is_not_found(client: runq.Client) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.predict("nope", 1),
        lambda: client.submit("nope", 1),
        lambda: client.status("missing"),
        lambda: client.result("missing", wait=0.2),
        lambda: client.cancel("missing"),
        lambda: client.delete("missing"),
    ]
    for call in calls:
        with pytest.raises(runq.NotFound) as error:
            call()
        assert error.value.status_code == 404 and error.value.code == "not_found"
        assert error.value.details["attempts"] == 1


def test_invalid_input_is_validation_failed(client: runq.Client) -> None:
    with pytest.raises(runq.ValidationFailed) as error:
        client.predict("double", "not a number")
    assert error.value.status_code == 422
    assert error.value.details["problems"][0]["loc"] == ["body", "input"]
    with pytest.raises(runq.ValidationFailed, match="max_timeout_s"):
        client.predict("echo", 1, timeout=31)


def test_model_error_carries_the_task_id(client: runq.Client) -> None:
    with pytest.raises(runq.ModelError) as error:
        client.predict("fails", "boom", idempotency_key=unique("boom"))
    assert error.value.message == "ValueError: cannot digest 'boom'"
    assert error.value.idempotency_key is not None
    assert error.value.idempotency_key.startswith("boom-")
    assert error.value.task_id is not None
    task = client.result(error.value.task_id)
    assert task.status == "failed"
    assert task.error is not None and task.error["message"] == error.value.message


def test_predict_timeout_is_raised_at_once_not_retried(client: runq.Client) -> None:
    started = time.monotonic()
    with pytest.raises(runq.Timeout) as error:
        client.predict("sleepy", 1.2, timeout=0.5)
    assert time.monotonic() - started < 2
    assert error.value.status_code == 504
    assert error.value.details["attempts"] == 1
    assert "still running" in error.value.message
    assert client.status(error.value.details["task_id"]).function == "sleepy"


@pytest.mark.usefixtures("parked")
def test_idempotency_conflict_and_a_key_whose_record_vanished(
    client: runq.Client, redis: Redis
) -> None:
    key = unique("order")
    first = client.submit("parked", 1, idempotency_key=key)
    assert client.submit("parked", 1, idempotency_key=key).id == first.id
    with pytest.raises(runq.IdempotencyConflict) as conflict:
        client.submit("parked", 2, idempotency_key=key)
    assert isinstance(conflict.value, runq.ValidationFailed)
    assert "task_id" not in conflict.value.details
    # The key's task record vanished (expired, `rq empty`): the key runs the request anew.
    redis.delete(f"rq:job:{first.id}")
    again = client.submit("parked", 1, idempotency_key=key)
    assert again.id != first.id and again.status == "queued"
    assert queued(redis, "parked") == 2


def test_no_gateway_is_connection_failed_naming_the_attempts() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = runq.Client(url, retries=3, backoff_s=0.01)
    with client, pytest.raises(runq.ConnectionFailed) as error:
        client.status("any")
    assert isinstance(error.value, runq.Unavailable)
    assert error.value.details["attempts"] == 4
    assert "after 4 attempt(s)" in error.value.message
    assert isinstance(error.value.__cause__, httpx.ConnectError)

    started = time.monotonic()
    deadline = runq.Client(url, retries=1000, backoff_s=0.05, backoff_max_s=0.05, deadline_s=0.6)
    with deadline, pytest.raises(runq.ConnectionFailed) as error:
        deadline.submit("echo", 1)
    assert 0.6 - 0.05 - MIN_ATTEMPT_S <= time.monotonic() - started < 1.5
    assert error.value.details["attempts"] > 5


def test_a_call_that_fails_says_which_key_reaches_its_task() -> None:
    transport = Recording()
    url = f"http://127.0.0.1:{free_port()}"
    with runq.Client(url, retries=1, backoff_s=0.01, transport=transport) as client:
        with pytest.raises(runq.ConnectionFailed) as predicted:
            client.predict("echo", 1, idempotency_key="my-key")
        assert predicted.value.idempotency_key == "my-key"
        assert "idempotency_key='my-key'" in predicted.value.message
        with pytest.raises(runq.ConnectionFailed) as submitted:
            client.submit("echo", 1)
        # The key the client made for the call: every attempt sent it.
        assert submitted.value.idempotency_key == transport.keys()[-1] is not None
        with pytest.raises(runq.ConnectionFailed) as read:
            client.status("any")
        assert read.value.idempotency_key is None


# retries through a gateway that goes away ----------------------------------------------------


def in_background(
    call: Callable[[runq.Client], Any], **settings: Any
) -> tuple[threading.Thread, list[Any]]:
    """Runs ``call`` on a client of its own, in a thread; its result (or RunqError) lands in
    the list."""
    outcome: list[Any] = []

    def run() -> None:
        with runq.Client(**settings) as client:
            try:
                outcome.append(call(client))
            except runq.RunqError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.usefixtures("gateway")
def test_default_retries_ride_through_a_gateway_restart_within_the_deadline(
    own_gateway: OwnGateway,
) -> None:
    # Five retries once gave up 1.9 to 2.6 s into a 2.7 s restart, 30 s before predict's deadline.
    own_gateway.stop()
    transport = Recording()
    value = unique("default retries")
    thread, outcome = in_background(
        lambda client: client.predict("echo", value, timeout=20),
        base_url=own_gateway.url,
        transport=transport,
    )
    time.sleep(4)  # the gateway's outage, longer than five retries used to last
    assert not outcome, outcome
    own_gateway.start()
    thread.join(30)
    assert outcome == [value]
    assert len(transport.sent) >= 5


@pytest.mark.usefixtures("parked")
def test_submit_retries_through_a_gateway_restart_without_duplicates(
    own_gateway: OwnGateway, redis: Redis
) -> None:
    own_gateway.stop()
    transport = Recording()
    value = unique("restart")
    thread, outcome = in_background(
        lambda client: client.submit("parked", value),
        base_url=own_gateway.url,
        backoff_max_s=0.3,
        deadline_s=30,
        transport=transport,
    )
    time.sleep(1)
    assert not outcome  # still retrying: nothing listens
    own_gateway.start()
    thread.join(30)
    [task] = outcome
    assert isinstance(task, Task), task
    assert task.function == "parked" and task.status == "queued"
    assert queued(redis, "parked") == 1  # exactly one task, however many attempts
    keys = transport.keys()
    assert len(keys) >= 2 and len(set(keys)) == 1, keys
    # The key the client kept on every retry names the task it made.
    again = httpx.post(
        f"{own_gateway.url}/v1/functions/parked/tasks",
        json={"input": value},
        headers={"Idempotency-Key": str(keys[0])},
    )
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == task.id
    assert queued(redis, "parked") == 1


@pytest.mark.usefixtures("parked")
def test_predict_retries_through_a_gateway_crash_and_runs_once(
    own_gateway: OwnGateway, procs: Callable[..., Proc], redis: Redis
) -> None:
    transport = Recording()
    value = unique("crash")
    thread, outcome = in_background(
        lambda client: client.predict("parked", value, timeout=20),
        base_url=own_gateway.url,
        backoff_max_s=0.3,
        transport=transport,
    )
    wait_until(lambda: queued(redis, "parked") == 1, what="the predict's task to be queued")
    # The gateway dies while the predict waits: its answer is lost, its task is not.
    own_gateway.stop(signal.SIGKILL)
    time.sleep(0.5)
    own_gateway.start()
    wait_until(lambda: len(transport.sent) >= 3, what="the predict to be asked again")
    worker = start_worker(procs, redis, "parked")
    try:
        thread.join(30)
    finally:
        worker.stop()
    assert outcome == [value]
    assert [x.decode() for x in redis.lrange(RAN_KEY.format("parked"), 0, -1)] == [repr(value)]
    keys = transport.keys()
    assert len(set(keys)) == 1, keys


# retries through 503s -------------------------------------------------------------------------


def fill_capped(client: runq.Client) -> list[Task]:
    return [client.submit("capped", unique(f"filler-{i}")) for i in range(3)]


@pytest.mark.usefixtures("capped")
def test_queue_full_is_retried_until_the_deadline(
    client: runq.Client, gateway: str, redis: Redis
) -> None:
    fill_capped(client)
    # The gateway asks for 5 s (nothing drains capped); backoff_max_s caps each wait.
    hurried = runq.Client(gateway, retries=1000, backoff_s=0.1, backoff_max_s=0.2, deadline_s=1.5)
    started = time.monotonic()
    with hurried, pytest.raises(runq.QueueFull) as error:
        hurried.submit("capped", unique("refused"))
    elapsed = time.monotonic() - started
    assert 1.5 - 0.2 - MIN_ATTEMPT_S <= elapsed < 3
    assert error.value.details["attempts"] >= 6  # each wait was 0.2 s at most
    assert error.value.retry_after_s >= 1
    # Without a deadline, retries bound it.
    counted = runq.Client(gateway, retries=2, backoff_max_s=0.05)
    with counted, pytest.raises(runq.QueueFull) as error:
        counted.submit("capped", unique("refused"))
    assert error.value.details["attempts"] == 3
    assert queued(redis, "capped") == 3


@pytest.mark.usefixtures("capped")
def test_submit_gets_in_once_the_queue_has_room_without_duplicates(
    client: runq.Client, gateway: str, redis: Redis
) -> None:
    fillers = fill_capped(client)
    threading.Timer(0.7, client.delete, args=(fillers[0].id,)).start()
    transport = Recording()
    value = unique("patient")
    with runq.Client(
        gateway, backoff_max_s=0.2, retries=100, deadline_s=10, transport=transport
    ) as patient:
        task = patient.submit("capped", value)
    assert task.status == "queued"
    keys = transport.keys()
    assert len(keys) >= 2 and len(set(keys)) == 1, keys
    assert queued(redis, "capped") == 3  # two fillers and this one, once
    queue = {x.decode() for x in redis.lrange("rq:queue:runq.capped", 0, -1)}
    assert queue == {fillers[1].id, fillers[2].id, task.id}


# AsyncClient ----------------------------------------------------------------------------------


def test_async_predict_and_errors(gateway: str) -> None:
    async def main() -> None:
        async with runq.AsyncClient(gateway, timeout=10) as client:
            outputs = await asyncio.gather(*(client.predict("echo", i) for i in range(8)))
            assert outputs == list(range(8))
            task = await client.submit("double", 4)
            assert (await client.result(task.id, wait=10)).output == 8
            assert (await client.status(task.id)).status == "succeeded"
            with pytest.raises(runq.ModelError) as error:
                await client.predict("fails", "boom")
            assert (await client.result(error.value.details["task_id"])).status == "failed"
            with pytest.raises(runq.NotFound):
                await client.cancel("missing")
            await client.delete(task.id)
            with pytest.raises(runq.NotFound):
                await client.delete(task.id)

    asyncio.run(main())


@pytest.mark.usefixtures("parked")
def test_async_submit_retries_through_a_gateway_restart(
    own_gateway: OwnGateway, redis: Redis
) -> None:
    own_gateway.stop()
    transport = AsyncRecording()

    async def main() -> Task:
        async with runq.AsyncClient(
            own_gateway.url, backoff_max_s=0.3, deadline_s=30, transport=transport
        ) as client:
            pending = asyncio.create_task(client.submit("parked", unique("async restart")))
            await asyncio.sleep(1)
            assert not pending.done()
            await asyncio.to_thread(own_gateway.start)
            return await pending

    task = asyncio.run(main())
    assert task.status == "queued"
    assert queued(redis, "parked") == 1
    keys = transport.keys()
    assert len(keys) >= 2 and len(set(keys)) == 1, keys


# the retry policy, on a fake clock ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(clock: FakeClock, jitter: float = 1.0, **kwargs: Any) -> _Retry:
    settings: dict[str, Any] = {"retries": 5, "backoff_s": 0.2, "backoff_max_s": 10.0, **kwargs}
    return _Retry(**settings, clock=clock, wall_clock=lambda: 50_000.0, jitter=lambda: jitter)


def delays(attempts: _Attempts, clock: FakeClock, retry_after: str | None = None) -> list[float]:
    """Plays a call whose every attempt fails at once; the waits it would take."""
    taken = []
    while True:
        attempts.count += 1
        delay = attempts.next_delay(retry_after)
        if delay is None:
            return taken
        taken.append(delay)
        clock.now += delay


def test_backoff_doubles_up_to_its_cap_with_full_jitter() -> None:
    clock = FakeClock()
    assert delays(policy(clock, retries=8, backoff_max_s=5).start(None), clock) == [
        0.2,
        0.4,
        0.8,
        1.6,
        3.2,
        5,
        5,
        5,
    ]
    # Full jitter: uniform between 0 and the ceiling.
    assert delays(policy(clock, jitter=0.5).start(None), clock) == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert delays(policy(clock, jitter=0.0, retries=2).start(None), clock) == [0.0, 0.0]
    assert delays(policy(clock, retries=0).start(None), clock) == []
    assert policy(clock, retries=10_000).backoff(5000) == 10.0  # no overflow


def test_retry_after_is_honoured_capped_by_backoff_max_and_the_deadline() -> None:
    clock = FakeClock()
    retry = policy(clock, jitter=0.1, retries=3)
    assert delays(retry.start(None), clock, "3") == [3.0, 3.0, 3.0]
    assert delays(retry.start(None), clock, "30") == [10.0, 10.0, 10.0]
    # Backoff above the hint wins: a hint is a floor, never a reason to hurry.
    assert delays(policy(clock, retries=3).start(None), clock, "0") == [0.2, 0.4, 0.8]
    date = email.utils.formatdate(50_000.0 + 7, usegmt=True)
    assert retry.retry_after(date) == 7.0
    assert retry.retry_after("not a date") is None
    assert retry.retry_after("-4") == 0.0
    # A wait that would end past the deadline gives up at once: the last answer stands.
    started = clock.now
    assert delays(retry.start(deadline_s=8), clock, "3") == [3.0, 3.0]
    assert clock.now - started == 6.0
    assert delays(retry.start(deadline_s=2), clock, "5") == []


def test_a_429_waits_out_its_retry_after_within_the_deadline_and_401_403_are_not_retried() -> None:
    clock = FakeClock()
    with runq.Client("http://127.0.0.1:9") as client:
        client._retry = policy(clock, jitter=0.1)
        call = _Call("POST", "/v1/functions/echo/predict")
        attempts = client._retry.start(deadline_s=10)
        limited = httpx.Response(
            429,
            json={"error": {"code": "rate_limited", "message": "slow down"}},
            headers={"Retry-After": "3"},
        )
        assert client._after(call, attempts, limited) == 3.0
        clock.now += 7.5  # 2.5 s left: too little to wait 3 s and try again
        assert client._after(call, attempts, limited) is None
        assert _error(limited, attempts).status_code == 429
        for status, kind in ((401, runq.Unauthenticated), (403, runq.Forbidden)):
            refused = httpx.Response(status, json={"error": {"code": kind.code, "message": "no"}})
            assert client._after(call, client._retry.start(deadline_s=10), refused) is None
            assert type(_error(refused, attempts)) is kind


def test_a_deadline_bounds_the_whole_call() -> None:
    clock = FakeClock()
    retry = policy(clock, retries=1000, backoff_max_s=1.0)
    started = clock.now
    taken = delays(retry.start(deadline_s=10), clock)
    assert taken[:3] == [0.2, 0.4, 0.8] and set(taken[3:]) == {1.0}
    assert 10 - 1.0 - MIN_ATTEMPT_S <= clock.now - started <= 10 - MIN_ATTEMPT_S


def test_without_a_retry_count_a_call_is_tried_until_its_deadline() -> None:
    clock = FakeClock()
    retry = policy(clock, retries=None)
    started = clock.now
    taken = delays(retry.start(deadline_s=35), clock)
    assert taken[:5] == [0.2, 0.4, 0.8, 1.6, 3.2]
    assert 35 - 10.0 - MIN_ATTEMPT_S <= clock.now - started <= 35 - MIN_ATTEMPT_S


def test_long_polls_keep_within_the_deadline() -> None:
    clock = FakeClock()
    attempts = policy(clock).start(deadline_s=30 + ANSWER_MARGIN_S)
    assert attempts.wait_s(30) == 30
    assert attempts.timeout(10, 30).read == 30 + ANSWER_MARGIN_S
    clock.now += 12
    assert attempts.wait_s(30) == 18  # the retry waits what is left of the caller's 30 s
    assert attempts.timeout(10, 18) == httpx.Timeout(10, read=23)
    clock.now += 21
    assert attempts.wait_s(30) == 1  # 2 s left: half for the wait, half for the answer
    assert attempts.timeout(10, None) == httpx.Timeout(2)
    no_deadline = policy(clock).start(None)
    assert no_deadline.wait_s(30) == 30
    assert no_deadline.timeout(10, None) == httpx.Timeout(10)


def test_answers_without_runq_bodies_still_map_to_typed_errors() -> None:
    attempts = policy(FakeClock()).start(None)
    attempts.count = 2
    proxy = httpx.Response(502, text="<html>bad gateway</html>", headers={"Retry-After": "4"})
    error = _error(proxy, attempts)
    assert type(error) is runq.Unavailable and error.retry_after_s == 4
    assert error.details == {"attempts": 2} and "bad gateway" in error.message
    # A proxy's own 401 (its code is none of runq's) is still the typed 401.
    denied = _error(
        httpx.Response(401, json={"error": {"code": "unauthorized", "message": "no"}}), attempts
    )
    assert type(denied) is runq.Unauthenticated
    assert (denied.status_code, denied.message) == (401, "no")
    odd = _error(httpx.Response(418, json={"error": {"code": "teapot", "message": "no"}}), attempts)
    assert type(odd) is runq.RunqError
    assert (odd.status_code, odd.code, odd.message) == (418, "teapot", "no")
    full = httpx.Response(
        503, json={"error": {"code": "queue_full", "message": "full"}}, headers={"Retry-After": "5"}
    )
    assert isinstance(_error(full, attempts), runq.QueueFull)


def test_a_lost_answer_to_cancel_or_delete_is_not_an_error_on_retry() -> None:
    attempts = policy(FakeClock()).start(None)
    task = {"id": "t", "function": "f", "priority": "normal", "status": "canceled"}
    ended = httpx.Response(
        409, json={"error": {"code": "conflict", "message": "ended", "task": task}}
    )
    missing = httpx.Response(404, json={"error": {"code": "not_found", "message": "no task t"}})
    # Answered at the first try: the caller hears it.
    with pytest.raises(runq.Conflict):
        _canceled(ended, attempts)
    with pytest.raises(runq.NotFound):
        _deleted(missing, attempts)
    # After an attempt whose answer was lost, it is what that attempt did.
    attempts.maybe_done = True
    assert _canceled(ended, attempts) == Task("t", "f", "normal", "canceled")
    assert _deleted(missing, attempts) is None
    succeeded = {**task, "status": "succeeded"}
    done = httpx.Response(
        409, json={"error": {"code": "conflict", "message": "x", "task": succeeded}}
    )
    with pytest.raises(runq.Conflict):
        _canceled(done, attempts)
