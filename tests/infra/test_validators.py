"""The offline validators of tests/infra/helpers.py are not vacuous: each refuses a misspelt
field."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.infra.helpers import (
    check_compose_spec,
    compose,
    gateway_deployment,
    scaled_objects,
    validate_k8s,
    validate_metrics_api_metadata,
    validate_scaled_object,
)


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
