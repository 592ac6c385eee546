"""Streaming over HTTP with real workers: server-sent events from predict and by task id,
batched generators, cancel and hang-up, bounded connections, chunk timing metrics, and the
client's resume after a dropped connection."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from redis import Redis

import runq
from runq.queue import constants
from tests.fns_stream import CLOSED_KEY
from tests.helpers import TESTS, Proc, free_port, start_worker, wait_for_gateway, wait_until
from tests.test_metrics import value

STREAM_FNS = str(TESTS / "fns_stream.py")
SSE = {"Accept": "text/event-stream"}
Event = tuple[str, str | None, Any]


@pytest.fixture(scope="module")
def streaming(procs: Callable[..., Proc], redis: Redis) -> Iterator[tuple[str, str]]:
    """A gateway serving tests/fns_stream.py, workers for all but `held`; and the URL of the
    `tokens` worker's metrics."""
    port, metrics_port = free_port(), free_port()
    gateway = procs("gateway", STREAM_FNS, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_for_gateway(gateway, url)
    workers = [
        start_worker(procs, redis, "tokens", STREAM_FNS, {"RUNQ_METRICS_PORT": str(metrics_port)}),
        start_worker(procs, redis, "decode", STREAM_FNS),
        start_worker(procs, redis, "whole", STREAM_FNS),
    ]
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    for proc in [gateway, *workers]:
        proc.stop()


@pytest.fixture(scope="module")
def redis(valkey_url: str) -> Iterator[Redis]:
    client = Redis.from_url(valkey_url)
    yield client
    client.close()


def events(lines: Iterator[str]) -> Iterator[Event]:
    """(event, id, data) of each server-sent event, as it arrives."""
    kind, event_id, data = "message", None, None
    for line in lines:
        if not line:
            if data is not None:
                yield kind, event_id, json.loads(data)
            kind, event_id, data = "message", None, None
        elif line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("id: "):
            event_id = line.removeprefix("id: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")


def read_all(url: str, method: str, path: str, **kwargs: Any) -> list[Event]:
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream(method, path, headers=SSE | kwargs.pop("headers", {}), **kwargs) as answer,
    ):
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        return list(events(answer.iter_lines()))


def chunks(received: list[Event]) -> list[tuple[str | None, Any]]:
    return [(event_id, data) for kind, event_id, data in received if kind == "chunk"]


def closed(redis: Redis, name: str) -> bool:
    return name.encode() in redis.lrange(CLOSED_KEY, 0, -1)


def closed_batch(redis: Redis, tags: list[str]) -> bool:
    """A decode batch of exactly these inputs was closed, whatever their order in it."""
    names = (entry.decode() for entry in redis.lrange(CLOSED_KEY, 0, -1))
    batches = (
        name.removeprefix("decode:").split(",") for name in names if name.startswith("decode:")
    )
    return sorted(tags) in (sorted(batch) for batch in batches)


def tag() -> str:
    return uuid.uuid4().hex[:8]


def decode_queued(redis: Redis) -> int:
    return int(redis.llen("rq:queue:runq.decode"))


def hold_decode(url: str) -> str:
    """Holds `decode`'s worker with a task that waits on a gate, once it runs (a task queued
    within the batch window would join its batch); returns the gate's key."""
    gate = f"test:stream:gate:{tag()}"
    held = httpx.post(
        f"{url}/v1/functions/decode/tasks", json={"input": {"count": 1, "gate": gate}}
    )
    assert held.status_code == 202
    task = f"{url}/v1/tasks/{held.json()['id']}"
    wait_until(lambda: httpx.get(task).json()["status"] == "running", 10, "the gate task running")
    return gate


