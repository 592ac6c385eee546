"""Sending webhook deliveries: a thread claims due ones, checks each URL again and POSTs it signed.

Before every attempt the host is resolved and checked again (DNS rebinding) and the connection
goes to the address checked; the body is signed with HMAC-SHA256 (``runq.webhooks``); a failed
attempt is retried with exponential backoff and the delivery dropped after the last one, with a
warning. Delivery is at least once: receivers dedupe by ``Runq-Task-Id``. Nothing a receiver does
can fail a task or stop the thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

import httpx
from redis import Redis
from redis.exceptions import RedisError

from runq.background import BackgroundLoop
from runq.errors import ConfigError, ValidationFailed
from runq.queue import constants
from runq.queue.webhooks import Delivery, DeliveryQueue
from runq.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TASK_ID_HEADER,
    Unresolvable,
    checked_addresses,
    parse_url,
    signature_header,
)

logger = logging.getLogger("runq.webhooks")

# How long the sender waits after a pass that failed (Redis unreachable) before the next one.
_ERROR_PAUSE_S = 1.0
# Addresses tried per attempt when a host resolves to several and the first ones refuse.
_ADDRESSES_TRIED_MAX = 3


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
        backoff_s: float = constants.WEBHOOK_BACKOFF_S,
        max_backoff_s: float = constants.WEBHOOK_BACKOFF_MAX_S,
        max_attempts: int = constants.WEBHOOK_MAX_ATTEMPTS,
        timeout_s: float = constants.WEBHOOK_TIMEOUT_S,
        poll_interval_s: float = constants.WEBHOOK_POLL_INTERVAL_S,
        lease_s: float = constants.WEBHOOK_LEASE_S,
        claim_max: int = constants.WEBHOOK_CLAIM_MAX,
    ) -> None:
        if not secret:
            raise ConfigError("webhooks need a non-empty webhook_secret to sign deliveries")
        if max_attempts < 1 or claim_max < 1:
            raise ConfigError("webhook max_attempts and claim_max must be at least 1")
        self._secret = secret
        self._allow_private = allow_private
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        self._lease_s = lease_s
        self._claim_max = claim_max
        self._queue = DeliveryQueue(connection)
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
        self._loop = BackgroundLoop("runq-webhooks", self._step, first_wait_s=poll_interval_s)

    # lifecycle ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The sending thread runs (it survives every receiver's and Redis's failures)."""
        return self._loop.alive

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """Stops after the delivery in hand; claimed ones not yet sent are due again at once."""
        # A send stuck past its deadline must not hold up the worker's exit.
        if self._loop.stop(timeout_s=self._timeout_s + 1.0):
            self._client.close()

    def _step(self) -> float:
        try:
            # A full claim means a backlog: the next pass comes at once.
            full = self.run_once() >= self._claim_max
            return 0 if full else self._poll_interval_s
        except RedisError as exc:
            # Once a second, not every poll, while Redis is unreachable.
            logger.warning("cannot claim due webhook deliveries: %s", exc)
        except Exception:
            # Anything else would end the thread silently, and every later delivery with it.
            logger.exception("sending webhook deliveries failed")
        return max(self._poll_interval_s, _ERROR_PAUSE_S)

    # one pass -------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claims the due deliveries and sends them; returns how many were claimed.

        Raises only if the claim itself fails (Redis); a delivery's failure is handled here.
        """
        deliveries = self._queue.claim(self._lease_s, self._claim_max)
        for index, delivery in enumerate(deliveries):
            if self._loop.stopping:
                self._release(deliveries[index:])
                break
            self._deliver(delivery)
        return len(deliveries)

    def _deliver(self, delivery: Delivery) -> None:
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
                self._queue.done(delivery)
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
                self._queue.retry_in(delivery, delay_s)
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

    def _post(self, delivery: Delivery) -> str | None:
        """One attempt; None when answered 2xx, else what went wrong. Raises _Refused."""
        try:
            url = parse_url(delivery.url)
            addresses = checked_addresses(url, allow_private=self._allow_private)
        except Unresolvable as exc:
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

    def _drop(self, delivery: Delivery, host: str, why: str) -> None:
        self._queue.done(delivery)
        logger.warning("webhook for task %s to %s dropped: %s", delivery.task_id, host, why)

    def _release(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            with contextlib.suppress(RedisError):
                self._queue.retry_in(delivery, 0, attempted=False)


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
