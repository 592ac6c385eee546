"""``runq.progress(fraction, message=None)``: a running function tells its callers how far it is.

The worker sets a reporter around each model call; outside one (the function called as plain
Python, say in its own unit tests) a report goes nowhere. The reporter is process-wide, not per
thread: a worker runs one model call at a time, and a model may report from threads it starts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

# Longest message kept: a progress report is a status line, not a log.
MESSAGE_MAX_CHARS = 1024

# Called with (input index or None for every input of the call, fraction, message).
Reporter = Callable[[int | None, float, str | None], None]

_reporter: Reporter | None = None


def progress(fraction: float, message: str | None = None, *, index: int | None = None) -> None:
    """Reports ``fraction`` (0 to 1) of the work done, with an optional message.

    A batched function names the input with ``index`` (its position in the batch); without
    it the report is every input's. It shows as the task's ``progress`` and as an SSE
    ``progress`` event; each report is one Redis call, so report steps, not every token.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"progress fraction must be a number, not {type(fraction).__name__}")
    if not math.isfinite(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"progress fraction must be between 0 and 1, not {fraction}")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"progress message must be a string, not {type(message).__name__}")
    reporter = _reporter
    if reporter is not None:
        reporter(index, float(fraction), None if message is None else message[:MESSAGE_MAX_CHARS])


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Routes ``progress`` calls to ``reporter`` while a model call runs."""
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous
