"""Helpers the tests share: ports, polling, /proc walks, runq child processes, a webhook
receiver with deliveries enqueued as a worker does, and what the tests of a running `runq serve`
(the `served` fixture) send it.

Fixtures live in tests/conftest.py; everything else a test module imports comes from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import resource
import signal
import socket
import ssl
import subprocess
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from runq.queue import constants
from runq.queue.connection import async_redis
from runq.queue.enqueue import Enqueue, Reply, Request
from runq.queue.store import new_task_id
from runq.queue.tasks import new_job_fields
from runq.queue.webhooks import enqueue
from runq.settings import FunctionSettings
from runq.webhook_sender import WebhookSender
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
# The `own_db` fixture's database (the `store` fixture has 13).
OWN_DB = 12


def clear_function(redis: Redis, function: str) -> None:
    """Empties every queue (each tenant's, each priority) of a worker-less function and what it
    recorded."""
    tenants = [t.decode() for t in redis.smembers(constants.tenants_key(function))]
    redis.delete(
        *(f"rq:queue:runq.{function}{suffix}" for suffix in PRIORITY_SUFFIXES),
        *(key for tenant in tenants for key in constants.queue_keys(function, tenant)),
        constants.tenants_key(function),
        constants.fair_key(function),
        f"runq:wake:{function}",
        CALLS_KEY.format(function),
        RAN_KEY.format(function),
    )


# `parked` has no worker unless a test starts one (the `parked` fixture empties its queue).
PARKED_QUEUE = "rq:queue:runq.parked"


def ran(redis: Redis) -> list[str]:
    """What `parked` ran, in order."""
    return [x.decode() for x in redis.lrange(RAN_KEY.format("parked"), 0, -1)]


def queued(redis: Redis, function: str) -> int:
    return sum(redis.llen(f"rq:queue:runq.{function}{s}") for s in PRIORITY_SUFFIXES)


def tenant_fields(
    connection: Redis,
    function: str,
    tenant: str = constants.DEFAULT_TENANT,
    priority: str = constants.DEFAULT_PRIORITY,
    settings: FunctionSettings | None = None,
) -> dict[str, Any]:
    """A new task's job hash as the gateway builds it (input 1)."""
    return new_job_fields(
        function=function,
        settings=settings or FunctionSettings(),
        payload_json=b"1",
        priority=priority,
        reply_to=None,
        connection=connection,
        tenant=tenant,
    )


def hanging_request(url: str, request: bytes) -> socket.socket:
    """A connection that has sent ``request`` (whole or a part) and never reads its answer:
    closing it is a caller hanging up."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(request)
    return sock


@contextlib.contextmanager
def open_files_limit(soft: int) -> Iterator[None]:
    """This process's soft limit on open files set to ``soft`` (processes started meanwhile
    inherit it), then restored."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


def http_request(method: str, path: str, body: object = None, **headers: str) -> bytes:
    """An HTTP/1.1 request's bytes; a JSON body if ``body`` is given."""
    content = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(content)}"]
    return "\r\n".join([*lines, "", ""]).encode() + content


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
    """A `python -m runq ...` child process whose output goes to a log file.

    With ``terminal``, the process runs as a shell runs a foreground job: in a session of its
    own whose controlling terminal is a pty, so `ctrl_c` reaches its whole process group
    through the terminal driver, exactly as a key press does.
    """

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, terminal: bool = False
    ) -> None:
        self.args = args
        self.log_path = log
        self._log = log.open("wb")
        self._controller: int | None = None
        tty = None
        if terminal:
            self._controller, tty = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runq", *args],
            env={**os.environ, **env},
            stdin=tty,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=terminal,
            preexec_fn=_take_stdin_as_controlling_terminal if terminal else None,
        )
        if tty is not None:
            os.close(tty)

    def ctrl_c(self) -> None:
        assert self._controller is not None, "started without a terminal"
        os.write(self._controller, b"\x03")

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(
        self, sig: int = signal.SIGTERM, timeout_s: float = 15.0, *, signaled: bool = False
    ) -> int:
        """Signals the process (unless ``signaled`` says it already was) and waits for its end."""
        if self.alive() and not signaled:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"runq {' '.join(self.args)} ignored signal {sig}") from None
        finally:
            self._log.close()
            if self._controller is not None:
                os.close(self._controller)
                self._controller = None


def _take_stdin_as_controlling_terminal() -> None:
    # A session leader's terminal ioctl also makes its group the terminal's foreground group.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def start_gateway(
    procs: Callable[..., Proc],
    *extra: str,
    env: dict[str, str] | None = None,
    target: str = FNS,
) -> str:
    proc, url = launch_gateway(procs, *extra, env=env, target=target)
    wait_for_gateway(proc, url)
    return url


def launch_gateway(
    procs: Callable[..., Proc],
    *extra: str,
    env: dict[str, str] | None = None,
    target: str = FNS,
) -> tuple[Proc, str]:
    """A gateway process started, and its URL, without waiting for it: what else a test starts
    meanwhile imports in parallel (`wait_for_gateway` before using it)."""
    port = free_port()
    proc = procs("gateway", target, "--port", str(port), *extra, env=env)
    return proc, f"http://127.0.0.1:{port}"


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
    (proc,) = start_workers(procs, redis, [function], target, env)
    return proc


