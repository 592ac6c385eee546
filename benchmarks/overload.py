"""Overload: a function driven at about 10x its capacity, against the same at half capacity.

The function (benchmarks/overload_fn.py) sleeps a fixed time per batch, so its capacity is small
and steady; it is still measured here, not assumed. Three open-loop phases run against one
`runq serve`:

1. calibration: 2x the nominal capacity for a few seconds; the rate of 200s once the queue is
   full is the capacity every later rate is a multiple of;
2. 0.5x capacity for --duration seconds: the unloaded latency;
3. 10x capacity for 2 x --duration seconds (20 s by default): admitted latency, the 503s' latency
   and the share shed.

Open loop means requests leave on a fixed schedule whatever the server does, as many independent
clients would send them. A closed-loop tool such as wrk sends the next request as soon as an
answer comes, so fast 503s would raise the rate it offers without bound; and it waits for slow
answers, so it would offer less than 10x exactly when the server is slowest. The schedule is
split over a few generator processes, each an asyncio loop speaking HTTP/1.1 keep-alive over raw
streams: the load generator shares two cores with the server it measures, so its cost per
request must stay small (a few percent of a core per generator at ~1,000 req/s in all), which a
full client library's is not. Each request's latency runs from the moment it left (connecting,
when no idle connection was free, included) to the last byte of its answer; how late it left
against its schedule is reported as the generator's lag, so a generator that cannot keep up is
visible rather than hidden.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import overload_fn
from harness import (
    BenchError,
    Server,
    after_readyz,
    cell,
    free_port,
    post_json,
    report_problems,
    runq_serve_argv,
    serving,
    verdict,
)

HERE = Path(__file__).resolve().parent
FUNCTION = "fixed_cost"
NOMINAL_CAPACITY = overload_fn.MAX_BATCH_SIZE / overload_fn.BATCH_S

CALIBRATE_FACTOR = 2.0
CALIBRATE_S = 5.0
# The first second fills the queue; only completions after it count towards the capacity.
CALIBRATE_SKIP_S = 1.0
UNLOADED_FACTOR = 0.5
OVERLOAD_FACTOR = 10.0
# Between phases, so the queue a phase leaves behind is not the next phase's first latency.
SETTLE_S = 1.0

# Two processes hold ~1,000 req/s within a couple of milliseconds of schedule (p99); more would
# only take CPU from the server on a two-core machine.
GENERATORS = 2
# Lets the forked generators start before their first request is due.
START_DELAY_S = 0.5
PREDICT_TIMEOUT_S = 10
CLIENT_TIMEOUT_S = PREDICT_TIMEOUT_S + 5
# uvicorn closes a keep-alive connection after 5 s idle; reusing one near that races its close.
MAX_IDLE_S = 4.0
# Per generator. Past it requests are counted as client errors instead of opening sockets
# without bound against a server that has stopped answering.
MAX_CONNECTIONS = 512

MAX_ADMITTED_P99_RATIO = 2.0
MAX_SHED_P99_MS = 5.0

OK = "ok"
SHED = "shed"


# load generator (runs in the forked processes) -------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """One generator's share of a phase: requests first, first + step, ... of a global schedule
    whose request i is due at start + i / rate (monotonic clock, shared by all processes)."""

    host: str
    port: int
    path: str
    rate: float
    total: int
    start: float
    first: int
    step: int


# (due, sent, answered, outcome): times on the monotonic clock.
Record = tuple[float, float, float, str]


class _Overflow(Exception):
    """Every allowed connection is busy."""


class _BadResponse(Exception):
    """An answer this client cannot read as HTTP/1.1 with a Content-Length."""


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ConnectionPool:
    """Keep-alive connections to one server; an open-loop client opens another whenever all are
    busy instead of waiting for one, or it would stop being open-loop."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        # (connection, idle since): most recently used last, so the busy few stay warm.
        self.idle: list[tuple[Conn, float]] = []
        self.open = 0

    async def get(self) -> Conn:
        while self.idle:
            conn, since = self.idle.pop()
            # A connection the server closed, or is about to close for idling, would fail the
            # request on it: a client artefact, not a server error. Real clients skip them too.
            if conn[0].at_eof() or time.monotonic() - since > MAX_IDLE_S:
                self.discard(conn)
                continue
            return conn
        if self.open >= self.limit:
            raise _Overflow
        self.open += 1
        try:
            return await asyncio.open_connection(self.host, self.port)
        except BaseException:
            self.open -= 1
            raise

    def put(self, conn: Conn) -> None:
        self.idle.append((conn, time.monotonic()))

    def discard(self, conn: Conn) -> None:
        self.open -= 1
        conn[1].close()

    def close(self) -> None:
        for conn, _ in self.idle:
            conn[1].close()
        self.idle.clear()


