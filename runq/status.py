"""`runq status`: every function's queue, replicas and last minute of outcomes, as a table."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from redis import Redis
from redis.exceptions import RedisError

from runq.errors import Unavailable
from runq.queue import constants, stats
from runq.queue.connection import sync_redis
from runq.queue.figures import Figures, FunctionFigures
from runq.queue.tasks import text

# Home the cursor and clear the screen: each refresh of --watch on a terminal replaces the last.
CLEAR_SCREEN = "\x1b[H\x1b[2J"
# A Redis that does not answer fails the command instead of hanging it.
REDIS_TIMEOUT_S = 5.0

COLUMNS = ("FUNCTION", "QUEUED", "RUNNING", "REPLICAS", "THROUGHPUT", "P50", "P99", "ERRORS")


@dataclass(frozen=True)
class FunctionStatus:
    function: str
    figures: FunctionFigures
    window: stats.WindowStats
    cold_start_budget_s: float

    @property
    def stranded(self) -> bool:
        return self.figures.stranded(self.cold_start_budget_s)

    def to_json(self) -> dict[str, Any]:
        figures, window = self.figures, self.window
        return {
            "function": self.function,
            "queued": figures.queued,
            "running": figures.running,
            "workers": figures.workers,
            "replicas": {"current": figures.replicas_current, "desired": figures.desired},
            "unserved_s": round(figures.unserved_s, 1),
            "stranded": self.stranded,
            "succeeded": window.succeeded,
            "failed": window.failed,
            "timed_out": window.timed_out,
            "errors": window.errors,
            "throughput_per_s": window.throughput_per_s,
            "p50_s": window.p50_s,
            "p99_s": window.p99_s,
        }

    def row(self) -> tuple[str, ...]:
        figures, window = self.figures, self.window
        desired = "-" if figures.desired is None else str(figures.desired)
        return (
            self.function,
            str(figures.queued),
            str(figures.running),
            f"{figures.replicas_current}/{desired}",
            f"{window.throughput_per_s:.2f}/s",
            _duration(window.p50_s),
            _duration(window.p99_s),
            str(window.errors),
        )


def connect(redis_url: str) -> Redis:
    return sync_redis(
        redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )


def collect(
    connection: Redis, cold_start_budget_s: float, window_s: int = constants.STATS_WINDOW_S
) -> list[FunctionStatus]:
    """Every listed function's figures and stats, read against the Redis server's clock."""
    functions = sorted(str(text(name)) for name in connection.smembers(constants.FUNCTIONS_KEY))
    figures = Figures(connection)
    with connection.pipeline(transaction=False) as pipe:
        for function in functions:
            figures.queue_read(pipe, function)
        pipe.time()
        *replies, (seconds, micros) = pipe.execute()
    now_s = seconds + micros / 1e6
    return [
        FunctionStatus(
            function,
            FunctionFigures.from_reply(reply),
            stats.read(connection, function, window_s, now_s=now_s),
            cold_start_budget_s,
        )
        for function, reply in zip(functions, replies, strict=True)
    ]


def report(
    connection: Redis,
    *,
    as_json: bool,
    cold_start_budget_s: float,
    window_s: int = constants.STATS_WINDOW_S,
) -> str:
    """The table (or one line of JSON) for every function; Unavailable when Redis is not."""
    try:
        rows = collect(connection, cold_start_budget_s, window_s)
    except RedisError as exc:
        raise Unavailable(f"cannot read Redis: {exc}") from None
    if as_json:
        return json.dumps({"window_s": window_s, "functions": [row.to_json() for row in rows]})
    return table(rows, window_s)


def table(rows: list[FunctionStatus], window_s: int) -> str:
    if not rows:
        return f"no functions listed in {constants.FUNCTIONS_KEY} yet"
    cells = [COLUMNS, *(row.row() for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        # Names read left to right, figures compare down their column.
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.append(f"throughput, p50/p99 (task created to ended) and errors: last {window_s} s")
    lines += [
        f"STRANDED: {row.function} has {row.figures.queued} queued task(s) and no live worker "
        f"for {row.figures.unserved_s:.0f} s (cold_start_budget_s {row.cold_start_budget_s:g})"
        for row in rows
        if row.stranded
    ]
    return "\n".join(lines)


def watch(
    connection: Redis,
    interval_s: float,
    *,
    as_json: bool,
    cold_start_budget_s: float,
    out: TextIO = sys.stdout,
) -> NoReturn:
    """Prints a report every ``interval_s`` until interrupted: in place on a terminal, else one
    after another (JSON: one line each). Redis being unreachable is shown, not fatal.
    """
    in_place = out.isatty() and not as_json
    while True:
        try:
            frame = report(connection, as_json=as_json, cold_start_budget_s=cold_start_budget_s)
        except Unavailable as exc:
            frame = json.dumps(exc.to_body()) if as_json else exc.message
        if not as_json:
            title = f"runq status at {time.strftime('%H:%M:%S')}, every {interval_s:g} s"
            frame = f"{title}\n\n{frame}\n"
        out.write((CLEAR_SCREEN if in_place else "") + frame + "\n")
        out.flush()
        time.sleep(interval_s)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"
