"""Webhooks: URL checks (SSRF), signatures, and delivery via a real Valkey to a real receiver."""

from __future__ import annotations

import datetime
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runq.errors import ConfigError, ValidationFailed
from runq.queue import constants as k
from runq.webhooks import WebhookSender, check_url, enqueue, sign, signature_header, verify
from tests.conftest import ROOT, Proc, free_port, start_gateway, start_worker, wait_until

SECRET = b"whsec-test"
PUBLIC = "http://93.184.216.34/hook"

# check_url ------------------------------------------------------------------------------------


def test_a_public_literal_address_is_accepted() -> None:
    assert check_url(PUBLIC, allow_private=False) == PUBLIC
    assert check_url("https://93.184.216.34:8443/a/b?c=d", allow_private=False)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.1.2.3:8080/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://172.16.0.1/hook", "private"),
        ("http://192.168.1.1/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://100.64.0.1/hook", "non-public"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://240.0.0.1/hook", "private"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[fc00::1]/hook", "private"),
        ("http://[2002:7f00:1::]/hook", "loopback"),
        ("http://localhost:9000/hook", "loopback"),
    ],
)
def test_private_and_loopback_addresses_are_refused(url: str, why: str) -> None:
    with pytest.raises(ValidationFailed, match=why):
        check_url(url, allow_private=False)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://93.184.216.34/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("93.184.216.34/hook", "http:// or https://"),
        ("http:///hook", "no host"),
        ("http://user:hunter2@93.184.216.34/hook", "credentials"),
        ("http://token@93.184.216.34/hook", "credentials"),
        ("http://93.184.216.34/ho ok", "spaces or control"),
        ("http://93.184.216.34:99999/hook", "port"),
        ("http://93.184.216.34/" + "a" * 3000, "at most"),
        ("http://no-such-host.invalid/hook", "cannot be resolved"),
    ],
)
def test_malformed_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(ValidationFailed, match=why) as refused:
        check_url(url, allow_private=False)
    assert refused.value.status_code == 422
    assert "hunter2" not in refused.value.message


def test_allow_private_permits_loopback_and_private() -> None:
    for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.1/hook"):
        assert check_url(url, allow_private=True) == url
    # The other rules still hold.
    with pytest.raises(ValidationFailed, match="credentials"):
        check_url("http://user:pass@127.0.0.1/hook", allow_private=True)


def test_a_name_is_refused_if_any_of_its_addresses_is_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = {
        "public.example": ["93.184.216.34"],
        "mixed.example": ["93.184.216.34", "10.0.0.7"],
        "mapped.example": ["::ffff:192.168.0.1"],
    }

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        family = socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert check_url("https://public.example/hook", allow_private=False)
    with pytest.raises(ValidationFailed, match=r"resolves to 10\.0\.0\.7, a private"):
        check_url("https://mixed.example/hook", allow_private=False)
    with pytest.raises(ValidationFailed, match="private"):
        check_url("https://mapped.example/hook", allow_private=False)


# signatures ----------------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    body = b'{"id": "abc", "status": "succeeded"}'
    now = int(time.time())
    header = signature_header(SECRET, now, body)
    assert header == f"t={now},v1={sign(SECRET, now, body)}"
    assert len(sign(SECRET, now, body)) == 64
    assert verify(SECRET, header, body)
    assert verify(SECRET.decode(), header, body)
    # A second v1 entry (a rotated secret) may be the matching one.
    assert verify(SECRET, f"t={now},v1={'0' * 64},v1={sign(SECRET, now, body)}", body)


