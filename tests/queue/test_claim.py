"""A worker's claim, as Redis sees it: a claim sent again after its reply was lost."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from redis import Redis

from runq.queue.claim import Claim
from runq.queue.line import Line
from tests.helpers import clear_function, queued


@pytest.fixture
def parked(redis: Redis) -> Iterator[None]:
    clear_function(redis, "parked")
    yield
    clear_function(redis, "parked")


@pytest.mark.usefixtures("parked")
def test_a_claim_sent_again_answers_what_it_took_and_takes_nothing_more(
    client: httpx.Client, redis: Redis
) -> None:
    ids = [
        client.post("/v1/functions/parked/tasks", json={"input": i}).json()["id"] for i in range(3)
    ]
    claim = Claim(Line(redis), "parked", "claim-test-worker")
    # As after a claim whose reply a dropped connection lost: the same claim goes again.
    claim._unanswered = "lost-reply"
    first = claim(2, None)
    claim._unanswered = "lost-reply"
    again = claim(2, None)
    assert [s.task_id for s in again.started] == [s.task_id for s in first.started] == ids[:2]
    assert [s.execution_id for s in again.started] == [s.execution_id for s in first.started]
    assert queued(redis, "parked") == 1  # the third task is still there for whoever claims next
    # A new claim takes on from there.
    assert [s.task_id for s in claim(2, None).started] == ids[2:]
