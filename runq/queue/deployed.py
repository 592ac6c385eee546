"""Live configuration: per-function settings changed by `runq deploy` in a running system.

`runq deploy FILE` writes the file's per-function settings to Redis whole, and bumps a version.
Gateways, workers and autoscalers poll the version every DEPLOYED_POLL_INTERVAL_S and, when it
moved, recompute their functions' settings with the deployed values on top of their own
(decorator < file < environment < CLI < deployed). A deploy is declarative: a function it does
not name goes back to its own settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis import Redis

from runq.errors import ConfigError
from runq.queue import constants
from runq.queue.tasks import text
from runq.settings import FunctionSettings, Settings, read_settings_file

logger = logging.getLogger("runq.live")

Deployed = dict[str, dict[str, Any]]


class LiveSettings:
    """Follows the deployed settings for the functions one process serves."""

    def __init__(self, settings: Settings, declared: Mapping[str, Mapping[str, Any]]) -> None:
        self.settings = settings
        self.declared = dict(declared)
        self._version: bytes | None = None

    def effective(self, deployed: Mapping[str, Mapping[str, Any]]) -> dict[str, FunctionSettings]:
        """Every function's settings under ``deployed``; ConfigError names what cannot work."""
        unknown = set(deployed) - set(self.declared)
        if unknown:
            raise ConfigError(
                f"deployed settings name function(s) {', '.join(sorted(unknown))} that are not "
                f"declared; declared: {', '.join(sorted(self.declared))}"
            )
        return {
            name: self.settings.function_settings(name, declared, deployed.get(name))
            for name, declared in self.declared.items()
        }

    def poll(self, connection: Redis) -> dict[str, FunctionSettings] | None:
        """The new settings when a deploy happened since the last poll, else None."""
        version = connection.get(constants.DEPLOYED_VERSION_KEY)
        if version == self._version:
            return None
        return self._changed(version, connection.hgetall(constants.DEPLOYED_KEY))

    async def poll_async(self, redis: aioredis.Redis) -> dict[str, FunctionSettings] | None:
        version = await redis.get(constants.DEPLOYED_VERSION_KEY)
        if version == self._version:
            return None
        return self._changed(version, await redis.hgetall(constants.DEPLOYED_KEY))

    def _changed(self, version: Any, raw: Mapping[Any, Any]) -> dict[str, FunctionSettings] | None:
        self._version = version
        deployed = _parse(raw)
        mine = {name: values for name, values in deployed.items() if name in self.declared}
        try:
            settings = self.effective(mine)
        except ConfigError as exc:
            # `runq deploy` validated it against its own base settings; this process's differ.
            logger.error("deployed settings refused here, keeping the current ones: %s", exc)
            return None
        logger.info("deployed settings (version %s) applied", text(version))
        return settings


def read_deploy_file(path: Path) -> Deployed:
    """The per-function settings a deploy file asks for; ConfigError for anything else in it."""
    data = read_settings_file(path)
    others = set(data) - {"functions"}
    if others:
        raise ConfigError(
            f"{path}: only per-function settings change live (functions: {{NAME: {{...}}}}); "
            f"restart to change {', '.join(sorted(others))}"
        )
    functions = data.get("functions") or {}
    if not isinstance(functions, dict) or not all(isinstance(v, dict) for v in functions.values()):
        raise ConfigError(f"{path}: functions must map each function name to its settings")
    return {str(name): dict(values) for name, values in functions.items()}


def deployed_settings(connection: Redis) -> Deployed:
    return _parse(connection.hgetall(constants.DEPLOYED_KEY))


def _parse(raw: Mapping[Any, Any]) -> Deployed:
    return {str(text(name)): json.loads(value) for name, value in raw.items()}


def deploy(connection: Redis, deployed: Deployed) -> int:
    """Replaces the deployed settings whole, in one transaction; returns the new version."""
    with connection.pipeline() as pipe:
        pipe.delete(constants.DEPLOYED_KEY)
        if deployed:
            pipe.hset(
                constants.DEPLOYED_KEY,
                mapping={name: json.dumps(values) for name, values in deployed.items()},
            )
        pipe.incr(constants.DEPLOYED_VERSION_KEY)
        *_, version = pipe.execute()
    return int(version)
