"""Python clients for the HTTP API that survive a bad network.

``Client`` and ``AsyncClient`` share everything but the I/O: the retry policy (exponential
backoff with full jitter, ``Retry-After`` honoured, an overall deadline), request building and
response decoding live here once; each class only sends and sleeps. Every call is safe to
repeat: submit and predict carry one ``Idempotency-Key`` per logical call, reused on each retry,
so a retried submit never makes a second task.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, ServerSentEvent

from runq.errors import (
    Conflict,
    ConnectionFailed,
    RetryLater,
    RunqError,
    Timeout,
    Unavailable,
    error_classes,
)

Priority = Literal["high", "normal", "low"]
TaskStatusName = Literal["queued", "running", "succeeded", "failed", "timed_out", "canceled"]

# A long-poll (predict, result?wait=) may hold its answer this long past its wait: the gateway
# withdraws or reads the task, then answers. Also predict's default deadline beyond its timeout.
ANSWER_MARGIN_S = 5.0
# The least time worth starting an attempt with; closer to the deadline the last error stands.
MIN_ATTEMPT_S = 0.1
TERMINAL = frozenset({"succeeded", "failed", "canceled", "timed_out"})
# Answers worth asking again: overload, a gateway restarting or a proxy's failed hop.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT_STREAM = "text/event-stream"
# Transport failures that may pass; a malformed URL or an unsupported scheme will not.
TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# ... and those where the request surely never reached the gateway.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# A purge takes only the queued tasks.
_QUEUED = {"status": "queued"}

# The most general class of each code: a base that only groups others (RetryLater) keeps
# RunqError's "internal" and must not take its place.
_BY_CODE: dict[str, type[RunqError]] = {cls.code: cls for cls in reversed(list(error_classes()))}
# For answers without runq's error body (a proxy in between): the most general class of each
# status, and a proxy's failed hop read as the gateway being unavailable.
_BY_STATUS: dict[int, type[RunqError]] = {
    **{cls.status_code: cls for cls in reversed(list(error_classes()))},
    502: Unavailable,
}


@dataclass(frozen=True)
class Task:
    """A task as the gateway answers it; ``output`` or ``error`` once it has ended."""

    id: str
    function: str
    priority: str
    status: str
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    # Whose task it is (the API key's tenant); None from a gateway that predates tenants.
    tenant: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        """Keys this version does not know are left out, so newer gateways still decode."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class TaskPage:
    """A page of a function's tasks; pass ``next_cursor`` as ``cursor`` for the next one (None:
    this was the last)."""

    tasks: list[Task]
    next_cursor: str | None


