"""BentoML 1.4's counterpart of runq's echo, for benchmarks/peers.py: an async API that answers
its input in a body shaped like a runq task.

It takes what runq's predict takes, `{"input": X}`, and answers what runq's predict answers: the
task's fields (id, function, priority, status, times, attempts) and `"output": X`, so both
servers parse, validate and write about the same bytes. Served by BentoML itself, in its own
venv (build/peers-venv, `make bench-peers`), never imported by runq's:

    build/peers-venv/bin/python -m bentoml serve bento_echo:Echo --working-dir benchmarks \
        --host 127.0.0.1 --port 3000
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import bentoml


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# One worker process, BentoML's default: the HTTP server and the API run in it, as uvicorn and
# the app do in runq's single gateway process.
@bentoml.service(name="echo")
class Echo:
    @bentoml.api
    async def echo(self, input: Any) -> dict[str, Any]:
        now = _now()
        return {
            "id": secrets.token_urlsafe(16),
            "function": "echo",
            "priority": "normal",
            "status": "succeeded",
            "created_at": now,
            "started_at": now,
            "finished_at": now,
            "attempts": 1,
            "output": input,
        }
