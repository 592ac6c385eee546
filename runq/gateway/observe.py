"""Per-request metrics and the request log line, as pure ASGI middleware.

Only the routes of served functions and of tasks are measured, labelled by function and
endpoint; any other path (docs, health, a 404 for an unknown function) is passed through
unmeasured, so no caller can mint label values. Routes add what only they know (the task id,
the function of a task route, why a request was refused) to the request's ``notes``.

Every request has an id, the caller's ``X-Request-ID`` if it is a plausible one, else one made
here; it is echoed in the answer's ``X-Request-ID`` and written on the request's log lines, so
a caller's report and the gateway's log meet.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass

from prometheus_client import Gauge, Histogram
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runq.metrics import metrics
from runq.queue import constants

logger = logging.getLogger("runq.access")

# Where a request's notes live in its ASGI scope's state.
_NOTES = "runq_notes"

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is taken as it is only if it cannot forge or flood a log line: short, and of
# the characters ids (UUIDs, trace ids, ...) are made of.
_PLAUSIBLE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


@dataclass
class RequestNotes:
    """What the headers and the route tell of a request, for its log lines and metrics."""

    request_id: str = ""
    task_id: str | None = None
    # A task route's function, known once the task has been read.
    function: str | None = None
    # Why it was refused before anything was enqueued (an error code).
    rejection: str | None = None
    # The caller's tenant once its API key is verified (auth: keys).
    tenant: str | None = None


def notes(request: Request) -> RequestNotes:
    """The request's notes (set by RequestMetrics on every HTTP request)."""
    state = request.scope.setdefault("state", {})
    found: RequestNotes = state.setdefault(_NOTES, RequestNotes())
    return found


def classify(method: str, path: str, functions: Collection[str]) -> tuple[str, str] | None:
    """(function, endpoint) of a measured route; None for any other request."""
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["v1", "functions"] and parts[2] in functions:
        if method == "POST" and parts[3] == "predict":
            return parts[2], "predict"
        if method == "POST" and parts[3] == "tasks":
            return parts[2], "submit"
    if (
        method == "GET"
        and len(parts) == 4
        and parts[:2] == ["v1", "tasks"]
        and parts[3] in ("result", "stream")
    ):
        # The function is known once the route has read the task.
        return "", parts[3]
    return None


class RequestMetrics:
    def __init__(self, app: ASGIApp, functions: Collection[str]) -> None:
        self.app = app
        self.functions = frozenset(functions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        noted = RequestNotes(request_id.decode())
        scope.setdefault("state", {})[_NOTES] = noted
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        route = classify(scope["method"], scope["path"], self.functions)
        if route is None:
            await self.app(scope, receive, observed_send)
            return
        function, endpoint = route
        started = time.perf_counter()

        in_progress = _in_progress(function, endpoint)
        in_progress.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            in_progress.dec()
            function = function or noted.function or ""
            _observe(scope, noted, function, endpoint, status, time.perf_counter() - started)


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _PLAUSIBLE_ID.fullmatch(value):
                return bytes(value)
            break
    return secrets.token_hex(16).encode()


# A metric's child per label values, looked up once: prometheus-client's labels() takes a lock
# and checks its arguments on every call, a measurable part of a noop predict. The values are
# bounded (served functions, endpoints, statuses), and so are these caches.
@functools.lru_cache(maxsize=1024)
def _in_progress(function: str, endpoint: str) -> Gauge:
    return metrics().requests_in_progress.labels(function, endpoint)


@functools.lru_cache(maxsize=1024)
def _duration(function: str, endpoint: str, status: int, tenant: str | None) -> Histogram:
    labels = (function, endpoint, str(status))
    return metrics().request_duration.labels(*labels, *_tenant_label(tenant))


def _tenant_label(tenant: str | None) -> tuple[str, ...]:
    """The tenant label's value when metrics carry one (metrics_tenant_label): the caller's
    tenant, the default one with auth off (None), empty for a caller without a valid key."""
    if not metrics().tenant_label:
        return ()
    return (constants.DEFAULT_TENANT if tenant is None else tenant,)


def _observe(
    scope: Scope,
    noted: RequestNotes,
    function: str,
    endpoint: str,
    status: int,
    elapsed_s: float,
) -> None:
    if noted.rejection is not None:
        metrics().rejections.labels(function, noted.rejection, *_tenant_label(noted.tenant)).inc()
    _duration(function, endpoint, status, noted.tenant).observe(elapsed_s)
    task_id = noted.task_id
    logger.info(
        "%s %s %d %.1f ms%s request %s",
        scope["method"],
        scope["path"],
        status,
        elapsed_s * 1000,
        f" task {task_id}" if task_id else "",
        noted.request_id,
        extra={
            "method": scope["method"],
            "path": scope["path"],
            "request_id": noted.request_id,
            "function": function,
            "endpoint": endpoint,
            "status": status,
            "duration_ms": round(elapsed_s * 1000, 3),
            "task_id": task_id,
            "tenant": noted.tenant,
        },
    )
