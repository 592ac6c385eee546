"""Who is calling: API keys (`auth: keys`), their tenant and scopes, for every route.

``Authenticate`` is pure ASGI middleware in front of both predict's lean path and FastAPI's
routes, so one check covers them all: no, unknown or revoked key is 401 before anything else
runs (a body is not even read). A route asks ``principal(request)`` who called, and
``require(scope)`` (or ``check_scope``) for 403s. With `auth: off` the middleware is not
installed and every request is ``OPEN``: the default tenant with every scope, as before keys.

A verified key is kept per process for API_KEY_CACHE_S: predict pays no Redis lookup in steady
state, and a revocation (`runq keys revoke`) holds on every gateway within that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runq.errors import Forbidden, Unauthenticated
from runq.gateway.observe import notes
from runq.queue import constants
from runq.queue.keys import SCOPES, KeyRecord, verify_key
from runq.queue.keys import Scope as KeyScope


@dataclass(frozen=True)
class Principal:
    key_id: str | None
    tenant: str
    scopes: frozenset[str]
    rate_per_s: float | None
    max_queued: int | None

    def allows(self, scope: KeyScope) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def sees(self, tenant: str) -> bool:
        """Whether a task of ``tenant`` exists for this caller (else it answers 404)."""
        return self.admin or tenant == self.tenant

    @classmethod
    def of(cls, record: KeyRecord) -> Principal:
        return cls(
            record.key_id,
            record.tenant,
            frozenset(record.scopes),
            record.rate_per_s,
            record.max_queued,
        )


# `auth: off`: everyone is the default tenant with every scope, as before keys existed.
OPEN = Principal(None, constants.DEFAULT_TENANT, frozenset(SCOPES), None, None)
# An open path (health, docs) under `auth: keys`: no tenant's tasks, no scope.
ANONYMOUS = Principal(None, "", frozenset(), None, None)

_STATE = "runq_principal"
BEARER = "bearer "
# Open with `auth: keys`: probes, and the docs (Swagger UI's "Authorize" needs the page first).
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
OPEN_PREFIX = "/static-offline-docs/"


def principal(request: Request) -> Principal:
    """Who sent the request: set by Authenticate, OPEN when auth is off."""
    found: Principal = request.scope.get("state", {}).get(_STATE, OPEN)
    return found


def check_scope(request: Request, scope: KeyScope) -> Principal:
    caller = principal(request)
    if not caller.allows(scope):
        raise Forbidden(f"this API key does not have the {scope!r} scope")
    return caller


def require(scope: KeyScope) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: 403 unless the caller's key has ``scope``."""

    # async: FastAPI runs a plain function dependency in its thread pool.
    async def required(request: Request) -> None:
        check_scope(request, scope)

    return required


class KeyCache:
    """Keys this process verified, by the SHA-256 of the key, each for API_KEY_CACHE_S.

    Only valid keys are kept, so the cache holds at most as many entries as keys exist; a burst
    of requests with one expired entry shares one lookup.
    """

    def __init__(
        self,
        ttl_s: float = constants.API_KEY_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._redis: aioredis.Redis | None = None
        self._verified: dict[bytes, tuple[float, Principal]] = {}
        self._lookups: dict[bytes, asyncio.Future[Principal | None]] = {}

    def connect(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def principal(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode()).digest()
        entry = self._verified.get(digest)
        if entry is not None and self._clock() < entry[0]:
            return entry[1]
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup(key, digest))
            self._lookups[digest] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))
        # Shielded: one caller hanging up must not cancel the lookup the others await.
        return await asyncio.shield(lookup)

    async def _lookup(self, key: str, digest: bytes) -> Principal | None:
        assert self._redis is not None, "KeyCache.connect was not called"
        checked_at = self._clock()
        record = await verify_key(self._redis, key)
        if record is None:
            self._verified.pop(digest, None)
            return None
        found = Principal.of(record)
        self._verified[digest] = (checked_at + self.ttl_s, found)
        return found


class Authenticate:
    """401 for a request without a valid key; the caller's Principal for every other one."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyCache,
        answer_error: Callable[[Request, Exception], Awaitable[Response]],
    ) -> None:
        self.app = app
        self.keys = keys
        self.answer_error = answer_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        path: str = scope["path"]
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            state[_STATE] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            caller = await self._caller(request)
        except Exception as exc:
            notes(request).tenant = ""
            response = await self.answer_error(request, exc)
            await response(scope, receive, send)
            return
        state[_STATE] = caller
        notes(request).tenant = caller.tenant
        await self.app(scope, receive, send)

    async def _caller(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if header is None:
            raise Unauthenticated("send an API key: Authorization: Bearer <key>")
        if header[: len(BEARER)].lower() != BEARER:
            raise Unauthenticated("the Authorization header must be: Bearer <key>")
        caller = await self.keys.principal(header[len(BEARER) :].strip())
        if caller is None:
            # The same answer for a malformed, unknown or revoked key: it tells a prober nothing.
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return caller


def document(app: FastAPI) -> None:
    """The OpenAPI document names the bearer scheme, required on every route but open ones."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key from `runq keys create`",
        }
        schema["security"] = [{"bearer": []}]
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
