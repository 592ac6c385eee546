"""runq: serverless, function-style model serving on a Redis/Valkey queue."""

from runq.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    ModelError,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RunqError,
    Timeout,
    Unavailable,
    ValidationFailed,
)
from runq.functions import Function, function

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Function",
    "ModelError",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "RunqError",
    "Timeout",
    "Unavailable",
    "ValidationFailed",
    "function",
]
