"""The job stock RQ drains in benchmarks/drain.py: a module-level function, as RQ imports jobs.

Kept apart from drain_fn.py, so the RQ worker imports neither runq nor anything else that
would lengthen its start.
"""

from typing import Any


def noop(value: Any) -> Any:
    return value
