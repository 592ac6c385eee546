"""HTTP API v1: functions, tasks, health. Per-function routes carry the function's schemas.

Reading order: ``install``; the per-function routes (their models, then the handlers they call);
the generic routes (``router``); the helpers every route shares.
"""

# No `from __future__ import annotations`: FastAPI must see the per-function body models that
# the route closures annotate with, not their names.

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, create_model
from redis.exceptions import RedisError

from runq import webhooks
from runq.errors import (
    ClientClosedRequest,
    Conflict,
    ErrorCode,
    NotFound,
    Timeout,
    Unavailable,
    ValidationFailed,
)
from runq.functions import Function
from runq.gateway import stream
from runq.gateway.auth import Principal, check_scope, principal, require
from runq.gateway.errors import ended_error
from runq.gateway.hangup import HangUp
from runq.gateway.lean import (
    IDEMPOTENCY_KEY_DOC,
    IDEMPOTENCY_KEY_MAX_CHARS,
    ON_DISCONNECT_DOC,
    ON_TIMEOUT_DOC,
    TIMEOUT_DOC,
    Endpoint,
    OnDisconnect,
    OnTimeout,
    PredictQuery,
    check_json_content_type,
    lean_endpoint,
)
from runq.gateway.limits import InflightLimit
from runq.gateway.observe import notes
from runq.gateway.strict import check_strict_json
from runq.metrics import exposition
from runq.queue import constants
from runq.queue.enqueue import Quota
from runq.queue.figures import FunctionFigures
from runq.queue.listing import CURSOR_MAX_CHARS, LIMIT_DEFAULT, LIMIT_MAX
from runq.queue.replies import Answer, Ended
from runq.queue.storage import ObjectStore
from runq.queue.store import Admission, Admitted, TaskStore, new_task_id
from runq.queue.tasks import OUTPUT_REF, TERMINAL, TaskStatus, error_json, task_json_head
from runq.queue.waiter import TaskWaiter
from runq.settings import FunctionSettings, Settings, StrictNumbers

RETRY_AFTER_PENDING_S = 1
EVENT_STREAM = stream.EVENT_STREAM
STREAM_DOC = (
    "with Accept: text/event-stream: events chunk (id: its index), progress, then end (the "
    "task) or error"
)
WEBHOOK_URL_MAX_CHARS = 2048
REPLAYED_HEADER = "Idempotent-Replayed"
TENANT_MAX_CHARS = 256

Priority = Literal["high", "normal", "low"]


@dataclass
class Served:
    function: Function
    # Replaced whole (never mutated) when `runq deploy` changes the function's settings; routes
    # read it per request.
    settings: FunctionSettings


class TaskModel(BaseModel):
    """A task as every endpoint answers it; ``output`` or ``error`` once it has ended."""

    id: str
    function: str
    priority: Priority
    status: TaskStatus
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    attempts: int
    tenant: str = Field(description="whose task it is (the API key's tenant)")
    output: Any = None
    error: dict[str, Any] | None = None
    # {fraction, message, at}: the latest runq.progress() report, once the function made one.
    progress: dict[str, Any] | None = None


class TaskPage(BaseModel):
    """A page of a function's tasks (without outputs), and where the next one starts."""

    tasks: list[TaskModel]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null: this was the last"
    )


class Purged(BaseModel):
    purged: int = Field(description="how many queued tasks were canceled")


def install(app: FastAPI, served: dict[str, Served]) -> dict[str, Endpoint]:
    """Adds every route; returns predict's lean endpoints by path (lean.py)."""
    # The served functions' routes first: the generic ones answer for unknown functions.
    lean = {}
    for name, entry in served.items():
        lean[f"/v1/functions/{name}/predict"] = _function_routes(app, name, entry)
    app.include_router(router)
    return lean


# per-function routes ------------------------------------------------------------------------


class StrictRequest(StrictNumbers):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class FunctionModels:
    """The request and response schemas of one function's routes (its OpenAPI entries)."""

    predict: type[BaseModel]
    submit: type[BaseModel]
    task: type[BaseModel]


