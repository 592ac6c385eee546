"""What every benchmark needs: servers started in their own session and always stopped, free
loopback ports, readiness checks and a few HTTP helpers. Shared by run.py, overload.py and
lifecycle.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The embed worker loads torch and the model before it answers.
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30


class BenchError(Exception):
    """A run that cannot produce figures; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A server process in its own session, so Ctrl-C reaches only us and we stop it in order."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = None if self.env is None else {**os.environ, **self.env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        # SIGTERM to the top process only: `runq serve` stops its gateway, workers and Valkey
        # itself. The group kill is for a process that ignores it, or a second Ctrl-C.
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            print(
                f"  {self.name} did not stop within {STOP_TIMEOUT_S} s; killing it."
                f" Its last lines:\n{self.log_tail()}",
                flush=True,
            )
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self, limit: int = 10, expected: tuple[str, ...] = ()) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        markers = ("Traceback", " ERROR ", " WARNING ", "Error:", "CRITICAL")
        found = [
            line
            for line in text.splitlines()
            if any(m in line for m in markers) and not any(e in line for e in expected)
        ]
        return found[:limit]


@contextmanager
def serving(server: Server, check: Callable[[], None]) -> Iterator[Server]:
    """Starts a server, waits until `check` passes, and always stops it afterwards."""
    try:
        server.start()
        wait_until_ready(server, check)
        yield server
    finally:
        server.stop()


def wait_until_ready(server: Server, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error = "no attempt yet"
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited early:\n{server.log_tail()}")
        try:
            check()
            return
        except (OSError, ValueError, BenchError) as exc:
            last_error = str(exc)
            time.sleep(0.25)
    raise BenchError(
        f"{server.name} not ready after {READY_TIMEOUT_S} s ({last_error}):\n{server.log_tail()}"
    )


def post_json(url: str, body: object, timeout: float = 60.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def get_ok(url: str) -> None:
    with urllib.request.urlopen(url, timeout=2):
        pass


def report_problems(server: Server, expected: tuple[str, ...] = ()) -> None:
    """Prints the log lines that look like trouble, less those containing an `expected` text."""
    problems = server.log_problems(expected=expected)
    if problems:
        print(f"  note: {server.name} logged problems (first {len(problems)} lines):")
        for line in problems:
            print(f"    {line}")


def runq_serve_argv(target: str, port: int) -> list[str]:
    # The module, not the console script: the same interpreter (and venv) as this harness.
    return [sys.executable, "-m", "runq", "serve", target, "--port", str(port)]


def after_readyz(port: int, check: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        get_ok(f"http://127.0.0.1:{port}/readyz")
        check()

    return both


def cell(value: float | None, width: int, decimals: int = 2, scale: float = 1.0) -> str:
    """A right-aligned table figure (times ``scale``), or a dash when there is none."""
    return f"{value * scale:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def verdict(ok: bool, target: str) -> str:
    return f"{'MET ' if ok else 'MISSED'} ({target})"


def stop_on_sigterm() -> None:
    """SIGTERM takes the same path as Ctrl-C, so the servers' `finally` blocks still run."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
