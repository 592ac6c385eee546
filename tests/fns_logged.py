"""A function of its own for the log tests: no other test's worker takes its tasks."""

from __future__ import annotations

import warnings

import runq


@runq.function(max_batch_size=4, max_latency_ms=1)
def logged(inputs: list[str]) -> list[str]:
    if "boom" in inputs:
        raise ValueError("cannot digest 'boom'")
    if "warn" in inputs:
        warnings.warn("a model's own warning", UserWarning, stacklevel=1)
    return inputs