# retry policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Retry:
    """When to try again and how long to wait first; clocks and jitter are injectable."""

    # None: as many as the call's deadline allows.
    retries: int | None
    backoff_s: float
    backoff_max_s: float
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    jitter: Callable[[], float] = random.random

    def start(self, deadline_s: float | None) -> _Attempts:
        now = self.clock()
        return _Attempts(self, now, None if deadline_s is None else now + deadline_s)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform below min(backoff_max_s, backoff_s * 2**(attempt - 1))."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2.0 ** min(attempt - 1, 62))
        return self.jitter() * ceiling

    def retry_after(self, value: str | None) -> float | None:
        """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - self.wall_clock())


@dataclass
class _Attempts:
    """One logical call's attempts so far, against its deadline."""

    policy: _Retry
    started: float
    deadline: float | None
    count: int = 0
    # An attempt failed after its request may have reached the gateway.
    maybe_done: bool = False
    # What names the call's task, for every error it raises: the caller can reach that task.
    idempotency_key: str | None = None

    def elapsed(self) -> float:
        return self.policy.clock() - self.started

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.policy.clock()

    def next_delay(self, retry_after: str | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None: give up, the last outcome stands.

        Full-jitter backoff, at least ``Retry-After`` when given, capped by backoff_max_s; a wait
        that would leave no time before the deadline gives up at once instead.
        """
        retries = self.policy.retries
        if retries is not None and self.count > retries:
            return None
        delay = self.policy.backoff(self.count)
        hint = self.policy.retry_after(retry_after)
        if hint is not None:
            delay = max(delay, hint)
        delay = min(delay, self.policy.backoff_max_s)
        remaining = self.remaining()
        if remaining is not None and delay + MIN_ATTEMPT_S > remaining:
            return None
        return delay

    def wait_s(self, wait_s: float) -> float:
        """A long-poll's wait for this attempt: what is left of it, its answer's margin kept."""
        remaining = self.remaining()
        if remaining is None:
            return wait_s
        return round(max(min(wait_s, remaining - min(ANSWER_MARGIN_S, remaining / 2)), 0.001), 3)

    def timeout(self, base_s: float, wait_s: float | None) -> httpx.Timeout:
        read_s = base_s if wait_s is None else wait_s + ANSWER_MARGIN_S
        remaining = self.remaining()
        if remaining is None:
            return httpx.Timeout(base_s, read=read_s)
        cap = max(remaining, MIN_ATTEMPT_S)
        return httpx.Timeout(min(base_s, cap), read=min(read_s, cap))


# requests and answers, shared by both clients --------------------------------------------------


@dataclass
class _Call:
    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # A long-poll: the query parameter that holds the wait, and the wait asked for.
    wait_param: str | None = None
    wait_s: float | None = None
    # Query parameters; those set to None are left out.
    params: dict[str, Any] = field(default_factory=dict)


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def _key_header(idempotency_key: str | None) -> dict[str, str]:
    # One key per logical call: every retry of it names the same task.
    return {IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())}


def _body(input: Any, **optional: Any) -> dict[str, Any]:
    return {"input": input, **{k: v for k, v in optional.items() if v is not None}}


def _code(response: httpx.Response) -> str | None:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _retryable(response: httpx.Response) -> bool:
    if response.status_code < 400:
        return False
    if response.status_code == 504 and _code(response) == Timeout.code:
        # runq's own 504: the wait the caller asked for is over; asking again would extend it.
        return False
    return response.status_code in RETRY_STATUSES or "retry-after" in response.headers


def _error(response: httpx.Response, attempts: _Attempts) -> RunqError:
    """The typed error for a gateway's ``{"error": {"code", "message", ...}}`` answer."""
    status = response.status_code
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
        details = {k: v for k, v in body.items() if k not in ("code", "message")}
    except (ValueError, KeyError, TypeError):
        code, message, details = "", f"HTTP {status}: {response.text[:200]}", {}
    details["attempts"] = attempts.count
    if attempts.idempotency_key is not None:
        details["idempotency_key"] = attempts.idempotency_key
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, RunqError)
    error: RunqError
    if issubclass(cls, RetryLater):
        hint = attempts.policy.retry_after(response.headers.get("retry-after"))
        error = cls(message, retry_after_s=1 if hint is None else round(hint), **details)
    else:
        error = cls(message, **details)
    if cls is RunqError:
        error.status_code, error.code = status, code or f"http_{status}"
    return error


def _task(response: httpx.Response, attempts: _Attempts, *ok: int) -> Task:
    if response.status_code not in ok:
        raise _error(response, attempts)
    try:
        return Task.from_json(response.json())
    except (ValueError, TypeError, AttributeError) as exc:
        raise RunqError(f"not a task: HTTP {response.status_code} {response.text[:200]}") from exc


def _canceled(response: httpx.Response, attempts: _Attempts) -> Task:
    if response.status_code == 200:
        return _task(response, attempts, 200)
    error = _error(response, attempts)
    task = error.details.get("task", {})
    canceled = isinstance(task, dict) and task.get("status") == "canceled"
    if isinstance(error, Conflict) and canceled and attempts.maybe_done:
        # An earlier attempt canceled it and its answer was lost on the way back.
        return Task.from_json(task)
    raise error


def _retried(response: httpx.Response, attempts: _Attempts) -> Task:
    if response.status_code == 202:
        return _task(response, attempts, 202)
    error = _error(response, attempts)
    task = error.details.get("task", {})
    again = isinstance(task, dict) and task.get("status") in ("queued", "running")
    if isinstance(error, Conflict) and again and attempts.maybe_done:
        # An earlier attempt queued it again and its answer was lost on the way back.
        return Task.from_json(task)
    raise error


