"""Calls the model on a batch and holds it to its contract; knows nothing of Redis."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from runq.errors import ErrorCode
from runq.functions import Function, validation_message
from runq.progress import reporting
from runq.queue.tasks import Outcome, failure, output_json

logger = logging.getLogger("runq.worker")


@dataclass(frozen=True, slots=True)
class _Input:
    task_id: str
    value: Any


class BatchTimeout(Exception):
    """Raised into a batch that ran past the function's timeout_s."""


class Sink(Protocol):
    """Where a batch's chunks and progress reports go while it runs (the worker's Redis)."""

    def chunks(self, chunks: Sequence[tuple[str, bytes]]) -> Mapping[str, Outcome]:
        """Sends one step's chunks (task id, chunk JSON); returns the tasks that must stop
        streaming (canceled meanwhile, or past max_chunks), each with the outcome it ends with."""
        ...

    def progress(self, task_id: str, fraction: float, message: str | None) -> None: ...


class _NoSink:
    """For a runner used without a worker (its tests): chunks go nowhere, nothing stops."""

    def chunks(self, chunks: Sequence[tuple[str, bytes]]) -> Mapping[str, Outcome]:
        return {}

    def progress(self, task_id: str, fraction: float, message: str | None) -> None:
        pass


class ModelRunner:
    def __init__(self, function: Function) -> None:
        self.function = function
        self._output = TypeAdapter(function.output_type)
        self._chunk = TypeAdapter(function.chunk_type) if function.stream else None
        self._call: Callable[[Any], Any] | None = None
        self._sink: Sink = _NoSink()

    def setup(self) -> None:
        self._call = self.function.load()

    def run(
        self, payloads: Sequence[Any], task_ids: Sequence[str], sink: Sink | None = None
    ) -> list[Outcome]:
        """One outcome per payload, in order. Never raises for the model's faults.

        The task ids are for the log lines of the inputs that fail; ``sink`` takes the chunks
        of a streaming function and the progress any function reports.
        """
        self._sink = sink or _NoSink()
        outcomes: list[Outcome | None] = [None] * len(payloads)
        inputs: list[_Input] = []
        positions = []
        for i, (payload, task_id) in enumerate(zip(payloads, task_ids, strict=True)):
            try:
                inputs.append(_Input(task_id, self.function.validate_input(payload)))
                positions.append(i)
            except ValidationError as exc:
                outcomes[i] = failure(ErrorCode.VALIDATION_ERROR, validation_message(exc))
        results = self._run_inputs(inputs)
        for i, outcome in zip(positions, results, strict=True):
            outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _run_inputs(self, inputs: list[_Input]) -> list[Outcome]:
        if self.function.stream:
            if self.function.batch:
                return self._stream_batch(inputs) if inputs else []
            return [self._stream_one(item) for item in inputs]
        return self._run_batch(inputs) if self.function.batch else self._run_each(inputs)

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
            with self._reporting(inputs):
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
                with self._reporting([item]):
                    outcomes.append(self._dump(self._model(item.value)))
            except BatchTimeout:
                raise
            except BaseException as exc:
                outcomes.append(self._failure(exc, item.task_id))
        return outcomes

    # streaming --------------------------------------------------------------------------------

    def _stream_one(self, item: _Input) -> Outcome:
        """An unbatched generator's outcome: its chunks, sent as it yields them.

        A task canceled meanwhile stops it: the generator is closed, so its ``finally`` runs.
        """
        chunks: list[Any] = []
        try:
            with self._reporting([item]), contextlib.closing(self._model(item.value)) as steps:
                for chunk in steps:
                    dumped, encoded = self._chunk_json(chunk)
                    stopped = self._sink.chunks([(item.task_id, encoded)])
                    if item.task_id in stopped:
                        return stopped[item.task_id]
                    chunks.append(dumped)
        except BatchTimeout:
            raise
        except _BadChunk as bad:
            return failure(ErrorCode.INVALID_OUTPUT, bad.message)
        except BaseException as exc:
            return self._failure(exc, item.task_id)
        return Outcome(output=chunks)

    def _stream_batch(self, inputs: list[_Input]) -> list[Outcome]:
        """A batched generator's outcomes: each yield is a list aligned with the inputs, a chunk
        or None per input. An input canceled meanwhile gets no more chunks while its batch-mates
        go on; once every input has stopped, the generator is closed.

        No bisection: chunks already sent cannot be taken back, so a generator that raises
        fails every input still streaming.
        """
        chunks: list[list[Any]] = [[] for _ in inputs]
        ended: dict[int, Outcome] = {}
        try:
            values = [item.value for item in inputs]
            with self._reporting(inputs), contextlib.closing(self._model(values)) as steps:
                for step in steps:
                    self._stream_step(inputs, step, chunks, ended)
                    if len(ended) == len(inputs):
                        break
        except BatchTimeout:
            raise
        except _BadStep as bad:
            broken = self._broken_contract(inputs, bad.message)[0]
            ended.update({i: broken for i in range(len(inputs)) if i not in ended})
        except BaseException as exc:
            for i, item in enumerate(inputs):
                ended.setdefault(i, self._failure(exc, item.task_id))
        return [ended.get(i) or Outcome(output=chunks[i]) for i in range(len(inputs))]

    def _stream_step(
        self, inputs: list[_Input], step: Any, chunks: list[list[Any]], ended: dict[int, Outcome]
    ) -> None:
        if not isinstance(step, Sequence) or isinstance(step, str | bytes):
            raise _BadStep(
                f"{self.function.name} is a batched generator and must yield lists; "
                f"it yielded {type(step).__name__}"
            )
        if len(step) != len(inputs):
            raise _BadStep(
                f"{self.function.name} yielded {len(step)} chunks for a batch of {len(inputs)} "
                "inputs; a batched generator yields one chunk or None per input, in order"
            )
        sent: list[tuple[int, Any]] = []
        batch: list[tuple[str, bytes]] = []
        for i, chunk in enumerate(step):
            if chunk is None or i in ended:
                continue
            try:
                dumped, encoded = self._chunk_json(chunk)
            except _BadChunk as bad:
                ended[i] = failure(ErrorCode.INVALID_OUTPUT, bad.message)
                continue
            sent.append((i, dumped))
            batch.append((inputs[i].task_id, encoded))
        stopped = self._sink.chunks(batch) if batch else {}
        for i, dumped in sent:
            outcome = stopped.get(inputs[i].task_id)
            if outcome is None:
                chunks[i].append(dumped)
            else:
                ended[i] = outcome

    def _chunk_json(self, chunk: Any) -> tuple[Any, bytes]:
        assert self._chunk is not None
        try:
            dumped = self._chunk.dump_python(chunk, mode="json")
            return dumped, output_json(dumped)
        except Exception as exc:
            raise _BadChunk(
                f"{self.function.name} yielded a chunk that cannot be sent as JSON: {exc}"
            ) from None

    def _reporting(self, inputs: list[_Input]) -> contextlib.AbstractContextManager[None]:
        sink = self._sink

        def report(index: int | None, fraction: float, message: str | None) -> None:
            chosen = inputs if index is None else [inputs[index]]
            for item in chosen:
                sink.progress(item.task_id, fraction, message)

        return reporting(report)

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


class _BadChunk(Exception):
    """A chunk that cannot be sent as JSON: fails its task (invalid_output)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _BadStep(_BadChunk):
    """A batched generator's step that is not one chunk or None per input: a contract broken."""
