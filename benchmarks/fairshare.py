"""Fair share: tenant A floods a function with 5,000 tasks at once while tenant B sends 2
predicts/s; B's latency and A's throughput against each alone.

One `runq serve benchmarks/fairshare_fn.py` (one worker, a fixed 10 ms per batch of up to 4) on
a Valkey of its own. The gateway has no API keys yet, so its callers are all DEFAULT_TENANT:
B is that tenant, predicting over HTTP (POST /v1/functions/shared/predict, open loop, one
request every 0.5 s whatever the answers do), and A is tenant "a", its tasks admitted by
runq's own admission step (runq.queue.enqueue.Enqueue, the script every gateway runs) with the
job hash's tenant field set, all 5,000 pipelined at once as a burst of submits would arrive.

1. B alone for --b-seconds: B's latency unloaded.
2. A alone: its 5,000 tasks, timed from their admission to the last one's end (the job hashes'
   ended_at): A's throughput with the pool to itself.
3. Both: B's predicts start, A's flood is admitted 2 s later, and B goes on until A's last task
   has ended. B's latency counts the predicts sent while A had tasks queued or running.

Targets: B's p99 with A flooding <= 2x B's p99 alone (the claim takes B's task within about
one batch however deep A's queue is), and A's throughput with B not lowered (the pool stays
busy; B's 2 tasks/s are < 1 % of it).

    python benchmarks/fairshare.py [--b-seconds S] [--rounds N] [--json PATH]
    (make bench-fairshare)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import fairshare_fn
import httpx
from drain import ping, valkey_server
from harness import (
    BenchError,
    Server,
    after_readyz,
    free_port,
    get_json,
    report_problems,
    runq_serve_argv,
    serving,
    stop_on_sigterm,
    verdict,
)
from redis import Redis

from runq.queue import constants
from runq.queue.connection import async_redis
from runq.queue.enqueue import Enqueue, Reply, Request
from runq.queue.store import new_task_id
from runq.queue.tasks import new_job_fields
from runq.settings import FunctionSettings

HERE = Path(__file__).resolve().parent
FN_FILE = str((HERE / "fairshare_fn.py").relative_to(HERE.parent))
FUNCTION = "shared"
FLOOD_TENANT = "a"
FLOOD_TASKS = 5000
B_INTERVAL_S = 0.5
B_ALONE_S = 60.0
# Floods, each against A alone: B's p99 pools the predicts of all of them.
ROUNDS = 3
SLOWEST_SHOWN = 3
# B's predicts are under way before A's flood lands.
FLOOD_AFTER_S = 2.0
PREDICT_TIMEOUT_S = 30
POLL_S = 0.05

MAX_P99_RATIO = 2.0
# A's throughput is "not lowered" within this run-to-run noise.
MIN_THROUGHPUT_RATIO = 0.95


@dataclass(frozen=True)
class Latencies:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latencies:
        if not seconds:
            raise BenchError("no predict of B answered")
        ordered = sorted(seconds)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000

        return cls(len(ordered), quantile(0.5), quantile(0.99), ordered[-1] * 1000)


@dataclass(frozen=True)
class Flood:
    tasks: int
    seconds: float
    per_s: float

    @classmethod
    def total(cls, rounds: list[Flood]) -> Flood:
        tasks, seconds = sum(r.tasks for r in rounds), sum(r.seconds for r in rounds)
        return cls(tasks, seconds, tasks / seconds)


@dataclass(frozen=True)
class Result:
    b_alone: Latencies
    b_flooded: Latencies
    a_alone: Flood
    a_with_b: Flood
    # B's slowest predicts while A flooded: (seconds after A's admission, latency s).
    slowest: list[tuple[float, float]]

    @property
    def p99_ratio(self) -> float:
        return self.b_flooded.p99_ms / self.b_alone.p99_ms

    @property
    def throughput_ratio(self) -> float:
        return self.a_with_b.per_s / self.a_alone.per_s

    @property
    def met(self) -> bool:
        return self.p99_ratio <= MAX_P99_RATIO and self.throughput_ratio >= MIN_THROUGHPUT_RATIO


# tenant B: predicts over HTTP, open loop -------------------------------------------------------


class Predicts:
    """B's predicts, one every B_INTERVAL_S until stopped; each one's send time and latency."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.sent: list[tuple[float, float]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=60) as http:
            calls: list[asyncio.Task[None]] = []
            next_at = time.monotonic()
            while not self._stop.is_set():
                calls.append(asyncio.create_task(self._predict(http)))
                next_at += B_INTERVAL_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(next_at - time.monotonic(), 0))
            await asyncio.gather(*calls)

    def stop(self) -> None:
        self._stop.set()

    async def _predict(self, http: httpx.AsyncClient) -> None:
        started = time.monotonic()
        path = f"/v1/functions/{FUNCTION}/predict?timeout={PREDICT_TIMEOUT_S}"
        answer = await http.post(path, json={"input": 1})
        if answer.status_code != 200:
            raise BenchError(f"B's predict answered {answer.status_code}: {answer.text[:200]}")
        self.sent.append((started, time.monotonic() - started))


