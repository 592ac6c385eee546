"""API keys and tenants over HTTP: two real gateways with `auth: keys` on the suite's Valkey,
whose tasks the session's workers run; keys made by `runq keys` and by its queue functions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis import Redis

import runq
from runq.errors import ConfigError, NotFound
from runq.functions import load_target
from runq.gateway.app import create_app
from runq.gateway.auth import KeyCache, Principal
from runq.queue.connection import async_redis
from runq.queue.keys import create_key, revoke_key
from runq.settings import Settings
from tests.helpers import (
    FNS,
    GATEWAY_ENV,
    Proc,
    free_port,
    queued,
    run_runq,
    wait_for_gateway,
    wait_until,
)


@dataclass(frozen=True)
class Gateway:
    url: str
    proc: Proc


@dataclass(frozen=True)
class Keys:
    acme: str
    globex: str
    read_only: str
    predict_only: str
    admin: str


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def spawn(procs: Callable[..., Proc], **env: str) -> Gateway:
    port = free_port()
    # Debug lines too: no key may show even there.
    full_env = {**GATEWAY_ENV, "RUNQ_AUTH": "keys", "RUNQ_LOG_LEVEL": "debug", **env}
    proc = procs("gateway", FNS, "--port", str(port), env=full_env)
    return Gateway(f"http://127.0.0.1:{port}", proc)


@pytest.fixture(scope="module")
def gateways(procs: Callable[..., Proc], gateway: str) -> tuple[Gateway, Gateway]:
    """Two gateways with keys (the session's `gateway` brings the workers); the second labels
    its request metrics by tenant. Started together, then awaited."""
    del gateway
    pair = spawn(procs), spawn(procs, RUNQ_METRICS_TENANT_LABEL="true")
    for gw in pair:
        wait_for_gateway(gw.proc, gw.url)
    return pair


@pytest.fixture(scope="module")
def keys(valkey_url: str) -> Keys:
    with Redis.from_url(valkey_url) as redis:
        return Keys(
            acme=create_key(redis, "acme")[0],
            globex=create_key(redis, "globex")[0],
            read_only=create_key(redis, "acme", ("read",))[0],
            predict_only=create_key(redis, "acme", ("predict",))[0],
            admin=create_key(redis, "ops", ("admin",))[0],
        )


def call(url: str, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = (bearer(key) if key else {}) | kwargs.pop("headers", {})
    return httpx.request(method, url + path, headers=headers, timeout=10, **kwargs)


def test_keys_cli_create_list_revoke_and_a_revoked_key_is_refused_by_both_gateways_in_a_second(
    gateways: tuple[Gateway, Gateway], keys: Keys, valkey_url: str
) -> None:
    created = run_runq(
        "keys", "create", "--tenant", "initech", "--scope", "predict", "--rate", "5",
        "--max-queued", "7", "--redis-url", valkey_url,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    match = re.fullmatch(r"runq_([0-9a-f]{16})_[A-Za-z0-9_-]{43}", key)
    assert match, created.stdout
    key_id = match.group(1)
    assert key_id in created.stderr and "initech" in created.stderr and key not in created.stderr
    for gw in gateways:
        answer = call(gw.url, "POST", "/v1/functions/echo/predict", key, json={"input": "hi"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["tenant"] == "initech"

    revoked = run_runq("keys", "revoke", key_id, "--redis-url", valkey_url)
    assert revoked.returncode == 0, revoked.stderr
    since = time.monotonic()
    for gw in gateways:
        wait_until(
            lambda gw=gw: call(gw.url, "GET", "/v1/functions", key).status_code == 401,
            1.0 - (time.monotonic() - since),
            "the revoked key to be refused",
        )
    assert time.monotonic() - since < 1.0
    answer = call(gateways[0].url, "POST", "/v1/functions/echo/predict", key, json={"input": 1})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthenticated"
    listed = run_runq("keys", "list", "--redis-url", valkey_url)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "TENANT", "SCOPES", "RATE", "MAX_QUEUED", "CREATED", "REVOKED"]
    row = next(line.split() for line in rows if line.startswith(key_id))
    assert row[1:5] == ["initech", "predict", "5/s", "7"] and row[6] != "-"
    assert next(line.split() for line in rows if "acme" in line)[6] == "-"
    secret_hash = hashlib.sha256(key.encode()).hexdigest()
    assert key.split("_", 2)[2] not in listed.stdout and secret_hash not in listed.stdout
    with Redis.from_url(valkey_url) as redis, pytest.raises(NotFound, match="no API key"):
        revoke_key(redis, "0123456789abcdef")

    # Right id, wrong secret: refused too. Nothing of the key shows in either gateway's log.
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert call(gateways[1].url, "GET", "/v1/functions", forged).status_code == 401
    for gw in gateways:
        log = gw.proc.output()
        assert "POST /v1/functions/echo/predict 200" in log  # the log is there, and verbose
        for secret in (key, key.split("_", 2)[2], forged.split("_", 2)[2], secret_hash):
            assert secret not in log


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/functions/admitted/predict"),  # the lean path
        ("POST", "/v1/functions/admitted/tasks"),
        ("GET", "/v1/tasks/some-task"),
        ("GET", "/v1/tasks/some-task/stream"),
        ("GET", "/v1/functions"),
        ("GET", "/metrics"),
        ("GET", "/v1/no-such-route"),
    ],
)
def test_no_or_bad_key_is_401_and_enqueues_nothing(
    gateways: tuple[Gateway, Gateway], keys: Keys, redis: Redis, method: str, path: str
) -> None:
    url = gateways[0].url
    before = queued(redis, "admitted")
    unknown_id = "runq_" + "0" * 16 + "_" + keys.acme.rsplit("_", 1)[1]
    wrong_secret = keys.acme[:-1] + ("A" if not keys.acme.endswith("A") else "B")
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": f"Basic {keys.acme}"},
        {"Authorization": "Bearer"},
        bearer("not-a-key"),
        bearer(unknown_id),
        bearer(wrong_secret),
    ]
    bodies = []
    for headers in attempts:
        answer = httpx.request(method, url + path, headers=headers, json={"input": 1}, timeout=10)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "unauthenticated"
        bodies.append(answer.json())
    # An unknown key and a wrong secret read the same: a prober learns nothing of which ids exist.
    assert bodies[4] == bodies[5]
    assert queued(redis, "admitted") == before


def test_health_probes_and_the_docs_are_open_and_the_schema_names_the_bearer_scheme(
    gateways: tuple[Gateway, Gateway],
) -> None:
    url = gateways[0].url
    for path in ("/healthz", "/readyz", "/docs", "/redoc"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    schema = httpx.get(url + "/openapi.json", timeout=10).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from `runq keys create`",
    }
    assert schema["security"] == [{"bearer": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/functions/echo/predict"]["post"]


def test_a_key_without_the_scope_is_403(gateways: tuple[Gateway, Gateway], keys: Keys) -> None:
    url = gateways[1].url
    forbidden = [
        (keys.read_only, "POST", "/v1/functions/echo/predict"),  # the lean path
        (keys.read_only, "POST", "/v1/functions/echo/tasks"),
        (keys.predict_only, "GET", "/v1/tasks/some-task"),
        (keys.predict_only, "GET", "/v1/tasks/some-task/result"),
        (keys.predict_only, "GET", "/v1/tasks/some-task/stream"),
        (keys.predict_only, "POST", "/v1/tasks/some-task/cancel"),
        (keys.predict_only, "DELETE", "/v1/tasks/some-task"),
        (keys.acme, "GET", "/metrics"),
    ]
    for key, method, path in forbidden:
        answer = call(url, method, path, key, json={"input": "x"})
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "forbidden"
    # 403 before the body is even looked at: an invalid one is not the answer.
    answer = call(url, "POST", "/v1/functions/norm/predict", keys.read_only, json={"input": 1})
    assert answer.status_code == 403
    assert call(url, "GET", "/metrics", keys.admin).status_code == 200
    # The functions' settings are the operator's; their figures anyone's with a key.
    plain = call(url, "GET", "/v1/functions/echo", keys.acme).json()
    assert "settings" not in plain and plain["demand"] >= 0
    assert call(url, "GET", "/v1/functions/echo", keys.admin).json()["settings"]["max_batch_size"]
    listed = call(url, "GET", "/v1/functions", keys.read_only).json()["functions"]
    assert listed and all("settings" not in f for f in listed)


def test_another_tenants_task_answers_404_exactly_like_a_missing_one(
    gateways: tuple[Gateway, Gateway], keys: Keys, redis: Redis
) -> None:
    first, second = (gw.url for gw in gateways)
    # `admitted` has no worker: its task stays queued, so cancel has something to cancel.
    queued_task = call(first, "POST", "/v1/functions/admitted/tasks", keys.acme, json={"input": 1})
    assert queued_task.status_code == 202 and queued_task.json()["tenant"] == "acme"
    done = call(first, "POST", "/v1/functions/echo/predict", keys.acme, json={"input": "mine"})
    assert done.status_code == 200
    ids = [queued_task.json()["id"], done.json()["id"]]

    def answers(task_id: str) -> list[tuple[int, object, str | None]]:
        routes = [
            ("GET", f"/v1/tasks/{task_id}"),
            ("GET", f"/v1/tasks/{task_id}/result"),
            ("GET", f"/v1/tasks/{task_id}/result?wait=5"),
            ("GET", f"/v1/tasks/{task_id}/stream"),
            ("POST", f"/v1/tasks/{task_id}/cancel"),
            ("DELETE", f"/v1/tasks/{task_id}"),
        ]
        found = []
        for method, path in routes:
            started = time.monotonic()
            answer = call(second, method, path, keys.globex)
            # Not waited on: another tenant's task is no task at all.
            assert time.monotonic() - started < 2, path
            found.append((answer.status_code, answer.json(), answer.headers.get("retry-after")))
        return found

    others = {task_id: answers(task_id) for task_id in ids}
    for task_id in ids:
        assert {status for status, _, _ in others[task_id]} == {404}
        # Untouched: its tenant still has it, as it was, and so does an admin.
        for key in (keys.acme, keys.read_only, keys.admin):
            answer = call(first, "GET", f"/v1/tasks/{task_id}", key)
            assert answer.status_code == 200 and answer.json()["tenant"] == "acme"
    assert call(first, "GET", f"/v1/tasks/{ids[0]}", keys.acme).json()["status"] == "queued"
    assert call(first, "GET", f"/v1/tasks/{ids[1]}/result", keys.acme).json()["output"] == "mine"

    # Once the tasks are really gone, the other tenant reads exactly what it read before.
    assert call(first, "DELETE", f"/v1/tasks/{ids[0]}", keys.acme).status_code == 204
    assert call(first, "DELETE", f"/v1/tasks/{ids[1]}", keys.admin).status_code == 204
    for task_id in ids:
        assert answers(task_id) == others[task_id]


def test_a_streamed_predict_is_its_callers_tenants_and_a_hang_up_cancels_it(
    gateways: tuple[Gateway, Gateway], keys: Keys
) -> None:
    first, second = (gw.url for gw in gateways)
    sse = {"Accept": "text/event-stream"}
    with httpx.stream(
        "POST",
        first + "/v1/functions/echo/predict",
        headers=bearer(keys.acme) | sse,
        json={"input": "streamed"},
        timeout=10,
    ) as answer:
        lines = list(answer.iter_lines())
    end = json.loads(lines[lines.index("event: end") + 1].removeprefix("data: "))
    assert end["status"] == "succeeded" and end["tenant"] == "acme"
    path = f"/v1/tasks/{end['id']}/stream"
    assert call(second, "GET", path, keys.globex).status_code == 404
    assert call(second, "GET", path, keys.acme, headers=sse).status_code == 200

    # `admitted` has no worker: the task waits in acme's queue until its caller hangs up.
    with httpx.stream(
        "POST",
        first + "/v1/functions/admitted/predict",
        headers=bearer(keys.acme) | sse,
        json={"input": 1},
        timeout=10,
    ) as answer:
        task_id = answer.headers["location"].split("/")[3]
        assert call(first, "GET", f"/v1/tasks/{task_id}", keys.acme).json()["status"] == "queued"

    def canceled() -> bool:
        task = call(first, "GET", f"/v1/tasks/{task_id}", keys.acme).json()
        return bool(task["status"] == "canceled")

    wait_until(canceled, 10, "the hung-up stream's task canceled")


def test_idempotency_keys_are_scoped_per_tenant(
    gateways: tuple[Gateway, Gateway], keys: Keys
) -> None:
    first, second = (gw.url for gw in gateways)
    idem = {"Idempotency-Key": f"shared-{time.time_ns()}"}
    body = {"input": "same"}

    def submit(url: str, key: str, json: object = body) -> httpx.Response:
        return httpx.post(
            url + "/v1/functions/echo/tasks", headers={**bearer(key), **idem}, json=json
        )

    acme = submit(first, keys.acme)
    globex = submit(second, keys.globex)
    assert acme.status_code == globex.status_code == 202
    assert acme.json()["id"] != globex.json()["id"]
    assert "idempotent-replayed" not in globex.headers
    replayed = submit(second, keys.acme)
    assert replayed.json()["id"] == acme.json()["id"]
    assert replayed.headers["idempotent-replayed"] == "true"
    # One tenant's other body conflicts with its own key only.
    assert submit(first, keys.globex, {"input": "other"}).status_code == 422
    assert submit(first, keys.admin, {"input": "other"}).status_code == 202


def test_clients_send_the_key_and_raise_typed_errors(
    gateways: tuple[Gateway, Gateway], keys: Keys
) -> None:
    url = gateways[0].url
    with runq.Client(url, api_key=keys.acme, timeout=10) as client:
        assert client.predict("double", 21) == 42
        task = client.submit("echo", "later")
        assert task.tenant == "acme"
        assert client.result(task.id, wait=10).output == "later"
    started = time.monotonic()
    with (
        runq.Client(url, api_key="runq_bogus", timeout=10) as client,
        pytest.raises(runq.Unauthenticated) as refused,
    ):
        client.predict("double", 1)
    # Not retried: asking again with the same key cannot help.
    assert refused.value.details["attempts"] == 1 and time.monotonic() - started < 2
    with (
        runq.Client(url, api_key=keys.read_only, timeout=10) as client,
        pytest.raises(runq.Forbidden),
    ):
        client.submit("echo", 1)

    async def run() -> None:
        async with runq.AsyncClient(url, api_key=keys.globex, timeout=10) as client:
            assert await client.predict("double", 4) == 8
            with pytest.raises(runq.NotFound):
                await client.status(task.id)  # acme's
        async with runq.AsyncClient(url, timeout=10) as client:
            with pytest.raises(runq.Unauthenticated):
                await client.predict("double", 4)

    asyncio.run(run())


def test_request_metrics_carry_a_tenant_label_only_when_asked(
    gateways: tuple[Gateway, Gateway], keys: Keys
) -> None:
    plain, labelled = gateways
    for gw in gateways:
        predicted = call(
            gw.url, "POST", "/v1/functions/echo/predict", keys.globex, json={"input": 1}
        )
        assert predicted.status_code == 200
        call(gw.url, "GET", "/v1/functions", "runq_bogus")

    def durations(gw: Gateway) -> list[str]:
        scrape = call(gw.url, "GET", "/metrics", keys.admin).text
        return [line for line in scrape.splitlines() if line.startswith("runq_request_duration")]

    assert any(
        'function="echo"' in line and 'tenant="globex"' in line for line in durations(labelled)
    )
    assert durations(plain) and not any("tenant=" in line for line in durations(plain))


@pytest.mark.parametrize("command", ["gateway", "serve"])
def test_a_gateway_on_a_non_loopback_address_without_auth_refuses_to_start(command: str) -> None:
    # 192.0.2.1 (TEST-NET-1) is nobody's address: the refusal comes before any bind.
    env = {"RUNQ_REDIS_URL": "redis://127.0.0.1:1"}
    refused = run_runq(command, FNS, "--host", "192.0.2.1", env=env)
    assert refused.returncode == 2
    assert "`auth`" in refused.stderr and "192.0.2.1" in refused.stderr


def test_the_auth_default_follows_the_bind_address_and_the_library_raises() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "::1", "localhost"):
        assert Settings(host=host).auth_mode() == "off"
    for host in ("0.0.0.0", "10.1.2.3", "::", "gateway.internal"):
        with pytest.raises(ConfigError, match="`auth`"):
            Settings(host=host).auth_mode()
        assert Settings(host=host, auth="off").auth_mode() == "off"
        assert Settings(host=host, auth="keys").auth_mode() == "keys"
    with pytest.raises(ConfigError, match="`auth`"):
        create_app(Settings(redis_url="redis://127.0.0.1:1", host="10.1.2.3"), load_target(FNS))


def test_a_verified_key_is_looked_up_again_only_once_its_cache_time_is_over(
    valkey_url: str,
) -> None:
    now = [1000.0]
    cache = KeyCache(ttl_s=0.5, clock=lambda: now[0])
    with Redis.from_url(valkey_url) as redis:
        key, record = create_key(redis, "cached", ("read",), rate_per_s=2.5, max_queued=9)

        async def run() -> None:
            connection = async_redis(valkey_url)
            cache.connect(connection)
            try:
                first = await cache.principal(key)
                assert first == Principal(record.key_id, "cached", frozenset({"read"}), 2.5, 9)
                revoke_key(redis, record.key_id)
                # Within its cache time the key is not read again (no Redis round trip)...
                now[0] += 0.49
                assert await cache.principal(key) == first
                # ...and after it, the revocation holds.
                now[0] += 0.02
                assert await cache.principal(key) is None
                assert await cache.principal("runq_nonsense") is None
            finally:
                await connection.aclose()

        asyncio.run(run())


def test_task_views_show_a_tenant_its_own_tasks_and_purge_is_an_admins(
    gateways: tuple[Gateway, Gateway], keys: Keys
) -> None:
    url = gateways[0].url
    # `admitted` has no worker: the tasks stay queued, to be listed and purged.
    mine = [
        call(url, "POST", "/v1/functions/admitted/tasks", key, json={"input": i}).json()["id"]
        for i, key in enumerate((keys.acme, keys.globex, keys.acme))
    ]

    def listed(key: str, query: str = "") -> list[str]:
        path = f"/v1/functions/admitted/tasks?status=queued&limit=500{query}"
        answer = call(url, "GET", path, key)
        assert answer.status_code == 200, answer.text
        return [task["id"] for task in answer.json()["tasks"]]

    assert set(listed(keys.acme)) & set(mine) == {mine[0], mine[2]}
    # Asking for another tenant's tasks shows a tenant still only its own.
    assert set(listed(keys.globex, "&tenant=acme")) & set(mine) == {mine[1]}
    assert set(listed(keys.admin, "&tenant=globex")) & set(mine) == {mine[1]}
    assert set(listed(keys.admin)) >= set(mine)
    # A failed task of acme's: globex cannot retry it, nor learn that it exists.
    failed = call(url, "POST", "/v1/functions/fails/predict", keys.acme, json={"input": "boom"})
    failed_id = failed.json()["error"]["task_id"]
    assert call(url, "POST", f"/v1/tasks/{failed_id}/retry", keys.globex).status_code == 404
    assert call(url, "POST", f"/v1/tasks/{failed_id}/retry", keys.read_only).status_code == 403
    assert call(url, "POST", f"/v1/tasks/{failed_id}/retry", keys.acme).status_code == 202
    purge = "/v1/functions/admitted/tasks?status=queued"
    assert call(url, "DELETE", purge, keys.acme).status_code == 403
    assert call(url, "DELETE", purge, keys.admin).json()["purged"] >= len(mine)
    assert not set(listed(keys.admin)) & set(mine)


def test_a_keys_quotas_answer_429_on_every_gateway_and_enqueue_nothing(
    gateways: tuple[Gateway, Gateway], keys: Keys, redis: Redis
) -> None:
    first, second = (gw.url for gw in gateways)
    capped = create_key(redis, "capped", max_queued=2)[0]
    slow = create_key(redis, "slow", rate_per_s=0.2)[0]
    queue = "rq:queue:runq.admitted@capped"
    # `admitted` has no worker: what is admitted stays queued and counts against the cap.
    for url in (first, second):
        answer = call(url, "POST", "/v1/functions/admitted/tasks", capped, json={"input": 1})
        assert answer.status_code == 202, answer.text
    for url in (first, second):
        answer = call(url, "POST", "/v1/functions/admitted/tasks", capped, json={"input": 1})
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "quota_exceeded"
        assert int(answer.headers["retry-after"]) >= 1
    assert redis.llen(queue) == 2
    assert call(first, "POST", "/v1/functions/echo/predict", slow, json={"input": 1}).is_success
    # One token a burst, refilled every 5 s: the next request, on either gateway, is refused.
    answer = call(second, "POST", "/v1/functions/echo/predict", slow, json={"input": 1})
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "rate_limited"
    assert int(answer.headers["retry-after"]) >= 1
    with pytest.raises(runq.RateLimited):
        runq.Client(first, api_key=slow, retries=0).predict("echo", 1)
    purge = "/v1/functions/admitted/tasks?status=queued"
    assert call(first, "DELETE", purge, keys.admin).json()["purged"] >= 2
    assert redis.llen(queue) == 0
