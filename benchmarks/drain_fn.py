"""The function benchmarks/drain.py queues 20,000 tasks for and drains: only the queue's cost.

    runq gateway benchmarks/drain_fn.py --redis-url URL    # takes the tasks, runs nothing
    runq worker benchmarks/drain_fn.py --redis-url URL     # drains them

The benchmark reads these settings back from GET /v1/functions/drain_noop and checks them
against its own figures, so it never imports this module (nor runq).
"""

from typing import Any

import runq

# Room for the whole backlog the benchmark queues (20,000) before any worker runs.
MAX_QUEUE = 25_000


@runq.function(
    name="drain_noop",
    max_batch_size=64,
    # The queue is full from the start: batches fill at once, the window never matters.
    max_latency_ms=2,
    max_queue=MAX_QUEUE,
    timeout_s=30,
    example=1,
)
def drain_noop(inputs: list[Any]) -> list[Any]:
    return inputs
