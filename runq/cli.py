"""`runq serve | gateway | worker | autoscale | status | config | deploy | keys | tasks |
tenants`: the entry
points, and the only place that exits."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, get_args

from runq import logs
from runq.client import TaskStatusName
from runq.errors import ConfigError, RunqError
from runq.functions import Function, load_target
from runq.queue.deployed import Deployed, LiveSettings, deploy, deployed_settings, read_deploy_file
from runq.settings import (
    ENV_METRICS_PORT,
    ENV_MULTIPROC_DIR,
    ENV_TARGET,
    FunctionSettings,
    Settings,
    explain_settings,
    load_settings,
    settings_to_env,
)

logger = logging.getLogger("runq")

READY_WAIT_S = 120.0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logs.configure()
    try:
        code = args.command(args)
    except RunqError as exc:
        print(f"runq: error: {exc.message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"runq {version('runq')}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(
        name: str, handler: Any, help_text: str, *, target: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=handler)
        if target:
            sub.add_argument("target", help="path/to/file.py, module or module:attr")
        _common_options(sub)
        return sub

    for name, handler, help_text in (
        ("serve", _serve, "run the gateway and a worker per function (embedded Valkey by default)"),
        ("gateway", _gateway, "run the HTTP gateway alone against a given Redis"),
    ):
        sub = command(name, handler, help_text)
        sub.add_argument("--host", help="bind address (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="bind port (default 8000)")
        sub.add_argument(
            "--api-workers", type=int, help="gateway processes (default: one per core, at most 4)"
        )
        sub.add_argument("--backlog", type=int, help="listen backlog (default 2048)")
        sub.add_argument("--ssl-certfile", type=Path)
        sub.add_argument("--ssl-keyfile", type=Path)
        sub.add_argument("--reload", action="store_true", help="restart on source changes (dev)")

    worker = command("worker", _worker, "run a batch worker for one function")
    worker.add_argument("--function", help="which declared function (needed if several)")
    autoscale = command(
        "autoscale", _autoscale, "run worker processes that follow each function's demand"
    )
    for sub in (worker, autoscale):
        sub.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on it")
    _status_command(command("status", _status, STATUS_HELP, target=False))
    config = command(
        "config", _config_show, "show the effective settings and their sources", target=False
    )
    config.add_argument("action", choices=["show"], help="show")
    config.add_argument("target", help="path/to/file.py, module or module:attr")
    config.add_argument("--function", help="only this function's settings")
    deploy = command(
        "deploy", _deploy, "change per-function settings of a running system", target=False
    )
    deploy.add_argument("file", type=Path, help="YAML: functions: {NAME: {SETTING: VALUE}}")
    deploy.add_argument("target", help="the served target, to check the file against")
    _keys_command(commands.add_parser("keys", help=KEYS_HELP, description=KEYS_HELP))
    tenants = command("tenants", _tenants, TENANTS_HELP, target=False)
    tenants.add_argument("action", choices=["list", "weight"], help="list, or weight NAME W")
    tenants.add_argument("name", nargs="?", help="weight: the tenant")
    tenants.add_argument(
        "weight",
        nargs="?",
        type=float,
        help="weight: its share of claims against other tenants' (default 1)",
    )
    _tasks_command(commands)
    return parser


def _common_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", type=Path, help="YAML settings file (or RUNQ_CONFIG)")
    sub.add_argument("--redis-url", help="Redis/Valkey URL (or RUNQ_REDIS_URL)")
    sub.add_argument(
        "--log-format", choices=_choices("log_format"), help="log lines (default text)"
    )
    sub.add_argument(
        "--log-level",
        choices=_choices("log_level"),
        help="least severe level logged (default info)",
    )


def _choices(setting: str) -> tuple[str, ...]:
    return get_args(Settings.model_fields[setting].annotation)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(cli=_cli_layer(args), config_file=args.config)
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _cli_layer(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "redis_url": args.redis_url,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "api_workers": getattr(args, "api_workers", None),
        "backlog": getattr(args, "backlog", None),
        "ssl_certfile": getattr(args, "ssl_certfile", None),
        "ssl_keyfile": getattr(args, "ssl_keyfile", None),
        "log_format": args.log_format,
        "log_level": args.log_level,
        "metrics_port": getattr(args, "metrics_port", None),
    }


@contextmanager
def _metrics_dir() -> Iterator[None]:
    """A prometheus-client multiprocess directory for this process and its children.

    Every process below shares it, so one scrape sees them all; one given by the environment
    is used as it is, and left in place.
    """
    if os.environ.get(ENV_MULTIPROC_DIR):
        yield
        return
    path = tempfile.mkdtemp(prefix="runq-metrics-")
    os.environ[ENV_MULTIPROC_DIR] = path
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)
        del os.environ[ENV_MULTIPROC_DIR]


def _serve_metrics(settings: Settings) -> None:
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        from runq.metrics import process_registry

        try:
            start_http_server(settings.metrics_port, registry=process_registry())
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on port {settings.metrics_port}: {exc.strerror}"
            ) from None


def _configured(args: argparse.Namespace) -> tuple[Settings, dict[str, Function]]:
    """The settings and the target's functions, checked against each other."""
    settings = _settings(args)
    functions = load_target(args.target)
    _checked(settings, functions)
    return settings, functions


