"""`runq status` as an operator runs it, against figures set up in the suite's Valkey."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis

from runq.queue import constants, stats
from tests.helpers import ROOT, Proc, free_port, predict_all, run_runq, runq_cli, wait_until

CLEAR_SCREEN = b"\x1b[H\x1b[2J"


def status_args(redis_url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "runq", "status", "--redis-url", redis_url, *args]


def runq_status(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_runq("status", "--redis-url", redis_url, *args)


def server_now_s(redis: Redis) -> float:
    seconds, micros = redis.time()
    return float(seconds + micros / 1e6)


@pytest.fixture
def busy(redis: Redis) -> Iterator[str]:
    """A function with 3 queued, 2 running, 1 live worker of 2 wanted, and 60 tasks ended in
    the last minute: 57 succeeded and 1 failed at 40 ms, 2 timed out at 3 s.
    """
    function = f"busy_{uuid.uuid4().hex[:8]}"
    now_s = server_now_s(redis)
    keys = [
        f"rq:queue:runq.{function}",
        f"rq:queue:runq.{function}.high",
        f"runq:leases:{function}",
        f"runq:alive:{function}",
        f"runq:replicas:{function}",
    ]
    redis.rpush(keys[0], "t1", "t2")
    redis.rpush(keys[1], "t3")
    redis.zadd(keys[2], {"t4": now_s + 60, "t5": now_s + 60, "lapsed": now_s - 1})
    redis.zadd(keys[3], {"worker-1": now_s + 60})
    redis.hset(keys[4], mapping={"current": 1, "desired": 2})
    outcomes = [("succeeded", 0.040)] * 57 + [("failed", 0.040)] + [("timed_out", 3.0)] * 2
    with redis.pipeline() as pipe:
        pipe.multi()
        stats.record(pipe, function, outcomes, now_s)
        pipe.execute()
    yield function
    redis.delete(*keys)
    redis.srem(constants.FUNCTIONS_KEY, function)


@pytest.fixture
def idle(redis: Redis) -> Iterator[str]:
    """A function listed before its first batch, with no worker and no autoscaler."""
    function = f"idle_{uuid.uuid4().hex[:8]}"
    redis.sadd(constants.FUNCTIONS_KEY, function)
    yield function
    redis.srem(constants.FUNCTIONS_KEY, function)


@pytest.fixture
def stranded(redis: Redis) -> Iterator[str]:
    """A function whose two queued tasks were created 300 s ago and whose last worker was last
    seen 150 s ago: its tasks have had nobody to take them for 150 s."""
    function = f"stranded_{uuid.uuid4().hex[:8]}"
    now_s = server_now_s(redis)
    created = datetime.fromtimestamp(now_s - 300, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    queue, seen = f"rq:queue:runq.{function}", f"runq:seen:{function}"
    jobs = [f"rq:job:{function}-{i}" for i in range(2)]
    redis.sadd(constants.FUNCTIONS_KEY, function)
    redis.rpush(queue, f"{function}-0", f"{function}-1")
    for job in jobs:
        redis.hset(job, "created_at", created)
    redis.set(seen, now_s - 150)
    yield function
    redis.delete(queue, seen, *jobs)
    redis.srem(constants.FUNCTIONS_KEY, function)


def test_work_with_no_live_worker_past_the_cold_start_budget_is_reported_stranded(
    valkey_url: str, stranded: str, busy: str
) -> None:
    report = json.loads(runq_status(valkey_url, "--json").stdout)
    rows = {row["function"]: row for row in report["functions"]}
    assert rows[stranded]["unserved_s"] == pytest.approx(150, abs=5)
    assert rows[stranded]["stranded"] is True
    assert (rows[busy]["unserved_s"], rows[busy]["stranded"]) == (0.0, False)  # a live worker
    table = runq_status(valkey_url).stdout
    assert f"STRANDED: {stranded} has 2 queued task(s) and no live worker for 15" in table
    assert f"STRANDED: {busy}" not in table
    # Within a longer budget (a slow cold start) it is only unserved, not stranded.
    patient = run_runq(
        "status", "--redis-url", valkey_url, "--json", env={"RUNQ_COLD_START_BUDGET_S": "600"}
    )
    rows = {row["function"]: row for row in json.loads(patient.stdout)["functions"]}
    assert rows[stranded]["stranded"] is False


def test_json_has_every_figure_of_every_listed_function(
    valkey_url: str, busy: str, idle: str
) -> None:
    result = runq_status(valkey_url, "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["window_s"] == 60
    rows = {row["function"]: row for row in report["functions"]}
    row = rows[busy]
    assert (row["queued"], row["running"], row["workers"]) == (3, 2, 1)
    assert row["replicas"] == {"current": 1, "desired": 2}
    assert (row["succeeded"], row["failed"], row["timed_out"], row["errors"]) == (57, 1, 2, 3)
    assert row["throughput_per_s"] == pytest.approx(1.0)
    assert row["p50_s"] == pytest.approx(0.040, rel=0.12)
    assert row["p99_s"] == pytest.approx(3.0, rel=0.12)
    assert rows[idle] == {
        "function": idle,
        "queued": 0,
        "running": 0,
        "workers": 0,
        "replicas": {"current": 0, "desired": None},
        "unserved_s": 0.0,
        "stranded": False,
        "succeeded": 0,
        "failed": 0,
        "timed_out": 0,
        "errors": 0,
        "throughput_per_s": 0.0,
        "p50_s": None,
        "p99_s": None,
    }


def test_table_has_a_row_per_function_in_aligned_columns(
    valkey_url: str, busy: str, idle: str
) -> None:
    result = runq_status(valkey_url)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header, *rows, footer = lines
    assert header.split() == [
        "FUNCTION",
        "QUEUED",
        "RUNNING",
        "REPLICAS",
        "THROUGHPUT",
        "P50",
        "P99",
        "ERRORS",
    ]
    assert len({len(line) for line in [header, *rows]}) == 1, result.stdout
    by_function = {row.split()[0]: row.split()[1:] for row in rows}
    assert by_function[busy] == ["3", "2", "1/2", "1.00/s", "40", "ms", "2.76", "s", "3"]
    assert by_function[idle] == ["0", "0", "0/-", "0.00/s", "-", "-", "0"]
    assert "last 60 s" in footer


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_watch_without_a_terminal_prints_one_report_after_another_until_ctrl_c(
    valkey_url: str, busy: str, tmp_path: Path, as_json: bool
) -> None:
    out = tmp_path / "out"
    with out.open("wb") as sink:
        flags = ["--json"] if as_json else []
        proc = subprocess.Popen(
            status_args(valkey_url, "--watch", "0.2", *flags), stdout=sink, cwd=ROOT
        )
        wait_until(lambda: out.read_text().count(busy) >= 2, 30, "two reports")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    text = out.read_text()
    assert "\x1b[" not in text
    if as_json:
        reports = [json.loads(line) for line in text.splitlines()]
        assert all(busy in {row["function"] for row in r["functions"]} for r in reports)
    else:
        assert text.count("runq status at") >= 2


def test_watch_on_a_terminal_redraws_in_place_until_ctrl_c(valkey_url: str, busy: str) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(status_args(valkey_url, "--watch", "0.2"), stdout=terminal, cwd=ROOT)
    os.close(terminal)
    seen = b""
    try:
        while seen.count(CLEAR_SCREEN) < 2 or seen.count(busy.encode()) < 2:
            ready, _, _ = select.select([controller], [], [], 30)
            assert ready, f"no redraw within 30 s: {seen!r}"
            seen += os.read(controller, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_shows_redis_unreachable_and_keeps_watching(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("wb") as sink:
        url = f"redis://127.0.0.1:{free_port()}"
        proc = subprocess.Popen(status_args(url, "--watch", "0.2", "--json"), stdout=sink, cwd=ROOT)
        wait_until(lambda: out.read_text().count("\n") >= 2, 30, "two reports")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    for line in out.read_text().splitlines():
        assert json.loads(line)["error"]["code"] == "unavailable"


def test_an_unreachable_redis_is_an_error_not_a_traceback() -> None:
    result = runq_status(f"redis://127.0.0.1:{free_port()}")

    assert result.returncode == 2
    assert "runq: error: cannot read Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_needs_a_redis_url_and_no_target() -> None:
    result = run_runq("status", env={"RUNQ_REDIS_URL": ""})
    assert result.returncode == 2
    assert "runq status needs --redis-url or RUNQ_REDIS_URL" in result.stderr


@pytest.mark.parametrize("seconds", ["0", "-1", "soon"])
def test_watch_takes_only_a_positive_interval(valkey_url: str, seconds: str) -> None:
    result = runq_status(valkey_url, "--watch", seconds)

    assert result.returncode == 2
    assert "positive number of seconds" in result.stderr


# a running `runq serve` -------------------------------------------------------------------


def test_status_shows_the_last_minute_of_a_running_function(
    served: tuple[str, Proc], valkey_url: str
) -> None:
    url, _ = served
    predict_all(url, list(range(8)))
    shown = runq_cli("status", "--json", redis_url=valkey_url)
    assert shown.returncode == 0, shown.stderr
    row = next(r for r in json.loads(shown.stdout)["functions"] if r["function"] == "counted")
    assert row["succeeded"] >= 8
    assert row["throughput_per_s"] > 0 and row["p99_s"] is not None
    assert row["replicas"] == {"current": 1, "desired": 1}