def function_models(name: str, fn: Function) -> FunctionModels:
    title = "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
    priority_field: tuple[Any, Any] = (
        Priority,
        Field(constants.DEFAULT_PRIORITY, description="higher priority tasks always run first"),
    )
    predict = create_model(
        f"{title}Predict",
        __base__=StrictRequest,
        input=(fn.input_type, ...),
        priority=priority_field,
    )
    submit = create_model(
        f"{title}Submit",
        __base__=StrictRequest,
        input=(fn.input_type, ...),
        priority=priority_field,
        timeout_s=(
            float | None,
            Field(None, gt=0, description="seconds from submission by which the task must end"),
        ),
        ttl_s=(
            float | None,
            Field(None, gt=0, description="seconds it may wait queued; then timed_out, never run"),
        ),
        webhook=(
            str | None,
            Field(
                None,
                max_length=WEBHOOK_URL_MAX_CHARS,
                description="http(s) URL to POST the task to when it ends (signed)",
            ),
        ),
    )
    task = create_model(f"{title}Task", __base__=TaskModel, output=(fn.output_type | None, None))
    return FunctionModels(predict, submit, task)


async def _idempotency_key(
    key: str | None = Header(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_CHARS,
        description=IDEMPOTENCY_KEY_DOC,
    ),
) -> str | None:
    return key


def _lean_predict(entry: Served, models: FunctionModels) -> Endpoint:
    async def lean_predict(
        request: Request, body: Any, query: PredictQuery, idempotency_key: str | None
    ) -> Response:
        return await predict_task(
            request,
            entry,
            body,
            query.timeout,
            query.on_timeout,
            idempotency_key,
            query.on_disconnect,
        )

    return lean_endpoint(models.predict, lean_predict, _may_predict)


def _may_predict(request: Request) -> None:
    check_scope(request, "predict")


def _function_routes(app: FastAPI, name: str, entry: Served) -> Endpoint:
    """Adds the function's routes; returns its lean predict, which stands in front of them."""
    models = function_models(name, entry.function)

    async def predict(
        body: models.predict,  # type: ignore[name-defined]
        request: Request,
        timeout_s: float | None = Query(None, alias="timeout", gt=0, description=TIMEOUT_DOC),
        on_timeout: Annotated[
            OnTimeout,
            Query(description=ON_TIMEOUT_DOC),
        ] = "error",
        idempotency_key: str | None = Depends(_idempotency_key),
        on_disconnect: Annotated[OnDisconnect, Query(description=ON_DISCONNECT_DOC)] = "cancel",
    ) -> Response:
        return await predict_task(
            request, entry, body, timeout_s, on_timeout, idempotency_key, on_disconnect
        )

    async def submit(
        body: models.submit,  # type: ignore[name-defined]
        request: Request,
        idempotency_key: str | None = Depends(_idempotency_key),
    ) -> Response:
        return await submit_task(request, entry, body, idempotency_key)

    async def describe(request: Request) -> dict[str, Any]:
        return await _describe(_store(request), name, entry, request)

    tag = f"function: {name}"
    app.add_api_route(
        f"/v1/functions/{name}/predict",
        predict,
        methods=["POST"],
        tags=[tag],
        summary=f"Run {name} and wait for its output",
        dependencies=[Depends(require("predict")), Depends(check_json_content_type)],
        response_model=models.task,
        responses={
            200: {"content": {EVENT_STREAM: {}}, "description": STREAM_DOC},
            202: {"description": "on_timeout=poll and not done yet: poll the task's result"},
            429: {"description": "rate_limited or quota_exceeded; retry after Retry-After"},
            503: {"description": "queue_full or overloaded; retry after Retry-After"},
            504: {"description": "timed out; the body names the task id"},
        },
    )
    app.add_api_route(
        f"/v1/functions/{name}/tasks",
        submit,
        methods=["POST"],
        tags=[tag],
        status_code=202,
        summary=f"Submit a background task to {name}",
        dependencies=[Depends(require("predict")), Depends(check_json_content_type)],
        response_model=TaskModel,
        responses={
            429: {"description": "rate_limited or quota_exceeded; retry after Retry-After"},
            503: {"description": "queue_full; retry after Retry-After"},
        },
    )
    app.add_api_route(f"/v1/functions/{name}", describe, methods=["GET"], tags=[tag])
    return _lean_predict(entry, models)


