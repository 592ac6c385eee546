"""A no-op function: answers each input with itself. Measures runq's own overhead."""

from typing import Any

import runq


@runq.function(max_batch_size=16, max_latency_ms=2, example="hello")
def echo(inputs: list[Any]) -> list[Any]:
    return inputs
