"""ModelRunner: one outcome per task, and the model held to its batching contract."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from pydantic import BaseModel

import runq
from runq.functions import Function
from runq.worker.batch_worker import _time_limit
from runq.worker.runner import BatchTimeout, ModelRunner, Outcome


class Point(BaseModel):
    x: float
    y: float


def runner(function: Function) -> ModelRunner:
    model = ModelRunner(function)
    model.setup()
    return model


def tasks(payloads: list[Any]) -> tuple[list[Any], list[str]]:
    """The payloads, and task ids for them."""
    return payloads, [f"task-{i}" for i in range(len(payloads))]


def outputs(outcomes: list[Outcome]) -> list[Any]:
    assert all(o.ok for o in outcomes), outcomes
    return [o.output for o in outcomes]


# batched --------------------------------------------------------------------------------------


def test_batch_runs_once_and_answers_each_input_in_order() -> None:
    calls: list[list[int]] = []

    @runq.function
    def square(values: list[int]) -> list[int]:
        calls.append(values)
        return [v * v for v in values]

    assert outputs(runner(square).run(*tasks([1, "2", 3]))) == [1, 4, 9]
    assert calls == [[1, 2, 3]]  # one call, inputs validated into the declared type


def test_outputs_are_json_ready() -> None:
    @runq.function
    def centre(points: list[Point]) -> list[Point]:
        return [Point(x=p.x / 2, y=p.y / 2) for p in points]

    assert outputs(runner(centre).run(*tasks([{"x": 2, "y": 4}]))) == [{"x": 1.0, "y": 2.0}]


def poisoned(poison: set[int], calls: list[list[int]]) -> Function:
    """Squares its inputs; raises on any batch holding a poison input."""

    @runq.function
    def square(values: list[int]) -> list[int]:
        calls.append(values)
        bad = [v for v in values if v in poison]
        if bad:
            raise ValueError(f"cannot digest {bad[0]}")
        return [v * v for v in values]

    return square


def test_one_poison_input_fails_alone_and_its_batch_mates_get_their_outputs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[int]] = []
    with caplog.at_level(logging.WARNING, logger="runq.worker"):
        outcomes = runner(poisoned({5}, calls)).run(*tasks(list(range(16))))
    assert [o.output for o in outcomes] == [v * v if v != 5 else None for v in range(16)]
    assert [o.ok for o in outcomes] == [v != 5 for v in range(16)]
    assert outcomes[5].error_code == "model_error"
    assert outcomes[5].error_message == "ValueError: cannot digest 5"
    assert "Traceback" in outcomes[5].traceback and "square" in outcomes[5].traceback
    assert [call for call in calls if len(call) == 1] == [[4], [5]]  # only down the poison's path
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "square raised on a batch of 16 inputs (ValueError: cannot digest 5); "
            "bisecting it to find the inputs that fail",
        ),
        (logging.ERROR, "task task-5: square raised ValueError: cannot digest 5"),
    ]
    # A collector finds the failing task by its id, and the batch the bisecting began from.
    assert caplog.records[1].task_id == "task-5"
    assert caplog.records[0].task_ids == [f"task-{i}" for i in range(16)]


def test_two_poison_inputs_fail_and_only_they_fail(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runq.worker"):
        outcomes = runner(poisoned({2, 9}, [])).run(*tasks(list(range(12))))
    assert [o.output for o in outcomes] == [None if v in (2, 9) else v * v for v in range(12)]
    assert [o.error_message for o in outcomes if not o.ok] == [
        "ValueError: cannot digest 2",
        "ValueError: cannot digest 9",
    ]
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.ERROR, logging.ERROR]  # per poison, not per call


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_every_input_poison_fails_in_exactly_2n_minus_1_calls(n: int) -> None:
    calls: list[list[int]] = []
    outcomes = runner(poisoned(set(range(n)), calls)).run(*tasks(list(range(n))))
    assert [o.error_message for o in outcomes] == [
        f"ValueError: cannot digest {v}" for v in range(n)
    ]
    assert len(calls) == 2 * n - 1


def test_batch_too_big_for_the_model_succeeds_after_bisection() -> None:
    @runq.function
    def small(values: list[int]) -> list[int]:
        if len(values) > 4:
            raise MemoryError("out of memory")
        return [-v for v in values]

    assert outputs(runner(small).run(*tasks(list(range(13))))) == [-v for v in range(13)]


def test_batch_timeout_during_bisection_propagates() -> None:
    calls: list[list[int]] = []

    @runq.function
    def slow(values: list[int]) -> list[int]:
        calls.append(values)
        if len(calls) == 1:
            raise ValueError("first call fails")
        raise BatchTimeout

    with pytest.raises(BatchTimeout):
        runner(slow).run(*tasks([1, 2, 3, 4]))
    assert calls == [[1, 2, 3, 4], [1, 2]]  # stopped at the first sub-call


def test_contract_violation_in_a_sub_batch_fails_only_that_sub_batch() -> None:
    calls: list[list[int]] = []

    @runq.function
    def extra(values: list[int]) -> list[int]:
        calls.append(values)
        if len(values) > 4:
            raise ValueError("batch too big")
        return [*values, 0] if 7 in values else values

    outcomes = runner(extra).run(*tasks(list(range(8))))
    assert [o.output for o in outcomes[:4]] == [0, 1, 2, 3]
    assert [o.error_code for o in outcomes[4:]] == ["model_error"] * 4
    assert outcomes[4].error_message == (
        "extra returned 5 outputs for a batch of 4 inputs; "
        "a batched function returns one output per input, in order"
    )
    assert calls == [list(range(8)), [0, 1, 2, 3], [4, 5, 6, 7]]  # no bisecting past it


def test_wrong_number_of_outputs_fails_the_batch() -> None:
    @runq.function
    def extra(values: list[int]) -> list[int]:
        return [*values, 0]

    outcomes = runner(extra).run(*tasks([1, 2]))
    assert [o.error_code for o in outcomes] == ["model_error", "model_error"]
    assert outcomes[0].error_message == (
        "extra returned 3 outputs for a batch of 2 inputs; "
        "a batched function returns one output per input, in order"
    )


@pytest.mark.parametrize("returned", ["ab", 7, None, {"a": 1, "b": 2}])
def test_non_list_result_fails_the_batch(returned: Any) -> None:
    @runq.function
    def scalar(values: list[Any]) -> list[Any]:
        return returned  # type: ignore[no-any-return]

    outcomes = runner(scalar).run(*tasks([1, 2]))
    assert [o.error_code for o in outcomes] == ["model_error", "model_error"]
    assert outcomes[0].error_message == (
        f"scalar is batched and must return a list; it returned {type(returned).__name__}"
    )


def test_tuple_result_is_accepted() -> None:
    @runq.function
    def pairs(values: list[int]) -> list[int]:
        return tuple(values)  # type: ignore[return-value]

    assert outputs(runner(pairs).run(*tasks([1, 2]))) == [1, 2]


def test_invalid_input_fails_only_that_task() -> None:
    calls: list[list[Point]] = []

    @runq.function
    def norm(points: list[Point]) -> list[float]:
        calls.append(points)
        return [(p.x**2 + p.y**2) ** 0.5 for p in points]

    outcomes = runner(norm).run(*tasks([{"x": 3, "y": 4}, {"x": "far"}, {"x": 6, "y": 8}]))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert [outcomes[0].output, outcomes[2].output] == [5.0, 10.0]
    assert outcomes[1].error_code == "validation_error"
    assert "x: Input should be a valid number" in outcomes[1].error_message
    assert "y: Field required" in outcomes[1].error_message
    assert calls == [[Point(x=3, y=4), Point(x=6, y=8)]]  # the model never sees the bad one


def test_batch_of_only_invalid_inputs_does_not_call_the_model() -> None:
    calls: list[list[int]] = []

    @runq.function
    def square(values: list[int]) -> list[int]:
        calls.append(values)
        return [v * v for v in values]

    outcomes = runner(square).run(*tasks(["one", "two"]))
    assert [o.error_code for o in outcomes] == ["validation_error", "validation_error"]
    assert calls == []


def test_output_that_does_not_serialize_fails_the_task() -> None:
    @runq.function
    def leaky(values: list[int]) -> list[Any]:
        return [v if v else object() for v in values]

    outcomes = runner(leaky).run(*tasks([1, 0]))
    assert outcomes[0].output == 1
    assert outcomes[1].error_code == "invalid_output"
    assert "leaky returned an output that cannot be sent as JSON" in outcomes[1].error_message


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
@pytest.mark.parametrize("batch", [True, False])
def test_a_model_that_raises_a_base_exception_fails_its_tasks_and_the_runner_goes_on(
    raised: BaseException, batch: bool
) -> None:
    @runq.function(batch=batch)
    def quits(values: Any) -> Any:
        if values in (0, [0]):
            raise raised
        return values

    model = runner(quits)
    (outcome,) = model.run(*tasks([0]))
    assert outcome.error_code == "model_error"
    assert outcome.error_message.startswith(type(raised).__name__)
    assert outputs(model.run(*tasks([1]))) == [1]


def test_class_model_keeps_state_across_batches() -> None:
    @runq.function
    class Counter:
        def setup(self) -> None:
            self.batches = 0

        def __call__(self, values: list[int]) -> list[int]:
            self.batches += 1
            return [self.batches for _ in values]

    model = runner(Counter)
    assert outputs(model.run(*tasks([0, 0]))) == [1, 1]
    assert outputs(model.run(*tasks([0]))) == [2]


def test_run_before_setup_fails_the_tasks() -> None:
    @runq.function
    def echo(values: list[int]) -> list[int]:
        return values

    outcomes = ModelRunner(echo).run(*tasks([1]))
    assert outcomes[0].error_code == "model_error"
    assert "setup() must run before run()" in outcomes[0].error_message


# unbatched ------------------------------------------------------------------------------------


def test_unbatched_function_is_called_per_input() -> None:
    calls: list[int] = []

    @runq.function(batch=False)
    def double(value: int) -> int:
        calls.append(value)
        return value * 2

    assert outputs(runner(double).run(*tasks([1, "2", 3]))) == [2, 4, 6]
    assert calls == [1, 2, 3]


def test_unbatched_failure_fails_only_its_input() -> None:
    @runq.function(batch=False)
    def inverse(value: float) -> float:
        if value == 0:
            raise ZeroDivisionError("0 has no inverse")
        return 1 / value

    outcomes = runner(inverse).run(*tasks([2, 0, "x", 4]))
    assert [o.output for o in outcomes] == [0.5, None, None, 0.25]
    assert [o.error_code for o in outcomes] == [
        None,
        "model_error",
        "validation_error",
        None,
    ]
    assert outcomes[1].error_message == "ZeroDivisionError: 0 has no inverse"


# time limit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [True, False])
def test_batch_timeout_is_not_taken_for_a_model_error(batch: bool) -> None:
    """The worker's time limit raises BatchTimeout into the model; the runner lets it through."""

    def stuck(value: Any) -> Any:
        raise BatchTimeout

    with pytest.raises(BatchTimeout):
        runner(runq.function(batch=batch)(stuck)).run(*tasks([1, 2]))


def test_time_limit_stops_a_model_that_runs_past_it() -> None:
    ran_on: list[int] = []

    @runq.function(batch=False)
    def sleepy(seconds: int) -> int:
        ran_on.append(seconds)
        time.sleep(seconds)
        return seconds

    model = runner(sleepy)
    with pytest.raises(BatchTimeout), _time_limit(0.05):
        model.run(*tasks([30, 30]))
    assert ran_on == [30]  # stopped inside the first call, the second never started
    assert outputs(model.run(*tasks([0]))) == [0]  # the limit is gone once the batch is over
