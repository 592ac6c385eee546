"""Prometheus metrics of a running `runq serve`, as an operator scrapes them: one scrape counts
every process's requests and batches, and the request buckets follow the settings."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis import Redis

from tests.helpers import Proc, batch_sizes, predict_all


def scrape(url: str) -> dict[str, list[Sample]]:
    text = httpx.get(f"{url}/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found)


def test_one_scrape_counts_every_request_and_batch_across_processes(
    served: tuple[str, Proc], redis: Redis
) -> None:
    url, _ = served
    answers = predict_all(url, list(range(40)))
    assert [a.status_code for a in answers] == [200] * 40
    for i in range(5):
        response = httpx.post(f"{url}/v1/functions/counted/tasks", json={"input": i})
        httpx.get(f"{url}/v1/tasks/{response.json()['id']}/result?wait=10")
    assert httpx.post(f"{url}/v1/functions/counted/predict", json={"nope": 1}).status_code == 422

    metrics = scrape(url)
    requests = metrics["runq_request_duration_seconds"]
    assert (
        value(requests, "runq_request_duration_seconds_count", endpoint="predict", status="200")
        == 40
    )
    assert (
        value(requests, "runq_request_duration_seconds_count", endpoint="submit", status="202") == 5
    )
    assert (
        value(requests, "runq_request_duration_seconds_count", endpoint="predict", status="422")
        == 1
    )
    # The worker process's figures agree with what the function itself saw.
    sizes = batch_sizes(redis)
    assert sum(sizes) == 45
    batches = metrics["runq_batch_size"]
    assert value(batches, "runq_batch_size_count", function="counted") == len(sizes)
    assert value(batches, "runq_batch_size_sum", function="counted") == 45
    assert value(metrics["runq_tasks"], "runq_tasks_total", status="succeeded") == 45
    assert value(metrics["runq_queue_wait_seconds"], "runq_queue_wait_seconds_count") == 45
    assert value(metrics["runq_execution_seconds"], "runq_execution_seconds_count") == len(sizes)
    # Read from Redis at scrape time.
    assert value(metrics["runq_queue_depth"], "runq_queue_depth", function="counted") == 0
    assert value(metrics["runq_replicas_current"], "runq_replicas_current") == 1
    assert value(metrics["runq_replicas_desired"], "runq_replicas_desired") == 1
    assert value(metrics["runq_cold_starts"], "runq_cold_starts_total") == 1


def test_request_buckets_follow_the_settings(served: tuple[str, Proc]) -> None:
    url, _ = served
    httpx.post(f"{url}/v1/functions/counted/predict", json={"input": 1})
    samples = scrape(url)["runq_request_duration_seconds"]
    bounds = {
        round(float(s.labels["le"]), 6)
        for s in samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    }
    assert bounds == {round(0.001 * 2**i, 6) for i in range(15)}
