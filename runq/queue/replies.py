"""A worker's reply to a waiting gateway: every task of a batch that the gateway waits on.

One message per gateway per batch; each task is a line, ``<id> <kind> <JSON>`` (a JSON text as
runq encodes it has no raw newline). A succeeded task whose output is inline is sent as the very
body its predict answers with, and the gateway forwards those bytes: decoding and re-encoding
them cost more than the rest of the request for outputs such as an embedding's 384 floats. Any
other task comes as its task JSON, which the gateway reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SEPARATOR = "\n"
_ANSWER, _TASK = b"answer", b"task"


@dataclass(frozen=True)
class Answer:
    """A succeeded task's 200 body, as its worker encoded it."""

    body: bytes

    def task(self) -> dict[str, Any]:
        view: dict[str, Any] = json.loads(self.body)
        return view


# An ended task as a waiter receives it: its answer as is, or its task JSON read.
Ended = dict[str, Any] | Answer


def reply_line(task_id: str, task_json: bytes, *, answer: bool) -> bytes:
    kind = _ANSWER if answer else _TASK
    return b"%s %s %s" % (task_id.encode(), kind, task_json)


def read_reply(message: bytes) -> Iterator[tuple[str, Ended]]:
    for line in message.split(SEPARATOR.encode()):
        task_id, kind, body = line.split(b" ", 2)
        yield task_id.decode(), Answer(body) if kind == _ANSWER else json.loads(body)
