"""`runq serve`, `gateway` and `worker` as a user runs them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from runq.cli import main
from tests.helpers import (
    FNS,
    ROOT,
    Proc,
    alive,
    descendants,
    free_port,
    run_runq,
    wait_until,
)

DRAIN_FNS = str(ROOT / "tests" / "fns_drain.py")


def serve(procs: Callable[..., Proc], target: str, port: int, terminal: bool = False) -> Proc:
    # No RUNQ_REDIS_URL: serve starts its own embedded Valkey.
    env = {"RUNQ_REDIS_URL": ""}
    proc = procs("serve", target, "--port", str(port), env=env, terminal=terminal)
    wait_until(lambda: "runq is serving" in proc.output() or not proc.alive(), 60, "serve")
    assert proc.alive(), proc.output()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_then_stops_cleanly_leaving_no_process(
    procs: Callable[..., Proc], sig: int
) -> None:
    port = free_port()
    proc = serve(procs, f"{FNS}:echo", port)
    curl = re.search(r"try: curl .* -d '(.*)'", proc.output())
    assert curl is not None, proc.output()
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/functions/echo/predict", content=curl.group(1)
    )
    assert response.json()["output"] == "hello"
    family = descendants(proc.pid)
    assert len(family) >= 3  # Valkey, gateway, worker
    assert proc.stop(sig, timeout_s=30) == 0
    wait_until(lambda: not any(alive(pid) for pid in family), 10, "every child to exit")


def test_serve_whose_valkey_died_still_stops_every_child(procs: Callable[..., Proc]) -> None:
    # Valkey killed (a stop that signals the whole process group, an OOM kill): serve's stop
    # raised on its first Redis call, exited 1 and left the gateway and the workers running.
    port = free_port()
    proc = serve(procs, f"{FNS}:echo", port)
    family = descendants(proc.pid)
    valkey = [
        pid for pid in family if b"valkey-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(valkey) == 1, family
    os.kill(valkey[0], signal.SIGKILL)
    assert proc.stop(signal.SIGTERM, timeout_s=30) == 0, proc.output()
    wait_until(lambda: not any(alive(pid) for pid in family), 10, "every child to exit")
    assert "Traceback" not in proc.output(), proc.output()


def predict_in_background(url: str, seconds: float) -> list[httpx.Response | httpx.HTTPError]:
    """A predict of `lingering` sent from a thread; its answer (or failure) lands in the list."""
    answers: list[httpx.Response | httpx.HTTPError] = []

    def send() -> None:
        predict = f"{url}/v1/functions/lingering/predict"
        try:
            answers.append(httpx.post(predict, json={"input": seconds}, timeout=60))
        except httpx.HTTPError as exc:
            answers.append(exc)

    threading.Thread(target=send, daemon=True).start()
    running = f"{url}/v1/functions/lingering"
    wait_until(lambda: httpx.get(running).json()["running"] == 1, 30, "the predict to run")
    return answers


def test_ctrl_c_to_serves_process_group_drains_the_running_batch(
    procs: Callable[..., Proc],
) -> None:
    # A Ctrl-C signals the terminal's whole foreground group. It reached the gateway, the
    # workers and Valkey too: the batch in hand was killed every time (its predict answered
    # 500), the worker printed tracebacks and serve exited 1.
    port = free_port()
    # It failed on every try before the fix; two tries keep the suite inside its budget.
    for attempt in range(2):
        answer, output = interrupted_while_running(procs, port)
        assert isinstance(answer, httpx.Response), (attempt, answer, output)
        assert answer.status_code == 200, (attempt, answer.text, output)
        assert answer.json()["output"] == 1.5
        assert "Traceback" not in output, output


def interrupted_while_running(
    procs: Callable[..., Proc], port: int
) -> tuple[httpx.Response | httpx.HTTPError, str]:
    """The answer to a predict whose `runq serve` got a Ctrl-C mid-batch, and serve's output."""
    proc = serve(procs, DRAIN_FNS, port, terminal=True)
    answers = predict_in_background(f"http://127.0.0.1:{port}", 1.5)
    proc.ctrl_c()
    assert proc.process.wait(timeout=60) == 0, proc.output()
    wait_until(lambda: answers, 10, "the predict's answer")
    return answers[0], proc.output()


def test_a_second_ctrl_c_cuts_the_running_batch_short(procs: Callable[..., Proc]) -> None:
    port = free_port()
    proc = serve(procs, DRAIN_FNS, port, terminal=True)
    family = descendants(proc.pid)
    predict_in_background(f"http://127.0.0.1:{port}", 25)
    proc.ctrl_c()
    wait_until(lambda: "draining" in proc.output(), 10, "the drain to start")
    proc.ctrl_c()
    # Long before the 25 s batch (and the grace period past it) would end.
    assert proc.process.wait(timeout=15) == 0, proc.output()
    assert "asked to stop again" in proc.output()
    wait_until(lambda: not any(alive(pid) for pid in family), 10, "every child to exit")


def test_serve_echo_batches_64_concurrent_predicts(procs: Callable[..., Proc]) -> None:
    port = free_port()
    proc = serve(procs, str(ROOT / "examples" / "echo.py"), port)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            url = f"http://127.0.0.1:{port}/v1/functions/echo/predict"
            return await asyncio.gather(*[http.post(url, json={"input": i}) for i in range(256)])

    responses = asyncio.run(burst())
    assert sorted(r.json()["output"] for r in responses) == list(range(256))
    sizes = [int(n) for n in re.findall(r"batch echo of (\d+)", proc.output())]
    assert sum(sizes) >= 256
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 64
    assert proc.stop() == 0


def test_worker_refuses_an_ambiguous_target() -> None:
    result = run_runq("worker", FNS, "--redis-url", "redis://127.0.0.1:1")
    assert result.returncode == 2
    assert "choose one with --function" in result.stderr
    assert "Traceback" not in result.stderr


def test_gateway_without_redis_url_says_what_is_missing() -> None:
    result = run_runq("gateway", FNS, env={"RUNQ_REDIS_URL": ""})
    assert result.returncode == 2
    assert "needs --redis-url or RUNQ_REDIS_URL" in result.stderr


def test_unknown_setting_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "runq.yaml"
    config.write_text("functions:\n  echo:\n    max_batch: 3\n")
    result = run_runq("serve", FNS, "--config", str(config))
    assert result.returncode == 2
    assert "max_batch" in result.stderr and "max_batch_size" in result.stderr


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"runq {version('runq')}\n"


@pytest.mark.parametrize(
    "command", ["serve", "gateway", "worker", "autoscale", "status", "config", "deploy", "tenants"]
)
def test_every_command_takes_log_level(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--log-level {debug,info,warning,error}" in capsys.readouterr().out


def test_log_level_flag_sets_the_level() -> None:
    result = run_runq("config", "show", FNS, "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert re.search(r'^log_level +"debug" +flag --log-level$', result.stdout, re.M)
