"""A function whose submitted tasks announce their end by webhook."""

from __future__ import annotations

import runq


@runq.function(max_batch_size=4)
def hooked(values: list[int]) -> list[int]:
    return [value * 3 for value in values]
