"""The functions benchmarks/lifecycle.py starts from zero and whose workers it kills.

    runq serve benchmarks/lifecycle_fn.py

Each function has its own worker pool, so a cold start of one is never served by another's
worker, and killing a crash function's worker leaves the others alone.
"""

import time

import runq

# What setup() costs: a model loading its weights, without the CPU a real load would take from
# the gateway on a small machine. The worker logs the time it really took; that is the figure
# the first answer is held against.
SETUP_S = 2.0


# Scales to zero (min_replicas defaults to 0) one second after its last task, so each trial
# starts from no worker at all.
@runq.function(
    name="cold_start",
    max_batch_size=4,
    max_latency_ms=1,
    max_replicas=1,
    scale_down_delay_s=1,
    timeout_s=10,
    example=1,
)
class ColdStart:
    def setup(self) -> None:
        time.sleep(SETUP_S)

    def __call__(self, inputs: list[int]) -> list[int]:
        return inputs


# The crash functions keep their worker between trials (the default 60 s scale-down delay), so
# a trial's kill hits a worker that is up and running the task, not one still starting.
@runq.function(
    name="crash_retry", batch=False, retries=1, max_replicas=1, timeout_s=60, example=0.1
)
def crash_retry(seconds: float) -> float:
    """Killed mid-task once; the retry runs it again on the replacement worker."""
    time.sleep(seconds)
    return seconds


@runq.function(
    name="crash_no_retry", batch=False, retries=0, max_replicas=1, timeout_s=60, example=0.1
)
def crash_no_retry(seconds: float) -> float:
    """Killed mid-task; without retries the task ends failed, worker_lost."""
    time.sleep(seconds)
    return seconds
