"""The function the fault run serves: it notes every input it runs in a file, so a task run
twice is seen even when Redis was away while it ran."""

from __future__ import annotations

import os
import time

import runq

RUNS_DIR_ENV = "FAULTS_RUNS_DIR"


@runq.function(max_batch_size=16, max_latency_ms=5, max_replicas=2, target_per_replica=8)
def tally(inputs: list[str]) -> list[str]:
    time.sleep(0.02)
    # One file per process, appended to: no lock between workers, nothing lost on a crash.
    path = os.path.join(os.environ[RUNS_DIR_ENV], f"{os.getpid()}.txt")
    with open(path, "a") as runs:
        runs.write("".join(f"{value}\n" for value in inputs))
    return inputs
