"""runq: serverless, function-style model serving on a Redis/Valkey queue."""

from runq.client import AsyncClient, Client, Task, TaskPage
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
    "TaskPage",
    "Timeout",
    "Unavailable",
    "ValidationFailed",
    "WorkerLost",
    "function",
]