def _request_bytes(schedule: Schedule, value: int) -> bytes:
    body = json.dumps({"input": value}).encode()
    head = (
        f"POST {schedule.path} HTTP/1.1\r\nHost: {schedule.host}:{schedule.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(pool: ConnectionPool, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    conn = await pool.get()
    reader, writer = conn
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        headers = dict(_header(line) for line in header_lines)
        if b"content-length" not in headers:
            raise _BadResponse(f"no Content-Length in {status_line!r}")
        body = await reader.readexactly(int(headers[b"content-length"]))
        status = int(status_line.split(b" ", 2)[1])
    except BaseException:
        pool.discard(conn)
        raise
    if headers.get(b"connection", b"").lower() == b"close":
        pool.discard(conn)
    else:
        pool.put(conn)
    return status, headers, body


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


def _outcome(value: int, status: int, headers: dict[bytes, bytes], body: bytes) -> str:
    # Every answer is read and checked: a fast 503 that is not queue_full, or a 200 carrying
    # someone else's output, must show up as an error rather than as shedding or throughput.
    try:
        answer = json.loads(body)
    except ValueError:
        return f"http_{status}_unreadable"
    if not isinstance(answer, dict):
        return f"http_{status}_not_an_object"
    if status == 200:
        return OK if answer.get("output") == value else "http_200_wrong_output"
    error = answer.get("error")
    code = error.get("code", "?") if isinstance(error, dict) else "?"
    if status == 503 and code == "queue_full":
        return SHED if b"retry-after" in headers else "http_503_queue_full_no_retry_after"
    return f"http_{status}_{code}"


async def _one(
    pool: ConnectionPool, schedule: Schedule, index: int, due: float, records: list[Record]
) -> None:
    request = _request_bytes(schedule, index)
    sent = time.monotonic()
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            status, headers, body = await _exchange(pool, request)
        outcome = _outcome(index, status, headers, body)
    except TimeoutError:
        outcome = "client_timeout"
    except Exception as exc:  # refused, reset, unreadable: each still a request to count
        outcome = f"client_{type(exc).__name__.lstrip('_')}"
    records.append((due, sent, time.monotonic(), outcome))


async def _drive(schedule: Schedule) -> list[Record]:
    pool = ConnectionPool(schedule.host, schedule.port, MAX_CONNECTIONS)
    records: list[Record] = []
    pending: set[asyncio.Task[None]] = set()
    for index in range(schedule.first, schedule.total, schedule.step):
        due = schedule.start + index / schedule.rate
        delay = due - time.monotonic()
        # Late requests still leave at once (their lag is recorded), but yield first so the
        # answers already in are read and timed rather than queued behind a burst of sends.
        await asyncio.sleep(max(delay, 0.0))
        task = asyncio.create_task(_one(pool, schedule, index, due, records))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    pool.close()
    return records


def _generate(schedule: Schedule) -> list[Record]:
    try:
        # uvicorn[standard] brings it; its loop costs the client less CPU per request.
        import uvloop
    except ImportError:
        return asyncio.run(_drive(schedule))
    return uvloop.run(_drive(schedule))


def drive(host: str, port: int, path: str, rate: float, duration_s: float) -> list[Record]:
    """Sends rate x duration_s requests on a fixed schedule from GENERATORS processes."""
    total = max(1, round(rate * duration_s))
    start = time.monotonic() + START_DELAY_S
    schedules = [
        Schedule(host, port, path, rate, total, start, first, GENERATORS)
        for first in range(GENERATORS)
    ]
    # fork: the generators need nothing re-imported, and start in milliseconds.
    processes = multiprocessing.get_context("fork").Pool(GENERATORS, initializer=_default_sigterm)
    try:
        parts = processes.map(_generate, schedules)
        processes.close()
    except BaseException:
        processes.terminate()  # Ctrl-C or a failed generator: stop the others now
        raise
    finally:
        processes.join()
    return sorted((record for part in parts for record in part), key=lambda r: r[0])


def _default_sigterm() -> None:
    # The harness turns SIGTERM into KeyboardInterrupt so its servers get stopped; a generator
    # has nothing to clean up, and Pool.terminate() stops generators with SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# figures ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    factor: float
    offered_rps: float
    duration_s: float
    requests: int
    achieved_rps: float
    lag_p99_ms: float
    lag_max_ms: float
    admitted: int
    admitted_rps: float
    admitted_p50_ms: float | None
    admitted_p99_ms: float | None
    shed: int
    shed_p50_ms: float | None
    shed_p99_ms: float | None
    shed_share: float
    other_errors: int
    other_error_kinds: dict[str, int] = field(default_factory=dict)
    # Per second of the schedule: tells a steady tail from one stall (JSON only).
    admitted_p99_ms_by_s: list[float | None] = field(default_factory=list)
    shed_p99_ms_by_s: list[float | None] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values, so an empty class never reads as 0 ms."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(
    name: str, factor: float, rate: float, duration_s: float, records: list[Record]
) -> Phase:
    sent = sorted(r[1] for r in records)
    # Rate between the first and the last send: what the server was actually offered.
    span = sent[-1] - sent[0] if len(sent) > 1 else 0.0
    ok = [(r[2] - r[1]) * 1000 for r in records if r[3] == OK]
    shed = [(r[2] - r[1]) * 1000 for r in records if r[3] == SHED]
    lags = [(r[1] - r[0]) * 1000 for r in records]
    others = Counter(r[3] for r in records if r[3] not in (OK, SHED))
    return Phase(
        name=name,
        factor=factor,
        offered_rps=rate,
        duration_s=duration_s,
        requests=len(records),
        achieved_rps=(len(sent) - 1) / span if span else 0.0,
        lag_p99_ms=percentile(lags, 99) or 0.0,
        lag_max_ms=max(lags, default=0.0),
        admitted=len(ok),
        admitted_rps=len(ok) / duration_s,
        admitted_p50_ms=percentile(ok, 50),
        admitted_p99_ms=percentile(ok, 99),
        shed=len(shed),
        shed_p50_ms=percentile(shed, 50),
        shed_p99_ms=percentile(shed, 99),
        shed_share=len(shed) / len(records) if records else 0.0,
        other_errors=sum(others.values()),
        other_error_kinds=dict(others),
        admitted_p99_ms_by_s=_p99_by_second(records, OK),
        shed_p99_ms_by_s=_p99_by_second(records, SHED),
    )


