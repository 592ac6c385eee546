"""The webhook sender: signed deliveries to a real receiver, retries with backoff, drops, TLS,
and a worker posting a task's webhook end to end."""

from __future__ import annotations

import datetime
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runq.errors import ConfigError
from runq.queue import constants
from runq.queue.keys import create_key
from runq.webhook_sender import WebhookSender
from runq.webhooks import verify
from tests.helpers import (
    E2E_SECRET,
    HOOKED,
    PUBLIC,
    SECRET,
    Proc,
    Receiver,
    delivered,
    fast_sender,
    free_port,
    start_worker,
    submit,
    wait_for_gateway,
    wait_until,
)


def test_a_delivery_arrives_signed_with_the_task_json(store: Redis, receiver: Receiver) -> None:
    body = submit(store, "t-ok", receiver.url)
    sender = fast_sender(store)
    sender.start()
    try:
        wait_until(lambda: receiver.requests, 10, "the webhook POST")
        wait_until(lambda: delivered(store, "t-ok"), 5, "the delivery to be removed")
    finally:
        sender.stop()
    assert len(receiver.requests) == 1
    headers, received = receiver.requests[0]
    assert received == body
    assert json.loads(received)["id"] == "t-ok"
    assert headers["Content-Type"] == "application/json"
    assert headers["Runq-Task-Id"] == "t-ok"
    assert headers["Runq-Delivery"] == "1"
    assert headers["Host"] == receiver.url.split("/")[2]
    assert verify(SECRET, headers["Runq-Signature"], received)
    assert not verify(b"wrong", headers["Runq-Signature"], received)


def test_failed_attempts_are_retried_with_backoff_then_the_delivery_is_gone(
    store: Redis, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500, 500]
    submit(store, "t-retry", receiver.url)
    sender = fast_sender(store, backoff_s=0.2)
    started = time.monotonic()
    sender.start()
    try:
        with caplog.at_level(logging.INFO, logger="runq.webhooks"):
            wait_until(lambda: delivered(store, "t-retry"), 10, "the third attempt")
    finally:
        sender.stop()
    # Backoff 0.2 s, then 0.4 s.
    assert time.monotonic() - started >= 0.6
    assert [h["Runq-Delivery"] for h, _ in receiver.requests] == ["1", "2", "3"]
    assert all(verify(SECRET, h["Runq-Signature"], b) for h, b in receiver.requests)
    assert "answered HTTP 500" in caplog.text
    assert "token" not in caplog.text and "output" not in caplog.text


