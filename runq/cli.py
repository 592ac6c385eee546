"""`runq serve | gateway | worker | autoscale`: the entry points, and the only place that exits."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from runq.errors import ConfigError, RunqError
from runq.functions import Function, load_target
from runq.settings import ENV_TARGET, FunctionSettings, Settings, load_settings, settings_to_env

logger = logging.getLogger("runq")

READY_WAIT_S = 120.0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=handler)
        sub.add_argument("target", help="path/to/file.py, module or module:attr")
        sub.add_argument("--config", type=Path, help="YAML settings file (or RUNQ_CONFIG)")
        sub.add_argument("--redis-url", help="Redis/Valkey URL (or RUNQ_REDIS_URL)")
        return sub

    for name, handler, help_text in (
        ("serve", _serve, "run the gateway and a worker per function (embedded Valkey by default)"),
        ("gateway", _gateway, "run the HTTP gateway alone against a given Redis"),
    ):
        sub = command(name, handler, help_text)
        sub.add_argument("--host", help="bind address (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="bind port (default 8000)")
        sub.add_argument("--api-workers", type=int, help="gateway processes (default 1)")
        sub.add_argument("--backlog", type=int, help="listen backlog (default 2048)")
        sub.add_argument("--ssl-certfile", type=Path)
        sub.add_argument("--ssl-keyfile", type=Path)
        sub.add_argument("--reload", action="store_true", help="restart on source changes (dev)")

    worker = command("worker", _worker, "run a batch worker for one function")
    worker.add_argument("--function", help="which declared function (needed if several)")
    command("autoscale", _autoscale, "run worker processes that follow each function's demand")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    cli = {
        "redis_url": args.redis_url,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "api_workers": getattr(args, "api_workers", None),
        "backlog": getattr(args, "backlog", None),
        "ssl_certfile": getattr(args, "ssl_certfile", None),
        "ssl_keyfile": getattr(args, "ssl_keyfile", None),
    }
    return load_settings(cli=cli, config_file=args.config)


def _checked(settings: Settings, functions: dict[str, Function]) -> None:
    settings.check_functions(set(functions))
    _function_settings(settings, functions)


# gateway ---------------------------------------------------------------------------------------


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(args)
    if settings.redis_url is None:
        raise ConfigError("runq gateway needs --redis-url or RUNQ_REDIS_URL")
    _checked(settings, load_target(args.target))
    # uvicorn's worker processes and reloader build the app from the environment.
    os.environ.update(settings_to_env(settings))
    os.environ[ENV_TARGET] = args.target
    uvicorn.run(
        "runq.gateway.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.api_workers if not args.reload else None,
        backlog=settings.backlog,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        log_level=settings.log_level,
        access_log=False,
        reload=args.reload,
        reload_dirs=[str(_source_dir(args.target))] if args.reload else None,
        timeout_graceful_shutdown=math.ceil(settings.max_timeout_s),
    )
    return 0


# worker ----------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    from redis import Redis

    from runq.worker.batch_worker import BatchWorker

    settings = _settings(args)
    if settings.redis_url is None:
        raise ConfigError("runq worker needs --redis-url or RUNQ_REDIS_URL")
    functions = load_target(args.target)
    _checked(settings, functions)
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
    connection = Redis.from_url(settings.redis_url)
    BatchWorker(fn, settings.function_settings(fn.name, fn.declared), connection).run()
    return 0


# serve -----------------------------------------------------------------------------------------


class _StopFlag:
    def __init__(self) -> None:
        self.set = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.set = True


def _autoscaler(settings: Settings, target: str, functions: dict[str, Function]) -> Any:
    from redis import Redis

    from runq.autoscaler.autoscaler import Autoscaler

    assert settings.redis_url is not None
    child_env = {**os.environ, **settings_to_env(settings), ENV_TARGET: target}
    per_function = {
        name: settings.function_settings(name, fn.declared) for name, fn in functions.items()
    }
    return Autoscaler(Redis.from_url(settings.redis_url), target, per_function, child_env)


def _grace_s(settings: Settings, functions: dict[str, Function]) -> float:
    # A draining worker finishes its batch, which may take up to its function's timeout_s.
    return max(fn.timeout_s for fn in _function_settings(settings, functions).values()) + 5


def _autoscale(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.redis_url is None:
        raise ConfigError("runq autoscale needs --redis-url or RUNQ_REDIS_URL")
    functions = load_target(args.target)
    _checked(settings, functions)
    stop = _StopFlag()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    autoscaler = _autoscaler(settings, args.target, functions)
    autoscaler.start()
    logger.info("autoscaling %s", ", ".join(sorted(functions)))
    try:
        while not stop.set:
            autoscaler.step()
    finally:
        autoscaler.stop(_grace_s(settings, functions))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from runq.autoscaler.supervisor import Supervisor
    from runq.embedded import EmbeddedValkey

    settings = _settings(args)
    functions = load_target(args.target)
    _checked(settings, functions)
    stop = _StopFlag()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    valkey = None
    if settings.redis_url is None:
        valkey = EmbeddedValkey()
        valkey.start()
        settings = settings.model_copy(update={"redis_url": valkey.url})
    child_env = {**os.environ, **settings_to_env(settings), ENV_TARGET: args.target}
    supervisor = Supervisor(child_env, args.target, _autoscaler(settings, args.target, functions))
    grace_s = _grace_s(settings, functions)
    code = 0
    try:
        supervisor.start()
        _announce(settings, functions, stop)
        code = _supervise(supervisor, stop, args, grace_s)
    finally:
        supervisor.stop(grace_s)
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
            supervisor.stop(grace_s)
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
    print("\n".join(lines), flush=True)
