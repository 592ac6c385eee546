"""Keeping the garbage collector's full passes off the serving path.

A full collection walks every object the collector tracks. A gateway holds about 100,000 from
its imports and its app (routes, models, the OpenAPI schema), a worker more (a model's
libraries), and nearly all of them live as long as the process. Under load, objects that
survive a young collection (requests in flight) bring on a full one every few seconds, each
stalling the event loop or the batch for tens of milliseconds (146 ms seen at c=64): the tail
latency. Frozen once startup is done, those objects are never scanned again; what the process
allocates later is collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    # No collection first: it would cost as much as the pauses it saves, once, at startup
    # (a cold start waits for it); the little garbage startup left is kept instead.
    gc.freeze()