def test_verify_refuses_tampering_old_timestamps_and_garbage() -> None:
    body = b'{"id": "abc"}'
    now = int(time.time())
    header = signature_header(SECRET, now, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify(b"another secret", header, body)
    old = now - 301
    assert not verify(SECRET, signature_header(SECRET, old, body), body)
    assert verify(SECRET, signature_header(SECRET, old, body), body, tolerance_s=600)
    assert not verify(SECRET, signature_header(SECRET, now + 301, body), body)
    # The timestamp is signed: moving it breaks the signature.
    assert not verify(SECRET, header.replace(f"t={now}", f"t={now + 1}"), body)
    for garbage in ("", "t=abc,v1=00", f"t={now}", f"v1={sign(SECRET, now, body)}", "nonsense"):
        assert not verify(SECRET, garbage, body)


# delivery ------------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST and answers from a script."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []  # answers in order; then `default`
        self.default = 200
        self.delay_s = 0.0
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.requests.append((dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                    receiver.arrived.notify_all()
                time.sleep(receiver.delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/runq?token=s3cret"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.server.server_address[1]}/hooks/runq"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def store(valkey_url: str) -> Iterator[Redis]:
    """The suite's Valkey, on a database of its own: workers of other tests, which run webhook
    senders against database 0, must not take these deliveries."""
    client = Redis.from_url(valkey_url, db=13)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def task_body(task_id: str) -> bytes:
    view = {"id": task_id, "function": "echo", "status": "succeeded", "output": [1, 2, 3]}
    return json.dumps(view).encode()


def submit(store: Redis, task_id: str, url: str) -> bytes:
    body = task_body(task_id)
    with store.pipeline() as pipe:  # WATCH, then MULTI/EXEC, as the worker's record does
        pipe.watch(k.job_key(task_id))
        pipe.multi()
        pipe.hset(k.job_key(task_id), "status", "finished")
        enqueue(pipe, task_id, url, body)
        pipe.execute()
    return body


def delivered(store: Redis, task_id: str) -> bool:
    gone = not store.exists(k.webhook_key(task_id))
    return gone and store.zscore(k.WEBHOOKS_DUE_KEY, task_id) is None


def fast_sender(store: Redis, **kwargs: Any) -> WebhookSender:
    options: dict[str, Any] = {
        "allow_private": True,
        "backoff_s": 0.05,
        "poll_interval_s": 0.01,
        "timeout_s": 2.0,
        **kwargs,
    }
    return WebhookSender(store, SECRET, **options)


def test_enqueue_writes_the_delivery_in_the_callers_transaction(store: Redis) -> None:
    body = submit(store, "t-enqueue", PUBLIC)
    fields = store.hgetall(k.webhook_key("t-enqueue"))
    assert fields == {b"url": PUBLIC.encode(), b"body": body, b"attempts": b"0"}
    assert 0 < store.ttl(k.webhook_key("t-enqueue")) <= k.WEBHOOK_TTL_S
    due = store.zscore(k.WEBHOOKS_DUE_KEY, "t-enqueue")
    assert due is not None and abs(due - time.time()) < 5


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
            assert sender._thread.is_alive()
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
        assert dead._thread.is_alive()
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


def test_two_senders_never_send_one_delivery_at_once(store: Redis, receiver: Receiver) -> None:
    receiver.delay_s = 0.5
    submit(store, "t-once", receiver.url)
    senders = [fast_sender(store) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: delivered(store, "t-once"), 10, "the delivery")
    finally:
        for sender in senders:
            sender.stop()
    assert len(receiver.requests) == 1


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
    fields = store.hgetall(k.webhook_key("t-slow"))
    assert fields[b"attempts"] == b"1"  # failed, and due again later


def test_stop_hands_back_claimed_deliveries_it_did_not_send(store: Redis) -> None:
    for n in range(3):
        submit(store, f"t-held-{n}", PUBLIC)
    sender = fast_sender(store)
    sender._stopping.set()  # as if stop() came while the batch was in hand
    assert sender.run_once() == 3
    for n in range(3):
        assert store.hget(k.webhook_key(f"t-held-{n}"), "attempts") == b"0"
        due = store.zscore(k.WEBHOOKS_DUE_KEY, f"t-held-{n}")
        assert due is not None and due <= time.time() + 1
    sender.stop()


def test_backoff_doubles_up_to_the_cap(store: Redis) -> None:
    sender = WebhookSender(store, SECRET, allow_private=False)
    assert [sender.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert sender.backoff(20) == k.WEBHOOK_BACKOFF_MAX_S
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
        sender = fast_sender(store)
        sender._client = httpx.Client(verify=trusting, trust_env=False, timeout=2.0)
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
        assert store.hget(k.webhook_key("t-tls"), "attempts") == b"1"
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


# end to end: gateway, worker, receiver -------------------------------------------------------

HOOKED = str(ROOT / "tests" / "fns_webhooks.py")
E2E_SECRET = "end-to-end-secret"


def test_a_submitted_task_is_posted_to_its_webhook_when_it_ends(
    procs: Callable[..., Proc], redis: Redis, receiver: Receiver
) -> None:
    env = {"RUNQ_WEBHOOK_SECRET": E2E_SECRET, "RUNQ_WEBHOOK_ALLOW_PRIVATE": "true"}
    url = start_gateway(procs, env=env, target=HOOKED)
    start_worker(procs, redis, "hooked", target=HOOKED, env=env)
    task = httpx.post(
        f"{url}/v1/functions/hooked/tasks", json={"input": 14, "webhook": receiver.url}
    ).json()
    with receiver.arrived:
        assert receiver.arrived.wait_for(lambda: receiver.requests, timeout=20)
    headers, body = receiver.requests[0]
    assert verify(E2E_SECRET, headers["Runq-Signature"], body)
    posted = json.loads(body)
    assert posted["id"] == task["id"] and posted["status"] == "succeeded"
    assert posted["output"] == 42


def test_a_webhook_to_a_private_address_is_refused_at_submit(
    procs: Callable[..., Proc], receiver: Receiver
) -> None:
    guarded = start_gateway(procs, env={"RUNQ_WEBHOOK_SECRET": E2E_SECRET}, target=HOOKED)
    refused = httpx.post(
        f"{guarded}/v1/functions/hooked/tasks", json={"input": 1, "webhook": receiver.url}
    )
    assert refused.status_code == 422
    assert "loopback" in refused.json()["error"]["message"]
    unsigned = start_gateway(procs, target=HOOKED)
    off = httpx.post(
        f"{unsigned}/v1/functions/hooked/tasks",
        json={"input": 1, "webhook": "http://93.184.216.34/hook"},
    )
    assert off.status_code == 422
    assert "webhook_secret" in off.json()["error"]["message"]
