"""Webhooks: a signed POST of the task JSON to the URL a task was submitted with, once it ends.

- **Submit** (gateway): ``check_url`` refuses anything but a public http(s) URL without
  credentials; every address its host resolves to must be public (SSRF), unless the server
  allows private ones (``webhook_allow_private``).
- **Record** (worker): ``enqueue`` adds the delivery inside the transaction that records the
  task's outcome, so a recorded outcome always has its delivery and an unrecorded one none.
- **Send** (``WebhookSender``, a thread in each worker): claims due deliveries atomically, resolves
  and checks the host again (DNS rebinding) and connects to the address it checked, POSTs the
  body signed with HMAC-SHA256, retries with exponential backoff and drops the delivery after
  the last attempt with a warning. Delivery is at least once: receivers dedupe by
  ``Runq-Task-Id``. Nothing a receiver does can fail a task or stop the thread.

Signature header: ``Runq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``;
receivers check it with ``verify``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from runq.errors import ConfigError, ValidationFailed
from runq.queue import constants as k

logger = logging.getLogger("runq.webhooks")

SIGNATURE_HEADER = "Runq-Signature"
TASK_ID_HEADER = "Runq-Task-Id"
DELIVERY_HEADER = "Runq-Delivery"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
URL_MAX_CHARS = 2048
# How long the sender waits after a pass that failed (Redis unreachable) before the next one.
_ERROR_PAUSE_S = 1.0
# Addresses tried per attempt when a host resolves to several and the first ones refuse.
_ADDRESSES_TRIED_MAX = 3

# Server time in epoch seconds: due times are read against the Redis server's clock, so senders
# on hosts whose clocks disagree still agree on them.
_SERVER_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# A new delivery, due now. Runs inside the caller's MULTI (the worker's record transaction).
# KEYS[1] delivery hash, KEYS[2] due set; ARGV[1] url, ARGV[2] body, ARGV[3] TTL s, ARGV[4] task id
_ENQUEUE = (
    _SERVER_NOW
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'url', ARGV[1], 'body', ARGV[2], 'attempts', 0)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], server_now(), ARGV[4])
return 1
"""
)

