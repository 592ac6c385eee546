"""predict's lean path: FastAPI's validation and answers without its per-request machinery.

predict is the hot path, and FastAPI's router, its per-route exception handling and dependency
solving cost more CPU than the rest of the request (py-spy on noop predict under wrk). The lean
path is a middleware just inside runq's own (metrics, body size), in front of FastAPI's router;
the FastAPI route stays for the OpenAPI schema and for every other method on the path. It reads
the same query parameters, header and body, validates them with the same pydantic models in the
same order (query, header, then body, all errors together) and answers errors with the same
handlers (errors.answer), so a caller cannot tell the two apart.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runq.errors import UnsupportedMediaType

IDEMPOTENCY_KEY_MAX_CHARS = 255
IDEMPOTENCY_HEADER = "Idempotency-Key"

OnTimeout = Literal["error", "poll"]
OnDisconnect = Literal["cancel", "continue"]
# predict's parameters as the schema describes them (the FastAPI route declares them too).
TIMEOUT_DOC = "seconds to wait for the output"
ON_TIMEOUT_DOC = (
    "at the timeout: 504 (error; a task not started yet is withdrawn), "
    "or 202 with the task to poll, which goes on (poll)"
)
IDEMPOTENCY_KEY_DOC = "the same key within its TTL answers with the same task"
ON_DISCONNECT_DOC = (
    "with Accept: text/event-stream, when the caller hangs up: cancel the task, or let it "
    "continue (its stream stays readable at /v1/tasks/{id}/stream)"
)


class PredictQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DOC)
    on_timeout: OnTimeout = Field("error", description=ON_TIMEOUT_DOC)
    on_disconnect: OnDisconnect = Field("cancel", description=ON_DISCONNECT_DOC)


IdempotencyKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_CHARS,
        description=IDEMPOTENCY_KEY_DOC,
    ),
]
_KEY = TypeAdapter(IdempotencyKey)

# What the route calls once everything is valid: the request, the body model, the query and
# the idempotency key.
Handler = Callable[[Request, Any, PredictQuery, str | None], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def check_json_content_type(request: Request) -> None:
    # curl's -d sends a form content type; say so instead of a puzzling schema error.
    content_type = request.headers.get("content-type", "application/json")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"the body must be JSON sent with content-type: application/json, not {media_type}"
        )


def lean_endpoint(
    body_model: type[BaseModel], handler: Handler, guard: Callable[[Request], object]
) -> Endpoint:
    """``guard`` runs first, as the route's own dependencies do (the caller's scope)."""

    async def predict(request: Request) -> Response:
        guard(request)
        check_json_content_type(request)
        raw = await _json(request)
        errors: list[dict[str, Any]] = []
        query = _validated(PredictQuery, dict(request.query_params), ("query",), errors)
        key = _idempotency_key(request, errors)
        body = _validated(body_model, raw, ("body",), errors)
        if errors:
            raise RequestValidationError(errors)
        assert query is not None and body is not None
        return await handler(request, body, query, key)

    return predict


class LeanPaths:
    """POSTs to a lean path go straight to its endpoint; every other request goes on to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        endpoints: Mapping[str, Endpoint],
        answer_error: Callable[[Request, Exception], Awaitable[Response]],
    ) -> None:
        self.app = app
        self.endpoints = endpoints
        self.answer_error = answer_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            response = await self.answer_error(request, exc)
        await response(scope, receive, send)


async def _json(request: Request) -> Any:
    """The body as JSON, FastAPI's way: empty is missing, malformed is a json_invalid error."""
    data = await request.body()
    if not data:
        return _MISSING
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        error = {
            "type": "json_invalid",
            "loc": ("body", exc.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
        raise RequestValidationError([error]) from exc
    except ValueError as exc:
        # Not UTF-8: FastAPI's answer.
        raise HTTPException(400, "There was an error parsing the body") from exc


_MISSING = object()


def _validated(
    model: type[BaseModel], value: Any, where: tuple[str, ...], errors: list[dict[str, Any]]
) -> Any:
    if value is _MISSING:
        errors.append({"type": "missing", "loc": where, "msg": "Field required", "input": None})
        return None
    try:
        return model.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        errors.extend(_located(exc, where))
        return None


def _idempotency_key(request: Request, errors: list[dict[str, Any]]) -> str | None:
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    try:
        return _KEY.validate_python(value)
    except ValidationError as exc:
        errors.extend(_located(exc, ("header", IDEMPOTENCY_HEADER)))
        return None


def _located(exc: ValidationError, where: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{**error, "loc": (*where, *error["loc"])} for error in exc.errors()]
