"""Settings as an operator writes them: a YAML file, RUNQ_* variables and CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydantic
import pytest

from runq.errors import ConfigError
from runq.settings import (
    FunctionSettings,
    Settings,
    load_settings,
    masked_url,
    settings_to_env,
)
from tests.helpers import OBSERVED as TARGET
from tests.helpers import run_runq


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runq.yaml"
    path.write_text(text)
    return path


# sources and precedence -----------------------------------------------------------------------


def test_defaults_when_nothing_is_given() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.redis_url is None
    assert settings.port == 8000
    assert settings.functions == {}


def test_env_beats_file_and_cli_beats_env(tmp_path: Path) -> None:
    path = config(tmp_path, "host: 0.0.0.0\nport: 9000\napi_workers: 3\n")
    env = {"RUNQ_PORT": "9100", "RUNQ_API_WORKERS": "4"}
    settings = load_settings(cli={"api_workers": 5}, env=env, config_file=path)
    assert settings.host == "0.0.0.0"  # only in the file
    assert settings.port == 9100  # env over file
    assert settings.api_workers == 5  # CLI over env and file


def test_cli_flag_left_as_none_is_unset() -> None:
    settings = load_settings(cli={"port": None, "host": None}, env={"RUNQ_PORT": "9100"})
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"


def test_empty_env_var_is_unset(tmp_path: Path) -> None:
    path = config(tmp_path, "port: 9000\n")
    settings = load_settings(env={"RUNQ_PORT": "", "RUNQ_NOT_A_SETTING": ""}, config_file=path)
    assert settings.port == 9000


def test_config_file_named_by_runq_config(tmp_path: Path) -> None:
    path = config(tmp_path, "port: 9000\n")
    assert load_settings(env={"RUNQ_CONFIG": str(path)}).port == 9000


def test_env_values_are_typed() -> None:
    settings = load_settings(
        env={"RUNQ_MAX_TIMEOUT_S": "12.5", "RUNQ_DEFAULT_TIMEOUT_S": "2", "RUNQ_LOG_LEVEL": "debug"}
    )
    assert settings.max_timeout_s == 12.5
    assert settings.default_timeout_s == 2.0
    assert settings.log_level == "debug"


def test_variables_of_other_programs_are_ignored() -> None:
    assert load_settings(env={"PORT": "1", "RUNQPORT": "2", "HOME": "/root"}) == Settings()


# per-function overrides -----------------------------------------------------------------------


def test_function_override_from_env() -> None:
    settings = load_settings(env={"RUNQ_FUNCTIONS__EMBED__MAX_BATCH_SIZE": "64"})
    resolved = settings.function_settings("embed", {"max_batch_size": 8, "timeout_s": 5})
    assert resolved.max_batch_size == 64
    assert resolved.timeout_s == 5


def test_function_overrides_merge_across_file_and_env(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "functions:\n  embed:\n    max_batch_size: 16\n    max_latency_ms: 20\n",
    )
    env = {"RUNQ_FUNCTIONS__EMBED__MAX_LATENCY_MS": "3"}
    resolved = load_settings(env=env, config_file=path).function_settings("embed", {})
    assert resolved.max_batch_size == 16  # from the file, untouched by env
    assert resolved.max_latency_ms == 3.0  # env over file


@pytest.mark.parametrize(
    "key", ["RUNQ_FUNCTIONS__EMBED", "RUNQ_FUNCTIONS__EMBED__", "RUNQ_FUNCTIONS__A__B__C"]
)
def test_malformed_function_variable_is_an_error(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(env={key: "1"})


def test_unknown_function_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        load_settings(env={"RUNQ_FUNCTIONS__EMBED__MAX_BATCH": "8"})


# unknown and invalid values -------------------------------------------------------------------


def test_unknown_runq_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="RUNQ_PROT") as caught:
        load_settings(env={"RUNQ_PROT": "9000"})
    assert "RUNQ_PORT" in caught.value.message  # the known names are listed


def test_functions_is_not_settable_as_one_variable() -> None:
    with pytest.raises(ConfigError, match="RUNQ_FUNCTIONS"):
        load_settings(env={"RUNQ_FUNCTIONS": "{}"})


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = config(tmp_path, "port: 9000\nprot: 9001\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(env={}, config_file=path)


def test_file_must_hold_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(env={}, config_file=config(tmp_path, "- port\n"))


def test_empty_file_is_no_settings(tmp_path: Path) -> None:
    assert load_settings(env={}, config_file=config(tmp_path, "")) == Settings()


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={}, config_file=tmp_path / "absent.yaml")


def test_invalid_yaml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(env={}, config_file=config(tmp_path, "port: [9000\n"))


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h:6380", "unix:///tmp/s"])
def test_redis_url_schemes_accepted(url: str) -> None:
    assert load_settings(env={"RUNQ_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["localhost:6379", "http://localhost:6379", "valkey://h"])
def test_redis_url_with_another_scheme_is_an_error(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        load_settings(env={"RUNQ_REDIS_URL": url})


def test_bad_value_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(env={"RUNQ_PORT": "eighty"})


def test_default_timeout_above_max_is_an_error() -> None:
    with pytest.raises(ConfigError, match="default_timeout_s"):
        load_settings(cli={"default_timeout_s": 60, "max_timeout_s": 30}, env={})


def test_tls_needs_both_files() -> None:
    with pytest.raises(ConfigError, match="ssl_certfile and ssl_keyfile"):
        load_settings(cli={"ssl_certfile": Path("cert.pem")}, env={})


def test_settings_are_frozen() -> None:
    settings = load_settings(env={})
    with pytest.raises(pydantic.ValidationError):
        settings.port = 1  # type: ignore[misc]
    resolved = settings.function_settings("embed", {})
    with pytest.raises(pydantic.ValidationError):
        resolved.max_batch_size = 1  # type: ignore[misc]


# settings_to_env ------------------------------------------------------------------------------


def test_settings_to_env_round_trips(tmp_path: Path) -> None:
    path = config(tmp_path, "host: 0.0.0.0\nssl_certfile: c.pem\nssl_keyfile: k.pem\n")
    env = {
        "RUNQ_REDIS_URL": "redis://cache:6379/2",
        "RUNQ_MAX_TIMEOUT_S": "90.5",
        "RUNQ_LOG_LEVEL": "warning",
        "RUNQ_FUNCTIONS__EMBED__MAX_BATCH_SIZE": "64",
        "RUNQ_FUNCTIONS__RE-RANK__TIMEOUT_S": "2.5",
    }
    settings = load_settings(cli={"port": 9000}, env=env, config_file=path)
    assert load_settings(env=settings_to_env(settings)) == settings


def test_typed_yaml_overrides_round_trip_whole(tmp_path: Path) -> None:
    path = config(tmp_path, "functions:\n  embed:\n    max_batch_size: 64\n    timeout_s: 2.5\n")
    settings = load_settings(env={}, config_file=path)
    assert load_settings(env=settings_to_env(settings)) == settings


def test_a_flag_equal_to_the_default_wins_over_an_inherited_env_var() -> None:
    """`runq serve --host 127.0.0.1` in the Docker image (RUNQ_HOST=0.0.0.0) binds loopback."""
    inherited = {"RUNQ_HOST": "0.0.0.0", "RUNQ_STORAGE_URL": "file:///srv/objects"}
    parent = load_settings(env=inherited, cli={"host": "127.0.0.1"})
    child = load_settings(env={**inherited, **settings_to_env(parent)})
    assert child.host == "127.0.0.1"
    assert child == parent


def test_unset_settings_reach_a_child_unset() -> None:
    env = settings_to_env(load_settings(env={}))
    assert env["RUNQ_STORAGE_URL"] == ""
    assert load_settings(env=env) == load_settings(env={})


def test_typed_function_overrides_survive_the_env(tmp_path: Path) -> None:
    """A worker started from the env resolves the same function settings as its parent."""
    path = config(tmp_path, "functions:\n  embed:\n    max_batch_size: 64\n    retries: 2\n")
    parent = load_settings(env={}, config_file=path)
    child = load_settings(env=settings_to_env(parent))
    declared = {"max_batch_size": 8, "max_latency_ms": 5}
    assert child.function_settings("embed", declared) == parent.function_settings("embed", declared)


def test_null_function_override_survives_the_env(tmp_path: Path) -> None:
    path = config(tmp_path, "functions:\n  embed:\n    max_concurrency: null\n")
    parent = load_settings(env={}, config_file=path)
    child = load_settings(env=settings_to_env(parent))
    declared = {"max_concurrency": 4}
    assert child.function_settings("embed", declared) == parent.function_settings("embed", declared)


# function_settings and check_functions --------------------------------------------------------


def test_function_settings_layers_defaults_decorator_and_overrides() -> None:
    settings = Settings(functions={"embed": {"max_replicas": 4}})
    resolved = settings.function_settings("embed", {"max_batch_size": 8, "max_replicas": 2})
    assert resolved == FunctionSettings(max_batch_size=8, max_replicas=4)
    assert settings.function_settings("other", {}) == FunctionSettings()


def test_function_settings_rejects_unknown_declared_key() -> None:
    with pytest.raises(ConfigError, match=r"'embed'.*max_batch"):
        Settings().function_settings("embed", {"max_batch": 8})


def test_unknown_override_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = config(tmp_path, "functions:\n  embed:\n    batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"functions\.embed: unknown setting\(s\) batch_size"):
        load_settings(env={}, config_file=path)


def test_function_settings_rejects_an_invalid_value() -> None:
    settings = Settings(functions={"embed": {"max_batch_size": 0}})
    with pytest.raises(ConfigError, match=r"'embed'.*max_batch_size"):
        settings.function_settings("embed", {})


def test_min_replicas_above_max_is_an_error() -> None:
    with pytest.raises(ConfigError, match="min_replicas"):
        Settings().function_settings("embed", {"min_replicas": 3, "max_replicas": 2})


def test_batching_window_must_fit_in_max_timeout() -> None:
    settings = Settings(max_timeout_s=2, default_timeout_s=1)
    assert settings.function_settings("embed", {"max_latency_ms": 1999}).max_latency_ms == 1999
    with pytest.raises(ConfigError, match=r"max_latency_ms \(2000\.0\) is not below max_timeout_s"):
        settings.function_settings("embed", {"max_latency_ms": 2000})
    with pytest.raises(ConfigError, match="max_latency_ms"):
        settings.function_settings("embed", {"max_latency_ms": 5000})


def test_overrides_for_undeclared_functions_are_rejected() -> None:
    settings = Settings(functions={"embed": {}, "emebd": {"max_batch_size": 2}})
    settings.check_functions({"embed", "emebd"})
    with pytest.raises(ConfigError, match="emebd") as caught:
        settings.check_functions({"embed", "rerank"})
    assert "function(s) emebd that" in caught.value.message  # only the stray one is named
    assert "declared: embed, rerank" in caught.value.message


@pytest.mark.parametrize(
    "buckets",
    [
        [0.1, 0.05],
        [0, 1],
        [],
        {"min": 1, "max": 0.5, "factor": 2},
        {"min": 0.1, "max": 1, "factor": 1},
    ],
)
def test_invalid_request_buckets_stop_the_start(buckets: object) -> None:
    result = run_runq("config", "show", TARGET, env={"RUNQ_REQUEST_BUCKETS": json.dumps(buckets)})
    assert result.returncode == 2
    assert "request_buckets" in result.stderr


def test_a_gateway_process_per_core_by_default_at_most_four() -> None:
    cores = len(os.sched_getaffinity(0))
    assert Settings().api_workers == min(cores, 4)
    assert Settings(api_workers=1).api_workers == 1


# masking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://app:s3cret@cache:6379", "redis://***@cache:6379"),
        ("rediss://cache:6380/1?password=s3cret&ssl_cert_reqs=none", None),
        (
            "unix:///run/valkey.sock?db=2&password=s3cret",
            "unix:///run/valkey.sock?db=2&password=***",
        ),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
    ],
)
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str | None) -> None:
    assert "s3cret" not in masked_url(url)
    if shown is not None:
        assert masked_url(url) == shown


def test_config_show_masks_every_credential(tmp_path: Path) -> None:
    env = {
        "RUNQ_REDIS_URL": "redis://cache:6379/0?password=s3cret-redis",
        "RUNQ_STORAGE_URL": "s3://bucket/objects",
        "RUNQ_STORAGE_ENDPOINT_URL": "http://minio-key:s3cret-s3@127.0.0.1:9000",
    }
    result = run_runq("config", "show", TARGET, env=env)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert "redis://cache:6379/0?password=***" in result.stdout
    assert "http://***@127.0.0.1:9000" in result.stdout


@pytest.mark.parametrize(
    "text", ["max_timeout_s: true\n", "functions:\n  embed:\n    max_batch_size: true\n"]
)
def test_a_boolean_is_not_a_number_in_settings(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must be a number, not a boolean"):
        load_settings(env={}, config_file=config(tmp_path, text)).function_settings("embed", {})
