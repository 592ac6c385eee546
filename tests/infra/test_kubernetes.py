"""infra/k8s/, checked offline against the Kubernetes schemas and for what a deployment relies
on: grace periods above the batch timeout, probes on /readyz and /healthz, Redis from a Secret
and declared resources."""

from __future__ import annotations

import re

from tests.infra.helpers import (
    container,
    container_env,
    deployments,
    deployments_running,
    function_settings,
    gateway_deployment,
    k8s_objects,
    parse_runq_command,
    runq_argv,
    validate_k8s,
)

# A Kubernetes resource quantity (k8s.io/apimachinery/pkg/api/resource).
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")


def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    builtin = [obj for obj in k8s_objects() if not obj["apiVersion"].startswith("keda.sh/")]
    assert {obj["kind"] for obj in builtin} == {"Deployment", "Service"}
    for obj in builtin:
        validate_k8s(obj)


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
