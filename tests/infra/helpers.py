"""Loaders and validators shared by the tests of the deployment files (tests/infra/).

Schemas come from dev dependencies (check-jsonschema ships compose-spec, kubernetes-validate the
Kubernetes schemas) or from tests/schemas/ (KEDA; see its README): nothing downloads here.
promtool (from Debian's prometheus package, which `make test` unpacks into .venv/bin) checks the
Prometheus config, the alert rules and their unit tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from runq.cli import _parser as runq_cli_parser
from runq.functions import load_target
from runq.settings import FunctionSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "infra" / "prometheus" / "rules.yml"
ALERT_RULES_TEST = ROOT / "infra" / "prometheus" / "rules_test.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "runq-dashboard.json"
METRICS = ROOT / "runq" / "metrics.py"
K8S = ROOT / "infra" / "k8s"
KEDA = ROOT / "tests" / "schemas" / "keda"
RUNQ_SERVICES = ("gateway", "autoscaler", "worker")
# Stands in for a Redis URL that a manifest takes from a Secret or ConfigMap.
SECRET_REDIS_URL = "redis://redis.invalid:6379/0"
METRIC_NAME = re.compile(r"\brunq_[a-z0-9_]+\b")


# Dockerfile -----------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage, continuation lines joined; stage 0 holds the global ARGs."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        instruction, _, rest = (logical + line).strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for instruction, rest in instructions if instruction == "ARG")


def substitute(value: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile_stages()[-1]:
        if instruction == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(rest))
    return env


# runq commands and settings -------------------------------------------------------------------


@functools.cache
def declared(target: str) -> dict[str, Mapping[str, Any]]:
    return {name: fn.declared for name, fn in load_target(str(ROOT / target)).items()}


def parse_runq_command(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    """Parses argv with runq's own CLI and checks the settings its environment gives."""
    parser = runq_cli_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv[0] not in commands.choices:
        pytest.skip(f"`runq {argv[0]}` is not in this tree's CLI yet")
    args = parser.parse_args(argv)
    functions = declared(args.target)
    assert getattr(args, "function", None) in (None, *functions), argv
    settings = load_settings(cli={"host": getattr(args, "host", None)}, env=env)
    settings.check_functions(set(functions))
    for name, settings_declared in functions.items():
        settings.function_settings(name, settings_declared)
    if argv[0] in ("gateway", "serve"):
        # A gateway bound past loopback with `auth` unset would refuse to start.
        settings.auth_mode()
    return args


def function_settings(argv: list[str], env: Mapping[str, str], name: str) -> FunctionSettings:
    args = parse_runq_command(argv, env)
    return load_settings(env=env).function_settings(name, declared(args.target)[name])


# docker-compose.yml ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return spec


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {**image_env(), **{k: str(v) for k, v in environment.items()}}


def check_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            "--color",
            "never",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


# Kubernetes -----------------------------------------------------------------------------------


def k8s_objects() -> list[dict[str, Any]]:
    objects = [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]
    assert objects
    return objects


def deployments() -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["kind"] == "Deployment"]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def container_env(spec: Mapping[str, Any]) -> dict[str, str]:
    env = dict(image_env())
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]
            assert "secretKeyRef" in ref or "configMapKeyRef" in ref, item
            env[item["name"]] = SECRET_REDIS_URL
    return env


def runq_argv(spec: Mapping[str, Any]) -> list[str]:
    """The runq command line a container runs: the image's entrypoint, unless replaced."""
    command = spec.get("command", ["runq"])
    assert command[0] == "runq", command
    return [*command[1:], *spec.get("args", [])]


def deployments_running(command: str) -> list[dict[str, Any]]:
    return [d for d in deployments() if runq_argv(container(d))[:1] == [command]]


def gateway_deployment() -> dict[str, Any]:
    (gateway,) = deployments_running("gateway")
    return gateway


def validate_k8s(obj: Mapping[str, Any]) -> None:
    kubernetes_validate.validate(dict(obj), kubernetes_validate.latest_version(), strict=True)


# KEDA -----------------------------------------------------------------------------------------


def scaled_objects() -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["apiVersion"].startswith("keda.sh/")]


def strict_openapi(schema: Any) -> Any:
    """The CRD schema, refusing unknown fields as `kubectl apply` does (field validation)."""
    if isinstance(schema, dict):
        schema = {key: strict_openapi(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict_openapi(item) for item in schema]
    return schema


@functools.cache
def scaled_object_schema() -> dict[str, Any]:
    crd = yaml.safe_load((KEDA / "keda.sh_scaledobjects.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = strict_openapi(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"]["const"] = "keda.sh/v1alpha1"
    schema["properties"]["kind"]["const"] = crd["spec"]["names"]["kind"]
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def validate_scaled_object(obj: Mapping[str, Any]) -> None:
    # apiextensions.k8s.io/v1 schemas are OpenAPI 3.0, a JSON Schema draft 4 dialect.
    jsonschema.Draft4Validator(scaled_object_schema()).validate(obj)
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name)


def validate_metrics_api_metadata(metadata: Mapping[str, Any]) -> None:
    """Trigger metadata against the parameters KEDA's metrics-api scaler reads."""
    schema = json.loads((KEDA / "scalers-schema.metrics-api.json").read_text())
    (scaler,) = schema["scalers"]
    parameters = {p["name"]: p for p in scaler["parameters"]}
    unknown = set(metadata) - set(parameters)
    assert not unknown, f"metrics-api ignores {sorted(unknown)}; known: {sorted(parameters)}"
    for name, parameter in parameters.items():
        if not parameter.get("optional") and "default" not in parameter:
            assert name in metadata, f"metrics-api needs {name}"
        if name in metadata and "allowedValue" in parameter:
            assert metadata[name] in parameter["allowedValue"], (name, metadata[name])


# promtool and the metric names runq exposes ---------------------------------------------------


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool", path=f"{Path(sys.executable).parent}:{ROOT / '.venv' / 'bin'}")
    found = found or shutil.which("promtool")
    if found is None:
        pytest.skip("no promtool: `make .venv/bin/promtool` unpacks Debian's")
    return subprocess.run(
        [found, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def metric_families() -> set[str]:
    """The metric names runq/metrics.py declares (as strings: some are created lazily)."""
    return set(re.findall(r"\"(runq_[a-z0-9_]+)\"", METRICS.read_text()))


@functools.cache
def exposed_metric_names() -> frozenset[str]:
    """Every series name runq/metrics.py exposes, histogram and counter suffixes included."""
    source = METRICS.read_text()
    names = metric_families()
    for histogram in re.findall(r"Histogram\(\s*\"(runq_[a-z0-9_]+)\"", source):
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    for counter in re.findall(r"Counter\(\s*\"(runq_[a-z0-9_]+)\"", source):
        names.add(counter if counter.endswith("_total") else f"{counter}_total")
    assert names
    return frozenset(names)
