"""What a request costs: CPU time per process role, read from /proc, and Redis commands.

A server's process tree (the process a benchmark started and every descendant) is split into
roles by command line: the gateway (`runq gateway`, its uvicorn processes, or any plain HTTP
server the benchmark started), the workers (`runq worker`, `rq worker`), Redis (the embedded
`valkey-server`) and the supervisor (`runq serve` itself: the autoscaler). A `CostMeter` reads
every process's utime + stime (/proc/PID/stat, clock ticks) before and after a run; a process
that started during the run counts from zero, one that ended and was waited for during it is
lost (read it before waiting: a zombie still has its final figures). Redis commands are the
total of `INFO commandstats` calls, before and after: a Lua script counts once for its EVALSHA
and once for each command it runs, as Redis counts them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
GATEWAY, WORKER, REDIS, SUPERVISOR = "gateway", "worker", "redis", "supervisor"
ROLES = (GATEWAY, WORKER, REDIS, SUPERVISOR)
# Valkey (like Redis) sets its process title to "valkey-server HOST:PORT".
_REDIS_TITLE = re.compile(rb"(?:valkey|redis)-server\S*\s+(\S+):(\d+)")
_REDIS_BINARIES = (b"valkey-server", b"redis-server")
# `runq COMMAND`, `rq worker` and benchmarks/queue_floor.py's processes, by the word after the
# program's name.
_PROGRAMS = (b"/runq", b"/rq", b"queue_floor.py")
_COMMAND_ROLES = {b"gateway": GATEWAY, b"worker": WORKER, b"serve": SUPERVISOR}

TOP_COMMANDS = 6
# INFO commandstats counts the commands a script runs as well as the call that ran it; these
# names are the calls. (A server's stats cannot tell a client's HSET from a script's.)
SCRIPT_COMMANDS = ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro")

Ticks = dict[int, int]


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    argv: list[bytes]
    ticks: int


def read_proc(pid: int) -> Proc | None:
    """The process's parent, command line and CPU ticks; None once it is gone.

    A zombie (exited, not yet waited for) still reads: its ticks are final, its command line
    empty.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat.rsplit(b")", 1)[1].split()
    ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
    # A process that rewrote its title (Valkey) may have joined its argv with spaces.
    argv = [arg for arg in cmdline.split(b"\0") if arg]
    return Proc(pid=pid, ppid=ppid, argv=argv, ticks=utime + stime)


