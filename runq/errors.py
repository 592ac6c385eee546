"""One exception root for runq; each error carries the HTTP status and code it answers with."""

from __future__ import annotations

from typing import Any


class RunqError(Exception):
    """Base of every error runq raises on purpose.

    The gateway maps it to ``{"error": {"code", "message", ...}}`` with ``status_code``; outside
    HTTP the status still tells whether the caller (4xx) or runq (5xx) is at fault.
    """

    status_code = 500
    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    @property
    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(RunqError):
    """Settings or a function declaration that cannot work; raised at start-up."""

    code = "config_error"


class TargetError(ConfigError):
    """The serve/worker target cannot be imported or declares no functions."""

    code = "target_error"


class BadRequest(RunqError):
    status_code = 400
    code = "bad_request"


class NotFound(RunqError):
    status_code = 404
    code = "not_found"


class Conflict(RunqError):
    status_code = 409
    code = "conflict"


class Gone(RunqError):
    status_code = 410
    code = "gone"


class PayloadTooLarge(RunqError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(RunqError):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(RunqError):
    status_code = 422
    code = "validation_error"


class IdempotencyConflict(ValidationFailed):
    """An Idempotency-Key already names a task that was asked with another body."""

    code = "idempotency_conflict"


class ModelError(RunqError):
    """The served function raised or broke its batching contract."""

    status_code = 500
    code = "model_error"


class Unavailable(RunqError):
    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFull(Unavailable):
    code = "queue_full"


class Overloaded(Unavailable):
    """The gateway process already holds max_inflight waiting requests."""

    code = "overloaded"


class ConnectionFailed(Unavailable):
    """runq.Client got no answer: every attempt failed in transport (refused, reset, timed out).

    Raised by the client, never answered by the gateway; ``details["attempts"]`` counts the tries.
    """

    code = "connection_failed"


class Timeout(RunqError):
    status_code = 504
    code = "timeout"