async def predict_task(
    request: Request,
    entry: Served,
    body: Any,
    timeout_s: float | None,
    on_timeout: OnTimeout,
    idempotency_key: str | None,
    on_disconnect: OnDisconnect = "cancel",
) -> Response:
    settings = _settings(request)
    wait_s = _checked_timeout(timeout_s, settings.default_timeout_s, settings, "timeout")
    check_strict_json(await request.body(), allow_inf_nan=entry.function.allows_inf_nan)
    if stream.wants_stream(request):
        return await _predict_stream(request, entry, body, wait_s, idempotency_key, on_disconnect)
    poll = on_timeout == "poll"
    store, waiter = _store(request), _waiter(request)
    admission = Admission(
        priority=body.priority,
        # A caller who will poll still wants the task run after the wait ends.
        start_within_s=None if poll else wait_s,
        reply_to=waiter.reply_channel,
        idempotency_key=idempotency_key,
        body_digest=_body_digest(body, idempotency_key),
        tenant=principal(request).tenant,
        quota=_quota(principal(request)),
    )
    with _inflight(request).hold():
        admitted, task = await _admit_and_wait(
            store, waiter, entry, _payload(entry, body), admission, wait_s, HangUp(request.receive)
        )
    notes(request).task_id = admitted.task_id
    return await _predict_answer(store, admitted, task, wait_s, poll=poll)


async def _predict_stream(
    request: Request,
    entry: Served,
    body: Any,
    wait_s: float,
    idempotency_key: str | None,
    on_disconnect: OnDisconnect,
) -> Response:
    """predict as server-sent events: the task's chunks as they come, within the timeout."""
    store, waiter = _store(request), _waiter(request)
    caller = principal(request)
    held = contextlib.ExitStack()
    held.enter_context(_inflight(request).hold())
    try:
        admitted = await store.enqueue(
            entry.function.name,
            entry.settings,
            _payload(entry, body),
            Admission(
                priority=body.priority,
                start_within_s=wait_s,
                idempotency_key=idempotency_key,
                body_digest=_body_digest(body, idempotency_key),
                tenant=caller.tenant,
                quota=_quota(caller),
            ),
        )
    except BaseException:
        held.close()
        raise
    task_id = admitted.task_id
    notes(request).task_id = task_id
    queue = constants.queue_name(entry.function.name, body.priority, caller.tenant)

    async def give_up(task: dict[str, Any]) -> str:
        return await _give_up(store, task, admitted, wait_s)

    async def hung_up() -> None:
        # A replay's caller does not own the task; its first caller may still be reading.
        if on_disconnect == "cancel" and not admitted.replayed:
            error = error_json(ErrorCode.CANCELED, "predict's caller hung up")
            await store.cancel(task_id, queue, which="any", error=error)

    events = stream.relay(
        store,
        waiter,
        task_id,
        streams=entry.function.stream,
        deadline=asyncio.get_running_loop().time() + wait_s,
        give_up=give_up,
    )
    headers = {"Location": f"/v1/tasks/{task_id}/stream"}
    if admitted.replayed:
        headers[REPLAYED_HEADER] = "true"
    return stream.event_stream(events, headers, hung_up=hung_up, done=held.close)


async def submit_task(
    request: Request, entry: Served, body: Any, idempotency_key: str | None
) -> Response:
    check_strict_json(await request.body(), allow_inf_nan=entry.function.allows_inf_nan)
    webhook = await _checked_webhook(body.webhook, _settings(request))
    store = _store(request)
    deadlines = [x for x in (body.timeout_s, body.ttl_s) if x is not None]
    admitted = await store.enqueue(
        entry.function.name,
        entry.settings,
        _payload(entry, body),
        Admission(
            priority=body.priority,
            start_within_s=min(deadlines, default=None),
            finish_within_s=body.timeout_s,
            idempotency_key=idempotency_key,
            body_digest=_body_digest(body, idempotency_key),
            webhook=webhook,
            tenant=principal(request).tenant,
            quota=_quota(principal(request)),
        ),
    )
    notes(request).task_id = admitted.task_id
    task = admitted.task or await store.read(admitted.task_id, with_output=False)
    if task is None:
        raise NotFound(f"task {admitted.task_id} was deleted as it was replayed")
    headers = {"Location": f"/v1/tasks/{task['id']}"}
    if admitted.replayed:
        headers[REPLAYED_HEADER] = "true"
    return _task_response(task, 202, **headers)


def _payload(entry: Served, body: Any) -> Any:
    try:
        return entry.function.input_adapter.dump_python(body.input, mode="json")
    except ValueError as exc:
        # pydantic-core refuses to serialize past its depth limit (a few hundred levels),
        # though it parsed and validated the input: the caller's input, not a server fault.
        raise ValidationFailed(f"input cannot be encoded as JSON: {exc}") from None


