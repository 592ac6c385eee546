"""The function benchmarks/overload.py overloads: a fixed cost per batch, so its capacity is known.

Sleeping instead of computing keeps the worker off the CPU, which the gateway and the load
generator need on a small machine; the queue cannot tell the difference.

    runq serve benchmarks/overload_fn.py
"""

import time
from typing import Any

import runq

BATCH_S = 0.040
MAX_BATCH_SIZE = 4
# One batch waits behind the running one. At saturation a task admitted waits for the running
# batch and runs in the next, answered about 2 x BATCH_S after it arrives; at half capacity
# tasks already wait up to one batch for the running one to end. Each further batch of room
# adds BATCH_S to every admitted answer; the cap is there to answer the overflow with a fast
# 503 instead.
MAX_QUEUE = MAX_BATCH_SIZE
# Batch-mates are already queued under load; at half capacity a longer window only adds delay.
MAX_LATENCY_MS = 2


# Exactly one worker, started with the server and never scaled to zero: the capacity measured
# is one worker's, and no phase pays for a cold start.
@runq.function(
    max_batch_size=MAX_BATCH_SIZE,
    max_latency_ms=MAX_LATENCY_MS,
    max_queue=MAX_QUEUE,
    min_replicas=1,
    max_replicas=1,
    timeout_s=10,
    example=1,
)
def fixed_cost(inputs: list[Any]) -> list[Any]:
    time.sleep(BATCH_S)
    return inputs
