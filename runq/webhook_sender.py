"""Sending webhook deliveries: a thread claims due ones, checks each URL again and POSTs it signed.

Deliveries are sent concurrently (an asyncio loop in the thread), at most ``per_host_max`` at
once to one receiver (scheme, host and port), so a receiver that never answers holds up only its
own deliveries. Before every attempt the host is resolved and checked again (DNS rebinding) and
the connection goes to the address checked; the body is signed with HMAC-SHA256
(``runq.webhooks``); a failed attempt is retried with exponential backoff and the delivery
dropped after the last one, with a warning. Delivery is at least once: receivers dedupe by
``Runq-Task-Id``. Nothing a receiver does can fail a task or stop the thread. The gateway runs
one sender per process (``runq.gateway.app``): it is there whenever tasks can be submitted, also
while the worker pool is at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from redis import Redis
from redis.exceptions import RedisError

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


class WebhookSender:
    """Sends due webhook deliveries from a background thread; ``start()`` then ``stop()``.

    Every ``poll_interval_s`` (at once while there is a backlog) it claims up to ``claim_max``
    due deliveries, as many as ``inflight_max`` leaves room for, and sends them concurrently, at
    most ``per_host_max`` at once to one receiver. Attempt n that fails (no 2xx answer within
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
        inflight_max: int = constants.WEBHOOK_INFLIGHT_MAX,
        per_host_max: int = constants.WEBHOOK_PER_HOST_MAX,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if not secret:
            raise ConfigError("webhooks need a non-empty webhook_secret to sign deliveries")
        if min(max_attempts, claim_max, inflight_max, per_host_max) < 1:
            raise ConfigError(
                "webhook max_attempts, claim_max, inflight_max and per_host_max must be at least 1"
            )
        self._secret = secret
        self._allow_private = allow_private
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        self._lease_s = lease_s
        self._claim_max = claim_max
        self._inflight_max = inflight_max
        self._per_host_max = per_host_max
        self._queue = DeliveryQueue(connection)
        # True: certificates are checked against the system's roots.
        self._verify = verify
        self._inflight: set[asyncio.Task[None]] = set()
        self._per_host: dict[str, int] = {}
        self._stopping = threading.Event()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="runq-webhooks", daemon=True)
        _quiet_http_logs()

    # lifecycle: start -> loop -> drain -> stop ----------------------------------------------

    @property
    def alive(self) -> bool:
        """The sending thread runs (it survives every receiver's and Redis's failures)."""
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops claiming, gives the deliveries in flight ``timeout_s`` to end, and hands back
        claimed ones not yet sent, due again at once. Bounded: a delivery still in flight then
        (several addresses tried) must not hold up the process's exit; its lease lapses and it
        is sent again later."""
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(wake.set)
        if self._thread.ident is not None:
            self._thread.join(timeout=self._timeout_s + 1.0)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = self._own_loop()
        self._wake = asyncio.Event()
        async with self._client() as client:
            wait_s = self._poll_interval_s
            while not await self._paused(wait_s):
                wait_s = await self._step(client)
            await self._drain()

    async def _paused(self, seconds: float) -> bool:
        """Waits ``seconds``, or until stop() or a delivery's end frees a slot; True: stop."""
        assert self._wake is not None
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
            self._wake.clear()
        return self._stopping.is_set()

    async def _step(self, client: httpx.AsyncClient) -> float:
        try:
            # A full claim means a backlog: the next pass comes at once.
            full = await self._claim_and_start(client) >= self._claim_max
            return 0 if full else self._poll_interval_s
        except RedisError as exc:
            # Once a second, not every poll, while Redis is unreachable.
            logger.warning("cannot claim due webhook deliveries: %s", exc)
        except Exception:
            # Anything else would end the thread silently, and every later delivery with it.
            logger.exception("sending webhook deliveries failed")
        return max(self._poll_interval_s, _ERROR_PAUSE_S)

    async def _drain(self) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self._timeout_s)
        for task in self._inflight:
            # Past its deadline: the lease lapses and the delivery is sent again (at least once).
            task.cancel()

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, with threads enough for every delivery in flight to resolve its
        host (getaddrinfo blocks) while Redis is still answered (asyncio's default has 6 on 2
        cores)."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            ThreadPoolExecutor(self._inflight_max + 2, thread_name_prefix="runq-webhooks")
        )
        return loop

    def _client(self) -> httpx.AsyncClient:
        # No keep-alive: every delivery connects afresh to the address it checked (a pooled
        # connection could carry another host's TLS session). No proxies from the environment:
        # they would connect to whatever the URL names, unchecked. Concurrency is bounded by
        # the sender, not the pool.
        return httpx.AsyncClient(
            timeout=self._timeout_s,
            follow_redirects=False,
            trust_env=False,
            verify=self._verify,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            headers={"User-Agent": "runq-webhooks"},
        )

    # one pass -------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One pass, waited out: claims the due deliveries, sends them and returns how many were
        claimed (sent or handed back). Raises only if the claim itself fails (Redis)."""

        async def once() -> int:
            self._own_loop()
            async with self._client() as client:
                claimed = await self._claim_and_start(client)
                if self._inflight:
                    await asyncio.wait(self._inflight)
                return claimed

        return asyncio.run(once())

    async def _claim_and_start(self, client: httpx.AsyncClient) -> int:
        """Claims what the free slots allow and starts sending; returns how many were claimed."""
        room = min(self._claim_max, self._inflight_max - len(self._inflight))
        if room < 1:
            return 0
        deliveries = await asyncio.to_thread(self._queue.claim, self._lease_s, room)
        for delivery in deliveries:
            origin = _origin_of(delivery.url)
            if self._stopping.is_set():
                await self._hand_back(delivery, 0)
            elif self._per_host.get(origin, 0) >= self._per_host_max:
                # Held here it would take a slot others could use; one of its receiver's slots
                # frees within timeout_s.
                await self._hand_back(delivery, self._timeout_s)
            else:
                self._per_host[origin] = self._per_host.get(origin, 0) + 1
                task = asyncio.create_task(self._deliver(client, delivery))
                self._inflight.add(task)
                task.add_done_callback(functools.partial(self._ended, origin=origin))
        return len(deliveries)

    def _ended(self, task: asyncio.Task[None], origin: str) -> None:
        self._inflight.discard(task)
        left = self._per_host[origin] - 1
        if left:
            self._per_host[origin] = left
        else:
            del self._per_host[origin]
        if self._wake is not None:
            self._wake.set()

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        host = _host_of(delivery.url)
        try:
            if delivery.attempt > self._max_attempts:
                # Claimed again after its last attempt was cut short (a sender died mid-send).
                await self._drop(delivery, host, f"no attempts left ({self._max_attempts} made)")
                return
            try:
                failure = await self._post(client, delivery)
            except _Refused as exc:
                await self._drop(delivery, host, str(exc))
                return
            if failure is None:
                await asyncio.to_thread(self._queue.done, delivery)
                logger.info(
                    "webhook for task %s delivered to %s (attempt %d)",
                    delivery.task_id,
                    host,
                    delivery.attempt,
                )
            elif delivery.attempt >= self._max_attempts:
                await self._drop(
                    delivery, host, f"{delivery.attempt} attempts failed, the last: {failure}"
                )
            else:
                delay_s = self.backoff(delivery.attempt)
                await asyncio.to_thread(self._queue.retry_in, delivery, delay_s)
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

    async def _post(self, client: httpx.AsyncClient, delivery: Delivery) -> str | None:
        """One attempt; None when answered 2xx, else what went wrong. Raises _Refused."""
        try:
            url = parse_url(delivery.url)
            addresses = await asyncio.to_thread(
                checked_addresses, url, allow_private=self._allow_private
            )
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
            request = client.build_request(
                "POST",
                target,
                content=delivery.body,
                headers=headers,
                # TLS checks the certificate against the URL's host name, not the address.
                extensions={"sni_hostname": url.raw_host.decode("ascii")},
            )
            try:
                status = await self._send(client, request)
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

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request) -> int:
        """The answer's status. The whole request is bounded by ``timeout_s``: httpx's timeout
        bounds each connect, read and write, so a receiver trickling its answer a byte at a time
        could otherwise hold the delivery for hours."""
        connected = False

        async def trace(event: str, _info: dict[str, Any]) -> None:
            nonlocal connected
            connected = connected or event == "connection.connect_tcp.complete"

        request.extensions["trace"] = trace
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await client.send(request, stream=True)
                # The answer's body is never read: only the status counts.
                await response.aclose()
                return response.status_code
        except TimeoutError:
            if connected:
                raise _TimedOut from None
            raise httpx.ConnectTimeout("connect timed out", request=request) from None
        except httpx.TimeoutException as exc:
            # A connect timeout is the address's fault (the next one is tried); any other
            # timeout is the receiver's.
            if isinstance(exc, httpx.ConnectTimeout):
                raise
            raise _TimedOut from None

    async def _drop(self, delivery: Delivery, host: str, why: str) -> None:
        await asyncio.to_thread(self._queue.done, delivery)
        logger.warning("webhook for task %s to %s dropped: %s", delivery.task_id, host, why)

    async def _hand_back(self, delivery: Delivery, delay_s: float) -> None:
        """Due again in ``delay_s``, its claimed attempt not counted (it was never made)."""
        with contextlib.suppress(RedisError):
            await asyncio.to_thread(self._queue.retry_in, delivery, delay_s, attempted=False)


class _TimedOut(Exception):
    pass


def _host_of(url: str) -> str:
    """The URL's host, for logs: never its path or query, which may hold a token."""
    try:
        return httpx.URL(url).host or "?"
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return "?"


def _origin_of(url: str) -> str:
    """Whom a delivery goes to, for the per-receiver bound: scheme, host and port."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return "?"
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _quiet_http_logs() -> None:
    """httpx logs every request's full URL at INFO; a webhook URL's path and query may hold a
    token, so only its warnings pass (runq's own lines name the host alone)."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _reason(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__
