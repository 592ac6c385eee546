"""One typed, frozen settings model, built once at the entry point and passed down.

Sources, lowest to highest precedence: defaults, decorator keywords (per function), the YAML
file, ``RUNQ_*`` environment variables, CLI flags. Unknown keys are errors in every source: a
misspelt setting that is silently ignored is worse than one that stops the start.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runq.errors import ConfigError

ENV_PREFIX = "RUNQ_"
ENV_NESTING = "__"
# Environment variables runq reads that are not settings fields.
ENV_CONFIG_FILE = "RUNQ_CONFIG"
ENV_TARGET = "RUNQ_TARGET"
# prometheus-client's multiprocess directory: read when prometheus_client is first imported, so
# entry points set it before anything imports runq.metrics.
ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
ENV_METRICS_PORT = "RUNQ_METRICS_PORT"
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")
STORAGE_URL_SCHEMES = ("file://", "s3://")


class StrictNumbers(BaseModel):
    """A model whose number fields refuse booleans, which pydantic would read as 1 and 0: a
    `timeout_s: true` is a mistake to report, not one second."""

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, bool):
            return value
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _numbers_only(field.annotation):
            raise ValueError("must be a number, not a boolean")
        return value


def _numbers_only(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    options = options or (annotation,)
    return all(option in (int, float, type(None)) for option in options) and any(
        option in (int, float) for option in options
    )


class FunctionSettings(StrictNumbers):
    """Per-function settings; names follow what BentoML and Ray Serve users already know."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=10_000)
    # How long a worker may wait to fill a batch; never a reason to reject a request. Bounded
    # well below the lease TTL: tasks claimed early in the window are leased but not renewed.
    max_latency_ms: float = Field(10.0, ge=0, le=5_000)
    timeout_s: float = Field(30.0, gt=0)
    max_queue: int = Field(10_000, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    # Queued + running tasks one worker is expected to carry; unset: max_batch_size.
    target_per_replica: int | None = Field(None, ge=1)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    scale_down_delay_s: float = Field(60.0, ge=0)
    result_ttl_s: int = Field(3600, ge=1)
    retries: int = Field(0, ge=0)
    # Share of tasks whose input and output go to the prediction log (0: none, 1: all).
    log_predictions: float = Field(0.0, ge=0, le=1)
    # A model exception's type and message reach the caller; off, a generic message does, and
    # the detail stays in the worker log under the task id (messages may hold internals).
    expose_errors: bool = True
    # A streaming function's chunks per task: one more fails the task (its generator closed),
    # so a runaway generator cannot grow Redis without bound.
    max_chunks: int = Field(10_000, ge=1)
    # A gap between chunks longer than this counts as a stall (runq_stream_stalls_total).
    stall_threshold_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _replicas_ordered(self) -> FunctionSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


FUNCTION_SETTING_NAMES = frozenset(FunctionSettings.model_fields)


class ExponentialBuckets(StrictNumbers):
    """Histogram buckets min, min·factor, … up to the first bound at or above max."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float = Field(gt=0)
    max: float = Field(gt=0)
    factor: float = Field(gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> ExponentialBuckets:
        if self.max <= self.min:
            raise ValueError(f"max ({self.max}) must be above min ({self.min})")
        if math.log(self.max / self.min, self.factor) > MAX_BUCKETS:
            raise ValueError(f"more than {MAX_BUCKETS} buckets; raise factor or narrow min..max")
        return self


# Each bucket is a time series per label set; a few dozen is already generous.
MAX_BUCKETS = 60


# The gateway is CPU-bound Python: one process per core serves noop predict a third faster than
# one on 2 cores (benchmarks/run.py --only echo), and an idle one costs only its memory.
API_WORKERS_MAX_DEFAULT = 4


def default_api_workers() -> int:
    """One gateway process per core this process may run on, at most API_WORKERS_MAX_DEFAULT."""
    return max(1, min(len(os.sched_getaffinity(0)), API_WORKERS_MAX_DEFAULT))


class Settings(StrictNumbers):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # None: `runq serve` starts the embedded Valkey; `gateway` and `worker` refuse to start.
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_workers: int = Field(default_factory=default_api_workers, ge=1)
    backlog: int = Field(2048, ge=1)
    default_timeout_s: float = Field(30.0, gt=0)
    max_timeout_s: float = Field(300.0, gt=0)
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    # Requests one gateway process holds while they wait (predict, result?wait=); over it, 503.
    max_inflight: int = Field(1024, ge=1)
    # A request line and headers past this get 431: the HTTP parser buffers them whole, so
    # without a bound one caller can grow the gateway by whatever it sends.
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    # A connection that has not sent its request's headers this long after it opened (or after
    # its previous answer) is closed: else half-open connections hold sockets forever.
    header_timeout_s: float = Field(10.0, gt=0)
    # Open connections per gateway process. Past it, the connection idle the longest (no
    # request under way) is closed to make room; only when every one has a request under way
    # is the newcomer answered 503. Sockets past the file-descriptor limit would be reset.
    max_connections: int = Field(4096, ge=1)
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    # Queued tasks with no live worker for longer than this are reported stranded: by then a
    # cold start should have brought one up.
    cold_start_budget_s: float = Field(120.0, gt=0)
    # At least this often, while any runq process runs, one of them removes the registry entries
    # of tasks past their result TTL (RQ's finished, failed and canceled registries, which
    # nothing else prunes) and RQ's records of workers that are gone.
    maintenance_interval_s: float = Field(60.0, gt=0)
    # A worker counts as a replica (replicas.current, runq_replicas_current) until this long after
    # its last heartbeat: a hung one (SIGSTOP, a deadlock) drops out after it. Shorter finds it
    # sooner; a model holding the GIL for longer also drops out while it runs.
    heartbeat_ttl_s: float = Field(8.0, ge=0.5, le=60)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # keys: every request but /healthz, /readyz and the docs needs `Authorization: Bearer KEY`
    # (`runq keys create`). Unset: off while the gateway binds a loopback address; binding any
    # other refuses to start, so a gateway never faces a network open by mistake.
    auth: Literal["keys", "off"] | None = None
    # Request metrics carry a `tenant` label: one series per tenant, so off unless asked.
    metrics_tenant_label: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # FastAPI's native OpenTelemetry (traces, metrics and logs to the globally configured
    # providers). Off by default: runq exports Prometheus metrics and its own logs, and FastAPI
    # looks its providers up on every request even when none is configured.
    opentelemetry: bool = False
    # runq_request_duration_seconds buckets: a list of upper bounds, or {min, max, factor}.
    request_buckets: list[float] | ExponentialBuckets | None = None
    # Workers and autoscalers serve /metrics here (gateways serve it on their own port).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Object storage for inputs and outputs above inline_max_bytes: file://DIR or
    # s3://BUCKET[/PREFIX]; unset: file://<system temp dir>/runq-objects (one host only).
    storage_url: str | None = None
    # An S3-compatible endpoint (MinIO, Ceph, moto); credentials come from boto3's usual chain.
    storage_endpoint_url: str | None = None
    inline_max_bytes: int = Field(256 * 1024, ge=1)
    presign_ttl_s: int = Field(300, ge=1, le=7 * 24 * 3600)
    # Where sampled predictions go as JSON Lines: file://DIR or s3://BUCKET[/PREFIX].
    prediction_log_url: str | None = None
    # Webhook deliveries are signed with it (HMAC-SHA256); unset: webhooks are refused.
    webhook_secret: SecretStr | None = None
    # Private, loopback and link-local webhook addresses are refused unless allowed (SSRF).
    webhook_allow_private: bool = False
    # Per-function overrides by function name; checked against the declared functions by
    # `function_settings`, so a name or key that matches nothing stops the start.
    functions: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("storage_url", "prediction_log_url", "redis_url")
    @classmethod
    def _known_scheme(cls, url: str | None, info: ValidationInfo) -> str | None:
        schemes = REDIS_URL_SCHEMES if info.field_name == "redis_url" else STORAGE_URL_SCHEMES
        if url is not None and not url.startswith(schemes):
            raise ValueError(f"must start with one of {', '.join(schemes)}")
        return url

    @field_validator("request_buckets")
    @classmethod
    def _increasing(
        cls, buckets: list[float] | ExponentialBuckets | None
    ) -> list[float] | ExponentialBuckets | None:
        if isinstance(buckets, list):
            if not buckets or len(buckets) > MAX_BUCKETS:
                raise ValueError(f"give 1 to {MAX_BUCKETS} bucket bounds")
            if buckets[0] <= 0 or any(b <= a for a, b in pairwise(buckets)):
                raise ValueError("bucket bounds must be positive and strictly increasing")
        return buckets

    def request_bucket_bounds(self) -> tuple[float, ...] | None:
        buckets = self.request_buckets
        if buckets is None:
            return None
        if isinstance(buckets, ExponentialBuckets):
            bounds = [buckets.min]
            while bounds[-1] < buckets.max:
                bounds.append(bounds[-1] * buckets.factor)
            return tuple(bounds)
        return tuple(buckets)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s}) is above max_timeout_s "
                f"({self.max_timeout_s})"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile must be given together")
        for name, overrides in self.functions.items():
            unknown = set(overrides) - FUNCTION_SETTING_NAMES
            if unknown:
                raise ValueError(
                    f"functions.{name}: unknown setting(s) {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(sorted(FUNCTION_SETTING_NAMES))}"
                )
        return self

    def auth_mode(self) -> Literal["keys", "off"]:
        """The effective `auth`; raises when it is unset and the gateway binds a non-loopback
        address."""
        if self.auth is not None:
            return self.auth
        if _is_loopback(self.host):
            return "off"
        raise ConfigError(
            f"the gateway binds {self.host}, not a loopback address, and the setting `auth` is "
            "unset: set auth to keys (RUNQ_AUTH=keys, then `runq keys create`) to require API "
            "keys, or to off to serve without them"
        )

    def function_settings(
        self,
        name: str,
        declared: Mapping[str, Any],
        deployed: Mapping[str, Any] | None = None,
    ) -> FunctionSettings:
        """The effective settings of one function: its decorator keywords under the overrides
        of the settings sources, under what `runq deploy` set last (``deployed``)."""
        merged = {**declared, **self.functions.get(name, {}), **(deployed or {})}
        try:
            resolved = FunctionSettings.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"function {name!r}: {_explain(exc)}") from None
        if resolved.max_latency_ms / 1000 >= self.max_timeout_s:
            raise ConfigError(
                f"function {name!r}: max_latency_ms ({resolved.max_latency_ms}) is not below "
                f"max_timeout_s ({self.max_timeout_s}); no predict could ever finish in time"
            )
        return resolved

    def check_functions(self, names: set[str]) -> None:
        unknown = set(self.functions) - names
        if unknown:
            raise ConfigError(
                f"settings name function(s) {', '.join(sorted(unknown))} that the target does "
                f"not declare; declared: {', '.join(sorted(names))}"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # Any other host name may resolve to an address others reach.
        return False


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Builds the settings from the file, the environment and CLI flags (None means unset)."""
    env = os.environ if env is None else env
    config_file = config_file or _env_path(env)
    layers = [
        read_settings_file(config_file) if config_file else {},
        _from_env(env),
        {key: value for key, value in (cli or {}).items() if value is not None},
    ]
    merged: dict[str, Any] = {}
    for layer in layers:
        _deep_merge(merged, layer)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {_explain(exc)}") from None


def explain_settings(
    settings: Settings,
    declared: Mapping[str, Mapping[str, Any]],
    *,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    deployed: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[str, Any, str]]:
    """Every effective setting as (dotted name, value, where it came from), secrets masked."""
    env = os.environ if env is None else env
    config_file = config_file or _env_path(env)
    file_layer = read_settings_file(config_file) if config_file else {}
    env_layer = _from_env(env)
    cli_layer = {key: value for key, value in (cli or {}).items() if value is not None}
    deployed = deployed or {}
    rows: list[tuple[str, Any, str]] = []
    for key in Settings.model_fields:
        if key == "functions":
            continue
        if key in cli_layer:
            source = f"flag --{key.replace('_', '-')}"
        elif key in env_layer:
            source = f"env {ENV_PREFIX}{key.upper()}"
        elif key in file_layer:
            source = f"file {config_file}"
        else:
            source = "default"
        rows.append((key, _shown(key, getattr(settings, key)), source))
    for name, fn_declared in sorted(declared.items()):
        effective = settings.function_settings(name, fn_declared, deployed.get(name))
        for key in FunctionSettings.model_fields:
            source = _function_source(
                name, key, fn_declared, deployed, env_layer, file_layer, config_file
            )
            rows.append((f"functions.{name}.{key}", getattr(effective, key), source))
    return rows


def _function_source(
    name: str,
    key: str,
    declared: Mapping[str, Any],
    deployed: Mapping[str, Mapping[str, Any]],
    env_layer: Mapping[str, Any],
    file_layer: Mapping[str, Any],
    config_file: Path | None,
) -> str:
    if key in deployed.get(name, {}):
        return "deployed (runq deploy)"
    if key in env_layer.get("functions", {}).get(name, {}):
        nesting = ENV_NESTING
        return f"env {ENV_PREFIX}FUNCTIONS{nesting}{name.upper()}{nesting}{key.upper()}"
    if key in file_layer.get("functions", {}).get(name, {}):
        return f"file {config_file}"
    return "decorator" if key in declared else "default"


def _shown(key: str, value: Any) -> Any:
    return masked_url(value) if key in URL_SETTINGS and isinstance(value, str) else value


# Settings holding URLs that may carry credentials: redis-py takes a password in the userinfo
# or as ?password=, and an S3 endpoint may be given as https://KEY:SECRET@host.
URL_SETTINGS = frozenset({"redis_url", "storage_url", "storage_endpoint_url", "prediction_log_url"})
SECRET_QUERY_PARAMETERS = frozenset({"password", "username"})
MASK = "***"


def masked_url(url: str) -> str:
    """The URL with its userinfo and any credential in its query replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = urlencode(
        [
            (name, MASK if name.lower() in SECRET_QUERY_PARAMETERS else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    # Built by hand: urlunsplit drops the empty authority of unix:///path.
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    return (
        masked + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    )


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process load exactly these settings.

    Every setting is written, defaults included: a child also inherits this process's
    environment, and a flag that resolved to the default (`--host 127.0.0.1`) must still win
    over an inherited RUNQ_HOST. An empty value is unset, so None falls back to its default.
    """
    env: dict[str, str] = {}
    for key, value in settings.model_dump(exclude={"functions"}).items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is None:
            text = ""
        elif isinstance(value, list | dict):
            text = json.dumps(value)
        else:
            text = str(value)
        env[ENV_PREFIX + key.upper()] = text
    for name, overrides in settings.functions.items():
        for key, value in overrides.items():
            env[f"{ENV_PREFIX}FUNCTIONS{ENV_NESTING}{name.upper()}{ENV_NESTING}{key.upper()}"] = (
                json.dumps(value)
            )
    return env


def _env_path(env: Mapping[str, str]) -> Path | None:
    value = env.get(ENV_CONFIG_FILE)
    return Path(value) if value else None


def read_settings_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a mapping at the top level")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    known_fields = set(Settings.model_fields)
    result: dict[str, Any] = {}
    for key, value in env.items():
        # An empty variable means unset, as `VAR=` in a compose file or a shell reads.
        if not key.startswith(ENV_PREFIX) or key in (ENV_CONFIG_FILE, ENV_TARGET) or not value:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name.startswith("functions" + ENV_NESTING):
            parts = name.split(ENV_NESTING)
            if len(parts) != 3 or not all(parts):
                raise ConfigError(f"{key}: expected RUNQ_FUNCTIONS__<NAME>__<SETTING>")
            result.setdefault("functions", {}).setdefault(parts[1], {})[parts[2]] = _json_or_text(
                value
            )
        elif name in known_fields and name != "functions":
            # Lists and mappings (request_buckets) arrive as JSON; everything else as text.
            result[name] = _json_or_text(value) if value[:1] in "[{" else value
        else:
            raise ConfigError(
                f"unknown environment variable {key}; known: "
                + ", ".join(sorted(ENV_PREFIX + f.upper() for f in known_fields))
            )
    return result


def _json_or_text(value: str) -> Any:
    # `null` must reach a child process as None (no cap), and numbers keep their type.
    try:
        return json.loads(value)
    except ValueError:
        return value


def _deep_merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
        for err in exc.errors()
    )