def _redis_url(settings: Settings, command: str) -> str:
    if settings.redis_url is None:
        raise ConfigError(f"runq {command} needs --redis-url or RUNQ_REDIS_URL")
    return settings.redis_url


def _checked(settings: Settings, functions: dict[str, Function]) -> None:
    settings.check_functions(set(functions))
    _function_settings(settings, functions)


# gateway ---------------------------------------------------------------------------------------


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from runq.gateway import connections

    settings, _functions = _configured(args)
    _redis_url(settings, "gateway")
    # Refused here, before uvicorn binds: a gateway never listens on a network without keys.
    settings.auth_mode()
    # Inherited by uvicorn's worker processes.
    connections.raise_open_files_limit(settings.max_connections)
    # uvicorn's worker processes and reloader build the app from the environment.
    os.environ.update(settings_to_env(settings))
    os.environ[ENV_TARGET] = args.target
    with _metrics_dir():
        uvicorn.run(
            "runq.gateway.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.api_workers if not args.reload else None,
            backlog=settings.backlog,
            http=connections.PROTOCOL,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            log_level=settings.log_level,
            # uvicorn's lines go to runq's handler, in runq's format (logs.configure).
            log_config=None,
            # runq logs one line per request itself, with the task id.
            access_log=False,
            reload=args.reload,
            reload_dirs=[str(_source_dir(args.target))] if args.reload else None,
            timeout_graceful_shutdown=math.ceil(settings.max_timeout_s),
        )
    return 0


# worker ----------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    from runq.queue.connection import sync_redis
    from runq.queue.outage import wait_until_reachable
    from runq.queue.storage import ClaimCheck, open_store
    from runq.worker.batch_worker import BatchWorker

    settings, functions = _configured(args)
    redis_url = _redis_url(settings, "worker")
    if args.function is not None:
        if args.function not in functions:
            raise ConfigError(
                f"{args.target!r} declares no function {args.function!r}; "
                f"declared: {', '.join(sorted(functions))}"
            )
        fn = functions[args.function]
    elif len(functions) == 1:
        (fn,) = functions.values()
    else:
        raise ConfigError(
            f"{args.target!r} declares several functions ({', '.join(sorted(functions))}); "
            "choose one with --function"
        )
    connection = sync_redis(redis_url)
    # RQ's worker reads from Redis as it is built: a worker started during an outage waits.
    wait_until_reachable(connection, "worker", logger)
    _serve_metrics(settings)
    BatchWorker(
        fn,
        settings.function_settings(fn.name, fn.declared),
        connection,
        ClaimCheck(
            open_store(settings.storage_url, settings.storage_endpoint_url),
            settings.inline_max_bytes,
        ),
        maintenance_interval_s=settings.maintenance_interval_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        live=LiveSettings(settings, {fn.name: fn.declared}),
        predictions=_prediction_log(settings),
    ).run()
    return 0


def _prediction_log(settings: Settings) -> Any:
    from runq.predlog import PredictionLog
    from runq.queue.storage import open_store

    if settings.prediction_log_url is None:
        return None
    store = open_store(settings.prediction_log_url, settings.storage_endpoint_url)
    return PredictionLog(store, f"{socket.gethostname()}-{os.getpid()}")


# serve -----------------------------------------------------------------------------------------


