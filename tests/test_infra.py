"""The deployment files, checked offline: against the compose-spec, Kubernetes and KEDA schemas,
and for the properties a deployment relies on (non-root image, AOF, scale to zero on demand,
grace periods above the batch timeout, probes on /readyz and /healthz).

Schemas come from dev dependencies (check-jsonschema ships compose-spec, kubernetes-validate the
Kubernetes schemas) or from tests/schemas/ (KEDA; see its README): nothing downloads here.
promtool (from Debian's prometheus package, which `make test` unpacks into .venv/bin) checks the
Prometheus config, the alert rules and their unit tests.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from runq.cli import _parser as runq_cli_parser
from runq.functions import load_target
from runq.settings import FunctionSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
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
# A Kubernetes resource quantity (k8s.io/apimachinery/pkg/api/resource).
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")


# Dockerfile ------------------------------------------------------------------------------------


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


def image_user() -> str:
    users = [rest for instruction, rest in dockerfile_stages()[-1] if instruction == "USER"]
    assert users, "the final stage has no USER: the image would run as root"
    return users[-1]


def test_image_runs_as_a_non_root_user_that_kubernetes_can_check() -> None:
    user, _, group = image_user().partition(":")
    assert user not in ("root", "0", "") and group not in ("root", "0")
    # Numeric, so that runAsNonRoot can verify it; the manifests run as that same uid.
    assert user.isdigit()
    for deployment in deployments():
        security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == int(user)


def test_image_is_python_slim_with_runq_as_entrypoint_serving_the_gateway_by_default() -> None:
    stages = dockerfile_stages()
    global_args = arg_defaults(stages[0])
    stage_names = {rest.split()[-1] for (_, rest), *_ in stages[1:] if " AS " in rest.upper()}
    bases = [substitute(rest.split()[0], global_args) for (_, rest), *_ in stages[1:]]
    assert all(base in stage_names or base == "python:3.11-slim" for base in bases), bases
    final = stages[-1]
    assert json.loads(next(rest for i, rest in final if i == "ENTRYPOINT")) == ["runq"]
    command = json.loads(next(rest for i, rest in final if i == "CMD"))
    assert command[0] == "gateway"
    parse_runq_command(command, image_env())
    assert "8000" in next(rest for i, rest in final if i == "EXPOSE").split()


def test_image_installs_cpu_torch_pinned_as_the_makefile_before_the_package() -> None:
    build = next(stage for stage in dockerfile_stages() if "pip install" in str(stage))
    args = arg_defaults(build)
    runs = [substitute(rest, args) for instruction, rest in build if instruction == "RUN"]
    torch_runs = [i for i, run in enumerate(runs) if "torch==" in run]
    package_runs = [i for i, run in enumerate(runs) if re.search(r"pip install \S*\.\[", run)]
    assert torch_runs and package_runs and torch_runs[0] < package_runs[0], runs
    torch_run = runs[torch_runs[0]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run.replace('"', "")
    makefile_pin = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text())
    assert makefile_pin is not None
    assert f"torch=={makefile_pin.group(1)}" in torch_run.replace('"', "")


def test_image_settings_from_its_environment_are_valid() -> None:
    env = image_env()
    assert any(key.startswith("RUNQ_") for key in env)
    load_settings(env=env)


# .dockerignore ---------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def copied_sources() -> Iterator[Path]:
    for instruction, rest in (i for stage in dockerfile_stages() for i in stage):
        if instruction == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            yield from (ROOT / source for source in sources)


def test_build_context_holds_what_the_image_copies_and_nothing_heavy() -> None:
    sources = list(copied_sources())
    assert sources
    for source in sources:
        assert source.exists(), source
        files = [source] if source.is_file() else source.rglob("*.py")
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignored(relative), relative
    for left_out in (
        ".git/HEAD",
        ".venv/bin/python",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/README.md",
        "benchmarks/results/latest.json",
        "runq/__pycache__/cli.cpython-311.pyc",
        "runq.egg-info/PKG-INFO",
        "tests/test_infra.py",
    ):
        assert dockerignored(left_out), left_out


# runq commands and settings --------------------------------------------------------------------


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
    settings = load_settings(env=env)
    settings.check_functions(set(functions))
    for name, settings_declared in functions.items():
        settings.function_settings(name, settings_declared)
    return args


def function_settings(argv: list[str], env: Mapping[str, str], name: str) -> FunctionSettings:
    args = parse_runq_command(argv, env)
    return load_settings(env=env).function_settings(name, declared(args.target)[name])


def seconds(duration: str | int | float) -> float:
    """A compose duration (`90s`, `1m30s`, `1.5h`) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# docker-compose.yml ----------------------------------------------------------------------------


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
    assert "8000:8000" in gateway["ports"]
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


