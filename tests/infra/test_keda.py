"""The KEDA ScaledObject in infra/k8s/, checked offline against the vendored CRD and the
metrics-api scaler's parameters: it scales the worker Deployment from zero on the gateway's
demand for that worker's function."""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.infra.helpers import (
    container,
    container_env,
    deployments_running,
    function_settings,
    gateway_deployment,
    named,
    parse_runq_command,
    runq_argv,
    scaled_objects,
    validate_metrics_api_metadata,
    validate_scaled_object,
)


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
    gateway_port = parse_runq_command(
        runq_argv(container(gateway)), container_env(container(gateway))
    ).port
    assert gateway_ports.get(port["targetPort"], port["targetPort"]) == gateway_port
    # targetValue is runq's per-replica target: target_per_replica, else max_batch_size.
    settings = function_settings(argv, container_env(worker), fn)
    per_replica = settings.target_per_replica or settings.max_batch_size
    assert float(metadata["targetValue"]) == per_replica
