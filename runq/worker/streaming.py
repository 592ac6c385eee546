"""One batch's sink for chunks and progress: appends them to Redis and times the chunks."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from rq.utils import now, utcformat

from runq.errors import ErrorCode
from runq.metrics import metrics
from runq.queue import constants
from runq.queue.chunks import Appended, ChunkWriter, progress_json
from runq.queue.tasks import Outcome, failure
from runq.settings import FunctionSettings

# What a canceled task's run ends with; never written (the task is no longer the worker's), and
# its status stays what the cancel made it.
_STOPPED = failure(ErrorCode.CANCELED, "canceled while it streamed")


class BatchStream:
    """The runner's Sink for one batch: created as the model call starts."""

    def __init__(self, writer: ChunkWriter, function: str, settings: FunctionSettings) -> None:
        self._writer = writer
        self._function = function
        self._settings = settings
        self._started = time.perf_counter()
        # When each task's latest chunk was sent.
        self._last: dict[str, float] = {}
        # Each task's latest progress JSON, for the task JSON its record answers with.
        self.progressed: dict[str, bytes] = {}

    def chunks(self, chunks: Sequence[tuple[str, bytes]]) -> Mapping[str, Outcome]:
        entries = [(task_id, constants.CHUNK_KIND, data) for task_id, data in chunks]
        appended = self._writer.append(entries, self._settings.max_chunks)
        sent = time.perf_counter()
        stopped: dict[str, Outcome] = {}
        for (task_id, _), result in zip(chunks, appended, strict=True):
            if result == Appended.WRITTEN:
                self._observe(task_id, sent)
            elif result == Appended.GONE:
                stopped[task_id] = _STOPPED
            else:
                stopped[task_id] = failure(
                    ErrorCode.MODEL_ERROR,
                    f"{self._function} yielded more than max_chunks "
                    f"({self._settings.max_chunks}) chunks for one input and was stopped",
                )
        return stopped

    def progress(self, task_id: str, fraction: float, message: str | None) -> None:
        data = progress_json(fraction, message, utcformat(now()))
        self._writer.append([(task_id, constants.PROGRESS_KIND, data)], self._settings.max_chunks)
        self.progressed[task_id] = data

    def _observe(self, task_id: str, sent: float) -> None:
        m = metrics()
        last = self._last.get(task_id)
        if last is None:
            m.first_chunk.labels(self._function).observe(sent - self._started)
        else:
            gap = sent - last
            m.between_chunks.labels(self._function).observe(gap)
            if gap > self._settings.stall_threshold_s:
                m.stalls.labels(self._function).inc()
        self._last[task_id] = sent