def test_a_receiver_that_always_fails_gets_max_attempts_then_a_warning(
    store: Redis, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.default = 503
    body = submit(store, "t-fail", receiver.url)
    sender = fast_sender(store, max_attempts=3)
    # Called directly, a pass never raises for a receiver's failure.
    with caplog.at_level(logging.INFO, logger="runq.webhooks"):
        assert sender.run_once() == 1
        sender.start()
        try:
            wait_until(lambda: delivered(store, "t-fail"), 10, "the delivery to be dropped")
            time.sleep(0.2)
            assert sender.alive
        finally:
            sender.stop()
    assert len(receiver.requests) == 3
    dropped = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(dropped) == 1
    line = dropped[0].getMessage()
    assert "t-fail" in line and "127.0.0.1" in line and "3 attempts" in line
    assert body.decode() not in caplog.text and "token" not in caplog.text


def test_nothing_listening_and_a_dead_redis_never_stop_the_sender(
    store: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    submit(store, "t-refused", url)
    sender = fast_sender(store, max_attempts=2)
    assert sender.run_once() == 1  # connection refused: rescheduled, not raised
    wait_until(lambda: sender.run_once() or delivered(store, "t-refused"), 5, "the drop")
    assert delivered(store, "t-refused")
    assert "cannot connect" in caplog.text

    dead = fast_sender(Redis(port=free_port(), retry=Retry(NoBackoff(), 0)))
    dead.start()
    try:
        claim_failed = "cannot claim due webhook deliveries"
        wait_until(lambda: caplog.text.count(claim_failed) >= 2, 10, "claims to fail twice")
        assert dead.alive
    finally:
        dead.stop()


def test_the_sender_checks_the_address_again_before_sending(
    store: Redis, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Accepted at submit (say, before the name was rebound to 127.0.0.1): refused at delivery.
    submit(store, "t-ssrf", receiver.url)
    sender = fast_sender(store, allow_private=False)
    with caplog.at_level(logging.WARNING, logger="runq.webhooks"):
        assert sender.run_once() == 1
    assert receiver.requests == []
    assert delivered(store, "t-ssrf")
    assert "loopback" in caplog.text and "t-ssrf" in caplog.text


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout(store: Redis) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

    threading.Thread(target=trickle, daemon=True).start()
    submit(store, "t-slow", f"http://127.0.0.1:{port}/hook")
    sender = fast_sender(store, timeout_s=1.0)
    started = time.monotonic()
    try:
        assert sender.run_once() == 1
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - started < 3
    fields = store.hgetall(constants.webhook_key("t-slow"))
    assert fields[b"attempts"] == b"1"  # failed, and due again later


def test_stop_hands_back_claimed_deliveries_it_did_not_send(store: Redis) -> None:
    for n in range(3):
        submit(store, f"t-held-{n}", PUBLIC)
    sender = fast_sender(store)
    sender.stop()  # as if stop() came while the batch was in hand: none is sent
    assert sender.run_once() == 3
    for n in range(3):
        assert store.hget(constants.webhook_key(f"t-held-{n}"), "attempts") == b"0"
        due = store.zscore(constants.WEBHOOKS_DUE_KEY, f"t-held-{n}")
        assert due is not None and due <= time.time() + 1
    sender.stop()


def tarpit() -> socket.socket:
    """A receiver that takes connections (the kernel completes them) and never answers."""
    return socket.create_server(("127.0.0.1", 0), backlog=32)


def test_receivers_that_never_answer_do_not_hold_up_a_good_one(
    store: Redis, receiver: Receiver
) -> None:
    pits = [tarpit() for _ in range(8)]
    try:
        # Claimed first: their ids sort before the good one's, and they are due earlier.
        for n, pit in enumerate(pits):
            submit(store, f"pit-{n}", f"http://127.0.0.1:{pit.getsockname()[1]}/hook")
        submit(store, "t-good", receiver.url)
        sender = fast_sender(store, timeout_s=1.0)
        sender.start()
        try:
            # Sent one after another, the good one would wait 8 x 1 s behind the tarpits.
            wait_until(lambda: delivered(store, "t-good"), 3, "the good webhook")
        finally:
            sender.stop()
    finally:
        for pit in pits:
            pit.close()
    assert len(receiver.requests) == 1


def test_one_receiver_gets_at_most_per_host_max_deliveries_at_once(store: Redis) -> None:
    pit = tarpit()
    try:
        url = f"http://127.0.0.1:{pit.getsockname()[1]}/hook"
        for n in range(5):
            submit(store, f"pit-{n}", url)
        sender = fast_sender(store, timeout_s=0.3, per_host_max=2)
        assert sender.run_once() == 5
    finally:
        pit.close()
    attempts = [store.hget(constants.webhook_key(f"pit-{n}"), "attempts") for n in range(5)]
    # Two were attempted (and timed out); three were handed back unattempted, due again later.
    assert sorted(attempts) == [b"0", b"0", b"0", b"1", b"1"]
    for n in range(5):
        assert store.zscore(constants.WEBHOOKS_DUE_KEY, f"pit-{n}") is not None


def test_no_log_line_shows_a_webhook_urls_path_or_query(
    store: Redis, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500]
    submit(store, "t-quiet", receiver.url)
    sender = fast_sender(store)
    with caplog.at_level(logging.DEBUG):
        sender.start()
        try:
            wait_until(lambda: delivered(store, "t-quiet"), 10, "the second attempt")
        finally:
            sender.stop()
    assert "t-quiet" in caplog.text and "127.0.0.1" in caplog.text
    assert "/hooks" not in caplog.text and "s3cret" not in caplog.text


def test_backoff_doubles_up_to_the_cap(store: Redis) -> None:
    sender = WebhookSender(store, SECRET, allow_private=False)
    assert [sender.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert sender.backoff(20) == constants.WEBHOOK_BACKOFF_MAX_S
    sender.stop()
    with pytest.raises(ConfigError):
        WebhookSender(store, b"", allow_private=False)


def self_signed(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for ``name``, and a client context trusting it."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))


@pytest.mark.parametrize(("certified", "arrives"), [("localhost", True), ("other.example", False)])
def test_https_is_checked_against_the_urls_name_while_connecting_to_the_checked_address(
    store: Redis, tmp_path: Path, certified: str, arrives: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server_tls, trusting = self_signed(tmp_path, certified)
    receiver = Receiver(tls=server_tls)
    try:
        body = submit(store, "t-tls", receiver.url)
        sender = fast_sender(store, verify=trusting)
        with caplog.at_level(logging.INFO, logger="runq.webhooks"):
            assert sender.run_once() == 1
        sender.stop()
    finally:
        receiver.close()
    if arrives:
        assert delivered(store, "t-tls")
        headers, received = receiver.requests[0]
        assert received == body
        assert headers["Host"] == receiver.url.split("/")[2]
    else:
        assert receiver.requests == []
        assert store.hget(constants.webhook_key("t-tls"), "attempts") == b"1"
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


# end to end: gateway, worker, receiver -------------------------------------------------------


def test_webhooks_go_out_from_the_gateway_also_while_no_worker_is_alive(
    procs: Callable[..., Proc], redis: Redis, receiver: Receiver
) -> None:
    env = {"RUNQ_WEBHOOK_SECRET": E2E_SECRET, "RUNQ_WEBHOOK_ALLOW_PRIVATE": "true"}
    port = free_port()
    # With keys, so the delivery names the task's tenant.
    gateway = procs("gateway", HOOKED, "--port", str(port), env={**env, "RUNQ_AUTH": "keys"})
    key, _ = create_key(redis, "hooks-tenant")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_gateway(gateway, url)
        worker = start_worker(procs, redis, "hooked", target=HOOKED, env=env)
        task = httpx.post(
            f"{url}/v1/functions/hooked/tasks",
            json={"input": 14, "webhook": receiver.url},
            headers={"Authorization": f"Bearer {key}"},
        ).json()
        wait_until(lambda: receiver.requests, 20, "the task's webhook")
        headers, body = receiver.requests[0]
        assert verify(E2E_SECRET, headers["Runq-Signature"], body)
        posted = json.loads(body)
        assert posted["id"] == task["id"] and posted["status"] == "succeeded"
        assert posted["output"] == 42 and posted["tenant"] == "hooks-tenant"

        # The pool scales to zero with a delivery still due (its first attempt failed, say).
        worker.stop()
        due = submit(redis, "t-no-worker", receiver.url)
        wait_until(lambda: len(receiver.requests) == 2, 10, "the gateway's delivery")
        headers, body = receiver.requests[1]
        assert body == due and verify(E2E_SECRET, headers["Runq-Signature"], body)
    finally:
        gateway.stop()
    log = gateway.output()
    assert "t-no-worker delivered to 127.0.0.1" in log
    assert "/hooks" not in log and "s3cret" not in log