def _page(response: httpx.Response, attempts: _Attempts) -> TaskPage:
    if response.status_code != 200:
        raise _error(response, attempts)
    try:
        body = response.json()
        return TaskPage([Task.from_json(t) for t in body["tasks"]], body["next_cursor"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunqError(f"not a page of tasks: HTTP 200 {response.text[:200]}") from exc


def _purged(response: httpx.Response, attempts: _Attempts) -> int:
    if response.status_code != 200:
        raise _error(response, attempts)
    try:
        return int(response.json()["purged"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunqError(f"not a purge's answer: HTTP 200 {response.text[:200]}") from exc


def _deleted(response: httpx.Response, attempts: _Attempts) -> None:
    if response.status_code == 204 or (response.status_code == 404 and attempts.maybe_done):
        return
    raise _error(response, attempts)


def _output(response: httpx.Response, attempts: _Attempts) -> Any:
    return _task(response, attempts, 200).output


def _given_up(call: _Call, attempts: _Attempts, exc: httpx.TransportError) -> ConnectionFailed:
    message = (
        f"{call.method} {call.path}: no answer after {attempts.count} attempt(s) in "
        f"{attempts.elapsed():.1f} s; last: {type(exc).__name__}: {str(exc) or 'no detail'}"
    )
    if attempts.idempotency_key is None:
        return ConnectionFailed(message, attempts=attempts.count)
    return ConnectionFailed(
        f"{message}; call again with idempotency_key={attempts.idempotency_key!r} to reach the "
        "task it may have made",
        attempts=attempts.count,
        idempotency_key=attempts.idempotency_key,
    )


# streams -----------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """One stream call across its connections: the task it reads, the last chunk it gave."""

    function: str
    attempts: _Attempts
    task_id: str | None = None
    last: int = -1
    ended: bool = False

    def call(self, predict: _Call) -> _Call:
        if self.task_id is None:
            return predict
        headers = {"Accept": EVENT_STREAM, "Last-Event-ID": str(self.last)}
        # Resuming: the task's own stream, after the last chunk given (none: from the start).
        if self.last < 0:
            del headers["Last-Event-ID"]
        return _Call("GET", _path("v1", "tasks", self.task_id, "stream"), headers=headers)

    def opened(self, response: httpx.Response) -> None:
        location = response.headers.get("location", "")
        if self.task_id is None and location.endswith("/stream"):
            self.task_id = location.rsplit("/", 2)[-2]

    def chunk(self, event: ServerSentEvent) -> tuple[bool, Any]:
        """(whether to give it, the chunk) for a chunk event; raises for an error event."""
        if event.event == "chunk":
            index = int(event.id or "-1")
            if index <= self.last:
                return False, None
            self.last = index
            return True, json.loads(event.data)
        if event.event == "end":
            self.ended = True
        elif event.event == "error":
            error = _event_error(json.loads(event.data), self.attempts)
            # The gateway lost Redis mid-stream: the stream is read again, the task goes on.
            self.ended = not isinstance(error, Unavailable)
            raise error
        return False, None


def _event_error(body: Any, attempts: _Attempts) -> RunqError:
    """The typed error of a stream's error event (the body an answer would have had)."""
    try:
        error = dict(body["error"])
        code, message = str(error.pop("code")), str(error.pop("message"))
    except (KeyError, TypeError, ValueError):
        return RunqError(f"not an error event: {str(body)[:200]}")
    error["attempts"] = attempts.count
    if attempts.idempotency_key is not None:
        error["idempotency_key"] = attempts.idempotency_key
    cls = _BY_CODE.get(code, RunqError)
    return cls(message, **error)


class _Base:
    """What both clients share: settings, the retry policy, and each call's request."""

    def __init__(
        self,
        timeout: float,
        retries: int | None,
        backoff_s: float,
        backoff_max_s: float,
        deadline_s: float | None,
    ) -> None:
        self.timeout = timeout
        self.deadline_s = deadline_s
        self._retry = _Retry(retries, backoff_s, backoff_max_s)

    @staticmethod
    def _headers(api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _request(
        self, http: httpx.Client | httpx.AsyncClient, call: _Call, attempts: _Attempts
    ) -> httpx.Request:
        attempts.count += 1
        wait_s = None if call.wait_s is None else attempts.wait_s(call.wait_s)
        params = {k: v for k, v in call.params.items() if v is not None}
        if call.wait_param and wait_s is not None:
            params[call.wait_param] = wait_s
        return http.build_request(
            call.method,
            call.path,
            json=call.body,
            params=params or None,
            headers=call.headers,
            timeout=attempts.timeout(self.timeout, wait_s),
        )

    def _start(self, call: _Call) -> _Attempts:
        deadline_s = self.deadline_s
        if deadline_s is None:
            # Every call ends: a long-poll after its wait and the answer's margin, any other
            # call after the client's timeout, however many attempts that takes.
            deadline_s = self.timeout if call.wait_s is None else call.wait_s + ANSWER_MARGIN_S
        attempts = self._retry.start(deadline_s)
        attempts.idempotency_key = call.headers.get(IDEMPOTENCY_HEADER)
        return attempts

    def _after(
        self, call: _Call, attempts: _Attempts, outcome: httpx.Response | httpx.TransportError
    ) -> float | None:
        """Seconds to wait before trying again; None when ``outcome`` is the call's answer."""
        if isinstance(outcome, httpx.Response):
            return (
                attempts.next_delay(outcome.headers.get("retry-after"))
                if _retryable(outcome)
                else None
            )
        if not isinstance(outcome, NOT_SENT):
            attempts.maybe_done = True
        delay = attempts.next_delay() if isinstance(outcome, TRANSIENT) else None
        if delay is None:
            raise _given_up(call, attempts, outcome) from outcome
        return delay

    def _predict(
        self,
        function: str,
        input: Any,
        timeout: float | None,
        priority: Priority | None,
        idempotency_key: str | None,
    ) -> _Call:
        wait_s = self.timeout if timeout is None else timeout
        return _Call(
            "POST",
            _path("v1", "functions", function, "predict"),
            _body(input, priority=priority),
            _key_header(idempotency_key),
            wait_param="timeout",
            wait_s=wait_s,
        )

    def _submit(
        self,
        function: str,
        input: Any,
        priority: Priority | None,
        timeout_s: float | None,
        ttl_s: float | None,
        webhook: str | None,
        idempotency_key: str | None,
    ) -> _Call:
        body = _body(input, priority=priority, timeout_s=timeout_s, ttl_s=ttl_s, webhook=webhook)
        return _Call(
            "POST",
            _path("v1", "functions", function, "tasks"),
            body,
            _key_header(idempotency_key),
        )

    def _stream_call(
        self,
        function: str,
        input: Any,
        timeout: float | None,
        priority: Priority | None,
        idempotency_key: str | None,
    ) -> tuple[_Call, _Stream]:
        call = self._predict(function, input, timeout, priority, idempotency_key)
        call.headers["Accept"] = EVENT_STREAM
        # A dropped connection must not cancel the task: the stream is read again from it.
        call.params["on_disconnect"] = "continue"
        return call, _Stream(function, self._start(call))

    def _stream_retry(self, state: _Stream, call: _Call, exc: Exception) -> float:
        """Seconds before reading the stream again after it broke; raises when it may not."""
        if isinstance(exc, httpx.TransportError):
            # A predict sent again carries its Idempotency-Key: it reaches the same task.
            delay = self._after(call, state.attempts, exc)
            assert delay is not None
            return delay
        delay = state.attempts.next_delay()
        if delay is None:
            raise exc
        return delay

    @staticmethod
    def _status(task_id: str) -> _Call:
        return _Call("GET", _path("v1", "tasks", task_id))

    @staticmethod
    def _result(task_id: str, wait: float) -> _Call:
        return _Call(
            "GET",
            _path("v1", "tasks", task_id, "result"),
            wait_param="wait" if wait > 0 else None,
            wait_s=wait if wait > 0 else None,
        )

    @staticmethod
    def _cancel(task_id: str) -> _Call:
        return _Call("POST", _path("v1", "tasks", task_id, "cancel"))

    @staticmethod
    def _delete(task_id: str) -> _Call:
        return _Call("DELETE", _path("v1", "tasks", task_id))

    @staticmethod
    def _tasks(
        function: str,
        status: TaskStatusName | None,
        tenant: str | None,
        cursor: str | None,
        limit: int | None,
    ) -> _Call:
        params = {"status": status, "tenant": tenant, "cursor": cursor, "limit": limit}
        return _Call("GET", _path("v1", "functions", function, "tasks"), params=params)

    @staticmethod
    def _retry_call(task_id: str) -> _Call:
        return _Call("POST", _path("v1", "tasks", task_id, "retry"))

    @staticmethod
    def _purge(function: str) -> _Call:
        return _Call("DELETE", _path("v1", "functions", function, "tasks"), params=_QUEUED)


# the clients -----------------------------------------------------------------------------------


class Client(_Base):
    """A blocking client: ``with runq.Client(url) as client: client.predict("embed", "hi")``.

    ``timeout`` is each request's HTTP timeout and predict's default wait; the backoff bounds
    how fast a call is tried again and ``retries``, when given, how often; ``deadline_s`` bounds
    a whole call across its retries (unset: a long-poll's wait plus a margin, else ``timeout``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int | None = None,
        backoff_s: float = 0.2,
        backoff_max_s: float = 10.0,
        deadline_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(timeout, retries, backoff_s, backoff_max_s, deadline_s)
        self._http = httpx.Client(
            base_url=base_url, headers=self._headers(api_key), transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> tuple[httpx.Response, _Attempts]:
        attempts = self._start(call)
        while True:
            request = self._request(self._http, call, attempts)
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.send(request)
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._after(call, attempts, outcome)
            if delay is None:
                assert isinstance(outcome, httpx.Response)
                return outcome, attempts
            time.sleep(delay)

    def predict(
        self,
        function: str,
        input: Any,
        *,
        timeout: float | None = None,
        priority: Priority | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Runs ``function`` on ``input`` and returns its output; raises the typed error else."""
        return _output(
            *self._send(self._predict(function, input, timeout, priority, idempotency_key))
        )

    def submit(
        self,
        function: str,
        input: Any,
        *,
        priority: Priority | None = None,
        timeout_s: float | None = None,
        ttl_s: float | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        call = self._submit(function, input, priority, timeout_s, ttl_s, webhook, idempotency_key)
        return _task(*self._send(call), 202)

    def stream(
        self,
        function: str,
        input: Any,
        *,
        timeout: float | None = None,
        priority: Priority | None = None,
        idempotency_key: str | None = None,
    ) -> Iterator[Any]:
        """Runs a streaming ``function`` on ``input`` and yields its chunks as they come.

        A dropped connection is read again from the task's stream after the last chunk given
        (Last-Event-ID), so no chunk is given twice or missed; ``timeout`` bounds the whole
        stream. Leaving the loop early cancels the task.
        """
        predict, state = self._stream_call(function, input, timeout, priority, idempotency_key)
        try:
            while not state.ended:
                call = state.call(predict)
                request = self._request(self._http, call, state.attempts)
                try:
                    yield from self._stream_once(request, state, call)
                except (httpx.TransportError, Unavailable) as exc:
                    time.sleep(self._stream_retry(state, call, exc))
        finally:
            if not state.ended and state.task_id is not None:
                with contextlib.suppress(RunqError):
                    self.cancel(state.task_id)

    def _stream_once(self, request: httpx.Request, state: _Stream, call: _Call) -> Iterator[Any]:
        response = self._http.send(request, stream=True)
        try:
            if response.status_code != 200:
                response.read()
                delay = self._after(call, state.attempts, response)
                if delay is None:
                    raise _error(response, state.attempts)
                time.sleep(delay)
                return
            state.opened(response)
            for event in EventSource(response).iter_sse():
                give, chunk = state.chunk(event)
                if give:
                    yield chunk
                if state.ended:
                    return
        finally:
            response.close()
        if not state.ended:
            raise httpx.RemoteProtocolError("the stream ended before its end event")

    def status(self, task_id: str) -> Task:
        return _task(*self._send(self._status(task_id)), 200)

    def result(self, task_id: str, wait: float = 0) -> Task:
        """The task with its output or error once ended; the pending task after ``wait`` s."""
        return _task(*self._send(self._result(task_id, wait)), 200, 202)

    def cancel(self, task_id: str) -> Task:
        return _canceled(*self._send(self._cancel(task_id)))

    def delete(self, task_id: str) -> None:
        _deleted(*self._send(self._delete(task_id)))

    def tasks(
        self,
        function: str,
        *,
        status: TaskStatusName | None = None,
        tenant: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> TaskPage:
        """A page of the function's tasks (without outputs): queued, running, then ended."""
        return _page(*self._send(self._tasks(function, status, tenant, cursor, limit)))

    def retry(self, task_id: str) -> Task:
        """Runs a failed, timed-out or canceled task again; returns it queued."""
        return _retried(*self._send(self._retry_call(task_id)))

    def purge(self, function: str) -> int:
        """Cancels every task queued for ``function`` (an admin's call); returns how many."""
        return _purged(*self._send(self._purge(function)))


class AsyncClient(_Base):
    """``Client`` for asyncio: the same calls, awaited."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int | None = None,
        backoff_s: float = 0.2,
        backoff_max_s: float = 10.0,
        deadline_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(timeout, retries, backoff_s, backoff_max_s, deadline_s)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=self._headers(api_key), transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> tuple[httpx.Response, _Attempts]:
        attempts = self._start(call)
        while True:
            request = self._request(self._http, call, attempts)
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.send(request)
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._after(call, attempts, outcome)
            if delay is None:
                assert isinstance(outcome, httpx.Response)
                return outcome, attempts
            await asyncio.sleep(delay)

    async def predict(
        self,
        function: str,
        input: Any,
        *,
        # The gateway's wait for the output, as in Client.predict; not a local cancel scope.
        timeout: float | None = None,  # noqa: ASYNC109
        priority: Priority | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        call = self._predict(function, input, timeout, priority, idempotency_key)
        return _output(*await self._send(call))

    async def submit(
        self,
        function: str,
        input: Any,
        *,
        priority: Priority | None = None,
        timeout_s: float | None = None,
        ttl_s: float | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        call = self._submit(function, input, priority, timeout_s, ttl_s, webhook, idempotency_key)
        return _task(*await self._send(call), 202)

    async def stream(
        self,
        function: str,
        input: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        priority: Priority | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[Any]:
        """``Client.stream``, iterated with ``async for``."""
        predict, state = self._stream_call(function, input, timeout, priority, idempotency_key)
        try:
            while not state.ended:
                call = state.call(predict)
                request = self._request(self._http, call, state.attempts)
                try:
                    async for chunk in self._stream_once(request, state, call):
                        yield chunk
                except (httpx.TransportError, Unavailable) as exc:
                    await asyncio.sleep(self._stream_retry(state, call, exc))
        finally:
            if not state.ended and state.task_id is not None:
                with contextlib.suppress(RunqError):
                    await self.cancel(state.task_id)

    async def _stream_once(
        self, request: httpx.Request, state: _Stream, call: _Call
    ) -> AsyncIterator[Any]:
        async with contextlib.aclosing(await self._http.send(request, stream=True)) as response:
            if response.status_code != 200:
                await response.aread()
                delay = self._after(call, state.attempts, response)
                if delay is None:
                    raise _error(response, state.attempts)
                await asyncio.sleep(delay)
                return
            state.opened(response)
            async for event in EventSource(response).aiter_sse():
                give, chunk = state.chunk(event)
                if give:
                    yield chunk
                if state.ended:
                    return
        if not state.ended:
            raise httpx.RemoteProtocolError("the stream ended before its end event")

    async def status(self, task_id: str) -> Task:
        return _task(*await self._send(self._status(task_id)), 200)

    async def result(self, task_id: str, wait: float = 0) -> Task:
        return _task(*await self._send(self._result(task_id, wait)), 200, 202)

    async def cancel(self, task_id: str) -> Task:
        return _canceled(*await self._send(self._cancel(task_id)))

    async def delete(self, task_id: str) -> None:
        _deleted(*await self._send(self._delete(task_id)))

    async def tasks(
        self,
        function: str,
        *,
        status: TaskStatusName | None = None,
        tenant: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> TaskPage:
        call = self._tasks(function, status, tenant, cursor, limit)
        return _page(*await self._send(call))

    async def retry(self, task_id: str) -> Task:
        return _retried(*await self._send(self._retry_call(task_id)))

    async def purge(self, function: str) -> int:
        return _purged(*await self._send(self._purge(function)))