async def _checked_webhook(url: str | None, settings: Settings) -> str | None:
    if url is None:
        return None
    if settings.webhook_secret is None:
        raise ValidationFailed("webhooks are off on this server (webhook_secret is not set)")
    # Resolving the host blocks: not on the event loop.
    return await asyncio.to_thread(
        webhooks.check_url, url, allow_private=settings.webhook_allow_private
    )


def _body_digest(body: BaseModel, idempotency_key: str | None) -> str:
    # Only a request with a key is ever compared, so only it pays for encoding and hashing.
    if idempotency_key is None:
        return ""
    # The validated body, canonically encoded, unset fields left out: the same request always
    # has the same digest, whether it came to predict or to submit.
    fields = body.model_dump(mode="json", exclude_none=True)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _admit_and_wait(
    store: TaskStore,
    waiter: TaskWaiter,
    entry: Served,
    payload: Any,
    admission: Admission,
    wait_s: float,
    hang_up: HangUp,
) -> tuple[Admitted, Ended | None]:
    task_id = new_task_id()
    # Listen before enqueueing, so a task that ends at once is not missed.
    future = waiter.expect(task_id)
    try:
        admitted = await store.enqueue(
            entry.function.name, entry.settings, payload, admission, task_id=task_id
        )
    except BaseException:
        waiter.forget(task_id, future)
        raise
    if admitted.replayed:
        # The key's task answers on its first caller's reply channel, maybe on another gateway.
        waiter.forget(task_id, future)
        return admitted, await waiter.wait_any(admitted.task_id, wait_s, hang_up)
    try:
        return admitted, await waiter.wait(task_id, future, wait_s, hang_up)
    except ClientClosedRequest:
        # Nobody waits for the output any more: a task not started yet is withdrawn, one
        # that runs goes on and its result can be read.
        withdrawn = await _withdraw(
            store,
            task_id,
            error_json(ErrorCode.CANCELED, "predict's caller hung up before it started"),
        )
        fate = "it never started and was withdrawn" if withdrawn else "it goes on running"
        raise ClientClosedRequest(
            f"the caller of task {task_id} hung up; {fate}", task_id=task_id
        ) from None


async def _predict_answer(
    store: TaskStore,
    admitted: Admitted,
    task: Ended | None,
    wait_s: float,
    *,
    poll: bool,
) -> Response:
    task_id = admitted.task_id
    if task is None:
        raise NotFound(f"task {task_id} was deleted while it was waited on", task_id=task_id)
    if isinstance(task, Answer):
        return _replayed(Response(task.body, media_type="application/json"), admitted)
    status = task["status"]
    if status == TaskStatus.SUCCEEDED:
        return _replayed(_task_response(await store.with_output(task)), admitted)
    if status not in TERMINAL:
        if not poll:
            raise Timeout(await _give_up(store, task, admitted, wait_s), task_id=task_id)
        pending = _task_response(
            task,
            202,
            Location=f"/v1/tasks/{task_id}/result",
            **{"Retry-After": str(RETRY_AFTER_PENDING_S)},
        )
        return _replayed(pending, admitted)
    raise ended_error(task)


async def _give_up(
    store: TaskStore, task: dict[str, Any], admitted: Admitted, wait_s: float
) -> str:
    """Withdraws a timed-out predict's task if it never started; says what became of it."""
    task_id = task["id"]
    message = f"task {task_id} did not finish within {wait_s} s"
    if admitted.replayed:
        # The key's first caller owns the task; a replay only stops waiting for it.
        return message
    withdrawn = await _withdraw(
        store,
        task_id,
        # The same end as a deadline that passes in the queue: nobody waits for an answer now.
        error_json(ErrorCode.TIMED_OUT, f"predict timed out after {wait_s} s before it started"),
    )
    if withdrawn:
        return message + "; it never started and was withdrawn"
    return message + "; it is still running"


async def _withdraw(store: TaskStore, task_id: str, error: str) -> bool:
    """Ends a predict's task that has not started yet; False if it had."""
    # Its queue is its tenant's: read, not rebuilt from the function and priority.
    queue = await store.queue_of(task_id)
    if queue is None:
        return False
    before = await store.cancel(task_id, queue, which="queued", error=error)
    return before == "queued"


