"""Builds the gateway's FastAPI app from the settings and the declared functions."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from fastapi_offline import FastAPIOffline
from redis import Redis
from redis.exceptions import RedisError

from runq import logs
from runq.errors import ConfigError
from runq.functions import Function, load_target
from runq.gateway import auth, connections, errors, routes
from runq.gateway.auth import Authenticate, KeyCache
from runq.gateway.lean import LeanPaths
from runq.gateway.limits import BodySizeLimit, InflightLimit
from runq.gateway.observe import RequestMetrics
from runq.gateway.routes import Served
from runq.heap import freeze_startup_heap
from runq.metrics import metrics
from runq.queue import constants
from runq.queue.connection import async_redis, sync_redis
from runq.queue.deployed import LiveSettings
from runq.queue.maintenance import AsyncMaintenance
from runq.queue.storage import open_store
from runq.queue.store import TaskStore
from runq.queue.waiter import TaskWaiter
from runq.settings import ENV_TARGET, Settings, load_settings
from runq.webhook_sender import WebhookSender

logger = logging.getLogger("runq.gateway")


def create_app(settings: Settings, functions: dict[str, Function]) -> FastAPI:
    if settings.redis_url is None:
        raise ConfigError("the gateway needs redis_url (--redis-url or RUNQ_REDIS_URL)")
    settings.check_functions(set(functions))
    auth_mode = settings.auth_mode()
    keys = KeyCache()
    served = {
        name: Served(fn, settings.function_settings(name, fn.declared))
        for name, fn in functions.items()
    }
    redis_url = settings.redis_url
    live = LiveSettings(settings, {name: fn.declared for name, fn in functions.items()})
    objects = open_store(settings.storage_url, settings.storage_endpoint_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = async_redis(redis_url)
        store = TaskStore(
            redis,
            redis_url,
            objects=objects,
            inline_max_bytes=settings.inline_max_bytes,
            idempotency_ttl_s=settings.idempotency_ttl_s,
        )
        waiter = TaskWaiter(redis, store)
        await waiter.start()
        keys.connect(redis)
        app.state.redis = redis
        app.state.store = store
        app.state.waiter = waiter
        follower = asyncio.create_task(_follow_deployed(redis, live, served), name="runq-live")
        webhooks = sync_redis(redis_url)
        sender = _webhook_sender(settings, webhooks)
        if sender is not None:
            sender.start()
        maintainer = asyncio.create_task(
            _maintain(AsyncMaintenance(redis, settings.maintenance_interval_s)),
            name="runq-maintenance",
        )
        freeze_startup_heap()
        try:
            yield
        finally:
            follower.cancel()
            if sender is not None:
                await asyncio.to_thread(sender.stop)
            webhooks.close()
            maintainer.cancel()
            await waiter.stop()
            await store.aclose()
            await redis.aclose()

    # /docs and /redoc load Swagger UI, ReDoc and the favicon from the gateway itself (the package
    # ships them), not from a CDN: docs that work on a machine with no internet.
    app = FastAPIOffline(
        title="runq",
        summary="Serverless function-style model serving on a Redis/Valkey queue",
        lifespan=lifespan,
        # A body with no content type is read as JSON; one that names another type gets a 415.
        strict_content_type=False,
        telemetry=_telemetry(settings),
        # Swagger UI would send the schema to an outside validator for its badge.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.served = served
    app.state.inflight = InflightLimit(settings.max_inflight)
    metrics(settings.request_bucket_bounds(), tenant_label=settings.metrics_tenant_label)
    errors.install(app)
    lean = routes.install(app, served)
    # Innermost of the middleware: in front of FastAPI's router, behind runq's limits and metrics.
    app.add_middleware(LeanPaths, endpoints=lean, answer_error=errors.answer)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    if auth_mode == "keys":
        # Before the body is read: a caller without a valid key gets nothing but its 401.
        app.add_middleware(Authenticate, keys=keys, answer_error=errors.answer)
        auth.document(app)
    # Outermost, so a refused oversized body is measured and logged like any answer.
    app.add_middleware(RequestMetrics, functions=list(served))
    return app


def _webhook_sender(settings: Settings, connection: Redis) -> WebhookSender | None:
    """Webhooks go out from the gateway, which is there whenever tasks can be submitted, also
    while the worker pool is at zero; several gateway processes share the deliveries, each
    claimed by one of them at a time."""
    if settings.webhook_secret is None:
        return None
    secret = settings.webhook_secret.get_secret_value().encode()
    return WebhookSender(connection, secret, allow_private=settings.webhook_allow_private)


def _telemetry(settings: Settings) -> TelemetryConfig:
    on = settings.opentelemetry
    return {"tracing": on, "metrics": on, "logs": on}


async def _follow_deployed(
    redis: aioredis.Redis, live: LiveSettings, served: dict[str, Served]
) -> None:
    while True:
        try:
            changed = await live.poll_async(redis)
        except (RedisError, OSError) as exc:
            logger.debug("cannot read deployed settings: %s", exc)
            changed = None
        for name, function_settings in (changed or {}).items():
            served[name].settings = function_settings
        await asyncio.sleep(constants.DEPLOYED_POLL_INTERVAL_S)


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes and `--reload`: everything comes from RUNQ_*."""
    target = os.environ.get(ENV_TARGET)
    if not target:
        raise ConfigError(f"{ENV_TARGET} is not set")
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    connections.configure(settings)
    return create_app(settings, load_target(target))


async def _maintain(maintenance: AsyncMaintenance) -> None:
    # Gateways clean too: with every function scaled to zero and no autoscaler, nothing else runs.
    while True:
        await maintenance.run()
        await asyncio.sleep(maintenance.try_interval_s)
