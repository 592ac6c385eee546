"""Object storage as a user relies on it: big inputs and outputs through a real S3-compatible
server over HTTP (moto's server mode), presigned results, deletion, and prediction logs."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from redis import Redis

from runq.queue.storage import FileStore
from tests.helpers import (
    ROOT,
    Proc,
    free_port,
    launch_gateway,
    start_worker,
    wait_for_gateway,
    wait_until,
)

TARGET = str(ROOT / "tests" / "fns_storage.py")
BUCKET = "runq-test"
FIVE_MIB = 5 * 1024 * 1024
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    s3(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def s3(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def keys_under(endpoint: str, prefix: str) -> list[str]:
    listed = s3(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [entry["Key"] for entry in listed.get("Contents", [])]


@pytest.fixture(scope="module")
def stored(procs: Callable[..., Proc], valkey_url: str, s3_endpoint: str) -> Iterator[httpx.Client]:
    """A gateway and a worker for tests/fns_storage.py that keep big objects in S3."""
    env = {
        **AWS_ENV,
        "RUNQ_STORAGE_URL": f"s3://{BUCKET}/objects",
        "RUNQ_STORAGE_ENDPOINT_URL": s3_endpoint,
        "RUNQ_PREDICTION_LOG_URL": f"s3://{BUCKET}/predictions",
        "RUNQ_MAX_BODY_BYTES": str(16 * 1024 * 1024),
    }
    gateway, url = launch_gateway(procs, env=env, target=TARGET)
    with Redis.from_url(valkey_url) as redis:
        start_worker(procs, redis, "mirror", target=TARGET, env=env)
    wait_for_gateway(gateway, url)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def big_text() -> str:
    return secrets.token_urlsafe(FIVE_MIB)[:FIVE_MIB]


def test_five_mib_in_and_out_through_predict_and_submit(
    stored: httpx.Client, s3_endpoint: str, redis: Redis
) -> None:
    text = big_text()
    answer = stored.post("/v1/functions/mirror/predict?timeout=60", json={"input": text})
    assert answer.status_code == 200, answer.text[:500]
    task = answer.json()
    assert task["output"] == text[::-1]
    # Only keys travelled through Redis; the bytes are in the bucket.
    assert redis.hstrlen(f"rq:job:{task['id']}", "data") < 10_000
    assert keys_under(s3_endpoint, f"objects/mirror/inputs/{task['id']}")
    assert keys_under(s3_endpoint, f"objects/mirror/outputs/{task['id']}")

    submitted = stored.post("/v1/functions/mirror/tasks", json={"input": text}).json()
    done = stored.get(f"/v1/tasks/{submitted['id']}/result?wait=60")
    assert done.status_code == 200
    assert done.json()["output"] == text[::-1]
    assert done.json()["status"] == "succeeded"


def test_result_redirect_is_a_working_presigned_url(stored: httpx.Client) -> None:
    text = big_text()
    task = stored.post("/v1/functions/mirror/tasks", json={"input": text}).json()
    stored.get(f"/v1/tasks/{task['id']}/result?wait=60")
    redirected = stored.get(f"/v1/tasks/{task['id']}/result?redirect=true")
    assert redirected.status_code == 307
    fetched = httpx.get(redirected.headers["location"], timeout=60)
    assert fetched.status_code == 200
    assert json.loads(fetched.content) == text[::-1]


def test_deleting_a_task_deletes_its_objects(stored: httpx.Client, s3_endpoint: str) -> None:
    task = stored.post("/v1/functions/mirror/predict?timeout=60", json={"input": big_text()})
    task_id = task.json()["id"]
    assert keys_under(s3_endpoint, f"objects/mirror/inputs/{task_id}")
    assert stored.delete(f"/v1/tasks/{task_id}").status_code == 204
    assert not keys_under(s3_endpoint, f"objects/mirror/inputs/{task_id}")
    assert not keys_under(s3_endpoint, f"objects/mirror/outputs/{task_id}")


def test_a_stored_output_whose_object_is_gone_answers_a_json_error(
    stored: httpx.Client, s3_endpoint: str
) -> None:
    task = stored.post("/v1/functions/mirror/tasks", json={"input": big_text()}).json()
    assert stored.get(f"/v1/tasks/{task['id']}/result?wait=60").status_code == 200
    (key,) = keys_under(s3_endpoint, f"objects/mirror/outputs/{task['id']}")
    s3(s3_endpoint).delete_object(Bucket=BUCKET, Key=key)
    # Once a 200 is sent a stream can only be cut short: the object is read before it starts.
    answer = stored.get(f"/v1/tasks/{task['id']}/result")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "storage_unavailable"


def test_small_inputs_stay_inline(stored: httpx.Client, s3_endpoint: str) -> None:
    task = stored.post("/v1/functions/mirror/predict", json={"input": "abc"}).json()
    assert task["output"] == "cba"
    assert not keys_under(s3_endpoint, f"objects/mirror/inputs/{task['id']}")


def test_predictions_are_logged_as_json_lines(stored: httpx.Client, s3_endpoint: str) -> None:
    ids = {
        stored.post("/v1/functions/mirror/predict", json={"input": f"log-{i}"}).json()["id"]
        for i in range(5)
    }

    def logged() -> list[dict[str, Any]]:
        records = []
        for key in keys_under(s3_endpoint, "predictions/mirror/"):
            body = s3(s3_endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()
            records += [json.loads(line) for line in body.decode().splitlines()]
        return [r for r in records if r["task_id"] in ids] if records else []

    records = wait_until(lambda: len(logged()) == 5 and logged(), 30, "the logged predictions")
    for record in records:
        assert record["status"] == "succeeded" and record["tenant"] == "default"
        assert record["output"] == record["input"][::-1]
        assert record["latency_s"] >= 0 and record["time"] <= time.time()


def test_file_store_round_trip_and_sweep(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("f/inputs/a.json", b'"x"')
    assert store.get("f/inputs/a.json") == b'"x"'
    assert b"".join(store.chunks("f/inputs/a.json")) == b'"x"'
    assert store.sweep("f", older_than_s=3600) == 0
    assert store.sweep("f", older_than_s=-1) == 1
    store.delete(["f/inputs/a.json"])
    assert not list(tmp_path.rglob("*.json"))
