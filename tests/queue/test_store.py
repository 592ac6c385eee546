"""Pure parts of the task store."""

from __future__ import annotations

import pytest

from runq.queue.store import retry_after_s


@pytest.mark.parametrize(
    ("drain_rate", "max_queue", "expected"),
    [
        (0.0, 50, 5),  # nothing drains (no worker yet): a cold start's worth
        (0.005, 50, 5),
        (10.0, 50, 3),  # half of 50 at 10/s is 2.5 s
        (100.0, 50, 1),  # never below a second
        (1000.0, 10_000, 5),
        (0.1, 10_000, 60),  # never above a minute
    ],
)
def test_retry_after_is_the_time_to_drain_half_the_queue(
    drain_rate: float, max_queue: int, expected: int
) -> None:
    assert retry_after_s(drain_rate, max_queue) == expected
