"""Webhook URL checks (SSRF) and signatures, and a private webhook refused at submit."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from runq.errors import ValidationFailed
from runq.webhooks import check_url, sign, signature_header, verify
from tests.helpers import (
    E2E_SECRET,
    HOOKED,
    PUBLIC,
    SECRET,
    Proc,
    Receiver,
    free_port,
    start_gateway,
    wait_for_gateway,
)

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


# at submit: the gateway checks the URL ------------------------------------------------------


def test_a_webhook_to_a_private_address_is_refused_at_submit(
    procs: Callable[..., Proc], receiver: Receiver
) -> None:
    port = free_port()
    guarded = procs("gateway", HOOKED, "--port", str(port), env={"RUNQ_WEBHOOK_SECRET": E2E_SECRET})
    try:
        wait_for_gateway(guarded, f"http://127.0.0.1:{port}")
        refused = httpx.post(
            f"http://127.0.0.1:{port}/v1/functions/hooked/tasks",
            json={"input": 1, "webhook": receiver.url},
        )
    finally:
        # Its webhook sender refuses loopback receivers: other tests' deliveries are not its.
        guarded.stop()
    assert refused.status_code == 422
    assert "loopback" in refused.json()["error"]["message"]
    unsigned = start_gateway(procs, target=HOOKED)
    off = httpx.post(
        f"{unsigned}/v1/functions/hooked/tasks",
        json={"input": 1, "webhook": "http://93.184.216.34/hook"},
    )
    assert off.status_code == 422
    assert "webhook_secret" in off.json()["error"]["message"]
