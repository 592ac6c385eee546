"""Calls the model on a batch and holds it to its contract; knows nothing of Redis."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from runq.errors import ErrorCode
from runq.functions import Function, validation_message
from runq.queue.tasks import Outcome, failure

logger = logging.getLogger("runq.worker")


@dataclass(frozen=True, slots=True)
class _Input:
    task_id: str
    value: Any


class BatchTimeout(Exception):
    """Raised into a batch that ran past the function's timeout_s."""


class ModelRunner:
    def __init__(self, function: Function) -> None:
        self.function = function
        self._output = TypeAdapter(function.output_type)
        self._call: Callable[[Any], Any] | None = None

    def setup(self) -> None:
        self._call = self.function.load()

    def run(self, payloads: Sequence[Any], task_ids: Sequence[str]) -> list[Outcome]:
        """One outcome per payload, in order. Never raises for the model's faults.

        The task ids are for the log lines of the inputs that fail.
        """
        outcomes: list[Outcome | None] = [None] * len(payloads)
        inputs: list[_Input] = []
        positions = []
        for i, (payload, task_id) in enumerate(zip(payloads, task_ids, strict=True)):
            try:
                inputs.append(_Input(task_id, self.function.validate_input(payload)))
                positions.append(i)
            except ValidationError as exc:
                outcomes[i] = failure(ErrorCode.VALIDATION_ERROR, validation_message(exc))
        results = self._run_batch(inputs) if self.function.batch else self._run_each(inputs)
        for i, outcome in zip(positions, results, strict=True):
            outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _run_batch(self, inputs: list[_Input], *, bisecting: bool = False) -> list[Outcome]:
        """Outcomes of one batched call; if it raises, bisects to fail only the poison inputs.

        One bad input must not fail its batch-mates, so a batch whose call raises is called
        again on each half, recursively, down to single inputs: those that still raise alone
        fail, the rest get their outputs. Each call is a node of a binary tree whose leaves are
        the n inputs, so a batch of n inputs costs at most 2n-1 model calls (every input
        poison), all within the batch's time limit; the model must tolerate seeing an input
        again. A contract violation is the function's bug, not an input's: it fails its
        (sub-)batch without bisecting.
        """
        if not inputs:
            return []
        try:
            outputs = self._model([i.value for i in inputs])
        except BatchTimeout:
            raise
        # SystemExit, KeyboardInterrupt and the like too: a model that raises them fails its
        # tasks, and the worker goes on (its own stop is a flag, never an exception).
        except BaseException as exc:
            if len(inputs) == 1:
                return [self._failure(exc, inputs[0].task_id)]
            if not bisecting:
                logger.warning(
                    "%s raised on a batch of %d inputs (%s: %s); bisecting it to find the "
                    "inputs that fail",
                    self.function.name,
                    len(inputs),
                    type(exc).__name__,
                    exc,
                    extra={
                        "function": self.function.name,
                        "task_ids": [i.task_id for i in inputs],
                    },
                )
            half = len(inputs) // 2
            return [
                *self._run_batch(inputs[:half], bisecting=True),
                *self._run_batch(inputs[half:], bisecting=True),
            ]
        return self._held_to_contract(inputs, outputs)

    def _held_to_contract(self, inputs: list[_Input], outputs: Any) -> list[Outcome]:
        if not isinstance(outputs, Sequence) or isinstance(outputs, str | bytes):
            message = (
                f"{self.function.name} is batched and must return a list; "
                f"it returned {type(outputs).__name__}"
            )
            return self._broken_contract(inputs, message)
        if len(outputs) != len(inputs):
            message = (
                f"{self.function.name} returned {len(outputs)} outputs for a batch of "
                f"{len(inputs)} inputs; a batched function returns one output per input, in order"
            )
            return self._broken_contract(inputs, message)
        return [self._dump(output) for output in outputs]

    def _broken_contract(self, inputs: list[_Input], message: str) -> list[Outcome]:
        task_ids = [i.task_id for i in inputs]
        logger.error(message, extra={"function": self.function.name, "task_ids": task_ids})
        return [failure(ErrorCode.MODEL_ERROR, message)] * len(inputs)

    def _run_each(self, inputs: list[_Input]) -> list[Outcome]:
        outcomes = []
        for item in inputs:
            try:
                outcomes.append(self._dump(self._model(item.value)))
            except BatchTimeout:
                raise
            except BaseException as exc:
                outcomes.append(self._failure(exc, item.task_id))
        return outcomes

    def _failure(self, exc: BaseException, task_id: str) -> Outcome:
        message = f"{type(exc).__name__}: {exc}"
        logger.error(
            "task %s: %s raised %s",
            task_id,
            self.function.name,
            message,
            exc_info=exc,
            extra={"function": self.function.name, "task_id": task_id},
        )
        return failure(ErrorCode.MODEL_ERROR, message, "".join(traceback.format_exception(exc)))

    def _model(self, value: Any) -> Any:
        if self._call is None:
            raise RuntimeError("ModelRunner.setup() must run before run()")
        return self._call(value)

    def _dump(self, output: Any) -> Outcome:
        try:
            return Outcome(output=self._output.dump_python(output, mode="json"))
        except Exception as exc:
            return failure(
                ErrorCode.INVALID_OUTPUT,
                f"{self.function.name} returned an output that cannot be sent as JSON: {exc}",
            )
