"""Streaming generators with no model to download: a token-by-token "generator" and a batched
decode loop, the shape of an LLM's, each chunk sent to callers as it is produced.

    runq serve examples/stream.py
    curl -N -X POST http://127.0.0.1:8000/v1/functions/spell/predict \\
      -H 'accept: text/event-stream' -H 'content-type: application/json' -d '{"input": "runq"}'
"""

import time
from collections.abc import Iterator

import runq


@runq.function(batch=False, timeout_s=60, example="hello")
def spell(word: str) -> Iterator[str]:
    """Spells the word one letter at a time, 50 ms apart, reporting progress as it goes."""
    for i, letter in enumerate(word):
        time.sleep(0.05)
        runq.progress((i + 1) / len(word), f"letter {i + 1} of {len(word)}")
        yield letter


@runq.function(max_batch_size=16, max_latency_ms=20, timeout_s=60, example=5)
def countdown(starts: list[int]) -> Iterator[list[int | None]]:
    """A batched decode loop: each step yields one chunk per input still counting down, and
    None for the inputs that are done, until every input has reached zero."""
    left = list(starts)
    while any(n >= 0 for n in left):
        time.sleep(0.05)
        yield [n if n >= 0 else None for n in left]
        left = [n - 1 for n in left]