class _StopFlag:
    """Counts stop requests (Ctrl-C, SIGTERM, a closed terminal): the first drains every batch in
    hand, a second cuts them short."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.requests += 1

    @property
    def set(self) -> bool:
        return self.requests > 0

    def again(self) -> bool:
        return self.requests > 1

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self)


def _autoscaler(settings: Settings, target: str, functions: dict[str, Function]) -> Any:
    from runq.autoscaler.autoscaler import Autoscaler
    from runq.queue.connection import sync_redis

    assert settings.redis_url is not None
    child_env = {**os.environ, **settings_to_env(settings), ENV_TARGET: target}
    # Workers write to this process's metrics directory; the port is this process's to serve.
    child_env.pop(ENV_METRICS_PORT, None)
    per_function = _function_settings(settings, functions)
    live = LiveSettings(settings, {name: fn.declared for name, fn in functions.items()})
    return Autoscaler(
        sync_redis(settings.redis_url),
        target,
        per_function,
        child_env,
        live,
        maintenance_interval_s=settings.maintenance_interval_s,
    )


def _grace_s(settings: Settings, functions: dict[str, Function]) -> float:
    # A draining worker finishes its batch, which may take up to its function's timeout_s.
    return max(fn.timeout_s for fn in _function_settings(settings, functions).values()) + 5


def _autoscale(args: argparse.Namespace) -> int:
    settings, functions = _configured(args)
    _redis_url(settings, "autoscale")
    stop = _StopFlag()
    stop.install()
    with _metrics_dir():
        _serve_metrics(settings)
        autoscaler = _autoscaler(settings, args.target, functions)
        autoscaler.start()
        logger.info("autoscaling %s", ", ".join(sorted(functions)))
        try:
            while not stop.set:
                autoscaler.step()
        finally:
            autoscaler.stop(_grace_s(settings, functions), stop.again)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from runq.embedded import EmbeddedValkey

    settings, functions = _configured(args)
    settings.auth_mode()
    stop = _StopFlag()
    stop.install()

    valkey = None
    if settings.redis_url is None:
        valkey = EmbeddedValkey()
        valkey.start()
        settings = settings.model_copy(update={"redis_url": valkey.url})
    grace_s = _grace_s(settings, functions)
    code = 0
    try:
        with _metrics_dir():
            # Imported once the metrics directory is set: prometheus-client reads it on import.
            from runq.supervisor import Supervisor

            child_env = {**os.environ, **settings_to_env(settings), ENV_TARGET: args.target}
            autoscaler = _autoscaler(settings, args.target, functions)
            supervisor = Supervisor(child_env, args.target, autoscaler)
            try:
                supervisor.start()
                _announce(settings, functions, stop)
                code = _supervise(supervisor, stop, args, grace_s)
            finally:
                supervisor.stop(grace_s, stop.again)
    finally:
        if valkey is not None:
            valkey.stop()
    return code


def _function_settings(
    settings: Settings, functions: dict[str, Function]
) -> dict[str, FunctionSettings]:
    return {name: settings.function_settings(name, fn.declared) for name, fn in functions.items()}


def _supervise(supervisor: Any, stop: _StopFlag, args: argparse.Namespace, grace_s: float) -> int:
    watcher = None
    if args.reload:
        import watchfiles

        watcher = watchfiles.watch(
            _source_dir(args.target), yield_on_timeout=True, rust_timeout=500, raise_interrupt=False
        )
    while not stop.set:
        if not supervisor.poll():
            logger.error("the gateway exited; stopping")
            return 1
        if watcher is None:
            continue
        changes = next(watcher, None)
        if changes:
            logger.info("source changed; restarting the gateway and workers")
            supervisor.stop(grace_s, stop.again)
            supervisor.start()
    return 0


def _source_dir(target: str) -> Path:
    module_part = target.partition(":")[0]
    return Path(module_part).resolve().parent if module_part.endswith(".py") else Path.cwd()


def _announce(settings: Settings, functions: dict[str, Function], stop: _StopFlag) -> None:
    scheme = "https" if settings.ssl_certfile else "http"
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    base = f"{scheme}://{host}:{settings.port}"
    deadline = time.monotonic() + READY_WAIT_S
    while not stop.set and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1):  # noqa: S310
                break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    lines = [f"runq is serving {', '.join(sorted(functions))} at {base} (API docs: {base}/docs)"]
    for name, fn in sorted(functions.items()):
        body = json.dumps({"input": fn.example})
        lines.append(
            f"  try: curl -s -X POST {base}/v1/functions/{name}/predict "
            f"-H 'content-type: application/json' -d '{body}'"
        )
    if settings.log_format == "json":
        logger.info("\n".join(lines), extra={"url": base})
    else:
        print("\n".join(lines), flush=True)


# config show, deploy --------------------------------------------------------------------------


def _config_show(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from runq.queue.connection import sync_redis

    settings, functions = _configured(args)
    declared = {
        name: fn.declared
        for name, fn in functions.items()
        if args.function is None or name == args.function
    }
    if not declared:
        raise ConfigError(f"{args.target!r} declares no function {args.function!r}")
    deployed: Deployed = {}
    if settings.redis_url is not None:
        try:
            with sync_redis(settings.redis_url) as connection:
                deployed = deployed_settings(connection)
        except RedisError as exc:
            logger.warning("cannot read deployed settings (%s); showing local sources only", exc)
    rows = explain_settings(
        settings, declared, cli=_cli_layer(args), config_file=args.config, deployed=deployed
    )
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        print(f"{name:<{width}}  {json.dumps(value, default=str):<24}  {source}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from runq.queue.connection import sync_redis

    settings, functions = _configured(args)
    redis_url = _redis_url(settings, "deploy")
    wanted = read_deploy_file(args.file)
    live = LiveSettings(settings, {name: fn.declared for name, fn in functions.items()})
    # Refused whole: every function's resulting settings must be valid before any is written.
    live.effective(wanted)
    with sync_redis(redis_url) as connection:
        version = deploy(connection, wanted)
    print(f"deployed version {version}: {', '.join(sorted(wanted)) or 'no overrides'}")
    return 0


# tenants ---------------------------------------------------------------------------------------

TENANTS_HELP = (
    "set a tenant's fair-share weight (weight NAME W), or list tenants' weights and queued tasks"
)


def _tenants(args: argparse.Namespace) -> int:
    from runq.queue import tenants
    from runq.queue.connection import sync_redis

    settings = _settings(args)
    redis_url = _redis_url(settings, "tenants")
    with sync_redis(redis_url) as connection:
        if args.action == "weight":
            if args.name is None or args.weight is None:
                raise ConfigError("runq tenants weight needs a tenant and a weight: weight NAME W")
            tenants.set_weight(connection, args.name, args.weight)
            print(f"tenant {args.name}: weight {args.weight:g}")
            return 0
        if args.name is not None:
            raise ConfigError("runq tenants list takes no tenant")
        rows = tenants.tenants(connection)
    print(f"{'TENANT':<24}  {'WEIGHT':>8}  {'QUEUED':>8}")
    for row in rows:
        print(f"{row.name:<24}  {row.weight:>8g}  {row.queued:>8}")
    return 0


# status ----------------------------------------------------------------------------------------

STATUS_HELP = (
    "show every function's queued, running and replicas, and the last minute's throughput, "
    "p50/p99 latency and errors"
)
STATUS_WATCH_S = 2.0


def _status_command(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--watch",
        nargs="?",
        const=STATUS_WATCH_S,
        type=_positive_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {STATUS_WATCH_S:g}) until Ctrl-C",
    )
    sub.add_argument("--json", action="store_true", help="JSON, one line per refresh")


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


def _status(args: argparse.Namespace) -> int:
    from runq import status

    settings = _settings(args)
    redis_url = _redis_url(settings, "status")
    connection = status.connect(redis_url)
    budget_s = settings.cold_start_budget_s
    if args.watch is None:
        print(status.report(connection, as_json=args.json, cold_start_budget_s=budget_s))
        return 0
    try:
        status.watch(connection, args.watch, as_json=args.json, cold_start_budget_s=budget_s)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a watch ends, not a failure.


# keys ------------------------------------------------------------------------------------------

KEYS_HELP = "create, list and revoke API keys (auth: keys), shared by every gateway on the Redis"


def _keys_command(keys: argparse.ArgumentParser) -> None:
    from runq.queue.keys import DEFAULT_SCOPES, SCOPES

    actions = keys.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="make a key; it is printed this once, and only its hash is kept"
    )
    create.set_defaults(command=_keys_create)
    create.add_argument("--tenant", required=True, help="whose tasks the key's requests are")
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        dest="scopes",
        help=f"repeat for several (default: {' '.join(DEFAULT_SCOPES)})",
    )
    create.add_argument("--rate", type=float, help="requests per second allowed (a quota)")
    create.add_argument("--max-queued", type=int, help="tasks it may have queued at once")
    listing = actions.add_parser("list", help="every key: id, tenant, scopes; never the secret")
    listing.set_defaults(command=_keys_list)
    revoke = actions.add_parser("revoke", help="refuse a key on every gateway within a second")
    revoke.set_defaults(command=_keys_revoke)
    revoke.add_argument("key_id", metavar="ID", help="the key's id (`runq keys list`)")
    for sub in (create, listing, revoke):
        _common_options(sub)


def _keys_connection(args: argparse.Namespace) -> Any:
    from runq.queue.connection import sync_redis

    return sync_redis(_redis_url(_settings(args), "keys"))


def _keys_create(args: argparse.Namespace) -> int:
    from runq.queue.keys import DEFAULT_SCOPES, create_key

    with _keys_connection(args) as connection:
        key, record = create_key(
            connection,
            args.tenant,
            tuple(args.scopes or DEFAULT_SCOPES),
            rate_per_s=args.rate,
            max_queued=args.max_queued,
        )
    # The key alone on stdout, for KEY=$(runq keys create ...); what it is on stderr.
    print(key)
    print(
        f"created key {record.key_id} for tenant {record.tenant} "
        f"(scopes: {' '.join(sorted(record.scopes))}); it is shown only this once",
        file=sys.stderr,
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from runq.queue.keys import list_keys

    with _keys_connection(args) as connection:
        records = list_keys(connection)
    rows = [("ID", "TENANT", "SCOPES", "RATE", "MAX_QUEUED", "CREATED", "REVOKED")]
    for record in records:
        rows.append(
            (
                record.key_id,
                record.tenant,
                ",".join(sorted(record.scopes)),
                "-" if record.rate_per_s is None else f"{record.rate_per_s:g}/s",
                "-" if record.max_queued is None else str(record.max_queued),
                _when(record.created_at),
                "-" if record.revoked_at is None else _when(record.revoked_at),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _when(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _keys_revoke(args: argparse.Namespace) -> int:
    from runq.queue.keys import revoke_key

    with _keys_connection(args) as connection:
        record = revoke_key(connection, args.key_id)
    print(f"revoked key {record.key_id} of tenant {record.tenant}")
    return 0


# tasks -----------------------------------------------------------------------------------------

# Unlike the commands above, `runq tasks` asks a gateway over HTTP: listing, retry and purge are
# the API's (its admission rules, and the caller's tenant once keys are on), not Redis's.
TASKS_HELP = "list a function's tasks, retry an ended one, or purge a queue, through a gateway"
DEFAULT_URL = "http://127.0.0.1:8000"
TASK_COLUMNS = ("ID", "STATUS", "PRIORITY", "ATTEMPTS", "CREATED", "FINISHED")


def _tasks_command(commands: Any) -> None:
    tasks = commands.add_parser("tasks", help=TASKS_HELP, description=TASKS_HELP)
    actions = tasks.add_subparsers(required=True, metavar="ACTION")

    def action(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=help_text
        )
        sub.set_defaults(command=handler)
        sub.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
        sub.add_argument(
            "--api-key",
            help="the key to send when the gateway has auth: keys",
        )
        return sub

    listing = action(
        "list", _tasks_list, "list a function's tasks: queued, then running, then ended"
    )
    listing.add_argument("function")
    listing.add_argument("--status", choices=get_args(TaskStatusName), help="only these")
    listing.add_argument("--tenant", help="only this tenant's tasks")
    listing.add_argument("--json", action="store_true", help="one task JSON per line")
    retry = action("retry", _tasks_retry, "run a failed, timed-out or canceled task again")
    retry.add_argument("task_id", metavar="ID")
    purge = action("purge", _tasks_purge, "cancel every task queued for a function")
    purge.add_argument("function")


def _tasks_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from runq.client import Client

    with Client(args.url, api_key=args.api_key) as client:
        cursor: str | None = None
        if not args.json:
            print(_task_row(TASK_COLUMNS))
        while True:
            page = client.tasks(
                args.function, status=args.status, tenant=args.tenant, cursor=cursor
            )
            for task in page.tasks:
                if args.json:
                    print(json.dumps(asdict(task)), flush=True)
                else:
                    cells = (task.id, task.status, task.priority, task.attempts)
                    print(_task_row((*cells, task.created_at, task.finished_at)), flush=True)
            cursor = page.next_cursor
            if cursor is None:
                return 0


# An id is 22 characters, a time in RQ's format 27.
TASK_WIDTHS = (22, 9, 8, 8, 27, 27)


def _task_row(cells: tuple[Any, ...]) -> str:
    padded = (f"{'-' if c is None else c!s:<{w}}" for c, w in zip(cells, TASK_WIDTHS, strict=True))
    return "  ".join(padded).rstrip()


def _tasks_retry(args: argparse.Namespace) -> int:
    from runq.client import Client

    with Client(args.url, api_key=args.api_key) as client:
        task = client.retry(args.task_id)
    print(f"task {task.id} is {task.status} again (attempts so far: {task.attempts})")
    return 0


def _tasks_purge(args: argparse.Namespace) -> int:
    from runq.client import Client

    with Client(args.url, api_key=args.api_key) as client:
        purged = client.purge(args.function)
    print(f"purged {purged} queued task(s) of {args.function}: each ended canceled")
    return 0