def test_chunks_arrive_long_before_the_task_ends(streaming: tuple[str, str]) -> None:
    url, _ = streaming
    body = {"input": {"count": 5, "delay_s": 0.3}}
    arrived: list[tuple[float, Event]] = []
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/functions/tokens/predict", json=body, headers=SSE) as answer,
    ):
        task_path = answer.headers["location"].removesuffix("/stream")
        for event in events(answer.iter_lines()):
            arrived.append((time.monotonic(), event))
            if len(arrived) == 1:
                # The first chunk is here and the task is still running.
                assert http.get(task_path).json()["status"] == "running"
    kinds = [kind for _, (kind, _, _) in arrived]
    assert kinds == ["chunk", "chunk", "progress", "chunk", "chunk", "chunk", "end"]
    assert chunks([e for _, e in arrived]) == [(str(i), f"t{i}") for i in range(5)]
    first, last = arrived[0][0], arrived[-1][0]
    assert last - first > 1.0
    progress = arrived[2][1][2]
    assert (progress["fraction"], progress["message"]) == (0.5, "half way")
    end = arrived[-1][1][2]
    assert end["status"] == "succeeded" and "output" not in end
    # The whole output is the list of chunks, as a predict without the header answers it.
    answer = httpx.post(f"{url}/v1/functions/tokens/predict", json=body, timeout=30)
    assert answer.json()["output"] == [f"t{i}" for i in range(5)]
    assert answer.json()["progress"]["fraction"] == 0.5


def test_a_function_that_does_not_stream_sends_its_output_as_one_chunk(
    streaming: tuple[str, str],
) -> None:
    url, _ = streaming
    received = read_all(url, "POST", "/v1/functions/whole/predict", json={"input": "abc"})
    assert [kind for kind, _, _ in received] == ["chunk", "end"]
    assert chunks(received) == [("0", "ABC")]


def test_a_batched_generator_of_8_inputs_streams_each_its_own_chunks(
    streaming: tuple[str, str], redis: Redis
) -> None:
    url, _ = streaming
    tags = [tag() for _ in range(8)]

    async def scenario() -> tuple[list[list[Event]], str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            # The worker is held by this one while the 8 queue up: they make one batch.
            gate = await asyncio.to_thread(hold_decode, url)

            async def one(i: int) -> list[Event]:
                body = {"input": {"count": i + 1, "delay_s": 0.05, "tag": tags[i]}}
                async with http.stream(
                    "POST", "/v1/functions/decode/predict", json=body, headers=SSE
                ) as answer:
                    return list(events_of(await _lines(answer)))

            calls = asyncio.gather(*(one(i) for i in range(8)))
            await asyncio.to_thread(wait_until, lambda: decode_queued(redis) == 8, 10, "queued")
            # The batch takes them in queue order, which is the order they reached the gateway.
            first = redis.lindex("rq:queue:runq.decode", 0)
            redis.set(gate, 1, ex=60)
            assert first is not None
            return await calls, first.decode()

    streams, first = asyncio.run(scenario())
    for i, received in enumerate(streams):
        assert chunks(received) == [(str(s), f"{tags[i]}:{s}") for s in range(i + 1)]
        assert received[-1][0] == "end"
        # Progress was reported for input 0 of the batch alone.
        progressed = any(kind == "progress" for kind, _, _ in received)
        assert progressed == (received[-1][2]["id"] == first)
    # Sent at once, they reach the gateway, and so the batch, in any order.
    wait_until(lambda: closed_batch(redis, tags), 10, "one batch of all 8")


async def _lines(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200
    return [line async for line in answer.aiter_lines()]


def events_of(lines: list[str]) -> Iterator[Event]:
    return events(iter(lines))


def test_attach_by_id_replays_and_resumes_after_last_event_id(
    streaming: tuple[str, str],
) -> None:
    url, _ = streaming
    submitted = httpx.post(
        f"{url}/v1/functions/tokens/tasks", json={"input": {"count": 6, "delay_s": 0.15}}
    )
    path = f"/v1/tasks/{submitted.json()['id']}/stream"
    # Read while it runs, and drop the connection after three chunks.
    seen: list[Event] = []
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream("GET", path, headers=SSE) as answer,
    ):
        for event in events(answer.iter_lines()):
            seen.append(event)
            if len(chunks(seen)) == 3:
                break
    assert httpx.get(url + path.removesuffix("/stream")).json()["status"] == "running"
    resumed = read_all(url, "GET", path, headers={"Last-Event-ID": "2"})
    whole = chunks(seen) + chunks(resumed)
    assert whole == [(str(i), f"t{i}") for i in range(6)]
    assert resumed[-1][0] == "end"
    # Once ended, a stream replays from the start.
    replayed = read_all(url, "GET", path)
    assert chunks(replayed) == whole
    assert [kind for kind, _, _ in replayed].count("progress") == 1
    assert httpx.get(f"{url}/v1/tasks/nope/stream").status_code == 404
    assert httpx.get(f"{url}{path}", headers={"Last-Event-ID": "x"}).status_code == 422


def test_deleting_a_streamed_task_deletes_its_chunks(
    streaming: tuple[str, str], redis: Redis
) -> None:
    url, _ = streaming
    received = read_all(
        url, "POST", "/v1/functions/tokens/predict", json={"input": {"count": 2, "delay_s": 0}}
    )
    task_id = received[-1][2]["id"]
    assert redis.exists(constants.chunks_key(task_id))
    assert httpx.delete(f"{url}/v1/tasks/{task_id}").status_code == 204
    assert not redis.exists(constants.chunks_key(task_id))
    assert httpx.get(f"{url}/v1/tasks/{task_id}/stream").status_code == 404


def test_cancel_mid_stream_closes_the_generator(streaming: tuple[str, str], redis: Redis) -> None:
    url, _ = streaming
    name = tag()
    body = {"input": {"count": 200, "delay_s": 0.05, "tag": name}}
    received: list[Event] = []
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream(
            "POST",
            "/v1/functions/tokens/predict?on_disconnect=continue",
            json=body,
            headers=SSE,
        ) as answer,
    ):
        task_path = answer.headers["location"].removesuffix("/stream")
        for event in events(answer.iter_lines()):
            received.append(event)
            if len(received) == 2:
                assert http.post(f"{task_path}/cancel").status_code == 200
    kind, _, error = received[-1]
    assert kind == "error" and error["error"]["message"] == "canceled"
    # Its `finally` ran, between two chunks, long before its 200 were done.
    wait_until(lambda: closed(redis, f"tokens:{name}"), 5, "the generator closed")
    assert len(chunks(received)) < 50


