"""Benchmarks runq against what it should come close to or beat, and under overload.

1. Echo: a bare FastAPI echo app versus runq's echo predict, under the same wrk load at
   concurrency 1, 16 and 64. Shows what the queue and the worker cost per request: next to the
   rates, the CPU each process role spent per request (gateway, worker, Redis; from /proc, see
   benchmarks/cost.py) and the Redis commands per request. Beside them, the floor: bare's app
   with a plain Redis list and worker process between it and its answer
   (benchmarks/queue_floor.py), what a plain queue costs here before runq's guarantees.
2. Embedding: all-MiniLM-L6-v2 called directly at batch 32 versus runq's embed predict at
   concurrency 64 (one sentence per request), with the same per-request costs. Shows how much
   of the model's rate survives serving.
3. Drain: 20,000 background tasks queued with no worker, then drained by one runq worker,
   against a stock RQ SimpleWorker draining 20,000 jobs (benchmarks/drain.py).
4. Overload: a fixed-cost function driven open-loop at 10x its measured capacity for
   2 x --duration seconds, against 0.5x for --duration (benchmarks/overload.py). Shows that
   admitted requests stay fast and the overflow gets fast 503s.
5. Lifecycle: the first answer from zero workers against the function's setup() time, and the
   time until a task whose worker got SIGKILL is re-queued or failed worker_lost
   (benchmarks/lifecycle.py).

    python benchmarks/run.py [--duration S] [--only echo|embed|drain|overload|lifecycle]
                             [--json PATH]

Echo and embedding need wrk on PATH (Debian: apt-get install wrk). Every server listens on
127.0.0.1 on a free port and is stopped before this exits, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cost import Cost, CostMeter, redis_url_in_tree, top_text
from drain import bench_drain, print_drain
from drain import had_errors as drain_had_errors
from harness import (
    BenchError,
    Server,
    after_readyz,
    cell,
    free_port,
    get_json,
    post_json,
    report_problems,
    runq_serve_argv,
    serving,
    stop_on_sigterm,
    verdict,
)
from lifecycle import bench_lifecycle, print_lifecycle
from lifecycle import had_errors as lifecycle_had_errors
from overload import bench_overload, print_overload
from stages import bench_stages, print_stages

from runq.functions import load_target

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LUA_SCRIPT = HERE / "wrk_post.lua"

CONCURRENCIES = (1, 16, 64)
EMBED_CONCURRENCY = 64
EMBED_BATCH_SIZE = 32
# The workers examples/embed.py runs (its max_replicas: one per core), one torch thread each.
EMBED_REPLICAS = int(
    load_target(str(REPO / "examples" / "embed.py"))["embed"].declared["max_replicas"]
)
WARMUP_S = 3
# Embedding latency at c=64 is hundreds of ms on a small CPU; wrk's 2 s default would turn a
# slow tail into "timeouts" and drop it from the percentiles.
WRK_TIMEOUT_S = 10
SENTENCE_COUNT = 1024
SEED = 20240601

# Targets shown next to the figures.
MIN_ECHO_RPS_RATIO_C64 = 0.40
MAX_ADDED_P50_MS_C1 = 1.0
MIN_EMBED_RATIO = 0.90

# Benchmarks that drive the servers themselves, without wrk.
NO_WRK = ("drain", "overload", "lifecycle")


@dataclass
class LoadResult:
    target: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    non2xx_codes: str
    socket_errors: int
    # Per request completed: CPU µs by process role and Redis commands, over the wrk run.
    cost: Cost = field(default_factory=Cost)


# inputs ----------------------------------------------------------------------------------------

_SUBJECTS = (
    "The new billing service",
    "Our support team",
    "A small bakery in Lisbon",
    "The city council",
    "My neighbour's teenage son",
    "The research group down the hall",
    "An old fishing boat",
    "Most first-year students",
    "The hospital's night shift",
    "A volunteer from the library",
    "The airline's mobile app",
    "Our biggest customer",
)
_VERBS = (
    "finally approved",
    "quietly replaced",
    "spent three weeks reviewing",
    "is still arguing about",
    "accidentally deleted",
    "wrote a long post about",
    "started testing",
    "keeps asking questions about",
    "could not explain",
    "was surprised by",
)
_OBJECTS = (
    "the plan to move every database to the cloud",
    "a cheaper way to deliver fresh bread",
    "the broken heating on the third floor",
    "the results of last year's survey",
    "the rules for parking near the station",
    "a recipe that uses only five ingredients",
    "the new schedule for weekend trains",
    "a report on rising sea levels",
    "the map of hiking trails",
    "the price of electricity in winter",
)
_TAILS = (
    "",
    "before the holidays.",
    "after a long meeting on Friday.",
    "without telling anyone.",
    "because the old one kept failing.",
    "despite the heavy rain.",
    "while everyone else was on leave.",
    "in front of the whole department.",
)


def make_sentences(count: int, seed: int) -> list[str]:
    """Distinct sentences of 10 to 20 words: real tokenisation and padding, not one cached input."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    for _ in range(count * 100):
        parts = [rng.choice(pool) for pool in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS)]
        sentence = " ".join(part for part in parts if part)
        sentence = sentence if sentence.endswith(".") else sentence + "."
        if 10 <= len(sentence.split()) <= 20:
            found[sentence] = None
        if len(found) == count:
            break
    return list(found)


