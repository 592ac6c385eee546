"""Where a lone predict's time goes: the c=1 path split into stages, and Redis's share of it.

Sequential predicts (one in flight, as wrk -c1 sends them) against a running `runq serve`. Each
task's own record holds three timestamps written on the way: `created_at` (the gateway, as it
builds the task), `started_at` (the worker, as it sends its claim) and `ended_at` (the worker,
as it builds the record); with the client's send and receive times they cut the path in four.
All processes share this machine's clock, so the differences are exact to its resolution.

Meanwhile Redis logs every call (SLOWLOG with a 0 µs threshold, restored after): the time the
server spent in each of runq's scripts, per call, is the part of the path no client code can
take out.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from rq.utils import utcparse

from runq.queue.claim import CLAIM
from runq.queue.enqueue import ENQUEUE
from runq.queue.record import RECORD

REQUESTS = 400
# The first requests pay for lazily built state; the figures start after them.
SKIPPED = 50
# Every command is logged, the readers of the timestamps and the workers' waits included.
SLOWLOG_LEN = 100_000

STAGES = (
    ("client -> task created (HTTP in, routing, validation)", "gateway_in"),
    ("created -> started (admission script, wake-up, claim sent)", "to_worker"),
    ("started -> ended (claim script, input, run, output)", "in_worker"),
    ("ended -> client (record script, reply, HTTP out)", "back"),
    ("total", "total"),
)
SCRIPTS = {"admission": ENQUEUE, "claim": CLAIM, "record": RECORD}


@dataclass(frozen=True)
class ScriptTime:
    name: str
    calls_per_request: float
    us_per_call: float


def bench_stages(url: str, redis_url: str, body: dict[str, Any]) -> dict[str, Any]:
    """p50 ms per stage over REQUESTS sequential predicts, and Redis µs per script call."""
    redis = Redis.from_url(redis_url)
    saved = redis.config_get("slowlog-*")
    redis.config_set("slowlog-max-len", SLOWLOG_LEN)
    try:
        rows = _timed_requests(url, redis, body, SKIPPED)
        redis.config_set("slowlog-log-slower-than", 0)
        redis.slowlog_reset()
        rows = _timed_requests(url, redis, body, REQUESTS - SKIPPED)
        log = redis.slowlog_get(SLOWLOG_LEN)
    finally:
        redis.config_set("slowlog-log-slower-than", saved["slowlog-log-slower-than"])
        redis.config_set("slowlog-max-len", saved["slowlog-max-len"])
        redis.close()
    stages = {key: statistics.median(row[key] for row in rows) for _, key in STAGES}
    scripts = _script_times(log, len(rows))
    return {"p50_ms": stages, "scripts": [s.__dict__ for s in scripts], "requests": len(rows)}


def _timed_requests(
    url: str, redis: Redis, body: dict[str, Any], count: int
) -> list[dict[str, float]]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
    encoded = json.dumps(body)
    rows = []
    try:
        for _ in range(count):
            sent = time.time()
            connection.request("POST", parts.path, encoded, {"content-type": "application/json"})
            answer = connection.getresponse().read()
            received = time.time()
            task_id = json.loads(answer)["id"]
            marks = redis.hmget(f"rq:job:{task_id}", "created_at", "started_at", "ended_at")
            created, started, ended = (utcparse(m.decode()).timestamp() for m in marks)
            rows.append(
                {
                    "gateway_in": created - sent,
                    "to_worker": started - created,
                    "in_worker": ended - started,
                    "back": received - ended,
                    "total": received - sent,
                }
            )
    finally:
        connection.close()
    return [{key: value * 1000 for key, value in row.items()} for row in rows]


def _script_times(log: list[dict[str, Any]], requests: int) -> list[ScriptTime]:
    by_sha = {hashlib.sha1(source.encode()).hexdigest(): name for name, source in SCRIPTS.items()}
    durations: dict[str, list[int]] = {name: [] for name in SCRIPTS}
    for entry in log:
        command = entry["command"]
        words = command.split() if isinstance(command, bytes) else str(command).split()
        if len(words) > 1 and words[0].lower() in (b"evalsha", "evalsha"):
            sha = words[1].decode() if isinstance(words[1], bytes) else words[1]
            if sha in by_sha:
                durations[by_sha[sha]].append(int(entry["duration"]))
    return [
        ScriptTime(name, len(times) / requests, statistics.mean(times) if times else 0.0)
        for name, times in durations.items()
    ]


def print_stages(stages: dict[str, Any], bare_p50_ms: float) -> None:
    print(
        f"\nWhere a lone predict's time goes ({stages['requests']} sequential predicts, p50 of"
        " each stage, from the task's own timestamps)"
    )
    for label, key in STAGES:
        print(f"  {label:<60} {stages['p50_ms'][key]:>7.3f} ms")
    print(f"  {'bare FastAPI echo, whole request (wrk c=1 p50)':<60} {bare_p50_ms:>7.3f} ms")
    scripts = ", ".join(
        f"{s['name']} {s['us_per_call']:.0f} µs x {s['calls_per_request']:.2f}"
        for s in stages["scripts"]
    )
    total_us = sum(s["us_per_call"] * s["calls_per_request"] for s in stages["scripts"])
    print(f"  Redis time inside runq's scripts per request: {total_us:.0f} µs ({scripts} calls)")
