"""runq: serverless, function-style model serving on a Redis/Valkey queue."""

from runq.client import AsyncClient, Client, Task
from runq.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    ConnectionFailed,
    IdempotencyConflict,
    InvalidOutput,
    ModelError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QueueFull,
    RunqError,
    Timeout,
    Unavailable,
    ValidationFailed,
    WorkerLost,
)
from runq.functions import Function, function
from runq.progress import progress

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "Function",
    "IdempotencyConflict",
    "InvalidOutput",
    "ModelError",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "QueueFull",
    "RunqError",
    "Task",
    "Timeout",
    "Unavailable",
    "ValidationFailed",
    "WorkerLost",
    "function",
    "progress",
]
