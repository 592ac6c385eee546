"""Real parts for every test: a Valkey server, uvicorn gateways and worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from runq.embedded import EmbeddedValkey
from tests.fns import CALLS_KEY, RAN_KEY

TESTS = Path(__file__).parent
ROOT = TESTS.parent
FNS = str(TESTS / "fns.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    """Polls ``check`` until it returns something truthy; fails the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


PRIORITY_SUFFIXES = ("", ".high", ".low")


def clear_function(redis: Redis, function: str) -> None:
    """Empties every priority queue of a worker-less function and what it recorded."""
    redis.delete(
        *(f"rq:queue:runq.{function}{suffix}" for suffix in PRIORITY_SUFFIXES),
        f"runq:wake:{function}",
        CALLS_KEY.format(function),
        RAN_KEY.format(function),
    )


def queued(redis: Redis, function: str) -> int:
    return sum(redis.llen(f"rq:queue:runq.{function}{s}") for s in PRIORITY_SUFFIXES)


def run_runq(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m runq ARGS` run to its end, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "runq", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout_s,
    )


class Proc:
    """A `python -m runq ...` child process whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runq", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.alive():
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"runq {' '.join(self.args)} ignored signal {sig}") from None
        finally:
            self._log.close()


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

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        name = "-".join(a.replace("/", "_") for a in args[:4])
        proc = Proc(
            list(args),
            {"RUNQ_REDIS_URL": valkey_url, **(env or {})},
            logs / f"{len(started)}-{name}.log",
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.stop()


def start_gateway(
    procs: Callable[..., Proc],
    *extra: str,
    env: dict[str, str] | None = None,
    target: str = FNS,
) -> str:
    port = free_port()
    proc = procs("gateway", target, "--port", str(port), *extra, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_gateway(proc, url)
    return url


def wait_for_gateway(proc: Proc, url: str) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"gateway exited:\n{proc.output()}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 30, "the gateway to be ready")


def start_worker(
    procs: Callable[..., Proc],
    redis: Redis,
    function: str,
    target: str = FNS,
    env: dict[str, str] | None = None,
) -> Proc:
    before = redis.scard(f"rq:workers:runq.{function}")
    proc = procs("worker", target, "--function", function, env=env)

    def registered() -> bool:
        if not proc.alive():
            raise AssertionError(f"worker exited:\n{proc.output()}")
        return bool(redis.scard(f"rq:workers:runq.{function}") > before)

    wait_until(registered, 60, f"a worker for {function}")
    return proc


GATEWAY_ENV = {
    "RUNQ_MAX_TIMEOUT_S": "30",
    "RUNQ_MAX_BODY_BYTES": "65536",
    "RUNQ_FUNCTIONS__CAPPED__MAX_QUEUE": "3",
}
SERVED = ["echo", "batches", "fails", "wrong_count", "double", "norm", "sleepy", "stateful"]


@pytest.fixture(scope="session")
def gateway(procs: Callable[..., Proc], valkey_url: str) -> str:
    """A gateway serving tests/fns.py with a worker for every function but `parked`."""
    url = start_gateway(procs, env=GATEWAY_ENV)
    with Redis.from_url(valkey_url) as redis:
        for function in SERVED:
            start_worker(procs, redis, function)
    return url


@pytest.fixture
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        yield http
