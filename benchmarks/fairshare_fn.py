"""The function benchmarks/fairshare.py shares between two tenants: a fixed cost per batch, so
the pool's capacity is steady and a task's wait is counted in batches.

Sleeping instead of computing keeps the worker off the CPU, which the gateway, Valkey and the
load need on a small machine; the queue cannot tell the difference.

    python benchmarks/fairshare.py
"""

import time
from typing import Any

import runq

BATCH_S = 0.010
MAX_BATCH_SIZE = 4
# Room for tenant A's whole flood at once.
MAX_QUEUE = 10_000


# Exactly one worker, started with the server and never scaled to zero: every phase has the
# same pool, and none pays for a cold start.
@runq.function(
    max_batch_size=MAX_BATCH_SIZE,
    max_latency_ms=1,
    max_queue=MAX_QUEUE,
    min_replicas=1,
    max_replicas=1,
    timeout_s=10,
    example=1,
)
def shared(inputs: list[Any]) -> list[Any]:
    time.sleep(BATCH_S)
    return inputs