# Claims due deliveries: counts the attempt and pushes the due time ARGV[1] s ahead (a lease), so
# no other sender takes them meanwhile. Ids whose hash has expired are dropped from the set.
# KEYS[1] due set; ARGV[1] lease s, ARGV[2] most to claim, ARGV[3] delivery hash prefix
# Returns {{task id, url, body, attempt}, ...}
_CLAIM = (
    _SERVER_NOW
    + """
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(due) do
  local key = ARGV[3] .. id
  local delivery = redis.call('HMGET', key, 'url', 'body')
  if delivery[1] and delivery[2] then
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    claimed[#claimed + 1] = {id, delivery[1], delivery[2], attempt}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""
)

# Makes a claimed delivery due again ARGV[2] s from now; ARGV[3] '1': the claimed attempt was
# never made (the sender is stopping), so it is not counted. XX: a delivery another sender has
# finished meanwhile is not brought back.
# KEYS[1] due set, KEYS[2] delivery hash; ARGV[1] task id, ARGV[2] delay s, ARGV[3] '1' or '0'
_RESCHEDULE = (
    _SERVER_NOW
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[2], 'attempts', -1)
end
redis.call('ZADD', KEYS[1], 'XX', server_now() + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)


# URL checks ----------------------------------------------------------------------------------


class _Unresolvable(ValidationFailed):
    """The host does not resolve now; at delivery time this is worth a retry, unlike a refusal."""


def check_url(url: str, *, allow_private: bool) -> str:
    """Validates a webhook URL at submit time; returns it. Raises ValidationFailed (422).

    Only http and https, a host, no credentials; every address the host resolves to must be
    public: private, loopback, link-local, multicast, reserved and unspecified addresses (IPv4,
    IPv6 and IPv4 inside IPv6) are refused unless ``allow_private``. The sender checks again
    before every attempt, as DNS may answer differently by then.
    """
    parsed = _parse(url)
    _checked_addresses(parsed, allow_private=allow_private)
    return url


def _parse(url: str) -> httpx.URL:
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


def _checked_addresses(url: httpx.URL, *, allow_private: bool) -> list[str]:
    """The addresses the URL's host resolves to, in resolver order, all of them allowed."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _Unresolvable(f"webhook host {host!r} cannot be resolved") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise _Unresolvable(f"webhook host {host!r} cannot be resolved")
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


# Queueing ------------------------------------------------------------------------------------


def enqueue(pipe: Pipeline, task_id: str, url: str, body: bytes) -> None:
    """Adds a delivery of ``body`` to ``url``, due now, as one command in ``pipe``.

    Called inside the transaction that records the task's outcome, it is written with it or not
    at all. The URL is the one ``check_url`` accepted at submit; the sender checks it again.
    """
    pipe.eval(
        _ENQUEUE,
        2,
        k.webhook_key(task_id),
        k.WEBHOOKS_DUE_KEY,
        url,
        body,
        k.WEBHOOK_TTL_S,
        task_id,
    )


# Sending -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Delivery:
    task_id: str
    url: str
    body: bytes
    attempt: int

    @classmethod
    def from_reply(cls, row: Sequence[Any]) -> _Delivery:
        task_id, url, body, attempt = row
        return cls(_text(task_id), _text(url), _bytes(body), int(attempt))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class _Refused(Exception):
    """The delivery must not be attempted again (its URL is refused now)."""


class _Deadline:
    """Bounds a whole request: httpx's timeout bounds each connect, read and write, so a
    receiver trickling its answer a byte at a time could otherwise hold the sender for hours.
    The request's socket is shut down when the time is up, which ends the request with an
    error."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds
        self._timer: threading.Timer | None = None
        self.passed = False

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        sock = info["return_value"].get_extra_info("socket")
        if isinstance(sock, socket.socket):
            self._timer = threading.Timer(max(self._at - time.monotonic(), 0.0), self._end, [sock])
            self._timer.daemon = True
            self._timer.start()

    def _end(self, sock: socket.socket) -> None:
        self.passed = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class WebhookSender:
    """Sends due webhook deliveries from a background thread; ``start()`` then ``stop()``.

    Every ``poll_interval_s`` (at once while there is a backlog) it claims up to ``claim_max``
    due deliveries and sends them one after another. Attempt n that fails (no 2xx answer within
    ``timeout_s``, redirects not followed) is retried ``backoff_s * 2**(n-1)`` s later, at most
    ``max_backoff_s``; after ``max_attempts`` the delivery is dropped with a warning naming the
    task and the URL's host (never its path or the body). A URL whose host now resolves to a
    refused address is dropped at once. The thread logs every error and goes on.
    """

    def __init__(
        self,
        connection: Redis,
        secret: bytes,
        *,
        allow_private: bool,
        backoff_s: float = k.WEBHOOK_BACKOFF_S,
        max_backoff_s: float = k.WEBHOOK_BACKOFF_MAX_S,
        max_attempts: int = k.WEBHOOK_MAX_ATTEMPTS,
        timeout_s: float = k.WEBHOOK_TIMEOUT_S,
        poll_interval_s: float = k.WEBHOOK_POLL_INTERVAL_S,
        lease_s: float = k.WEBHOOK_LEASE_S,
        claim_max: int = k.WEBHOOK_CLAIM_MAX,
    ) -> None:
        if not secret:
            raise ConfigError("webhooks need a non-empty webhook_secret to sign deliveries")
        if max_attempts < 1 or claim_max < 1:
            raise ConfigError("webhook max_attempts and claim_max must be at least 1")
        self._connection = connection
        self._secret = secret
        self._allow_private = allow_private
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        self._lease_s = lease_s
        self._claim_max = claim_max
        self._claim = connection.register_script(_CLAIM)
        self._reschedule = connection.register_script(_RESCHEDULE)
        # No keep-alive: every delivery connects afresh to the address it checked (a pooled
        # connection could carry another host's TLS session). No proxies from the environment:
        # they would connect to whatever the URL names, unchecked.
        self._client = httpx.Client(
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": "runq-webhooks"},
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runq-webhooks", daemon=True)

    # lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops after the delivery in hand; claimed ones not yet sent are due again at once."""
        self._stopping.set()
        if self._thread.ident is not None:
            # A send stuck past its deadline must not hold up the worker's exit.
            self._thread.join(timeout=self._timeout_s + 1.0)
        if not self._thread.is_alive():
            self._client.close()

    def _loop(self) -> None:
        pause_s = self._poll_interval_s
        while not self._stopping.wait(pause_s):
            try:
                # A full claim means a backlog: the next pass comes at once.
                full = self.run_once() >= self._claim_max
                pause_s = 0 if full else self._poll_interval_s
            except RedisError as exc:
                # Once a second, not every poll, while Redis is unreachable.
                pause_s = max(self._poll_interval_s, _ERROR_PAUSE_S)
                logger.warning("cannot claim due webhook deliveries: %s", exc)
            except Exception:
                # Anything else would end the thread silently, and every later delivery with it.
                pause_s = max(self._poll_interval_s, _ERROR_PAUSE_S)
                logger.exception("sending webhook deliveries failed")

    # one pass -------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claims the due deliveries and sends them; returns how many were claimed.

        Raises only if the claim itself fails (Redis); a delivery's failure is handled here.
        """
        rows = self._claim(
            keys=[k.WEBHOOKS_DUE_KEY],
            args=[self._lease_s, self._claim_max, k.WEBHOOK_PREFIX],
        )
        deliveries = [_Delivery.from_reply(row) for row in rows]
        for index, delivery in enumerate(deliveries):
            if self._stopping.is_set():
                self._release(deliveries[index:])
                break
            self._deliver(delivery)
        return len(deliveries)

    def _deliver(self, delivery: _Delivery) -> None:
        host = _host_of(delivery.url)
        try:
            if delivery.attempt > self._max_attempts:
                # Claimed again after its last attempt was cut short (a sender died mid-send).
                self._drop(delivery, host, f"no attempts left ({self._max_attempts} made)")
                return
            try:
                failure = self._post(delivery)
            except _Refused as exc:
                self._drop(delivery, host, str(exc))
                return
            if failure is None:
                self._done(delivery)
                logger.info(
                    "webhook for task %s delivered to %s (attempt %d)",
                    delivery.task_id,
                    host,
                    delivery.attempt,
                )
            elif delivery.attempt >= self._max_attempts:
                self._drop(
                    delivery, host, f"{delivery.attempt} attempts failed, the last: {failure}"
                )
            else:
                delay_s = self.backoff(delivery.attempt)
                self._reschedule(
                    keys=[k.WEBHOOKS_DUE_KEY, k.webhook_key(delivery.task_id)],
                    args=[delivery.task_id, delay_s, "0"],
                )
                logger.info(
                    "webhook for task %s to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    delivery.task_id,
                    host,
                    delivery.attempt,
                    self._max_attempts,
                    failure,
                    delay_s,
                )
        except RedisError as exc:
            # The lease lapses and the delivery is claimed again: at least once, maybe twice.
            logger.warning(
                "webhook for task %s to %s: cannot record the attempt: %s",
                delivery.task_id,
                host,
                exc,
            )
        except Exception:
            logger.exception("webhook for task %s to %s failed", delivery.task_id, host)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s))

    def _post(self, delivery: _Delivery) -> str | None:
        """One attempt; None when answered 2xx, else what went wrong. Raises _Refused."""
        try:
            url = _parse(delivery.url)
            addresses = _checked_addresses(url, allow_private=self._allow_private)
        except _Unresolvable as exc:
            return exc.message
        except ValidationFailed as exc:
            raise _Refused(exc.message) from None
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self._secret, timestamp, delivery.body),
            TASK_ID_HEADER: delivery.task_id,
            DELIVERY_HEADER: str(delivery.attempt),
            # The name the URL gave, while the connection goes to the address checked above.
            "Host": url.netloc.decode("ascii"),
        }
        failure = "no address to connect to"
        for address in addresses[:_ADDRESSES_TRIED_MAX]:
            # A scoped IPv6 address (fe80::1%eth0; allowed only with allow_private) cannot be
            # written into a URL: that one is left to httpx to resolve.
            target = url if "%" in address else url.copy_with(host=address)
            try:
                status = self._send(target, url.raw_host.decode("ascii"), headers, delivery.body)
            except httpx.ConnectError as exc:
                failure = f"cannot connect to {address}: {_reason(exc)}"
                continue
            except httpx.ConnectTimeout:
                failure = f"cannot connect to {address} within {self._timeout_s:g} s"
                continue
            except _TimedOut:
                return f"no answer within {self._timeout_s:g} s"
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {_reason(exc)}"
            return None if 200 <= status < 300 else f"answered HTTP {status}"
        return failure

    def _send(
        self, target: httpx.URL, server_name: str, headers: dict[str, str], body: bytes
    ) -> int:
        deadline = _Deadline(self._timeout_s)
        try:
            with self._client.stream(
                "POST",
                target,
                content=body,
                headers=headers,
                # TLS checks the certificate against the URL's host name, not the address.
                extensions={"sni_hostname": server_name, "trace": deadline.trace},
            ) as response:
                # The answer's body is never read: only the status counts.
                return response.status_code
        except httpx.HTTPError as exc:
            # A connect timeout is the address's fault (the next one is tried); any other
            # timeout, or the socket shut at the deadline, is the receiver's.
            late = isinstance(exc, httpx.TimeoutException) and not isinstance(
                exc, httpx.ConnectTimeout
            )
            if deadline.passed or late:
                raise _TimedOut from None
            raise
        finally:
            deadline.cancel()

    def _done(self, delivery: _Delivery) -> None:
        with self._connection.pipeline() as pipe:
            pipe.delete(k.webhook_key(delivery.task_id))
            pipe.zrem(k.WEBHOOKS_DUE_KEY, delivery.task_id)
            pipe.execute()

    def _drop(self, delivery: _Delivery, host: str, why: str) -> None:
        self._done(delivery)
        logger.warning("webhook for task %s to %s dropped: %s", delivery.task_id, host, why)

    def _release(self, deliveries: list[_Delivery]) -> None:
        for delivery in deliveries:
            with contextlib.suppress(RedisError):
                self._reschedule(
                    keys=[k.WEBHOOKS_DUE_KEY, k.webhook_key(delivery.task_id)],
                    args=[delivery.task_id, 0, "1"],
                )


class _TimedOut(Exception):
    pass


def _host_of(url: str) -> str:
    """The URL's host, for logs: never its path or query, which may hold a token."""
    try:
        return httpx.URL(url).host or "?"
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return "?"


def _reason(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__
