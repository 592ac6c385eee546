"""Functions the test suite serves. Each shows one behaviour a user relies on."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from pydantic import BaseModel, Field
from redis import Redis

import runq

# Functions that prove what ran record their inputs here; CALLS_KEY gets one JSON list per call.
RAN_KEY = "test:ran:{}"
CALLS_KEY = "test:calls:{}"
# `limited` counts its tasks running right now, and the most it ever saw at once.
RUNNING_KEY = "test:limited:running"
PEAK_KEY = "test:limited:peak"
_RAISE_PEAK = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
"""


@contextmanager
def _redis() -> Iterator[Redis]:
    with Redis.from_url(os.environ["RUNQ_REDIS_URL"]) as redis:
        yield redis


def _record(function: str, inputs: list[Any]) -> None:
    with _redis() as redis:
        redis.rpush(RAN_KEY.format(function), *[repr(x) for x in inputs])


def _record_call(function: str, inputs: list[Any]) -> None:
    with _redis() as redis:
        redis.rpush(CALLS_KEY.format(function), json.dumps(inputs))


@runq.function(max_batch_size=8, max_latency_ms=5)
def echo(inputs: list[Any]) -> list[Any]:
    return inputs


@runq.function(max_batch_size=4, max_latency_ms=200)
def batches(inputs: list[Any]) -> list[dict[str, Any]]:
    """Tells each caller how big its batch was."""
    return [{"value": x, "batch_size": len(inputs)} for x in inputs]


@runq.function(max_batch_size=8, max_latency_ms=1)
def parked(inputs: list[Any]) -> list[Any]:
    """Has no worker until a test starts one; records what it ran."""
    _record("parked", inputs)
    return inputs


@runq.function(max_queue=5)
def capped(inputs: list[Any]) -> list[Any]:
    """Never gets a worker: its queue only fills up (the gateway's settings lower the cap to 3)."""
    return inputs


@runq.function(max_queue=50)
def admitted(inputs: list[Any]) -> list[Any]:
    """Never gets a worker: shows how many tasks admission lets into its queue."""
    return inputs


@runq.function(max_batch_size=8, max_latency_ms=50)
def fails(inputs: list[str]) -> list[str]:
    if "boom" in inputs:
        raise ValueError("cannot digest 'boom'")
    return inputs


@runq.function(max_batch_size=8, max_latency_ms=1)
def wrong_count(inputs: list[int]) -> list[int]:
    return [*inputs, 0]


@runq.function(batch=False)
def double(value: int) -> int:
    return value * 2


class Point(BaseModel):
    x: float
    y: float


@runq.function(max_batch_size=8, max_latency_ms=1)
def norm(points: list[Point]) -> list[float]:
    return [(p.x**2 + p.y**2) ** 0.5 for p in points]


@runq.function(batch=False, timeout_s=1.5)
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@runq.function(max_batch_size=1)
class Stateful:
    """Loaded once per worker process; keeps state across batches."""

    def setup(self) -> None:
        self.setups = getattr(self, "setups", 0) + 1
        self.calls = 0

    def __call__(self, inputs: list[Any]) -> list[dict[str, int]]:
        self.calls += 1
        return [{"pid": os.getpid(), "setups": self.setups, "calls": self.calls} for _ in inputs]


@runq.function(max_batch_size=2, max_concurrency=3, timeout_s=10)
def limited(seconds: list[float]) -> list[float]:
    """Measures from inside how many of its tasks run at once, across all its workers."""
    with _redis() as redis:
        running = redis.incrby(RUNNING_KEY, len(seconds))
        redis.eval(_RAISE_PEAK, 1, PEAK_KEY, running)
        time.sleep(max(seconds))
        redis.decrby(RUNNING_KEY, len(seconds))
    return seconds


@runq.function(max_batch_size=8, max_latency_ms=1)
def poison(inputs: list[str]) -> list[str]:
    """Has no worker until a test starts one; records each call; cannot digest 'boom'."""
    _record_call("poison", inputs)
    if "boom" in inputs:
        raise ValueError("cannot digest 'boom'")
    return inputs


@runq.function(max_batch_size=3, max_latency_ms=1)
def ordered(inputs: list[str]) -> list[str]:
    """Has no worker until a test starts one; records each batch in the order it ran."""
    _record_call("ordered", inputs)
    return inputs


@runq.function(batch=False, max_concurrency=1, timeout_s=60)
def solo(seconds: float) -> float:
    """One task at a time across all its workers."""
    time.sleep(seconds)
    return seconds


@runq.function(max_batch_size=8, max_latency_ms=1)
def lenient(values: list[Annotated[float, Field(allow_inf_nan=True)]]) -> list[bool]:
    """Declares that it takes NaN and Infinity; never served by a worker in the tests."""
    return [value != value for value in values]


@runq.function(max_batch_size=8, max_latency_ms=1, expose_errors=False)
def secretive(inputs: list[str]) -> list[str]:
    raise ValueError(f"cannot reach postgres://app@10.0.0.7 for {inputs[0]!r}")