def test_prometheus_scrapes_the_gateway_metrics() -> None:
    prometheus = compose()["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = [volume.split(":") for volume in prometheus["volumes"]]
    assert ["./infra/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = config["scrape_configs"]
    gateway = next(job for job in jobs if "gateway:8000" in job["static_configs"][0]["targets"])
    assert gateway.get("metrics_path", "/metrics") == "/metrics"


# Kubernetes ------------------------------------------------------------------------------------


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


def scaled_objects() -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["apiVersion"].startswith("keda.sh/")]


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


def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    builtin = [obj for obj in k8s_objects() if not obj["apiVersion"].startswith("keda.sh/")]
    assert {obj["kind"] for obj in builtin} == {"Deployment", "Service"}
    for obj in builtin:
        validate_k8s(obj)


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


def test_scaled_object_matches_the_keda_crd_and_the_metrics_api_parameters() -> None:
    (scaled,) = scaled_objects()
    validate_scaled_object(scaled)
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "metrics-api"
        validate_metrics_api_metadata(trigger["metadata"])


def test_scaled_object_scales_the_worker_deployment_from_zero() -> None:
    (scaled,) = scaled_objects()
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    worker = runq_argv(container(named("Deployment", target["name"])))
    assert worker[0] == "worker" and "--function" in worker
    assert spec["maxReplicaCount"] >= 1


def test_scaled_object_reads_demand_from_the_gateway_for_the_worker_function() -> None:
    (scaled,) = scaled_objects()
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert metadata["valueLocation"] == "demand"
    assert metadata.get("format", "json") == "json"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    worker = container(named("Deployment", scaled["spec"]["scaleTargetRef"]["name"]))
    argv = runq_argv(worker)
    fn = argv[argv.index("--function") + 1]
    url = urlsplit(metadata["url"])
    assert url.path == f"/v1/functions/{fn}"
    # The gateway's Service, possibly namespace-qualified (`NAME.NAMESPACE.svc`), on its port.
    service = named("Service", url.hostname.split(".")[0] if url.hostname else "")
    (port,) = [port for port in service["spec"]["ports"] if port["port"] == url.port]
    gateway = gateway_deployment()
    selector = service["spec"]["selector"].items()
    assert selector <= gateway["spec"]["template"]["metadata"]["labels"].items()
    for other in deployments_running("worker"):
        assert not selector <= other["spec"]["template"]["metadata"]["labels"].items()
    gateway_ports = {p.get("name"): p["containerPort"] for p in container(gateway)["ports"]}
    gateway_port = parse_runq_command(runq_argv(container(gateway)), {}).port
    assert gateway_ports.get(port["targetPort"], port["targetPort"]) == gateway_port
    # targetValue is runq's per-replica target: target_per_replica, else max_batch_size.
    settings = function_settings(argv, container_env(worker), fn)
    per_replica = settings.target_per_replica or settings.max_batch_size
    assert float(metadata["targetValue"]) == per_replica


def test_worker_grace_period_is_above_the_batch_timeout() -> None:
    workers = deployments_running("worker")
    assert workers
    for deployment in workers:
        spec = container(deployment)
        args = runq_argv(spec)
        fn = args[args.index("--function") + 1]
        timeout = function_settings(args, container_env(spec), fn).timeout_s
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > timeout, f"{deployment['metadata']['name']}: {grace} s <= {timeout} s"


def test_gateway_probes_readyz_and_healthz_on_the_port_it_listens_on() -> None:
    gateway = gateway_deployment()
    spec = container(gateway)
    args = parse_runq_command(runq_argv(container(gateway)), container_env(spec))
    assert args.host == "0.0.0.0"
    ports = {port.get("name"): port["containerPort"] for port in spec["ports"]}
    assert args.port in ports.values()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = spec[probe]["httpGet"]
        assert http["path"] == path
        assert ports.get(http["port"], http["port"]) == args.port


def test_runq_containers_take_redis_from_a_secret_and_declare_resources() -> None:
    for deployment in deployments():
        spec = container(deployment)
        (redis,) = [item for item in spec["env"] if item["name"] == "RUNQ_REDIS_URL"]
        assert set(redis.get("valueFrom", {})) & {"secretKeyRef", "configMapKeyRef"}, redis
        for bound in ("requests", "limits"):
            amounts = spec["resources"][bound]
            assert {"cpu", "memory"} <= set(amounts), (bound, spec["name"])
            # The schemas take any string; the API server takes only quantities.
            assert all(QUANTITY.fullmatch(str(amount)) for amount in amounts.values()), amounts


# The validators above are not vacuous: each refuses a misspelt field. --------------------------


def test_the_validators_refuse_a_misspelt_field(tmp_path: Path) -> None:
    spec = compose()
    spec["services"]["valkey"]["healthchek"] = spec["services"]["valkey"].pop("healthcheck")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(spec))
    assert check_compose_spec(broken).returncode != 0

    deployment = copy.deepcopy(gateway_deployment())
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(deployment)

    (scaled,) = copy.deepcopy(scaled_objects())
    scaled["spec"]["minReplicasCount"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        validate_scaled_object(scaled)

    with pytest.raises(AssertionError, match="ignores"):
        validate_metrics_api_metadata({**scaled["spec"]["triggers"][0]["metadata"], "valueLoc": ""})


# Prometheus alert rules and the Grafana dashboard ----------------------------------------------

ALERTS = (
    "RunqQueueBackingUp",
    "RunqQueueWaitHigh",
    "RunqHighErrorRate",
    "RunqHighServerErrorRate",
    "RunqNoWorkersWhileTasksWait",
    "RunqShedding",
)
METRIC_NAME = re.compile(r"\brunq_[a-z0-9_]+\b")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool", path=f"{Path(sys.executable).parent}:{ROOT / '.venv' / 'bin'}")
    found = found or shutil.which("promtool")
    if found is None:
        pytest.skip("no promtool: `make .venv/bin/promtool` unpacks Debian's")
    return subprocess.run(
        [found, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


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


def test_prometheus_loads_the_alert_rules_mounted_next_to_its_config() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [ALERT_RULES.name]
    # prometheus.yml's rule_files are relative to it: the rules are mounted beside it.
    mounts = [volume.split(":") for volume in compose()["services"]["prometheus"]["volumes"]]
    assert ["./infra/prometheus/rules.yml", "/etc/prometheus/rules.yml", "ro"] in mounts


def test_promtool_accepts_the_alert_rules_and_the_config() -> None:
    rules = promtool("check", "rules", str(ALERT_RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # Also loads rule_files, relative to the config file.
    config = promtool("check", "config", str(PROMETHEUS))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr


def test_alert_rules_fire_when_they_should_and_not_otherwise() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_RULES_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == set(ALERTS)
    result = promtool("test", "rules", ALERT_RULES_TEST.name, cwd=ALERT_RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_wait_and_carry_a_severity_and_a_summary() -> None:
    rules = alert_rules()
    assert sorted(rule["alert"] for rule in rules) == sorted(ALERTS)
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        # An alert per function: every rule keeps the function label.
        assert "$labels.function" in rule["annotations"]["summary"], rule["alert"]
    waits = {rule["alert"]: rule["for"] for rule in rules}
    assert waits["RunqNoWorkersWhileTasksWait"] == "2m"


def test_dashboard_panels_query_prometheus_for_each_function() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    function = variables["function"]
    assert function["definition"] == "label_values(runq_queue_depth, function)"
    assert function["query"]["query"] == function["definition"]
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        datasources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(ds == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for ds in datasources)
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert all('function=~"$function"' in t["expr"] for t in panel["targets"]), panel["title"]
    queried = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    # Every metric runq exposes has a panel.
    for family in metric_families():
        series = {family, *(f"{family}_{suffix}" for suffix in ("bucket", "count", "total"))}
        assert series & queried, f"no panel shows {family}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, Grafana's variables filled in, as a recording rule."""
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$function", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    assert rules
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_name_only_metrics_runq_exposes() -> None:
    for path in (ALERT_RULES, ALERT_RULES_TEST, DASHBOARD):
        referenced = set(METRIC_NAME.findall(path.read_text()))
        assert referenced, path
        unknown = referenced - exposed_metric_names()
        assert not unknown, f"{path.name} names {sorted(unknown)}, not in runq/metrics.py"


def test_promtool_checks_are_not_vacuous(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERT_RULES.read_text())
    rule = rules["groups"][0]["rules"][0]
    rule["exp"] = rule.pop("expr")
    broken = tmp_path / "rules.yml"
    broken.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(broken)).returncode != 0

    # An alert that no longer fires fails its unit test.
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "RunqNoWorkersWhileTasksWait":
            rule["for"] = "5m"
    broken.write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_RULES_TEST, tmp_path / ALERT_RULES_TEST.name)
    result = promtool("test", "rules", ALERT_RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "RunqNoWorkersWhileTasksWait" in result.stdout + result.stderr
