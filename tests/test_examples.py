"""The bundled examples, served as a newcomer serves them."""

from __future__ import annotations

import math
from collections.abc import Callable

import httpx
from redis import Redis

from tests.helpers import ROOT, Proc, launch_gateway, start_worker, wait_for_gateway
from tests.test_logs import json_lines

EMBED = str(ROOT / "examples" / "embed.py")


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embed_example_answers_unit_vectors_that_carry_meaning(
    procs: Callable[..., Proc], valkey_url: str
) -> None:
    gateway, url = launch_gateway(procs, target=EMBED)
    with Redis.from_url(valkey_url) as redis:
        # Loading torch and the model takes a while on a small CI machine.
        worker = start_worker(procs, redis, "embed", target=EMBED, env={"RUNQ_LOG_FORMAT": "json"})
    wait_for_gateway(gateway, url)
    sentences = [
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "Interest rates rose again this quarter.",
    ]
    with httpx.Client(base_url=url, timeout=120) as http:
        example = http.get("/v1/functions/embed").json()["example"]
        answers = [
            http.post("/v1/functions/embed/predict", json={"input": s})
            for s in [example, *sentences]
        ]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    vectors = [a.json()["output"] for a in answers]
    assert all(len(v) == 384 and all(isinstance(x, float) for x in v) for v in vectors)
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-3) for v in vectors)
    _, cat, kitten, rates = vectors
    assert cosine(cat, kitten) > cosine(cat, rates) + 0.3
    # A collector takes the worker's log as it is: no progress bars, no stray output.
    assert worker.stop() == 0
    assert any(entry["logger"] == "runq.worker" for entry in json_lines(worker))
