"""runq's echo predict against BentoML 1.4's async echo service, under the same wrk load.

Both servers run at once on 127.0.0.1, each warmed up first: `runq serve examples/echo.py`
(embedded Valkey, one gateway process, one worker) and `bentoml serve bento_echo:Echo`
(benchmarks/bento_echo.py, one worker process, from its own venv: build/peers-venv, made by
`make bench-peers`). Each concurrency (64, then 16 and 1) is measured --rounds times, runq and
BentoML alternating (the order swapped each round), so a slow spell of the shared machine falls
on both. Next to the rates: the CPU per request of every process of each server (/proc), runq's
split into gateway, worker and Redis. Target: runq >= 2x BentoML's req/s at c=64.

    make bench-peers
    python benchmarks/peers.py --bentoml-python build/peers-venv/bin/python
                               [--duration S] [--rounds N] [--concurrency 64,16,1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cost import Cost
from harness import (
    BenchError,
    Server,
    after_readyz,
    cell,
    free_port,
    report_problems,
    runq_serve_argv,
    serving,
    stop_on_sigterm,
    verdict,
)
from run import (
    COST_LEGEND,
    SEED,
    SENTENCE_COUNT,
    LoadResult,
    cost_meter,
    echo_check,
    load_table,
    make_sentences,
    measure,
    warm_up,
    write_bodies,
)

HERE = Path(__file__).resolve().parent
CONCURRENCIES = (64, 16, 1)
MIN_RATIO_C64 = 2.0
RUNQ, BENTO = "runq", "bento"


def bento_argv(python: Path, port: int, home: Path) -> list[str]:
    # `env` execs BentoML: the process started is BentoML's own. No usage reports leave the
    # machine, and its home (bentos, models, config) is a throwaway directory.
    return [
        "env",
        "BENTOML_DO_NOT_TRACK=True",
        f"BENTOML_HOME={home}",
        str(python),
        "-m",
        "bentoml",
        "serve",
        "bento_echo:Echo",
        "--working-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def bentoml_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import bentoml; print(bentoml.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "True"},
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{python} cannot import bentoml:\n{done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def bench_peers(
    tmp: Path, python: Path, duration_s: float, rounds: int, concurrencies: list[int]
) -> dict[str, Any]:
    bodies = write_bodies(tmp / "bodies.jsonl", make_sentences(SENTENCE_COUNT, SEED))
    body = json.loads(bodies.read_text().splitlines()[0])
    runq_port, bento_port = free_port(), free_port()
    urls = {
        RUNQ: f"http://127.0.0.1:{runq_port}/v1/functions/echo/predict",
        BENTO: f"http://127.0.0.1:{bento_port}/echo",
    }
    servers = {
        RUNQ: Server(
            "runq serve examples/echo.py",
            runq_serve_argv("examples/echo.py", runq_port),
            tmp / "runq.log",
        ),
        BENTO: Server(
            "bentoml serve bento_echo:Echo",
            bento_argv(python, bento_port, tmp / "bentoml-home"),
            tmp / "bentoml.log",
        ),
    }
    checks = {
        RUNQ: after_readyz(runq_port, echo_check(urls[RUNQ], body)),
        BENTO: after_readyz(bento_port, echo_check(urls[BENTO], body)),
    }
    runs: list[LoadResult] = []
    with ExitStack() as stack:
        for target in (RUNQ, BENTO):
            print(f"  {target}: starting {servers[target].name}", flush=True)
            stack.enter_context(serving(servers[target], checks[target]))
            warm_up(urls[target], bodies, max(concurrencies))
        meters = {target: cost_meter(server) for target, server in servers.items()}
        for meter in meters.values():
            stack.callback(meter.close)
        for concurrency in concurrencies:
            for round_index in range(rounds):
                order = (RUNQ, BENTO) if round_index % 2 == 0 else (BENTO, RUNQ)
                for target in order:
                    result = measure(
                        target, urls[target], bodies, concurrency, duration_s, meters[target]
                    )
                    print(
                        f"  {target} c={concurrency} round {round_index + 1}:"
                        f" {result.rps:,.0f} req/s",
                        flush=True,
                    )
                    runs.append(result)
    for server in servers.values():
        report_problems(server)
    return {"runs": [asdict(r) for r in runs], "ratios": ratios(runs, concurrencies)}


def total_cpu_us(cost: Cost) -> float | None:
    """CPU per request of every process of the server, whatever its role."""
    parts = [cost.gateway_cpu_us, cost.worker_cpu_us, cost.redis_cpu_us, cost.supervisor_cpu_us]
    known = [part for part in parts if part is not None]
    return sum(known) if known else None


def ratios(runs: list[LoadResult], concurrencies: list[int]) -> list[dict[str, Any]]:
    found = []
    for concurrency in concurrencies:
        rates = {
            target: [r.rps for r in runs if r.target == target and r.concurrency == concurrency]
            for target in (RUNQ, BENTO)
        }
        cpu = {
            target: [
                total_cpu_us(r.cost)
                for r in runs
                if r.target == target and r.concurrency == concurrency
            ]
            for target in (RUNQ, BENTO)
        }
        if not rates[RUNQ] or not rates[BENTO]:
            continue
        runq_rps, bento_rps = statistics.mean(rates[RUNQ]), statistics.mean(rates[BENTO])
        found.append(
            {
                "concurrency": concurrency,
                "runq_rps": runq_rps,
                "bentoml_rps": bento_rps,
                "ratio": runq_rps / bento_rps if bento_rps else None,
                "runq_cpu_us": _mean(cpu[RUNQ]),
                "bentoml_cpu_us": _mean(cpu[BENTO]),
            }
        )
    return found


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def print_peers(result: dict[str, Any], duration_s: float) -> None:
    print(
        f"\nEcho: runq predict vs BentoML {result['meta']['bentoml']} async API"
        f" (wrk -t1, {duration_s:g} s per row, alternating)"
    )
    runs = [LoadResult(**{**r, "cost": Cost(**r["cost"])}) for r in result["runs"]]
    print(load_table(runs))
    print(COST_LEGEND + "; BentoML's processes all count as gw")
    print(
        f"\n{'conc':>4}  {'runq req/s':>10}  {'bento req/s':>11}  {'runq/bento':>10}"
        f"  {'runq CPU µs':>11}  {'bento CPU µs':>12}  target"
    )
    for row in result["ratios"]:
        target = ""
        if row["concurrency"] == 64 and row["ratio"] is not None:
            target = verdict(row["ratio"] >= MIN_RATIO_C64, f"runq >= {MIN_RATIO_C64:g}x BentoML")
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        runq_cpu, bento_cpu = cell(row["runq_cpu_us"], 11, 0), cell(row["bentoml_cpu_us"], 12, 0)
        print(
            f"{row['concurrency']:>4}  {row['runq_rps']:>10,.0f}  {row['bentoml_rps']:>11,.0f}"
            f"  {ratio:>10}  {runq_cpu}  {bento_cpu}  {target}".rstrip()
        )
    print("  CPU µs: per request, every process of the server (runq: gateway + worker + Redis")
    print("  + supervisor); req/s: the mean of the rounds")


# main ------------------------------------------------------------------------------------------


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: concurrencies must be >= 1")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bentoml-python",
        type=Path,
        required=True,
        help="the interpreter of a venv with bentoml>=1.4,<1.5 (make bench-peers makes one)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server and concurrency")
    parser.add_argument(
        "--concurrency",
        type=_concurrencies,
        default=list(CONCURRENCIES),
        help="comma-separated wrk connection counts (default 64,16,1)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.rounds < 1:
        print("peers.py: --duration must be positive and --rounds at least 1", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("peers.py: wrk is not on PATH; install it (apt-get install -y wrk)", file=sys.stderr)
        return 2
    stop_on_sigterm()
    print(
        f"runq vs BentoML: {os.cpu_count()} CPUs, {args.duration:g} s per run,"
        f" {args.rounds} rounds per concurrency"
    )
    try:
        version = bentoml_version(args.bentoml_python)
        with tempfile.TemporaryDirectory(prefix="runq-peers-") as tmp:
            found = bench_peers(
                Path(tmp), args.bentoml_python, args.duration, args.rounds, args.concurrency
            )
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\npeers.py: {exc}", file=sys.stderr)
        return 1
    result = {
        "meta": {
            "cpus": os.cpu_count(),
            "bentoml": version,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "concurrencies": args.concurrency,
        },
        **found,
    }
    print_peers(result, args.duration)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    errors = any(r["non2xx"] or r["socket_errors"] for r in result["runs"])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
