"""The one place errors become HTTP answers: always ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from runq.errors import (
    BadRequest,
    Conflict,
    ErrorCode,
    InvalidOutput,
    ModelError,
    Overloaded,
    QueueFull,
    RunqError,
    Timeout,
    TooManyRequests,
    Unavailable,
    ValidationFailed,
    WorkerLost,
)
from runq.gateway.observe import notes
from runq.queue.tasks import TaskStatus

logger = logging.getLogger("runq.gateway")


# How a failed task's predict answers, by its error code; any other code is a model_error.
_FAILURES: dict[str | None, type[RunqError]] = {
    ErrorCode.WORKER_LOST: WorkerLost,
    ErrorCode.INVALID_OUTPUT: InvalidOutput,
}


def ended_error(task: dict[str, Any]) -> RunqError:
    """What predict answers for a task that ended without an output (failed, timed out,
    canceled): a predict's error body, or a stream's last event."""
    task_id = task["id"]
    error = task.get("error") or {}
    status = task["status"]
    if status == TaskStatus.FAILED:
        failed = _FAILURES.get(error.get("code"), ModelError)
        return failed(error.get("message", "the function failed"), task_id=task_id)
    if status == TaskStatus.TIMED_OUT:
        return Timeout(error.get("message", "the task timed out"), task_id=task_id)
    return Conflict(error.get("message", f"task {task_id} was canceled"), task_id=task_id)


def error_response(error: RunqError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers)


async def _runq_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RunqError)
    task_id = exc.details.get("task_id")
    if task_id is not None:
        notes(request).task_id = str(task_id)
    if isinstance(exc, QueueFull | Overloaded | TooManyRequests):
        # Shedding load, or a caller over its quota, is the gateway working as configured:
        # counted, and not logged beyond the request's own line, which would cost most when the
        # gateway is busiest.
        notes(request).rejection = exc.code
    elif exc.status_code >= 500:
        logger.warning("%s: %s", exc.code, exc.message, extra=_logged(request))
    return error_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    malformed = [e for e in errors if e.get("type") == "json_invalid"]
    if malformed:
        detail = malformed[0].get("ctx", {}).get("error", "not valid JSON")
        return error_response(BadRequest(f"malformed JSON body: {detail}"))
    problems = [
        {"loc": [str(p) for p in e.get("loc", ())], "message": e.get("msg", "")} for e in errors
    ]
    message = "; ".join(f"{'.'.join(p['loc'])}: {p['message']}" for p in problems)
    return error_response(ValidationFailed(message, problems=problems))


# Starlette's own answers (no route for a path or a method), in runq's vocabulary.
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    fallback = ErrorCode.BAD_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL
    return JSONResponse(
        {"error": {"code": _HTTP_CODES.get(exc.status_code, fallback), "message": str(exc.detail)}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    # Redis down or restarting is an outage the caller should retry, not a bug in runq.
    logger.warning("queue store unreachable: %s", exc, extra=_logged(request))
    return error_response(Unavailable("the queue store is unreachable; retry shortly"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The log keeps the traceback; the body never does.
    logger.error("unhandled error", exc_info=exc, extra=_logged(request))
    return JSONResponse(
        {"error": {"code": ErrorCode.INTERNAL, "message": "internal error; see the gateway log"}},
        status_code=500,
    )


def _logged(request: Request) -> dict[str, str | None]:
    noted = notes(request)
    return {"request_id": noted.request_id, "task_id": noted.task_id}


_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    RunqError: _runq_error,
    RequestValidationError: _validation_error,
    HTTPException: _http_error,
    RedisError: _redis_error,
    Exception: _unexpected,
}


def install(app: FastAPI) -> None:
    for kind, handler in _HANDLERS.items():
        app.add_exception_handler(kind, handler)


async def answer(request: Request, exc: Exception) -> Response:
    """What FastAPI's exception handling answers for ``exc``, for a path that bypasses it."""
    handler = next(_HANDLERS[kind] for kind in type(exc).__mro__ if kind in _HANDLERS)
    return await handler(request, exc)
