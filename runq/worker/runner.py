"""Calls the model on a batch and holds it to its contract; knows nothing of Redis."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from runq.errors import ErrorCode
from runq.functions import Function, validation_message
from runq.queue.tasks import Outcome, failure

logger = logging.getLogger("runq.worker")


class BatchTimeout(Exception):
    """Raised into a batch that ran past the function's timeout_s."""


class ModelRunner:
    def __init__(self, function: Function) -> None:
        self.function = function
        self._output = TypeAdapter(function.output_type)
        self._call: Callable[[Any], Any] | None = None

    def setup(self) -> None:
        self._call = self.function.load()

    def run(self, payloads: Sequence[Any]) -> list[Outcome]:
        """One outcome per payload, in order. Never raises for the model's faults."""
        outcomes: list[Outcome | None] = [None] * len(payloads)
        inputs, positions = [], []
        for i, payload in enumerate(payloads):
            try:
                inputs.append(self.function.validate_input(payload))
                positions.append(i)
            except ValidationError as exc:
                outcomes[i] = failure(ErrorCode.VALIDATION_ERROR, validation_message(exc))
        results = self._run_batch(inputs) if self.function.batch else self._run_each(inputs)
        for i, outcome in zip(positions, results, strict=True):
            outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _run_batch(self, inputs: list[Any], *, bisecting: bool = False) -> list[Outcome]:
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
            outputs = self._model(inputs)
        except BatchTimeout:
            raise
        # SystemExit, KeyboardInterrupt and the like too: a model that raises them fails its
        # tasks, and the worker goes on (its own stop is a flag, never an exception).
        except BaseException as exc:
            if len(inputs) == 1:
                return [_model_failure(exc)]
            if not bisecting:
                logger.warning(
                    "%s raised on a batch of %d inputs (%s: %s); bisecting it to find the "
                    "inputs that fail",
                    self.function.name,
                    len(inputs),
                    type(exc).__name__,
                    exc,
                )
            half = len(inputs) // 2
            return [
                *self._run_batch(inputs[:half], bisecting=True),
                *self._run_batch(inputs[half:], bisecting=True),
            ]
        return self._held_to_contract(inputs, outputs)

    def _held_to_contract(self, inputs: list[Any], outputs: Any) -> list[Outcome]:
        if not isinstance(outputs, Sequence) or isinstance(outputs, str | bytes):
            message = (
                f"{self.function.name} is batched and must return a list; "
                f"it returned {type(outputs).__name__}"
            )
            return [failure(ErrorCode.MODEL_ERROR, message)] * len(inputs)
        if len(outputs) != len(inputs):
            message = (
                f"{self.function.name} returned {len(outputs)} outputs for a batch of "
                f"{len(inputs)} inputs; a batched function returns one output per input, in order"
            )
            return [failure(ErrorCode.MODEL_ERROR, message)] * len(inputs)
        return [self._dump(output) for output in outputs]

    def _run_each(self, inputs: list[Any]) -> list[Outcome]:
        outcomes = []
        for value in inputs:
            try:
                outcomes.append(self._dump(self._model(value)))
            except BatchTimeout:
                raise
            except BaseException as exc:
                outcomes.append(_model_failure(exc))
        return outcomes

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


def _model_failure(exc: BaseException) -> Outcome:
    message = f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(exc))
    logger.error("function raised %s", message, exc_info=exc)
    return failure(ErrorCode.MODEL_ERROR, message, tb)