def test_a_batched_generator_s_canceled_input_stops_while_its_batch_mates_go_on(
    streaming: tuple[str, str], redis: Redis
) -> None:
    url, _ = streaming
    tags = [tag() for _ in range(3)]
    gate = hold_decode(url)
    with httpx.Client(base_url=url, timeout=30) as http:
        ids = [
            http.post(
                "/v1/functions/decode/tasks",
                json={"input": {"count": 12, "delay_s": 0.1, "tag": t}},
            ).json()["id"]
            for t in tags
        ]
        wait_until(lambda: decode_queued(redis) == 3, 10, "the three queued")
        redis.set(gate, 1, ex=60)
        wait_until(
            lambda: http.get(f"/v1/tasks/{ids[1]}").json()["status"] == "running", 10, "running"
        )
        assert http.post(f"/v1/tasks/{ids[1]}/cancel").status_code == 200
        results = [http.get(f"/v1/tasks/{i}/result?wait=10").json() for i in ids]
    assert [r["status"] for r in results] == ["succeeded", "canceled", "succeeded"]
    for i in (0, 2):
        assert results[i]["output"] == [f"{tags[i]}:{s}" for s in range(12)]
    canceled = chunks(read_all(url, "GET", f"/v1/tasks/{ids[1]}/stream"))
    assert 0 < len(canceled) < 12
    wait_until(lambda: closed(redis, "decode:" + ",".join(tags)), 5, "the batch's end")


def test_a_predict_stream_caller_that_disconnects_cancels_its_task(
    streaming: tuple[str, str], redis: Redis
) -> None:
    url, _ = streaming
    paths = {}
    for on_disconnect in ("cancel", "continue"):
        name = tag()
        body = {"input": {"count": 20, "delay_s": 0.05, "tag": name}}
        with (
            httpx.Client(base_url=url, timeout=30) as http,
            http.stream(
                "POST",
                f"/v1/functions/tokens/predict?on_disconnect={on_disconnect}",
                json=body,
                headers=SSE,
            ) as answer,
        ):
            paths[on_disconnect] = answer.headers["location"].removesuffix("/stream")
            next(events(answer.iter_lines()))
        # The client hung up after its first chunk.
    wait_until(lambda: closed(redis, f"tokens:{name}"), 5, "the generators closed")

    def status(which: str) -> str:
        return str(httpx.get(f"{url}{paths[which]}/result?wait=5").json()["status"])

    assert status("cancel") == "canceled"
    assert status("continue") == "succeeded"


STREAMS = 1000


