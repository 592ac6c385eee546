"""Pure parts of the task store."""

from __future__ import annotations

import pytest

from runq.queue.store import new_task_id, retry_after_s


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


def test_a_task_id_never_reads_as_a_command_line_option() -> None:
    # `rq requeue ID` took an id starting with '-' for an option (1 id in 64 did).
    ids = {new_task_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert not [task_id for task_id in ids if task_id.startswith("-")]
    assert all(len(task_id) == 22 for task_id in ids)
