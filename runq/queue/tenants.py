"""Tenants' fair-share weights (`runq tenants`), and what each has queued.

A weight is a tenant's share of every function's claims while other tenants have tasks queued
too (claim.py): weight 2 is taken twice as often as weight 1. The claim reads the weights in
Redis itself, so a change holds from the next claim on, on every worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis import Redis

from runq.errors import ValidationFailed
from runq.queue import constants
from runq.queue.tasks import text

# A weight's bounds: the stride 1/weight stays a sane float either way.
WEIGHT_MIN = 0.001
WEIGHT_MAX = 1000.0
TENANT_MAX_CHARS = 255


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float
    # Queued tasks, every function's together.
    queued: int


def checked_weight(weight: float) -> float:
    if not (math.isfinite(weight) and WEIGHT_MIN <= weight <= WEIGHT_MAX):
        raise ValidationFailed(
            f"a weight is a number from {WEIGHT_MIN:g} to {WEIGHT_MAX:g}, not {weight:g}"
        )
    return weight


def checked_tenant(name: str) -> str:
    if not name or len(name) > TENANT_MAX_CHARS or not name.isprintable() or " " in name:
        raise ValidationFailed(
            f"a tenant is 1 to {TENANT_MAX_CHARS} printable characters without spaces, not {name!r}"
        )
    return name


def set_weight(connection: Redis, tenant: str, weight: float) -> None:
    """The tenant's weight from the next claim on; the default weight is stored as no weight."""
    checked_tenant(tenant)
    if checked_weight(weight) == constants.DEFAULT_TENANT_WEIGHT:
        connection.hdel(constants.TENANT_WEIGHTS_KEY, tenant)
    else:
        connection.hset(constants.TENANT_WEIGHTS_KEY, tenant, repr(weight))


def tenants(connection: Redis) -> list[Tenant]:
    """Every tenant with a weight set or tasks queued, by name."""
    weights = {
        str(text(name)): float(value)
        for name, value in connection.hgetall(constants.TENANT_WEIGHTS_KEY).items()
    }
    functions = sorted(str(text(f)) for f in connection.smembers(constants.FUNCTIONS_KEY))
    with connection.pipeline(transaction=False) as pipe:
        for function in functions:
            pipe.smembers(constants.tenants_key(function))
        members = pipe.execute()
    queues = [
        (tenant, key)
        for function, others in zip(functions, members, strict=True)
        for tenant in [constants.DEFAULT_TENANT, *sorted(str(text(t)) for t in others)]
        for key in constants.queue_keys(function, tenant)
    ]
    with connection.pipeline(transaction=False) as pipe:
        for _, key in queues:
            pipe.llen(key)
        lengths = pipe.execute()
    queued: dict[str, int] = {}
    for (tenant, _), length in zip(queues, lengths, strict=True):
        if length:
            queued[tenant] = queued.get(tenant, 0) + length
    return [
        Tenant(name, weights.get(name, constants.DEFAULT_TENANT_WEIGHT), queued.get(name, 0))
        for name in sorted(weights.keys() | queued.keys())
    ]
