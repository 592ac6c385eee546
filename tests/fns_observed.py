"""A function whose every model call is recorded, for the observability tests."""

from __future__ import annotations

from typing import Any

import runq
from tests.fns import _record_call


@runq.function(max_batch_size=4, max_latency_ms=200, min_replicas=1)
def counted(inputs: list[Any]) -> list[Any]:
    _record_call("counted", inputs)
    return inputs
