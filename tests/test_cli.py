"""`runq serve`, `gateway` and `worker` as a user runs them."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

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


def serve(procs: Callable[..., Proc], target: str, port: int) -> Proc:
    # No RUNQ_REDIS_URL: serve starts its own embedded Valkey.
    proc = procs("serve", target, "--port", str(port), env={"RUNQ_REDIS_URL": ""})
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