def process_tree(root: int) -> list[Proc]:
    """`root` and all its descendants still in /proc (zombies too), parents before children."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            proc = read_proc(int(entry.name))
            if proc is not None:
                procs[proc.pid] = proc
    children: dict[int, list[Proc]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc)
    if root not in procs:
        return []
    found, todo = [], [procs[root]]
    while todo:
        proc = todo.pop(0)
        found.append(proc)
        todo.extend(children.get(proc.pid, []))
    return found


def role_of(argv: list[bytes], parent_role: str | None) -> str:
    """A process's role from its command line, else its parent's (uvicorn's worker processes)."""
    words = b" ".join(argv).split()
    if _REDIS_TITLE.search(b" ".join(words)) or (words and words[0].endswith(_REDIS_BINARIES)):
        return REDIS
    for index, word in enumerate(words[:-1]):
        if word in (b"runq", b"rq", b"rq.cli") or word.endswith(_PROGRAMS):
            return _COMMAND_ROLES.get(words[index + 1], parent_role or GATEWAY)
    return parent_role or GATEWAY


def roles(root: int, known: dict[int, str] | None = None) -> dict[str, list[Proc]]:
    """The processes of `root`'s tree by role.

    `known` (pid → role) is read and updated: a process keeps the role it was first given,
    so one that has exited since (a zombie, its command line gone) is still counted right.
    """
    known = {} if known is None else known
    found: dict[str, list[Proc]] = {role: [] for role in ROLES}
    for proc in process_tree(root):
        role = known.get(proc.pid) or role_of(proc.argv, known.get(proc.ppid))
        known[proc.pid] = role
        found[role].append(proc)
    return found


def redis_url_in_tree(root: int) -> str | None:
    """The address of the Redis/Valkey server in `root`'s tree, from its process title."""
    for proc in roles(root)[REDIS]:
        found = _REDIS_TITLE.search(b" ".join(proc.argv))
        if found is not None:
            host, port = found.group(1).decode(), found.group(2).decode()
            host = "127.0.0.1" if host in ("*", "0.0.0.0") else host
            return f"redis://{host}:{port}"
    return None


def redis_calls(connection: Redis) -> dict[str, int]:
    """The commands the server has run since it started, by name ("evalsha", "hset", ...)."""
    stats = connection.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


@dataclass
class Cost:
    """Per request (or task): CPU µs by role, and Redis commands; None where not measured."""

    gateway_cpu_us: float | None = None
    worker_cpu_us: float | None = None
    redis_cpu_us: float | None = None
    supervisor_cpu_us: float | None = None
    redis_cmds: float | None = None
    # Script calls (EVALSHA and its kin): each is one round trip, whatever it runs inside.
    redis_scripts: float | None = None
    # The most frequent commands, per task, most frequent first.
    redis_top: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Reading:
    """CPU ticks by role and pid, and the Redis server's command count, at one moment."""

    ticks: dict[str, Ticks]
    calls: dict[str, int] | None


def top_text(cost: Cost) -> str:
    """ "evalsha 2.00, hset 1.02, ..." (per task), or a dash."""
    return ", ".join(f"{name} {n:.2f}" for name, n in cost.redis_top.items()) or "-"


class CostMeter:
    """CPU and Redis commands of a set of process trees, between readings.

    Each root is a process the benchmark started; more may be added to `roots` between
    readings (a worker started after the first). `redis_url` names the server whose commands
    count, in a tree or outside them.
    """

    def __init__(self, roots: list[int], redis_url: str | None = None) -> None:
        self.roots = roots
        self.redis = Redis.from_url(redis_url) if redis_url is not None else None
        self._known: dict[int, str] = {}
        self._start: Reading | None = None

    def read(self) -> Reading:
        ticks: dict[str, Ticks] = {role: {} for role in ROLES}
        for root in self.roots:
            for role, procs in roles(root, self._known).items():
                ticks[role].update({proc.pid: proc.ticks for proc in procs})
        calls = redis_calls(self.redis) if self.redis is not None else None
        return Reading(ticks=ticks, calls=calls)

    def start(self) -> None:
        self._start = self.read()

    def stop(self, count: int) -> Cost:
        assert self._start is not None, "stop() before start()"
        return cost_between(self._start, self.read(), count)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def cost_between(before: Reading, after: Reading, count: int) -> Cost:
    """Per task of `count`. A process not in `before` started since, and counts from zero."""
    if count <= 0:
        return Cost()
    per_task: dict[str, float | None] = {}
    for role in ROLES:
        if not after.ticks[role] and not before.ticks[role]:
            per_task[role] = None
            continue
        ticks = sum(t - before.ticks[role].get(pid, 0) for pid, t in after.ticks[role].items())
        per_task[role] = ticks / CLOCK_TICKS_PER_S * 1e6 / count
    calls, scripts, top = None, None, {}
    if before.calls is not None and after.calls is not None:
        by_name = {name: n - before.calls.get(name, 0) for name, n in after.calls.items()}
        # Less the INFO that took the first reading (each is counted once it has run).
        by_name["info"] = by_name.get("info", 1) - 1
        calls = sum(by_name.values()) / count
        scripts = sum(by_name.get(name, 0) for name in SCRIPT_COMMANDS) / count
        ranked = sorted(by_name.items(), key=lambda item: -item[1])[:TOP_COMMANDS]
        top = {name: n / count for name, n in ranked if n}
    return Cost(
        gateway_cpu_us=per_task[GATEWAY],
        worker_cpu_us=per_task[WORKER],
        redis_cpu_us=per_task[REDIS],
        supervisor_cpu_us=per_task[SUPERVISOR],
        redis_cmds=calls,
        redis_scripts=scripts,
        redis_top=top,
    )