def start_workers(
    procs: Callable[..., Proc],
    redis: Redis,
    functions: list[str],
    target: str = FNS,
    env: dict[str, str] | None = None,
) -> list[Proc]:
    """A worker per entry of ``functions``, all started before any is awaited: their imports
    overlap instead of queueing one behind another."""
    wanted = Counter(functions)
    keys = {function: f"rq:workers:runq.{function}" for function in wanted}
    before = {function: redis.scard(key) for function, key in keys.items()}
    started = [procs("worker", target, "--function", function, env=env) for function in functions]

    def registered() -> bool:
        for proc in started:
            if not proc.alive():
                raise AssertionError(f"worker exited:\n{proc.output()}")
        return all(redis.scard(keys[f]) >= before[f] + wanted[f] for f in wanted)

    wait_until(registered, 60, f"workers for {', '.join(functions)}")
    return started


GATEWAY_ENV = {
    "RUNQ_MAX_TIMEOUT_S": "30",
    "RUNQ_MAX_BODY_BYTES": "65536",
    "RUNQ_FUNCTIONS__CAPPED__MAX_QUEUE": "3",
}
SERVED = ["echo", "batches", "fails", "wrong_count", "double", "norm", "sleepy", "stateful"]


# webhooks: a receiver, deliveries enqueued as the worker's record does, a quick sender --------

SECRET = b"whsec-test"
PUBLIC = "http://93.184.216.34/hook"
HOOKED = str(TESTS / "fns_webhooks.py")
E2E_SECRET = "end-to-end-secret"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST and answers from a script."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []  # answers in order; then `default`
        self.default = 200
        self.delay_s = 0.0
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.requests.append((dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                    receiver.arrived.notify_all()
                time.sleep(receiver.delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/runq?token=s3cret"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.server.server_address[1]}/hooks/runq"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def task_body(task_id: str) -> bytes:
    view = {"id": task_id, "function": "echo", "status": "succeeded", "output": [1, 2, 3]}
    return json.dumps(view).encode()


def submit(store: Redis, task_id: str, url: str) -> bytes:
    body = task_body(task_id)
    with store.pipeline() as pipe:  # WATCH, then MULTI/EXEC, as the worker's record does
        pipe.watch(constants.job_key(task_id))
        pipe.multi()
        pipe.hset(constants.job_key(task_id), "status", "finished")
        enqueue(pipe, task_id, url, body)
        pipe.execute()
    return body


def delivered(store: Redis, task_id: str) -> bool:
    gone = not store.exists(constants.webhook_key(task_id))
    return gone and store.zscore(constants.WEBHOOKS_DUE_KEY, task_id) is None


def fast_sender(store: Redis, **kwargs: Any) -> WebhookSender:
    options: dict[str, Any] = {
        "allow_private": True,
        "backoff_s": 0.05,
        "poll_interval_s": 0.01,
        "timeout_s": 2.0,
        **kwargs,
    }
    return WebhookSender(store, SECRET, **options)


# a running `runq serve` of tests/fns_observed.py (the `served` fixture) ----------------------

OBSERVED = str(TESTS / "fns_observed.py")
# runq_request_duration_seconds buckets: 1 ms, 2 ms, ... doubling up to the first above 10 s.
BUCKETS = {"min": 0.001, "max": 10, "factor": 2}


def predict_all(url: str, inputs: list[object]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.gather(
                *(http.post("/v1/functions/counted/predict", json={"input": x}) for x in inputs)
            )

    return asyncio.run(run())


def batch_sizes(redis: Redis) -> list[int]:
    return [len(json.loads(raw)) for raw in redis.lrange(CALLS_KEY.format("counted"), 0, -1)]


def runq_cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return run_runq(*args, "--redis-url", redis_url)


def submit_tasks(
    url: str,
    function: str,
    count: int,
    settings: FunctionSettings,
    *,
    tenant: str = constants.DEFAULT_TENANT,
    priority: str = constants.DEFAULT_PRIORITY,
) -> list[str]:
    """``count`` tasks (input 1) admitted as the gateway admits them, pipelined: fast in bulk.
    Returns their ids, in admission order."""

    async def run() -> list[tuple[Reply, str]]:
        redis = async_redis(url)
        enqueue = Enqueue(redis, idempotency_ttl_s=60)
        try:
            admitted = await asyncio.gather(*map(enqueue, requests))
            return [(a.reply, a.value) for a in admitted]
        finally:
            await enqueue.aclose()
            await redis.aclose()

    with Redis.from_url(url) as job_connection:
        requests = [
            Request(
                function=function,
                task_id=new_task_id(),
                priority=priority,
                fields=tenant_fields(job_connection, function, tenant, priority, settings),
                max_queue=settings.max_queue,
            )
            for _ in range(count)
        ]
    replies = asyncio.run(run())
    assert {reply for reply, _ in replies} == {Reply.ENQUEUED}
    return [task_id for _, task_id in replies]