# tenant A: a burst admitted by runq's admission script -----------------------------------------


def flood_requests(redis_url: str, settings: FunctionSettings) -> list[Request]:
    """FLOOD_TASKS admissions of tenant A, built before the clock starts: building them is the
    harness's work, not the system's."""
    with Redis.from_url(redis_url) as job_connection:
        requests = []
        for index in range(FLOOD_TASKS):
            fields = new_job_fields(
                function=FUNCTION,
                settings=settings,
                payload_json=json.dumps(index).encode(),
                priority=constants.DEFAULT_PRIORITY,
                reply_to=None,
                connection=job_connection,
                tenant=FLOOD_TENANT,
            )
            request = Request(
                FUNCTION, new_task_id(), constants.DEFAULT_PRIORITY, fields, settings.max_queue
            )
            requests.append(request)
    return requests


async def admit_flood(redis_url: str, requests: list[Request]) -> None:
    """A's tasks admitted at once, as a burst of submits would be."""
    redis = async_redis(redis_url)
    try:
        replies = await asyncio.gather(*map(Enqueue(redis, idempotency_ttl_s=60), requests))
    finally:
        await redis.aclose()
    refused = [r.reply.name for r in replies if r.reply != Reply.ENQUEUED]
    if refused:
        raise BenchError(f"{len(refused)} of A's tasks refused ({refused[0]})")