def test_a_thousand_open_streams_use_a_bounded_number_of_connections(
    streaming: tuple[str, str], redis: Redis
) -> None:
    url, _ = streaming
    redis.delete("rq:queue:runq.held")
    # Connections that exist before the burst: workers, the suite's own, the gateway's so far.
    before = {c["id"] for c in redis.client_list()}
    task_ids: list[str] = []

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=STREAMS)
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

            async def one(i: int) -> None:
                async with http.stream(
                    "POST",
                    "/v1/functions/held/predict?on_disconnect=continue",
                    json={"input": i},
                    headers=SSE,
                ) as answer:
                    assert answer.status_code == 200
                    task_ids.append(answer.headers["location"].split("/")[3])
                    await release.wait()

            calls = [asyncio.create_task(one(i)) for i in range(STREAMS)]
            await asyncio.to_thread(
                wait_until, lambda: len(task_ids) == STREAMS, 60, "every stream open"
            )
            channels = [f"runq:task:{task_id}" for task_id in task_ids]

            def watched() -> bool:
                return all(count for _, count in redis.pubsub_numsub(*channels))

            await asyncio.to_thread(wait_until, watched, 30, "every stream watching its task")
            # Every stream is open and listening for its task: count what the gateway holds.
            opened = [c for c in redis.client_list() if c["id"] not in before]
            assert len(opened) <= 40, [c["cmd"] for c in opened]
            release.set()
            await asyncio.gather(*calls)

    try:
        asyncio.run(scenario())
    finally:
        redis.delete("rq:queue:runq.held", *(f"rq:job:{task_id}" for task_id in task_ids))


def test_time_to_first_chunk_and_between_chunks_count_what_was_sent(
    streaming: tuple[str, str],
) -> None:
    url, metrics_url = streaming

    def figures() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(metrics_url).text
        found = {f.name: f.samples for f in text_string_to_metric_families(text)}
        return {
            name: value(found.get(family, []), name, function="tokens")
            for family, name in [
                ("runq_time_to_first_chunk_seconds", "runq_time_to_first_chunk_seconds_count"),
                ("runq_time_between_chunks_seconds", "runq_time_between_chunks_seconds_count"),
                ("runq_time_between_chunks_seconds", "runq_time_between_chunks_seconds_sum"),
                ("runq_stream_stalls", "runq_stream_stalls_total"),
            ]
        }

    before = figures()
    # 2 streams of 4 chunks 0.3 s apart: 2 first chunks, 6 gaps, each past stall_threshold_s.
    for _ in range(2):
        received = read_all(
            url,
            "POST",
            "/v1/functions/tokens/predict",
            json={"input": {"count": 4, "delay_s": 0.3}},
        )
        assert len(chunks(received)) == 4
    after = figures()
    delta = {name: after[name] - before[name] for name in after}
    assert delta["runq_time_to_first_chunk_seconds_count"] == 2
    assert delta["runq_time_between_chunks_seconds_count"] == 6
    assert delta["runq_time_between_chunks_seconds_sum"] >= 6 * 0.3
    assert delta["runq_stream_stalls_total"] == 6


class DroppingTransport(httpx.HTTPTransport):
    """The real transport, but the first stream it answers breaks after two chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = super().handle_request(request)
        if len(self.requests) > 1:
            return response
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Broken(response),
            request=request,
        )


class _Broken(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for part in self._response.stream:
            yield part
            seen += part.count(b"event: chunk")
            if seen >= 2:
                self._response.close()
                raise httpx.ReadError("connection dropped")

    def close(self) -> None:
        self._response.close()


def test_client_stream_resumes_after_a_dropped_connection_without_duplicates(
    streaming: tuple[str, str],
) -> None:
    url, _ = streaming
    transport = DroppingTransport()
    with runq.Client(url, transport=transport, backoff_s=0.05) as client:
        got = list(client.stream("tokens", {"count": 6, "delay_s": 0.1}))
    assert got == [f"t{i}" for i in range(6)]
    method, path = transport.requests[1].method, transport.requests[1].url.path
    assert (method, path.endswith("/stream")) == ("GET", True)
    assert transport.requests[1].headers["last-event-id"] in ("0", "1")

    async def run() -> list[Any]:
        async with runq.AsyncClient(url) as client:
            return [chunk async for chunk in client.stream("decode", {"count": 3, "tag": "a"})]

    assert asyncio.run(run()) == ["a:0", "a:1", "a:2"]
