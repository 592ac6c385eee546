"""Functions with inputs and outputs too big for Redis, for the object storage tests."""

from __future__ import annotations

import runq


@runq.function(max_batch_size=4, log_predictions=1.0)
def mirror(texts: list[str]) -> list[str]:
    """Answers each text reversed: an output as big as its input, and provably computed."""
    return [text[::-1] for text in texts]