async def wait_drained(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        while True:
            info = (await http.get(f"/v1/functions/{FUNCTION}")).json()
            if info["queued"] + info["running"] == 0:
                return
            await asyncio.sleep(POLL_S)


def flood_figures(redis_url: str, ids: list[str], admitted_at: float) -> Flood:
    """From admission (server clock) to the last task's end: every task must have succeeded."""
    with Redis.from_url(redis_url) as connection, connection.pipeline(False) as pipe:
        for task_id in ids:
            pipe.hmget(constants.job_key(task_id), constants.STATUS_FIELD, constants.ENDED_AT_FIELD)
        rows = pipe.execute()
    failed = [status for status, _ in rows if status != b"finished"]
    if failed:
        raise BenchError(f"{len(failed)} of A's tasks did not succeed ({failed[0]!r})")
    last = max(_epoch(ended_at) for _, ended_at in rows)
    seconds = last - admitted_at
    return Flood(len(ids), seconds, len(ids) / seconds)


def _epoch(stamp: bytes) -> float:
    return datetime.fromisoformat(stamp.decode()).replace(tzinfo=UTC).timestamp()


def server_now(redis_url: str) -> float:
    with Redis.from_url(redis_url) as connection:
        seconds, micros = connection.time()
        return float(seconds) + micros / 1e6


# phases ---------------------------------------------------------------------------------------


async def b_alone(base_url: str, seconds: float) -> list[tuple[float, float]]:
    predicts = Predicts(base_url)
    running = asyncio.create_task(predicts.run())
    await asyncio.sleep(seconds)
    predicts.stop()
    await running
    return predicts.sent


async def a_flood(base_url: str, redis_url: str, requests: list[Request]) -> float:
    """Admits A's flood and waits until the function has nothing queued or running; returns
    when the admission began (the server's clock). The admission runs in a process of its own:
    encoding 5,000 commands is the harness's CPU, and must not stall B's client meanwhile."""
    admitted_at = server_now(redis_url)
    admitter = multiprocessing.get_context("fork").Process(
        target=_admit_in_child, args=(redis_url, requests)
    )
    admitter.start()
    await asyncio.get_running_loop().run_in_executor(None, admitter.join)
    if admitter.exitcode != 0:
        raise BenchError(f"A's admission failed (exit code {admitter.exitcode})")
    await wait_drained(base_url)
    return admitted_at


def _admit_in_child(redis_url: str, requests: list[Request]) -> None:
    try:
        asyncio.run(admit_flood(redis_url, requests))
    except BenchError as exc:
        print(f"fairshare: {exc}", file=sys.stderr)
        sys.exit(1)


def flood_alone(base_url: str, redis_url: str, requests: list[Request]) -> Flood:
    admitted_at = asyncio.run(a_flood(base_url, redis_url, requests))
    return flood_figures(redis_url, [r.task_id for r in requests], admitted_at)


def both(
    base_url: str, redis_url: str, requests: list[Request]
) -> tuple[list[tuple[float, float]], Flood]:
    """B's predicts sent while A's tasks were queued or running (send time from the flood's
    admission, latency), and A's figures."""

    async def run() -> tuple[list[tuple[float, float]], float]:
        predicts = Predicts(base_url)
        running = asyncio.create_task(predicts.run())
        await asyncio.sleep(FLOOD_AFTER_S)
        flood_from = time.monotonic()
        admitted_at = await a_flood(base_url, redis_url, requests)
        flood_until = time.monotonic()
        predicts.stop()
        await running
        sent = [(at - flood_from, s) for at, s in predicts.sent if flood_from <= at <= flood_until]
        return sent, admitted_at

    sent, admitted_at = asyncio.run(run())
    return sent, flood_figures(redis_url, [r.task_id for r in requests], admitted_at)


def bench(b_seconds: float, rounds: int) -> Result:
    tmp = Path(tempfile.mkdtemp(prefix="runq-fairshare-"))
    valkey_port, port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{valkey_port}"
    base_url = f"http://127.0.0.1:{port}"
    valkey = valkey_server(tmp, valkey_port)
    server = Server(
        "runq serve",
        [*runq_serve_argv(FN_FILE, port), "--redis-url", redis_url],
        tmp / "serve.log",
    )

    def worker_up() -> None:
        info = get_json(f"{base_url}/v1/functions/{FUNCTION}")
        if info["replicas"]["current"] != 1:
            raise BenchError("no worker yet")

    print(f"  fairshare: Valkey on {valkey_port}, runq serve {FN_FILE} on {port}", flush=True)
    with serving(valkey, ping(redis_url)), serving(server, after_readyz(port, worker_up)):
        settings = FunctionSettings.model_validate(
            get_json(f"{base_url}/v1/functions/{FUNCTION}")["settings"]
        )
        print(f"  B alone, {b_seconds:g} s at {1 / B_INTERVAL_S:g} predicts/s", flush=True)
        alone = asyncio.run(b_alone(base_url, b_seconds))
        a_alone, a_with_b, flooded = [], [], []
        # Alternated, so that a drift in the machine's load weighs on both alike.
        for round_ in range(1, rounds + 1):
            print(f"  round {round_}/{rounds}: A alone, then A with B", flush=True)
            requests = flood_requests(redis_url, settings)
            a_alone.append(flood_alone(base_url, redis_url, requests))
            requests = flood_requests(redis_url, settings)
            sent, flood = both(base_url, redis_url, requests)
            a_with_b.append(flood)
            flooded += sent
        report_problems(server)
    return Result(
        Latencies.of([s for _, s in alone]),
        Latencies.of([s for _, s in flooded]),
        Flood.total(a_alone),
        Flood.total(a_with_b),
        slowest=sorted(flooded, key=lambda sample: -sample[1])[:SLOWEST_SHOWN],
    )


def print_result(result: Result) -> None:
    print(
        f"\nFair share: one worker, {fairshare_fn.MAX_BATCH_SIZE} tasks per batch of "
        f"{fairshare_fn.BATCH_S * 1000:g} ms; A floods {FLOOD_TASKS} tasks, B predicts "
        f"{1 / B_INTERVAL_S:g}/s"
    )
    header = f"{'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(f"  {'B predicts':<22} {header}")
    for name, figures in (("alone", result.b_alone), ("with A flooding", result.b_flooded)):
        print(
            f"  {name:<22} {figures.count:>6} {figures.p50_ms:>8.1f} {figures.p99_ms:>8.1f}"
            f" {figures.max_ms:>8.1f}"
        )
    print(f"  {'A flood':<22} {'tasks':>6} {'seconds':>8} {'tasks/s':>8}")
    for name, flood in (("alone", result.a_alone), ("with B predicting", result.a_with_b)):
        print(f"  {name:<22} {flood.tasks:>6} {flood.seconds:>8.2f} {flood.per_s:>8.1f}")
    slowest = ", ".join(f"{s * 1000:.0f} ms at +{at:.1f} s" for at, s in result.slowest)
    print(f"  B's slowest while A flooded (from A's admission): {slowest}")
    print(
        f"  B's p99 flooded / alone: {result.p99_ratio:.2f}x "
        f"{verdict(result.p99_ratio <= MAX_P99_RATIO, f'<= {MAX_P99_RATIO:g}x')}"
    )
    print(
        f"  A's throughput with B / alone: {result.throughput_ratio:.3f} "
        f"{verdict(result.throughput_ratio >= MIN_THROUGHPUT_RATIO, f'>= {MIN_THROUGHPUT_RATIO}')}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b-seconds", type=float, default=B_ALONE_S, help="B alone this long")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="floods, each against A alone")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    stop_on_sigterm()
    try:
        result = bench(args.b_seconds, args.rounds)
    except BenchError as exc:
        print(f"fairshare: {exc}", file=sys.stderr)
        return 1
    print_result(result)
    if args.json is not None:
        figures = {**asdict(result), "p99_ratio": result.p99_ratio}
        args.json.write_text(json.dumps({**figures, "throughput_ratio": result.throughput_ratio}))
    return 0 if result.met else 1


if __name__ == "__main__":
    sys.exit(main())
