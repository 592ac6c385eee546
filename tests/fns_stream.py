"""Streaming functions the stream tests serve: generators, batched and not, that record what
ran and when their generator was closed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from pydantic import BaseModel
from redis import Redis

import runq

# Each generator that is closed (its `finally` ran) pushes "<function>:<first input value>".
CLOSED_KEY = "test:stream:closed"


class Tokens(BaseModel):
    count: int
    delay_s: float = 0.0
    # Tag for CLOSED_KEY, so a test finds its own generator.
    tag: str = ""
    # A Redis key the run waits for before its first chunk (a test lets it go on).
    gate: str = ""


def _wait_for(gate: str) -> None:
    with Redis.from_url(os.environ["RUNQ_REDIS_URL"]) as redis:
        deadline = time.monotonic() + 10
        while not redis.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)


def _closed(name: str) -> None:
    with Redis.from_url(os.environ["RUNQ_REDIS_URL"]) as redis:
        redis.rpush(CLOSED_KEY, name)


@runq.function(batch=False, timeout_s=20, stall_threshold_s=0.25)
def tokens(request: Tokens) -> Iterator[str]:
    """``count`` chunks "t0", "t1", ..., ``delay_s`` apart, reporting progress half way."""
    try:
        for i in range(request.count):
            if i:
                time.sleep(request.delay_s)
            if i == request.count // 2:
                runq.progress(0.5, "half way")
            yield f"t{i}"
    finally:
        _closed(f"tokens:{request.tag}")


@runq.function(max_batch_size=8, max_latency_ms=300, timeout_s=20)
def decode(requests: list[Tokens]) -> Iterator[list[str | None]]:
    """A batched decode loop: input i gets ``count`` chunks "<tag>:<step>", None once done."""
    try:
        for gate in {r.gate for r in requests if r.gate}:
            _wait_for(gate)
        longest = max(r.count for r in requests)
        for step in range(longest):
            if step:
                time.sleep(max(r.delay_s for r in requests))
            yield [f"{r.tag}:{step}" if step < r.count else None for r in requests]
            runq.progress((step + 1) / longest, index=0)
    finally:
        _closed("decode:" + ",".join(r.tag for r in requests))


@runq.function(batch=False)
def whole(text: str) -> str:
    """Not a generator: a stream of it is its whole output as one chunk."""
    return text.upper()


@runq.function(max_batch_size=64, max_latency_ms=1, max_queue=2000)
def held(values: list[int]) -> Iterator[list[int]]:
    """Has no worker until its test starts one: its streams wait with their tasks queued."""
    yield values