def _replayed(response: Response, admitted: Admitted) -> Response:
    if admitted.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


async def _describe(store: TaskStore, name: str, entry: Served, request: Request) -> dict[str, Any]:
    figures = await store.figures(name)
    settings = _settings(request)
    described: dict[str, Any] = {
        "name": name,
        "batch": entry.function.batch,
        "example": entry.function.example,
    }
    # The settings (caps, quotas to come) are the operator's: admin keys only.
    if principal(request).admin:
        described["settings"] = entry.settings.model_dump()
    return described | {
        "queued": figures.queued,
        "running": figures.running,
        # What an external scaler (KEDA's metrics-api) scales on.
        "demand": figures.queued + figures.running,
        "replicas": {
            "current": figures.replicas_current,
            "desired": figures.desired,
        },
        "stranded": _stranded(figures, settings.cold_start_budget_s),
    }


def _stranded(figures: FunctionFigures, budget_s: float) -> dict[str, Any] | None:
    if not figures.stranded(budget_s):
        return None
    return {
        "queued": figures.queued,
        "for_s": round(figures.unserved_s, 1),
        "message": (
            f"{figures.queued} queued task(s) have had no live worker for "
            f"{figures.unserved_s:.0f} s, past cold_start_budget_s ({budget_s:g} s): "
            "start a worker, or see why the autoscaler's do not come up"
        ),
    }


# generic routes -----------------------------------------------------------------------------

router = APIRouter()


@router.get("/v1/functions", tags=["functions"])
async def list_functions(request: Request) -> dict[str, Any]:
    store = _store(request)
    served = sorted(_served(request).items())
    return {"functions": [await _describe(store, name, entry, request) for name, entry in served]}


@router.get("/v1/functions/{fn}", tags=["functions"], include_in_schema=False)
async def unknown_function(fn: str, request: Request) -> None:
    raise _unknown(request, fn)


@router.post("/v1/functions/{fn}/predict", include_in_schema=False)
@router.post("/v1/functions/{fn}/tasks", include_in_schema=False)
async def unknown_function_call(fn: str, request: Request) -> None:
    raise _unknown(request, fn)


# Task routes answer another tenant's task exactly as a missing one: 404, the same body.
_READ = [Depends(require("read"))]


@router.get(
    "/v1/functions/{fn}/tasks",
    tags=["tasks"],
    response_model=TaskPage,
    summary="List a function's tasks, a page at a time",
    dependencies=_READ,
)
async def list_tasks(
    fn: str,
    request: Request,
    status: Annotated[TaskStatus | None, Query(description="only tasks with this status")] = None,
    tenant: str | None = Query(
        None,
        min_length=1,
        max_length=TENANT_MAX_CHARS,
        description="only this tenant's tasks (an admin's choice; any other caller sees its own)",
    ),
    cursor: str | None = Query(
        None,
        min_length=1,
        max_length=CURSOR_MAX_CHARS,
        description="the previous page's next_cursor",
    ),
    limit: int = Query(LIMIT_DEFAULT, ge=1, le=LIMIT_MAX, description="most tasks in the page"),
) -> Response:
    """Queued tasks in the order they will run, then running ones, then ended ones, oldest
    first. A page may hold fewer than ``limit`` tasks (even none) and still have a next one."""
    if fn not in _served(request):
        raise _unknown(request, fn)
    caller = _tenant(request)
    page = await _store(request).page(
        fn,
        status=status,
        tenant=tenant if caller is None else caller,
        cursor=cursor,
        limit=limit,
    )
    # The tasks as every task route answers them (no output, no null error), unfiltered by the
    # response model.
    return JSONResponse({"tasks": page.tasks, "next_cursor": page.cursor})


@router.delete(
    "/v1/functions/{fn}/tasks",
    tags=["tasks"],
    response_model=Purged,
    summary="Purge a function's queue: every queued task ends canceled",
    dependencies=[Depends(require("admin"))],
)
async def purge_tasks(
    fn: str,
    request: Request,
    status: Literal["queued"] = Query(description="which tasks: only `queued` is purged"),
) -> dict[str, int]:
    if fn not in _served(request):
        raise _unknown(request, fn)
    return {"purged": await _store(request).purge(fn)}


