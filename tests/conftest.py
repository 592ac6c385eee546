"""Real parts for every test: a Valkey server, uvicorn gateways and worker processes.

Only fixtures live here; the helpers they and the tests share are in tests/helpers.py.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator

import httpx
import pytest
from redis import Redis

from runq.embedded import EmbeddedValkey
from tests.fns import CALLS_KEY
from tests.helpers import (
    BUCKETS,
    GATEWAY_ENV,
    OBSERVED,
    OWN_DB,
    SERVED,
    Proc,
    Receiver,
    clear_function,
    free_port,
    launch_gateway,
    start_workers,
    wait_for_gateway,
    wait_until,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that start runq processes first, in-process ones last (order kept within each).

    `make test` hands whole modules to its xdist workers in this order (--dist loadfile
    --no-loadscope-reorder): the long modules start early and the short ones fill in at the end,
    instead of a module of one 12 s test starting last while the others sit idle."""
    starts_processes = {item.path for item in items if "procs" in item.fixturenames}
    items.sort(key=lambda item: item.path not in starts_processes)


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    server = EmbeddedValkey(port=free_port())
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis(valkey_url: str) -> Iterator[Redis]:
    client = Redis.from_url(valkey_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def procs(
    valkey_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Proc]]:
    """Starts runq processes against the suite's Valkey; stops what is left at the end."""
    started: list[Proc] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(*args: str, env: dict[str, str] | None = None, terminal: bool = False) -> Proc:
        name = "-".join(a.replace("/", "_") for a in args[:4])
        proc = Proc(
            list(args),
            # One gateway process unless a test asks for more: the suite's assertions about
            # a process's limits (max_inflight) hold for one.
            {"RUNQ_REDIS_URL": valkey_url, "RUNQ_API_WORKERS": "1", **(env or {})},
            logs / f"{len(started)}-{name}.log",
            terminal,
        )
        started.append(proc)
        return proc

    yield start
    # All asked at once, then awaited: each drains in parallel instead of one after another.
    left = [proc for proc in started if proc.alive()]
    for proc in left:
        proc.process.send_signal(signal.SIGTERM)
    for proc in left:
        proc.stop(signaled=True)


@pytest.fixture(scope="session")
def gateway(procs: Callable[..., Proc], valkey_url: str) -> str:
    """A gateway serving tests/fns.py with a worker for every function but `parked`."""
    proc, url = launch_gateway(procs, env=GATEWAY_ENV)
    with Redis.from_url(valkey_url) as redis:
        start_workers(procs, redis, SERVED)
    wait_for_gateway(proc, url)
    return url


@pytest.fixture(scope="session")
def gateways(gateway: str, procs: Callable[..., Proc]) -> list[str]:
    """The suite's gateway and two more processes like it."""
    more = [launch_gateway(procs, env=GATEWAY_ENV) for _ in range(2)]
    for proc, url in more:
        wait_for_gateway(proc, url)
    return [gateway, *(url for _, url in more)]


@pytest.fixture
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def served(procs: Callable[..., Proc], valkey_url: str) -> Iterator[tuple[str, Proc]]:
    """`runq serve` with two API processes on the suite's Valkey, logging JSON: one per test
    module, stopped at its end, so that each module's figures are its own alone."""
    redis = Redis.from_url(valkey_url)
    redis.delete(CALLS_KEY.format("counted"), "runq:deployed", "runq:deployed:version")
    port = free_port()
    proc = procs(
        "serve",
        OBSERVED,
        "--port",
        str(port),
        "--api-workers",
        "2",
        "--log-format",
        "json",
        env={"RUNQ_REQUEST_BUCKETS": json.dumps(BUCKETS)},
    )
    wait_until(lambda: "runq is serving" in proc.output() or not proc.alive(), 60, "serve")
    assert proc.alive(), proc.output()
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: httpx.get(f"{url}/v1/functions/counted").json()["replicas"]["current"] == 1,
        60,
        "the worker",
    )
    yield url, proc
    proc.stop()  # the next module's `runq serve` must count alone
    redis.delete("runq:deployed", "runq:deployed:version")
    redis.close()


@pytest.fixture
def parked(redis: Redis) -> Iterator[None]:
    """`parked` starts each test with empty queues (every priority) and no worker."""
    clear_function(redis, "parked")
    yield
    clear_function(redis, "parked")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def store(valkey_url: str) -> Iterator[Redis]:
    """The suite's Valkey, on a database of its own: gateways of other tests, which run webhook
    senders against database 0, must not take these deliveries."""
    client = Redis.from_url(valkey_url, db=13)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def own_db(valkey_url: str) -> Iterator[tuple[Redis, str]]:
    """A database of the suite's Valkey that no session process uses, emptied, and its URL: for
    processes whose figures or cleanup must be theirs alone (the others clean database 0 with
    the default period, and would hold its maintenance lock for most of a minute)."""
    url = f"{valkey_url}/{OWN_DB}"
    client = Redis.from_url(url)
    client.flushdb()
    yield client, url
    client.flushdb()
    client.close()
