"""One exception root for runq; each error carries the HTTP status and code it answers with."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every error code runq answers with, in an error body or in an ended task's ``error``."""

    INTERNAL = "internal"
    CONFIG_ERROR = "config_error"
    TARGET_ERROR = "target_error"
    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_ERROR = "validation_error"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    MODEL_ERROR = "model_error"
    UNAVAILABLE = "unavailable"
    QUEUE_FULL = "queue_full"
    # Over the caller's quota: its request rate, or its count of queued tasks.
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    OVERLOADED = "overloaded"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    CONNECTION_FAILED = "connection_failed"
    TIMEOUT = "timeout"
    # Only in the gateway's log and metrics: the caller closed its connection while it waited.
    CLIENT_CLOSED_REQUEST = "client_closed_request"
    # Only in an ended task's error: why it ended without an output.
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    WORKER_LOST = "worker_lost"
    # The function returned what JSON cannot carry (NaN, Infinity, a lone surrogate, ...).
    INVALID_OUTPUT = "invalid_output"


class RunqError(Exception):
    """Base of every error runq raises on purpose.

    The gateway maps it to ``{"error": {"code", "message", ...}}`` with ``status_code``; outside
    HTTP the status still tells whether the caller (4xx) or runq (5xx) is at fault.
    """

    status_code = 500
    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def task_id(self) -> str | None:
        """The task the error is about, when one is known."""
        value = self.details.get("task_id")
        return value if isinstance(value, str) else None

    @property
    def idempotency_key(self) -> str | None:
        """The client's key for the call that failed: calling again with it reaches its task."""
        value = self.details.get("idempotency_key")
        return value if isinstance(value, str) else None

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    @property
    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(RunqError):
    """Settings or a function declaration that cannot work; raised at start-up."""

    code = ErrorCode.CONFIG_ERROR


class TargetError(ConfigError):
    """The serve/worker target cannot be imported or declares no functions."""

    code = ErrorCode.TARGET_ERROR


class BadRequest(RunqError):
    status_code = 400
    code = ErrorCode.BAD_REQUEST


class Unauthenticated(RunqError):
    """No API key, or one that is unknown or revoked (auth: keys)."""

    status_code = 401
    code = ErrorCode.UNAUTHENTICATED

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(RunqError):
    """A valid API key without the scope the route needs."""

    status_code = 403
    code = ErrorCode.FORBIDDEN


class NotFound(RunqError):
    status_code = 404
    code = ErrorCode.NOT_FOUND


class Conflict(RunqError):
    status_code = 409
    code = ErrorCode.CONFLICT


class PayloadTooLarge(RunqError):
    status_code = 413
    code = ErrorCode.PAYLOAD_TOO_LARGE


class HeadersTooLarge(RunqError):
    status_code = 431
    code = ErrorCode.HEADERS_TOO_LARGE


class UnsupportedMediaType(RunqError):
    status_code = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class ValidationFailed(RunqError):
    status_code = 422
    code = ErrorCode.VALIDATION_ERROR


class IdempotencyConflict(ValidationFailed):
    """An Idempotency-Key already names a task that was asked with another body."""

    code = ErrorCode.IDEMPOTENCY_CONFLICT


class ModelError(RunqError):
    """The served function raised or broke its batching contract."""

    status_code = 500
    code = ErrorCode.MODEL_ERROR


class InvalidOutput(ModelError):
    """The function returned an output that strict JSON cannot carry; the message says why."""

    code = ErrorCode.INVALID_OUTPUT


class WorkerLost(RunqError):
    """The worker running the task stopped answering, and the task's retries are spent.

    Not the model's fault: the same request may be sent again, and its Idempotency-Key then
    runs it anew rather than answering with the lost task.
    """

    status_code = 502
    code = ErrorCode.WORKER_LOST


class RetryLater(RunqError):
    """Refused for now, nothing done: ``Retry-After`` (whole seconds) says when to ask again."""

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class TooManyRequests(RetryLater):
    """The caller is over its quota; other callers are served."""

    status_code = 429


class RateLimited(TooManyRequests):
    code = ErrorCode.RATE_LIMITED


class QuotaExceeded(TooManyRequests):
    code = ErrorCode.QUOTA_EXCEEDED


class Unavailable(RetryLater):
    status_code = 503
    code = ErrorCode.UNAVAILABLE


class QueueFull(Unavailable):
    code = ErrorCode.QUEUE_FULL


class Overloaded(Unavailable):
    """The gateway process already holds max_inflight waiting requests."""

    code = ErrorCode.OVERLOADED


class ConnectionFailed(Unavailable):
    """runq.Client got no answer: every attempt failed in transport (refused, reset, timed out).

    Raised by the client, never answered by the gateway; ``details["attempts"]`` counts the tries.
    """

    code = ErrorCode.CONNECTION_FAILED


class Timeout(RunqError):
    status_code = 504
    code = ErrorCode.TIMEOUT


class ClientClosedRequest(RunqError):
    """The caller hung up while its request waited; nobody reads the answer.

    499 is nginx's status for it: the request's log line and metrics tell it from a timeout.
    """

    status_code = 499
    code = ErrorCode.CLIENT_CLOSED_REQUEST


class StorageError(Unavailable):
    """The object store could not be reached or refused an operation."""

    code = ErrorCode.STORAGE_UNAVAILABLE


def error_classes() -> Iterator[type[RunqError]]:
    """RunqError and every class below it, each base before the classes that extend it."""
    todo: list[type[RunqError]] = [RunqError]
    while todo:
        cls = todo.pop(0)
        yield cls
        todo.extend(cls.__subclasses__())
