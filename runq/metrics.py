"""Every Prometheus metric runq exposes, defined in one place.

Gateway processes, local workers and the autoscaler of `runq serve` share prometheus-client's
multiprocess directory (PROMETHEUS_MULTIPROC_DIR, created and cleaned by `runq serve`), so one
scrape of any gateway process shows them all. Figures that live in Redis (queue depth, running
tasks, replicas) are read from it at scrape time by `RedisFigures`, never kept in a process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runq.queue.figures import FunctionFigures
from runq.settings import ENV_MULTIPROC_DIR

# Queue waits and executions span a millisecond echo to a minutes-long batch.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Metrics:
    request_duration: Histogram
    requests_in_progress: Gauge
    rejections: Counter
    queue_wait: Histogram
    execution: Histogram
    batch_size: Histogram
    tasks: Counter
    cold_starts: Counter
    predictions_dropped: Counter
    # Whether request_duration and rejections carry a `tenant` label (metrics_tenant_label).
    tenant_label: bool
    first_chunk: Histogram
    between_chunks: Histogram
    stalls: Counter


_metrics: Metrics | None = None


def metrics(
    request_buckets: Sequence[float] | None = None, *, tenant_label: bool = False
) -> Metrics:
    """This process's metrics, created on first use (with the request buckets and the tenant
    label from settings)."""
    global _metrics
    if _metrics is None:
        _metrics = _create(tuple(request_buckets or SECONDS_BUCKETS), tenant_label)
    return _metrics


def _create(request_buckets: tuple[float, ...], tenant_label: bool) -> Metrics:
    # A label per tenant multiplies the series by the tenants: only when asked.
    tenant = ["tenant"] if tenant_label else []
    return Metrics(
        request_duration=Histogram(
            "runq_request_duration_seconds",
            "Whole request as the caller saw it: queueing, batching wait and execution included",
            ["function", "endpoint", "status", *tenant],
            buckets=request_buckets,
        ),
        requests_in_progress=Gauge(
            "runq_requests_in_progress",
            "Requests being handled right now",
            ["function", "endpoint"],
            multiprocess_mode="livesum",
        ),
        rejections=Counter(
            "runq_rejections_total",
            "Requests refused before anything was enqueued",
            ["function", "reason", *tenant],
        ),
        queue_wait=Histogram(
            "runq_queue_wait_seconds",
            "From admission to the start of the task's batch",
            ["function"],
            buckets=SECONDS_BUCKETS,
        ),
        execution=Histogram(
            "runq_execution_seconds",
            "One model call on one batch",
            ["function"],
            buckets=SECONDS_BUCKETS,
        ),
        batch_size=Histogram(
            "runq_batch_size",
            "Tasks per model call",
            ["function"],
            buckets=BATCH_SIZE_BUCKETS,
        ),
        tasks=Counter("runq_tasks_total", "Tasks ended, by final status", ["function", "status"]),
        cold_starts=Counter(
            "runq_cold_starts_total", "Times a function went from zero workers to one", ["function"]
        ),
        predictions_dropped=Counter(
            "runq_predictions_dropped_total",
            "Sampled predictions not logged: the writer fell behind, or the write failed",
            ["function"],
        ),
        tenant_label=tenant_label,
        first_chunk=Histogram(
            "runq_time_to_first_chunk_seconds",
            "From the start of a streaming task's model call to its first chunk",
            ["function"],
            buckets=SECONDS_BUCKETS,
        ),
        between_chunks=Histogram(
            "runq_time_between_chunks_seconds",
            "Between one chunk of a streaming task and its next",
            ["function"],
            buckets=SECONDS_BUCKETS,
        ),
        stalls=Counter(
            "runq_stream_stalls_total",
            "Gaps between a streaming task's chunks longer than its function's stall_threshold_s",
            ["function"],
        ),
    )


FigureRow = tuple[str, FunctionFigures]


class RedisFigures(Collector):
    """Per-function figures read from Redis for one scrape (gauges no process could keep)."""

    def __init__(self, rows: Iterable[FigureRow]) -> None:
        self._rows = list(rows)

    def collect(self) -> Iterable[Metric]:
        queued = GaugeMetricFamily("runq_queue_depth", "Tasks waiting", labels=["function"])
        running = GaugeMetricFamily("runq_running_tasks", "Tasks running", labels=["function"])
        current = GaugeMetricFamily("runq_replicas_current", "Workers running", labels=["function"])
        desired = GaugeMetricFamily(
            "runq_replicas_desired", "Workers the autoscaler wants", labels=["function"]
        )
        unserved = GaugeMetricFamily(
            "runq_unserved_seconds",
            "How long queued tasks have had no live worker (0 while one is live)",
            labels=["function"],
        )
        for function, figures in self._rows:
            queued.add_metric([function], figures.queued)
            running.add_metric([function], figures.running)
            current.add_metric([function], figures.replicas_current)
            if figures.desired is not None:
                desired.add_metric([function], figures.desired)
            unserved.add_metric([function], figures.unserved_s)
        yield from (queued, running, current, desired, unserved)


def process_registry() -> CollectorRegistry:
    """What a scrape reads of the processes: every one's files in multiprocess mode, else ours."""
    if os.environ.get(ENV_MULTIPROC_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def exposition(figures: Iterable[FigureRow]) -> bytes:
    """One scrape: the processes' metrics, then the Redis figures."""
    redis_registry = CollectorRegistry()
    redis_registry.register(RedisFigures(figures))
    return generate_latest(process_registry()) + generate_latest(redis_registry)