@router.get("/v1/tasks/{task_id}", tags=["tasks"], response_model=TaskModel, dependencies=_READ)
async def task_status(task_id: str, request: Request) -> Response:
    task = await _task_or_404(_store(request), task_id, _tenant(request), with_output=False)
    return _task_response(task)


@router.get(
    "/v1/tasks/{task_id}/result",
    tags=["tasks"],
    response_model=TaskModel,
    dependencies=_READ,
    responses={202: {"description": "still pending; try again after Retry-After"}},
)
async def task_result(
    task_id: str,
    request: Request,
    wait: float = Query(0, ge=0, description="seconds to wait for the task to end"),
    redirect: bool = Query(
        False,
        description="an output kept in S3 is answered with a 307 to a short-lived URL",
    ),
) -> Response:
    settings = _settings(request)
    wait_s = _checked_timeout(wait, None, settings, "wait")
    if wait_s > 0:
        with _inflight(request).hold():
            ended = await _waiter(request).wait_any(
                task_id, wait_s, HangUp(request.receive), tenant=_tenant(request)
            )
        if ended is None:
            raise NotFound(f"no task {task_id}")
        task = ended.task() if isinstance(ended, Answer) else ended
    else:
        task = await _task_or_404(_store(request), task_id, _tenant(request), with_output=True)
    notes(request).task_id = task_id
    notes(request).function = task["function"]
    if task["status"] not in TERMINAL:
        return _task_response(task, 202, **{"Retry-After": str(RETRY_AFTER_PENDING_S)})
    output_ref = task.pop(OUTPUT_REF, None)
    if output_ref is None:
        return _task_response(task)
    redirect_ttl_s = settings.presign_ttl_s if redirect else None
    return await _stored_output(_store(request).objects, task, output_ref, redirect_ttl_s)


@router.get(
    "/v1/tasks/{task_id}/stream",
    tags=["tasks"],
    response_class=Response,
    responses={200: {"content": {EVENT_STREAM: {}}, "description": STREAM_DOC}},
    dependencies=_READ,
)
async def task_stream(
    task_id: str,
    request: Request,
    last_event_id: int | None = Header(
        None, alias="Last-Event-ID", ge=0, description="resume after this chunk"
    ),
) -> Response:
    """The task's chunks and progress as server-sent events, replayed from the start (or after
    Last-Event-ID), while it is queued, runs, or within result_ttl_s of its end."""
    store = _store(request)
    task = await _task_or_404(store, task_id, _tenant(request), with_output=False)
    notes(request).task_id = task_id
    notes(request).function = task["function"]
    held = contextlib.ExitStack()
    held.enter_context(_inflight(request).hold())
    served = _served(request).get(task["function"])
    events = stream.relay(
        store,
        _waiter(request),
        task_id,
        after=-1 if last_event_id is None else last_event_id,
        # A function this gateway does not serve is read as streaming: its chunks, if any.
        streams=served is None or served.function.stream,
    )
    return stream.event_stream(events, {}, done=held.close)


@router.post(
    "/v1/tasks/{task_id}/cancel", tags=["tasks"], response_model=TaskModel, dependencies=_READ
)
async def cancel_task(task_id: str, request: Request) -> Response:
    store = _store(request)
    queue = await store.queue_of(task_id, _tenant(request))
    if queue is None:
        raise NotFound(f"no task {task_id}")
    before = await store.cancel(
        task_id, queue, which="any", error=error_json(ErrorCode.CANCELED, "canceled")
    )
    task = await _task_or_404(store, task_id, None, with_output=False)
    if before not in ("queued", "started"):
        raise Conflict(f"task {task_id} has already ended ({task['status']})", task=task)
    return _task_response(task)


@router.post(
    "/v1/tasks/{task_id}/retry",
    tags=["tasks"],
    status_code=202,
    response_model=TaskModel,
    summary="Run a failed, timed-out or canceled task again (same id)",
    responses={
        409: {"description": "the task is queued, running or succeeded"},
        503: {"description": "queue_full; retry after Retry-After"},
    },
    dependencies=[Depends(require("predict"))],
)
async def retry_task(task_id: str, request: Request) -> Response:
    store = _store(request)
    queue = await store.queue_of(task_id, _tenant(request))
    if queue is None:
        raise NotFound(f"no task {task_id}")
    function = constants.function_of_queue(queue)
    entry = _served(request).get(function)
    if entry is None:
        raise _unknown(request, function)
    notes(request).task_id = task_id
    task = await store.retry(task_id, queue, entry.settings, tenant=_tenant(request))
    if task is None:
        raise NotFound(f"no task {task_id}")
    return _task_response(task, 202, Location=f"/v1/tasks/{task_id}")


