"""A worker's reply to a gateway: what the gateway reads back is what the worker wrote."""

from __future__ import annotations

import json

import pytest

from runq.queue.replies import SEPARATOR, Answer, read_reply, reply_line
from runq.queue.tasks import output_json, task_json


def test_a_reply_carries_answers_as_bytes_and_other_tasks_as_json() -> None:
    view = {"id": "a-1", "status": "succeeded", "note": "two words\nand a line"}
    answer = task_json(view, output_json({"text": "spaces and\nnewlines", "n": [1, 2.5]}))
    failed = json.dumps({"id": "b_2", "status": "failed", "error": {"message": "x y"}}).encode()
    message = SEPARATOR.encode().join(
        [reply_line("a-1", answer, answer=True), reply_line("b_2", failed, answer=False)]
    )
    read = dict(read_reply(message))
    assert read["a-1"] == Answer(answer)
    assert read["a-1"].task()["output"] == {"text": "spaces and\nnewlines", "n": [1, 2.5]}
    assert read["b_2"] == json.loads(failed)


def test_an_output_is_compact_json() -> None:
    assert output_json({"a": [1.5, "é", "NaN"]}) == '{"a":[1.5,"é","NaN"]}'.encode()


@pytest.mark.parametrize(
    "not_json",
    [float("nan"), float("-inf"), 10**4400, "\ud800"],
    ids=["nan", "-inf", "4401 digits", "a lone surrogate"],
)
def test_an_output_that_strict_json_cannot_hold_is_refused(not_json: object) -> None:
    with pytest.raises(ValueError):
        output_json([not_json])
