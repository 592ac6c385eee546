"""docker-compose.yml, checked offline against the compose-spec and for what the stack relies
on: Valkey with AOF on a named volume, runq services that wait for it and start valid commands,
the gateway published and health-checked, and stop grace periods above the batch timeout."""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit

import pytest

from tests.infra.helpers import (
    COMPOSE,
    RUNQ_SERVICES,
    check_compose_spec,
    compose,
    compose_env,
    declared,
    function_settings,
    parse_runq_command,
)


def seconds(duration: str | int | float) -> float:
    """A compose duration (`90s`, `1m30s`, `1.5h`) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_matches_the_compose_spec() -> None:
    result = check_compose_spec(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_valkey_keeps_its_data_with_aof_on_a_named_volume() -> None:
    spec = compose()
    valkey = spec["services"]["valkey"]
    assert valkey["image"].startswith("valkey/valkey:")
    command = valkey["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, _, mount = valkey["volumes"][0].partition(":")
    assert mount == "/data" and volume in spec["volumes"]
    assert "valkey-cli" in valkey["healthcheck"]["test"]
    assert "ping" in valkey["healthcheck"]["test"]


@pytest.mark.parametrize("name", RUNQ_SERVICES)
def test_compose_runq_services_wait_for_a_healthy_valkey_and_start_valid_commands(
    name: str,
) -> None:
    service = compose()["services"][name]
    assert service["depends_on"]["valkey"]["condition"] == "service_healthy"
    env = compose_env(service)
    assert urlsplit(env["RUNQ_REDIS_URL"]).hostname == "valkey"
    parse_runq_command(service["command"], env)


def test_compose_gateway_is_published_and_health_checked_on_healthz() -> None:
    gateway = compose()["services"]["gateway"]
    assert gateway["command"][:2] == ["gateway", "examples/embed.py"]
    assert "--host" in gateway["command"] and "0.0.0.0" in gateway["command"]
    # Published on the host's loopback alone: the stack runs with `auth: off`.
    assert "127.0.0.1:8000:8000" in gateway["ports"]
    assert compose_env(gateway)["RUNQ_AUTH"] == "off"
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])


def test_compose_autoscaler_runs_by_default_and_fixed_workers_are_opt_in() -> None:
    services = compose()["services"]
    autoscaler, worker = services["autoscaler"], services["worker"]
    assert "profiles" not in autoscaler
    assert autoscaler["command"][0] == "autoscale"
    env = compose_env(autoscaler)
    assert int(env["RUNQ_FUNCTIONS__EMBED__MAX_REPLICAS"]) >= 1
    assert worker["profiles"] == ["fixed-workers"]
    assert worker["command"][0] == "worker"


@pytest.mark.parametrize("name", ["autoscaler", "worker"])
def test_compose_workers_get_more_time_to_stop_than_a_batch_may_run(name: str) -> None:
    service = compose()["services"][name]
    env = compose_env(service)
    argv = service["command"]
    functions = declared(argv[1])
    names = [argv[argv.index("--function") + 1]] if "--function" in argv else list(functions)
    timeout = max(function_settings(argv, env, fn).timeout_s for fn in names)
    # Docker's default is 10 s: below it the worker is killed mid-batch.
    assert seconds(service["stop_grace_period"]) > timeout