def write_bodies(path: Path, sentences: list[str]) -> Path:
    path.write_text("".join(json.dumps({"input": s}) + "\n" for s in sentences))
    return path


# load ------------------------------------------------------------------------------------------


def run_wrk(url: str, bodies: Path, concurrency: int, duration_s: float) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(bodies),
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + WRK_TIMEOUT_S + 30, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_RESULT "))
            return result
    raise BenchError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}{done.stderr}")


def measure(
    target: str,
    url: str,
    bodies: Path,
    concurrency: int,
    duration_s: float,
    meter: CostMeter | None = None,
) -> LoadResult:
    if meter is not None:
        meter.start()
    raw = run_wrk(url, bodies, concurrency, duration_s)
    cost = meter.stop(raw["requests"]) if meter is not None else Cost()
    socket_errors = sum(
        raw[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return LoadResult(
        target=target,
        concurrency=concurrency,
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=raw["requests"],
        non2xx=raw["non2xx"],
        non2xx_codes=raw["non2xx_codes"],
        socket_errors=socket_errors,
        cost=cost,
    )


def cost_meter(server: Server) -> CostMeter:
    """Meters the server's process tree, and its Redis when one runs in it (`runq serve`)."""
    assert server.process is not None
    return CostMeter([server.process.pid], redis_url_in_tree(server.process.pid))


def warm_up(url: str, bodies: Path, concurrency: int) -> None:
    # Lazily built state (connection pools, pydantic validators, torch's kernels and buffers)
    # is paid for here, not in the figures.
    run_wrk(url, bodies, concurrency, WARMUP_S)


# echo ------------------------------------------------------------------------------------------


def echo_check(url: str, body: dict[str, Any]) -> Callable[[], None]:
    def check() -> None:
        answer = post_json(url, body, timeout=10)
        if answer.get("output") != body["input"]:
            raise BenchError(f"unexpected answer from {url}: {answer!r}")

    return check


def bench_bare_echo(tmp: Path, bodies: Path, duration_s: float) -> list[LoadResult]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/echo"
    argv = [sys.executable, str(HERE / "bare_echo.py"), "--port", str(port)]
    server = Server("bare echo", argv, tmp / "bare_echo.log")
    return _bench_echo_target(server, "bare", url, bodies, duration_s)


def bench_floor_echo(tmp: Path, bodies: Path, duration_s: float) -> list[LoadResult]:
    """bare_echo.py's app with a Redis list and a worker process between it and its answer:
    what a plain Redis-list queue costs here (benchmarks/queue_floor.py)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/echo"
    argv = [sys.executable, str(HERE / "queue_floor.py"), "gateway", "--port", str(port)]
    server = Server("queue floor", argv, tmp / "queue_floor.log")
    return _bench_echo_target(server, "floor", url, bodies, duration_s)


def bench_runq_echo(
    tmp: Path, bodies: Path, duration_s: float
) -> tuple[list[LoadResult], dict[str, Any]]:
    """The loads, then where a lone predict's time goes (benchmarks/stages.py)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/functions/echo/predict"
    argv = runq_serve_argv("examples/echo.py", port)
    server = Server("runq serve examples/echo.py", argv, tmp / "runq_echo.log")
    stages: dict[str, Any] = {}

    def split_lone_predicts() -> None:
        assert server.process is not None
        redis_url = redis_url_in_tree(server.process.pid)
        if redis_url is not None:
            body = json.loads(bodies.read_text().splitlines()[0])
            stages.update(bench_stages(url, redis_url, body))

    results = _bench_echo_target(
        server, "runq", url, bodies, duration_s, ready_port=port, then=split_lone_predicts
    )
    return results, stages


def _bench_echo_target(
    server: Server,
    target: str,
    url: str,
    bodies: Path,
    duration_s: float,
    ready_port: int | None = None,
    then: Callable[[], None] | None = None,
) -> list[LoadResult]:
    body = json.loads(bodies.read_text().splitlines()[0])
    check = echo_check(url, body)
    if ready_port is not None:
        check = after_readyz(ready_port, check)
    results = []
    print(f"  {target}: starting {server.name}", flush=True)
    with serving(server, check):
        warm_up(url, bodies, max(CONCURRENCIES))
        meter = cost_meter(server)
        try:
            for concurrency in CONCURRENCIES:
                result = measure(target, url, bodies, concurrency, duration_s, meter)
                print(f"  {target} c={concurrency}: {result.rps:,.0f} req/s", flush=True)
                results.append(result)
        finally:
            meter.close()
        if then is not None:
            then()
    report_problems(server)
    return results


def echo_ratios(results: list[LoadResult]) -> list[dict[str, Any]]:
    """runq against bare FastAPI at each concurrency; bare's figures are the mean of its runs
    (before and after runq's), so that a drift of the machine during the run weighs on both."""
    ratios = []
    for concurrency in CONCURRENCIES:
        bare = [r for r in results if r.target == "bare" and r.concurrency == concurrency]
        runq = [r for r in results if r.target == "runq" and r.concurrency == concurrency]
        floor = [r for r in results if r.target == "floor" and r.concurrency == concurrency]
        if not bare or not runq:
            continue
        bare_rps = sum(r.rps for r in bare) / len(bare)
        bare_p50_ms = sum(r.p50_ms for r in bare) / len(bare)
        row = {
            "concurrency": concurrency,
            "bare_rps": bare_rps,
            "rps_ratio": runq[0].rps / bare_rps if bare_rps else 0.0,
            "added_p50_ms": runq[0].p50_ms - bare_p50_ms,
        }
        if floor:
            row["floor_rps_ratio"] = floor[0].rps / bare_rps if bare_rps else 0.0
            row["floor_added_p50_ms"] = floor[0].p50_ms - bare_p50_ms
        ratios.append(row)
    return ratios


def print_echo(results: list[LoadResult], ratios: list[dict[str, Any]], duration_s: float) -> None:
    print(f"\nEcho: bare FastAPI vs runq predict (wrk -t1, {duration_s:g} s per row)")
    print(load_table(results))
    print(COST_LEGEND)
    for r in results:
        if r.cost.redis_top:
            print(f"  {r.target} c={r.concurrency} Redis commands per request: {top_text(r.cost)}")
    print("  bare ran before and after runq: the ratios below take the mean of its two runs")
    print(
        "  floor: bare's app with a Redis list and a worker process between it and its answer"
        " (benchmarks/queue_floor.py): what a plain Redis-list queue costs here"
    )
    print(
        f"\n{'conc':>4}  {'runq/bare req/s':>15}  {'added p50 ms':>12}"
        f"  {'floor/bare':>10}  {'floor added':>11}  target"
    )
    for row in ratios:
        concurrency, ratio, added = row["concurrency"], row["rps_ratio"], row["added_p50_ms"]
        floor_ratio = f"{row['floor_rps_ratio']:>10.1%}" if "floor_rps_ratio" in row else "-"
        floor_added = cell(row.get("floor_added_p50_ms"), 11, 2)
        target = ""
        if concurrency == 64:
            target = verdict(
                ratio >= MIN_ECHO_RPS_RATIO_C64, f"req/s >= {MIN_ECHO_RPS_RATIO_C64:.0%} of bare"
            )
        elif concurrency == 1:
            target = verdict(added <= MAX_ADDED_P50_MS_C1, f"added p50 <= {MAX_ADDED_P50_MS_C1} ms")
        print(
            f"{concurrency:>4}  {ratio:>15.1%}  {added:>12.2f}  {floor_ratio:>10}  {floor_added}"
            f"  {target}".rstrip()
        )


COST_LEGEND = (
    "  gw/wk/redis µs: CPU per request of the gateway process(es), the worker(s) and Redis"
    " (/proc utime+stime over the run); cmds: Redis commands per request (INFO commandstats:"
    " those a Lua script runs count too); scripts: script calls per request, a round trip each"
)


def cost_text(cost: Cost) -> str:
    return (
        f"gateway {cell(cost.gateway_cpu_us, 0, 0)} µs CPU, worker {cell(cost.worker_cpu_us, 0, 0)}"
        f" µs, Redis {cell(cost.redis_cpu_us, 0, 0)} µs and {cell(cost.redis_cmds, 0, 1)} commands"
    )


def load_table(results: list[LoadResult]) -> str:
    header = (
        f"{'target':<6}  {'conc':>4}  {'req/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}"
        f"  {'requests':>9}  {'non-2xx':>7}  {'sock err':>8}"
        f"  {'gw µs':>7}  {'wk µs':>7}  {'redis µs':>8}  {'cmds':>6}  {'scripts':>7}"
    )
    rows = [header]
    for r in results:
        non2xx = f"{r.non2xx}" + (f" ({r.non2xx_codes})" if r.non2xx_codes else "")
        c = r.cost
        rows.append(
            f"{r.target:<6}  {r.concurrency:>4}  {r.rps:>9,.0f}  {r.p50_ms:>8.2f}  {r.p99_ms:>8.2f}"
            f"  {r.requests:>9,}  {non2xx:>7}  {r.socket_errors:>8}"
            f"  {cell(c.gateway_cpu_us, 7, 0)}  {cell(c.worker_cpu_us, 7, 0)}"
            f"  {cell(c.redis_cpu_us, 8, 0)}  {cell(c.redis_cmds, 6, 1)}"
            f"  {cell(c.redis_scripts, 7, 2)}"
        )
    return "\n".join(rows)


# embed -----------------------------------------------------------------------------------------


def bench_offline_embed(sentences_file: Path, duration_s: float) -> dict[str, Any]:
    """The model called directly in one process, torch's threads as torch sets them."""
    (result,) = _offline_embed(sentences_file, duration_s, processes=1, threads=None)
    return result


def bench_offline_layout(sentences_file: Path, duration_s: float) -> dict[str, Any]:
    """The model called directly the way runq serves it: EMBED_REPLICAS processes at once,
    one torch thread each; their rates added up."""
    runs = _offline_embed(sentences_file, duration_s, processes=EMBED_REPLICAS, threads=1)
    return {
        "sentences_per_s": sum(run["sentences_per_s"] for run in runs),
        "batch_size": EMBED_BATCH_SIZE,
        "processes": len(runs),
        "threads": 1,
    }


def _offline_embed(
    sentences_file: Path, duration_s: float, *, processes: int, threads: int | None
) -> list[dict[str, Any]]:
    argv = [
        sys.executable,
        str(HERE / "offline_embed.py"),
        str(sentences_file),
        "--duration",
        str(duration_s),
        "--batch-size",
        str(EMBED_BATCH_SIZE),
        *([] if threads is None else ["--threads", str(threads)]),
    ]
    with ExitStack() as stack:
        running = []
        for i in range(processes):
            # A file, not a pipe: a child whose stderr filled a pipe nobody reads yet would stall.
            err = stack.enter_context((sentences_file.parent / f"offline_{i}.err").open("w+"))
            process = subprocess.Popen(
                argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True
            )
            stack.callback(_ended, process)
            running.append((process, err))
        results = []
        for process, err in running:
            out, _ = process.communicate(timeout=duration_s + 300)
            if process.returncode != 0:
                err.seek(0)
                raise BenchError(
                    f"offline embedding failed (exit {process.returncode}):\n{err.read()}"
                )
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results


def _ended(process: subprocess.Popen[str]) -> None:
    """A child stopped, whatever became of the others (one failed, or Ctrl-C)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def mean_offline(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    rates = [before["sentences_per_s"], after["sentences_per_s"]]
    return {**before, "sentences_per_s": sum(rates) / 2, "runs_sentences_per_s": rates}


def embed_check(url: str, body: object) -> Callable[[], None]:
    def check() -> None:
        answer = post_json(url, body, timeout=60)
        output = answer.get("output")
        if not (isinstance(output, list) and len(output) == 384):
            raise BenchError(f"unexpected answer from {url}: {str(answer)[:200]}")

    return check


def pool_ready(function_url: str, first: Callable[[], None]) -> Callable[[], None]:
    """``first``, then every one of the EMBED_REPLICAS workers up."""

    def check() -> None:
        first()
        current = get_json(function_url)["replicas"]["current"]
        if current < EMBED_REPLICAS:
            raise BenchError(f"{current} of {EMBED_REPLICAS} workers up")

    return check


@dataclass(frozen=True)
class Batches:
    """The worker's batches over a run, from the runq_batch_size and runq_execution_seconds
    histograms that the gateway's /metrics serves for every process of `runq serve`."""

    count: float
    tasks: float
    model_s: float

    @property
    def mean_size(self) -> float:
        return self.tasks / self.count if self.count else 0.0

    @property
    def model_ms(self) -> float:
        return 1000 * self.model_s / self.count if self.count else 0.0


def read_batches(metrics_url: str, function: str) -> Batches:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    figures = {}
    for name in ("runq_batch_size_count", "runq_batch_size_sum", "runq_execution_seconds_sum"):
        found = re.search(rf'^{name}{{function="{function}"}} (\S+)$', text, re.MULTILINE)
        figures[name] = float(found.group(1)) if found else 0.0
    return Batches(
        figures["runq_batch_size_count"],
        figures["runq_batch_size_sum"],
        figures["runq_execution_seconds_sum"],
    )


def bench_runq_embed(tmp: Path, bodies: Path, duration_s: float) -> tuple[LoadResult, Batches]:
    """The example as it is, but with its pool held at full size: the load is measured, not the
    autoscaler's scale-up (benchmarks/lifecycle.py times cold starts)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/functions/embed/predict"
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    argv = runq_serve_argv("examples/embed.py", port)
    env = {"RUNQ_FUNCTIONS__EMBED__MIN_REPLICAS": str(EMBED_REPLICAS)}
    server = Server("runq serve examples/embed.py", argv, tmp / "runq_embed.log", env)
    body = json.loads(bodies.read_text().splitlines()[0])
    function_url = f"http://127.0.0.1:{port}/v1/functions/embed"
    check = after_readyz(port, pool_ready(function_url, embed_check(url, body)))
    print(f"  runq: starting {server.name}", flush=True)
    with serving(server, check):
        warm_up(url, bodies, EMBED_CONCURRENCY)
        meter = cost_meter(server)
        before = read_batches(metrics_url, "embed")
        try:
            result = measure("runq", url, bodies, EMBED_CONCURRENCY, duration_s, meter)
        finally:
            meter.close()
        after = read_batches(metrics_url, "embed")
    report_problems(server)
    batches = Batches(
        after.count - before.count, after.tasks - before.tasks, after.model_s - before.model_s
    )
    return result, batches


def print_embed(
    offline: dict[str, Any] | None,
    served: LoadResult | None,
    batches: Batches | None = None,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    print("\nEmbedding: all-MiniLM-L6-v2 on the CPU, one sentence per request")
    summary: dict[str, Any] = {}
    if offline is not None:
        summary["offline_sentences_per_s"] = offline["sentences_per_s"]
        runs = " and ".join(f"{rate:,.1f}" for rate in offline.get("runs_sentences_per_s", []))
        print(
            f"  {'model called directly, batch ' + str(offline['batch_size']) + ':':<34}"
            f" {offline['sentences_per_s']:>9,.1f} sentences/s"
            + (f" (mean of {runs}, before and after serving)" if runs else "")
        )
    if layout is not None:
        summary["offline_layout_sentences_per_s"] = layout["sentences_per_s"]
        label = f"the same, {layout['processes']} processes x 1 thread:"
        runs = " and ".join(f"{rate:,.1f}" for rate in layout.get("runs_sentences_per_s", []))
        print(
            f"  {label:<34} {layout['sentences_per_s']:>9,.1f} sentences/s"
            " (the layout runq serves it with, added up" + (f"; mean of {runs})" if runs else ")")
        )
    if served is not None:
        summary["runq_sentences_per_s"] = served.rps
        print(
            f"  {'runq predict, c=' + str(served.concurrency) + ':':<34}"
            f" {served.rps:>9,.1f} sentences/s   p50 {served.p50_ms:.1f} ms"
            f"   p99 {served.p99_ms:.1f} ms   non-2xx {served.non2xx}"
            f"   socket errors {served.socket_errors}"
        )
        print(f"  {'per request:':<34} {cost_text(served.cost)}")
        print(f"  {'Redis commands per request:':<34} {top_text(served.cost)}")
    if batches is not None:
        summary["mean_batch_size"] = batches.mean_size
        summary["model_ms_per_batch"] = batches.model_ms
        direct = ""
        if offline is not None and offline["sentences_per_s"]:
            direct_ms = 1000 * offline["batch_size"] / offline["sentences_per_s"]
            direct = f" (direct: {direct_ms:.1f} ms per batch of {offline['batch_size']})"
        print(
            f"  {'batches:':<34} mean size {batches.mean_size:.1f}, model "
            f"{batches.model_ms:.1f} ms per batch{direct}"
        )
    if offline is not None and served is not None and offline["sentences_per_s"]:
        ratio = served.rps / offline["sentences_per_s"]
        summary["ratio"] = ratio
        judged = verdict(ratio >= MIN_EMBED_RATIO, f">= {MIN_EMBED_RATIO:.0%} of direct")
        print(f"  runq / direct: {ratio:.1%}  {judged}")
        if layout is not None and layout["sentences_per_s"]:
            same = served.rps / layout["sentences_per_s"]
            summary["ratio_same_layout"] = same
            print(f"  runq / direct in runq's layout: {same:.1%}  (what serving itself costs)")
    return summary


# main ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument(
        "--only",
        choices=("echo", "embed", "drain", "overload", "lifecycle"),
        help="run one of the five benchmarks",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.duration <= 0:
        print("run.py: --duration must be positive", file=sys.stderr)
        return 2
    if args.only not in NO_WRK and shutil.which("wrk") is None:
        print(
            "run.py: wrk is not on PATH; install it (Debian/Ubuntu: apt-get install -y wrk)",
            file=sys.stderr,
        )
        return 2
    stop_on_sigterm()
    try:
        with tempfile.TemporaryDirectory(prefix="runq-bench-") as tmp:
            results = _run(Path(tmp), args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\nrun.py: {exc}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 1 if _had_errors(results) else 0


def _run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    sentences = make_sentences(SENTENCE_COUNT, SEED)
    bodies = write_bodies(tmp / "bodies.jsonl", sentences)
    results: dict[str, Any] = {"meta": _meta(args.duration, len(sentences))}
    wrk_runs = "" if args.only in NO_WRK else f", wrk -t1, {WARMUP_S} s warm-up per server"
    print(f"runq benchmarks: {os.cpu_count()} CPUs, {args.duration:g} s per run{wrk_runs}")
    # Offline first: nothing else may compete with the model for the CPU.
    offline = layout = None
    if args.only in (None, "embed"):
        print("  direct: timing the model in its own process", flush=True)
        sentences_file = tmp / "sentences.json"
        sentences_file.write_text(json.dumps(sentences))
        offline = bench_offline_embed(sentences_file, args.duration)
        print(f"  direct: in {EMBED_REPLICAS} processes of one thread", flush=True)
        layout = bench_offline_layout(sentences_file, args.duration)
    if args.only in (None, "echo"):
        echo = bench_bare_echo(tmp, bodies, args.duration)
        runq_echo, stages = bench_runq_echo(tmp, bodies, args.duration)
        echo += runq_echo
        echo += bench_floor_echo(tmp, bodies, args.duration)
        echo += bench_bare_echo(tmp, bodies, args.duration)
        ratios = echo_ratios(echo)
        print_echo(echo, ratios, args.duration)
        if stages:
            bare_c1 = [r.p50_ms for r in echo if r.target == "bare" and r.concurrency == 1]
            print_stages(stages, sum(bare_c1) / len(bare_c1))
        results["echo"] = {"runs": [asdict(r) for r in echo], "ratios": ratios, "stages": stages}
    if args.only in (None, "embed"):
        served, batches = bench_runq_embed(tmp, bodies, args.duration)
        # The model alone again, after serving: the baseline is the mean of the two runs.
        assert offline is not None and layout is not None
        print("  direct: timing the model in its own process again", flush=True)
        offline = mean_offline(offline, bench_offline_embed(sentences_file, args.duration))
        print(f"  direct: in {EMBED_REPLICAS} processes of one thread again", flush=True)
        layout = mean_offline(layout, bench_offline_layout(sentences_file, args.duration))
        summary = print_embed(offline, served, batches, layout)
        results["embed"] = {
            "offline": offline,
            "offline_layout": layout,
            "runq": asdict(served),
            **summary,
        }
    if args.only in (None, "drain"):
        results["drain"] = bench_drain(tmp)
        print_drain(results["drain"])
    if args.only in (None, "overload"):
        results["overload"] = bench_overload(tmp, args.duration)
        print_overload(results["overload"])
    if args.only in (None, "lifecycle"):
        results["lifecycle"] = bench_lifecycle(tmp)
        print_lifecycle(results["lifecycle"])
    return results


def _meta(duration_s: float, sentence_count: int) -> dict[str, Any]:
    wrk_version: list[str] = []
    if shutil.which("wrk") is not None:
        wrk_version = subprocess.run(
            ["wrk", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wrk": wrk_version[0] if wrk_version else "",
        "duration_s": duration_s,
        "warmup_s": WARMUP_S,
        "distinct_inputs": sentence_count,
    }


def _had_errors(results: dict[str, Any]) -> bool:
    runs = list(results.get("echo", {}).get("runs", []))
    if "embed" in results:
        runs.append(results["embed"]["runq"])
    # Overload's 503 queue_full answers are the point of it; anything else is an error.
    overload_errors = any(p["other_errors"] for p in results.get("overload", {}).get("phases", []))
    lifecycle_errors = "lifecycle" in results and lifecycle_had_errors(results["lifecycle"])
    drain_errors = "drain" in results and drain_had_errors(results["drain"])
    return (
        overload_errors
        or lifecycle_errors
        or drain_errors
        or any(run["non2xx"] or run["socket_errors"] for run in runs)
    )


if __name__ == "__main__":
    sys.exit(main())