def _p99_by_second(records: list[Record], outcome: str) -> list[float | None]:
    if not records:
        return []
    first_due = records[0][0]
    seconds: list[list[float]] = [[] for _ in range(math.ceil(records[-1][0] - first_due) or 1)]
    for due, sent, answered, found in records:
        if found == outcome:
            seconds[min(int(due - first_due), len(seconds) - 1)].append((answered - sent) * 1000)
    return [_round(percentile(values, 99)) for values in seconds]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def capacity_from(records: list[Record]) -> float:
    """200s per second while the queue was full: completions after the skip, up to the last."""
    if not records:
        return 0.0
    first_due = records[0][0]
    ended = sorted(r[2] for r in records if r[3] == OK and r[2] >= first_due + CALIBRATE_SKIP_S)
    if len(ended) < 2:
        raise BenchError(f"calibration saw {len(ended)} successful answers; no capacity to use")
    return (len(ended) - 1) / (ended[-1] - ended[0])


# run -------------------------------------------------------------------------------------------


def _check(url: str) -> Callable[[], None]:
    def check() -> None:
        answer = post_json(url, {"input": 1}, timeout=PREDICT_TIMEOUT_S)
        if answer.get("output") != 1:
            raise BenchError(f"unexpected answer from {url}: {answer!r}")

    return check


def bench_overload(tmp: Path, duration_s: float) -> dict[str, Any]:
    port = free_port()
    path = f"/v1/functions/{FUNCTION}/predict?timeout={PREDICT_TIMEOUT_S}"
    url = f"http://127.0.0.1:{port}{path}"
    fn_file = str((HERE / "overload_fn.py").relative_to(HERE.parent))
    server = Server(f"runq serve {fn_file}", runq_serve_argv(fn_file, port), tmp / "overload.log")
    print(f"  overload: starting {server.name}", flush=True)
    with serving(server, after_readyz(port, _check(url))):
        phases, capacity = _phases(port, path, duration_s)
    # The gateway logs every 503 it answers; here they are the expected outcome, not trouble.
    report_problems(server, expected=("queue_full",))
    return _result(capacity, phases)


def _phases(port: int, path: str, duration_s: float) -> tuple[list[Phase], float]:
    def phase(name: str, rate: float, seconds: float) -> list[Record]:
        print(f"  overload: {name}, {rate:,.0f} req/s for {seconds:g} s", flush=True)
        records = drive("127.0.0.1", port, path, rate, seconds)
        time.sleep(SETTLE_S)
        return records

    calibration = phase("calibration", CALIBRATE_FACTOR * NOMINAL_CAPACITY, CALIBRATE_S)
    capacity = capacity_from(calibration)
    phases = []
    for name, factor, seconds in (
        ("0.5x", UNLOADED_FACTOR, duration_s),
        ("10x", OVERLOAD_FACTOR, 2 * duration_s),
    ):
        rate = factor * capacity
        phases.append(summarize(name, factor, rate, seconds, phase(name, rate, seconds)))
    return phases, capacity


