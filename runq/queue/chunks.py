"""A streaming task's chunks and progress: appended by its worker, read by any gateway.

Each task that streams has a Redis Stream (``runq:chunks:<id>``) of its chunks and progress
reports, in order. The worker appends each step of its generator in one script call for the
whole batch; the same atomic step checks that every task is still this worker's (a cancel or
delete that landed stops that task's chunks, and the worker closes its generator), counts the
chunks against max_chunks, keeps the stream the task's result TTL and publishes the task's id on
its channel. Gateways listen on their one shared pub/sub connection (``waiter.TaskWaiter``), so
an open stream costs a subscription, not a connection, and re-read the stream from the last
entry they sent. Functions that do not stream never touch any of this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from rq.job import JobStatus

from runq.queue import constants, lua
from runq.queue.claim import RawHash


class Appended(IntEnum):
    """What became of one appended entry."""

    WRITTEN = 1
    # The task is no longer this worker's to stream (canceled, deleted, re-queued).
    GONE = 0
    # The chunk is past the function's max_chunks; not written.
    TOO_MANY = -1


# ARGV[1] worker name, ARGV[2] max_chunks; then per entry: task id, kind, data JSON.
# Returns one Appended value per entry. A run that follows a lost one (its worker died and the
# task was re-queued) streams anew: the lost run's entries are dropped at its first append.
APPEND = lua.script(
    """
local written = {}
for i = 3, #ARGV, 3 do
  local id, kind, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = JOB_PREFIX .. id
  local held = redis.call('HMGET', key, STATUS, WORKER_NAME, RESULT_TTL, ATTEMPTS, CHUNKS_ATTEMPT)
  local result = GONE
  if held[1] == STARTED and held[2] == ARGV[1] then
    local stream = CHUNKS_PREFIX .. id
    local attempt = held[4] or '0'
    if held[5] ~= attempt then
      redis.call('DEL', stream)
      redis.call('HSET', key, CHUNKS, 0, CHUNKS_ATTEMPT, attempt)
    end
    result = WRITTEN
    if kind == CHUNK_KIND then
      local count = redis.call('HINCRBY', key, CHUNKS, 1)
      if count > tonumber(ARGV[2]) then
        result = TOO_MANY
      else
        redis.call('XADD', stream, '*', KIND, kind, INDEX, count - 1, DATA, data)
      end
    else
      redis.call('HSET', key, PROGRESS, data)
      redis.call('XADD', stream, '*', KIND, kind, DATA, data)
    end
    if result == WRITTEN then
      redis.call('EXPIRE', stream, tonumber(held[3] or DEFAULT_TTL_S))
      redis.call('PUBLISH', TASK_CHANNEL_PREFIX .. id, id)
    end
  end
  written[#written + 1] = result
end
return written
""",
    JOB_PREFIX=constants.RQ_JOB_PREFIX,
    CHUNKS_PREFIX=constants.CHUNKS_PREFIX,
    TASK_CHANNEL_PREFIX=constants.TASK_CHANNEL_PREFIX,
    STATUS=constants.STATUS_FIELD,
    WORKER_NAME=constants.WORKER_NAME_FIELD,
    RESULT_TTL=constants.RESULT_TTL_FIELD,
    ATTEMPTS=constants.ATTEMPTS_FIELD,
    CHUNKS=constants.CHUNKS_FIELD,
    CHUNKS_ATTEMPT=constants.CHUNKS_ATTEMPT_FIELD,
    PROGRESS=constants.PROGRESS_FIELD,
    KIND=constants.CHUNK_KIND_FIELD,
    INDEX=constants.CHUNK_INDEX_FIELD,
    DATA=constants.CHUNK_DATA_FIELD,
    CHUNK_KIND=constants.CHUNK_KIND,
    STARTED=JobStatus.STARTED.value,
    DEFAULT_TTL_S=constants.DEFAULT_RESULT_TTL_S,
    WRITTEN=Appended.WRITTEN.value,
    GONE=Appended.GONE.value,
    TOO_MANY=Appended.TOO_MANY.value,
)

# One entry to append: the task id, its kind (CHUNK_KIND or PROGRESS_KIND) and its JSON.
Entry = tuple[str, str, bytes]


class ChunkWriter:
    """A worker's appends, one script call per generator step of a batch."""

    def __init__(self, connection: Redis, worker_name: str) -> None:
        self._script = connection.register_script(APPEND)
        self._worker_name = worker_name

    def append(self, entries: Sequence[Entry], max_chunks: int) -> list[Appended]:
        args: list[Any] = [self._worker_name, max_chunks]
        for entry in entries:
            args += entry
        return [Appended(int(r)) for r in self._script(args=args)]


@dataclass(frozen=True)
class StreamEntry:
    """One entry of a task's stream as a reader gets it."""

    entry_id: bytes
    kind: str
    # The chunk's index (chunks only; -1 for progress).
    index: int
    data: bytes


@dataclass(frozen=True)
class StreamRead:
    """The task's job hash (empty: no such task) and the stream's entries after the last read."""

    fields: RawHash
    entries: list[StreamEntry]

    @property
    def more(self) -> bool:
        """Whether the read stopped at its count: more entries may follow at once."""
        return len(self.entries) >= constants.CHUNKS_READ_MAX


_KIND = constants.CHUNK_KIND_FIELD.encode()
_INDEX = constants.CHUNK_INDEX_FIELD.encode()
_DATA = constants.CHUNK_DATA_FIELD.encode()


async def read(redis: aioredis.Redis, task_id: str, after: bytes | None) -> StreamRead:
    """The task and its stream's entries after ``after`` (None: from the start).

    The job hash is read first, in the same round trip: a task that reads as ended has had
    every chunk appended before its outcome was recorded, so the entries read next are all.
    """
    start = b"-" if after is None else b"(" + after
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(constants.job_key(task_id))
        pipe.xrange(constants.chunks_key(task_id), start, b"+", count=constants.CHUNKS_READ_MAX)
        fields, raw = await pipe.execute()
    entries = [
        StreamEntry(
            entry_id,
            values.get(_KIND, b"").decode(),
            int(values.get(_INDEX, b"-1")),
            values.get(_DATA, b"null"),
        )
        for entry_id, values in raw
    ]
    return StreamRead(fields, entries)


def progress_json(fraction: float, message: str | None, at: str) -> bytes:
    return json.dumps({"fraction": fraction, "message": message, "at": at}).encode()
