"""`runq deploy` on a running `runq serve`: the deployed settings reach its gateway and
workers while they run, a deploy naming an unknown function writes nothing, and
`runq config show` says where a value came from."""

from __future__ import annotations

from pathlib import Path

import httpx
from redis import Redis

from tests.fns import CALLS_KEY
from tests.helpers import OBSERVED as TARGET
from tests.helpers import Proc, batch_sizes, predict_all, runq_cli, wait_until


def test_deploy_changes_a_running_workers_batch_size(
    served: tuple[str, Proc], redis: Redis, valkey_url: str, tmp_path: Path
) -> None:
    url, proc = served
    redis.delete(CALLS_KEY.format("counted"))
    for _ in range(3):
        predict_all(url, list(range(16)))
    assert max(batch_sizes(redis)) <= 4

    bad = tmp_path / "bad.yaml"
    bad.write_text("functions:\n  counted: {max_batch_size: 16}\n  nowhere: {max_queue: 1}\n")
    refused = runq_cli("deploy", str(bad), TARGET, redis_url=valkey_url)
    assert refused.returncode == 2
    assert "nowhere" in refused.stderr
    assert redis.get("runq:deployed:version") is None  # nothing of it was written

    good = tmp_path / "good.yaml"
    good.write_text("functions:\n  counted: {max_batch_size: 16}\n")
    deployed = runq_cli("deploy", str(good), TARGET, redis_url=valkey_url)
    assert deployed.returncode == 0, deployed.stderr
    wait_until(
        lambda: httpx.get(f"{url}/v1/functions/counted").json()["settings"]["max_batch_size"] == 16,
        what="the gateway to pick the deploy up",
    )
    wait_until(lambda: "settings now" in proc.output(), what="the worker to pick the deploy up")

    def bigger_batch() -> bool:
        predict_all(url, list(range(16)))
        return max(batch_sizes(redis)) > 4

    wait_until(bigger_batch, 20, "a batch above the old limit")
    shown = runq_cli("config", "show", TARGET, "--function", "counted", redis_url=valkey_url)
    line = next(x for x in shown.stdout.splitlines() if "max_batch_size" in x)
    assert "16" in line and "deployed" in line