@router.delete("/v1/tasks/{task_id}", tags=["tasks"], status_code=204, dependencies=_READ)
async def delete_task(task_id: str, request: Request) -> Response:
    store = _store(request)
    queue = await store.queue_of(task_id, _tenant(request))
    if queue is None or not await store.delete(task_id, queue):
        raise NotFound(f"no task {task_id}")
    return Response(status_code=204)


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    dependencies=[Depends(require("admin"))],
)
async def prometheus_metrics(request: Request) -> Response:
    store = _store(request)
    rows = [(name, await store.figures(name)) for name in sorted(_served(request))]
    return Response(exposition(rows), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> dict[str, str]:
    # Zero workers is still ready: tasks wait in the queue for a cold start.
    try:
        await request.app.state.redis.ping()
    except (RedisError, OSError):
        raise Unavailable("the queue is unreachable") from None
    if not _waiter(request).connected.is_set():
        raise Unavailable("the reply subscription is not up yet")
    return {"status": "ready"}


def _unknown(request: Request, fn: str) -> NotFound:
    known = ", ".join(sorted(_served(request)))
    return NotFound(f"unknown function {fn!r}; served: {known}")


async def _task_or_404(
    store: TaskStore, task_id: str, tenant: str | None, *, with_output: bool
) -> dict[str, Any]:
    """The task; 404 if there is none, or (``tenant`` given) it is another tenant's."""
    task = await store.read(task_id, with_output=with_output)
    if task is None or (tenant is not None and task["tenant"] != tenant):
        raise NotFound(f"no task {task_id}")
    return task


def _quota(caller: Principal) -> Quota | None:
    """The limits of the caller's key (`runq keys create --rate/--max-queued`), kept per key by
    the admission script on every gateway at once."""
    if caller.key_id is None or (caller.rate_per_s is None and caller.max_queued is None):
        return None
    return Quota(f"key:{caller.key_id}", rate_per_s=caller.rate_per_s, max_queued=caller.max_queued)


def _tenant(request: Request) -> str | None:
    """The only tenant whose tasks the caller may reach; None: every tenant's (admin)."""
    caller = principal(request)
    return None if caller.admin else caller.tenant


async def _stored_output(
    objects: ObjectStore, task: dict[str, Any], output_ref: str, redirect_ttl_s: int | None
) -> Response:
    """A stored output: a redirect to it when asked and possible, else the task JSON streamed
    with the object's bytes as its output, never held whole in memory."""
    if redirect_ttl_s is not None:
        url = await asyncio.to_thread(objects.presign, output_ref, redirect_ttl_s)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    head = task_json_head(task)
    # The first chunk is read before the answer starts: a missing object must be an error
    # answer, not a 200 cut short.
    chunks = objects.chunks(output_ref)
    first = await asyncio.to_thread(next, chunks, b"")

    def body() -> Iterator[bytes]:
        yield head
        yield first
        yield from chunks
        yield b"}"

    return StreamingResponse(body(), media_type="application/json")


# shared helpers -----------------------------------------------------------------------------


def _checked_timeout(
    value: float | None, default: float | None, settings: Settings, name: str
) -> float:
    timeout = default if value is None else value
    if timeout is None:
        return 0.0
    if timeout > settings.max_timeout_s:
        raise ValidationFailed(
            f"{name}={timeout} is above max_timeout_s ({settings.max_timeout_s}); "
            f"ask for at most {settings.max_timeout_s} s"
        )
    return timeout


def _task_response(task: dict[str, Any], status_code: int = 200, **headers: str) -> JSONResponse:
    return JSONResponse(task, status_code=status_code, headers=headers or None)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _served(request: Request) -> dict[str, Served]:
    served: dict[str, Served] = request.app.state.served
    return served


def _store(request: Request) -> TaskStore:
    store: TaskStore = request.app.state.store
    return store


def _waiter(request: Request) -> TaskWaiter:
    waiter: TaskWaiter = request.app.state.waiter
    return waiter


def _inflight(request: Request) -> InflightLimit:
    inflight: InflightLimit = request.app.state.inflight
    return inflight