def _result(capacity: float, phases: list[Phase]) -> dict[str, Any]:
    return {
        "function": {
            "name": FUNCTION,
            "batch_s": overload_fn.BATCH_S,
            "max_batch_size": overload_fn.MAX_BATCH_SIZE,
            "max_queue": overload_fn.MAX_QUEUE,
            "nominal_capacity_rps": NOMINAL_CAPACITY,
        },
        "generators": GENERATORS,
        "capacity_rps": capacity,
        "phases": [asdict(p) for p in phases],
        "targets": targets(phases),
    }


def targets(phases: list[Phase]) -> dict[str, Any]:
    by_name = {p.name: p for p in phases}
    unloaded, overloaded = by_name["0.5x"], by_name["10x"]
    ratio = None
    if unloaded.admitted_p99_ms and overloaded.admitted_p99_ms is not None:
        ratio = overloaded.admitted_p99_ms / unloaded.admitted_p99_ms
    shed_p99 = overloaded.shed_p99_ms
    return {
        "admitted_p99_ratio": ratio,
        "admitted_p99_ratio_max": MAX_ADMITTED_P99_RATIO,
        "admitted_p99_met": ratio is not None and ratio <= MAX_ADMITTED_P99_RATIO,
        "shed_p99_ms": shed_p99,
        "shed_p99_ms_max": MAX_SHED_P99_MS,
        "shed_p99_met": shed_p99 is not None and shed_p99 <= MAX_SHED_P99_MS,
    }


def print_overload(result: dict[str, Any]) -> None:
    fn = result["function"]
    print(
        f"\nOverload: {fn['name']} ({fn['max_batch_size']} per batch, {fn['batch_s'] * 1000:g} ms"
        f" per batch, max_queue {fn['max_queue']}), open loop from {result['generators']}"
        " generator processes"
    )
    print(
        f"  capacity {result['capacity_rps']:,.1f} tasks/s measured"
        f" (nominal {fn['nominal_capacity_rps']:,.0f})"
    )
    print(_phase_table([Phase(**p) for p in result["phases"]]))
    _print_targets(result["targets"])


def _phase_table(phases: list[Phase]) -> str:
    rows = [
        f"{'phase':<5}  {'offered/s':>9}  {'sent/s':>7}  {'lag p99/max':>11}  {'requests':>8}"
        f"  {'200/s':>6}  {'200 p50':>7}  {'200 p99':>7}  {'503 p50':>7}  {'503 p99':>7}"
        f"  {'shed':>6}  {'errors':>6}",
        f"{'':<5}  {'':>9}  {'':>7}  {'ms':>11}  {'':>8}  {'':>6}  {'ms':>7}  {'ms':>7}"
        f"  {'ms':>7}  {'ms':>7}  {'':>6}  {'':>6}",
    ]
    for p in phases:
        lag = f"{p.lag_p99_ms:.1f}/{p.lag_max_ms:.1f}"
        rows.append(
            f"{p.name:<5}  {p.offered_rps:>9,.1f}  {p.achieved_rps:>7,.1f}  {lag:>11}"
            f"  {p.requests:>8,}  {p.admitted_rps:>6,.1f}  {cell(p.admitted_p50_ms, 7)}"
            f"  {cell(p.admitted_p99_ms, 7)}  {cell(p.shed_p50_ms, 7)}  {cell(p.shed_p99_ms, 7)}"
            f"  {p.shed_share:>6.1%}  {p.other_errors:>6}"
        )
        if p.other_error_kinds:
            rows.append(f"       errors: {p.other_error_kinds}")
    return "\n".join(rows)


def _print_targets(found: dict[str, Any]) -> None:
    ratio, shed_p99 = found["admitted_p99_ratio"], found["shed_p99_ms"]
    ratio_text = f"{ratio:.2f}x" if ratio is not None else "n/a"
    shed_text = f"{shed_p99:.2f} ms" if shed_p99 is not None else "n/a (no 503s)"
    print(
        f"  200 p99 at 10x / at 0.5x: {ratio_text:<8}"
        f" {verdict(found['admitted_p99_met'], f'<= {MAX_ADMITTED_P99_RATIO:g}x')}"
    )
    print(
        f"  503 p99 at 10x:           {shed_text:<8}"
        f" {verdict(found['shed_p99_met'], f'<= {MAX_SHED_P99_MS:g} ms')}"
    )
