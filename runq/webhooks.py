"""Webhooks: a signed POST of the task JSON to the URL a task was submitted with, once it ends.

- **Submit** (gateway): ``check_url`` refuses anything but a public http(s) URL without
  credentials; every address its host resolves to must be public (SSRF), unless the server
  allows private ones (``webhook_allow_private``).
- **Record** (worker): ``runq.queue.webhooks.enqueue`` adds the delivery inside the transaction
  that records the task's outcome, so a recorded outcome always has its delivery and an
  unrecorded one none.
- **Send** (``runq.webhook_sender.WebhookSender``, in every gateway process): claims due
  deliveries, checks each URL again and POSTs them signed, concurrently, with retries.
  Delivery is at least once: receivers dedupe by ``Runq-Task-Id``.

Signature header: ``Runq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``;
receivers check it with ``verify``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time

import httpx

from runq.errors import ValidationFailed

SIGNATURE_HEADER = "Runq-Signature"
TASK_ID_HEADER = "Runq-Task-Id"
DELIVERY_HEADER = "Runq-Delivery"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
URL_MAX_CHARS = 2048

# URL checks ----------------------------------------------------------------------------------


class Unresolvable(ValidationFailed):
    """The host does not resolve now; at delivery time this is worth a retry, unlike a refusal."""


def check_url(url: str, *, allow_private: bool) -> str:
    """Validates a webhook URL at submit time; returns it. Raises ValidationFailed (422).

    Only http and https, a host, no credentials; every address the host resolves to must be
    public: private, loopback, link-local, multicast, reserved and unspecified addresses (IPv4,
    IPv6 and IPv4 inside IPv6) are refused unless ``allow_private``. The sender checks again
    before every attempt, as DNS may answer differently by then.
    """
    parsed = parse_url(url)
    checked_addresses(parsed, allow_private=allow_private)
    return url


def parse_url(url: str) -> httpx.URL:
    if not isinstance(url, str) or len(url) > URL_MAX_CHARS:
        raise ValidationFailed(f"webhook must be a URL of at most {URL_MAX_CHARS} characters")
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise ValidationFailed("webhook URL must not contain spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise ValidationFailed("webhook is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise ValidationFailed("webhook URL must start with http:// or https://")
    if not parsed.raw_host:
        raise ValidationFailed("webhook URL has no host")
    if parsed.userinfo:
        raise ValidationFailed("webhook URL must not carry credentials (user:password@host)")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValidationFailed("webhook URL port must be between 1 and 65535")
    return parsed


def checked_addresses(url: httpx.URL, *, allow_private: bool) -> list[str]:
    """The addresses the URL's host resolves to, in resolver order, all of them allowed."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise Unresolvable(f"webhook host {host!r} cannot be resolved") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Unresolvable(f"webhook host {host!r} cannot be resolved")
    if not allow_private:
        for address in addresses:
            kind = refused_kind(address)
            if kind is not None:
                resolved = "is" if address == host else f"resolves to {address},"
                raise ValidationFailed(
                    f"webhook host {host!r} {resolved} a {kind} address; webhooks may only "
                    "reach public addresses"
                )
    return addresses


def refused_kind(address: str) -> str | None:
    """Why an IP address is no webhook target ("loopback", "private", ...); None: it is public."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 reaches that IPv4 address: ::ffff:127.0.0.1 is loopback.
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        if ip.teredo is not None:
            candidates.extend(ip.teredo)
    candidates.append(ip)
    for candidate in candidates:
        if candidate.is_unspecified:
            return "unspecified"
        if candidate.is_loopback:
            return "loopback"
        if candidate.is_link_local:
            return "link-local"
        if candidate.is_multicast:
            return "multicast"
        if candidate.is_private:
            return "private"
        if candidate.is_reserved:
            return "reserved"
        if not candidate.is_global:
            return "non-public"
    return None


# Signatures ----------------------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 of ``b"<timestamp>." + body`` under ``secret``, as hex."""
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Runq-Signature`` header's value: ``t=<timestamp>,v1=<hex>``."""
    return f"t={timestamp},{SIGNATURE_VERSION}={sign(secret, timestamp, body)}"


def verify(
    secret: bytes | str,
    header: str,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> bool:
    """For receivers: True when ``header`` (Runq-Signature) signs ``body`` (the raw request
    bytes) under ``secret`` and its timestamp is within ``tolerance_s`` of now (replays of old
    deliveries are refused). Any ``v1`` entry may match, so a secret can be rotated."""
    key = secret.encode() if isinstance(secret, str) else secret
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == SIGNATURE_VERSION:
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(key, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)
