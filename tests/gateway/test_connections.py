"""What a gateway process holds for connections that have no request under way yet: half-open
ones, slow or huge headers, more connections than it may keep open."""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from redis import Redis

from runq.gateway.connections import FD_HEADROOM, raise_open_files_limit
from runq.queue import constants
from tests.helpers import (
    GATEWAY_ENV,
    Proc,
    clear_function,
    hanging_request,
    http_request,
    open_files_limit,
    start_gateway,
    wait_until,
)

HALF_OPEN = 2000
# A common default soft limit on open files.
LOW_OPEN_FILES = 1024
# Far fewer than HALF_OPEN: the half-open connections are the ones closed to make room.
CAP = 20


@pytest.fixture(scope="module")
def guarded(procs: Callable[..., Proc]) -> str:
    """A gateway process with a short header deadline and room for few connections."""
    env = {**GATEWAY_ENV, "RUNQ_HEADER_TIMEOUT_S": "0.5", "RUNQ_MAX_CONNECTIONS": str(CAP)}
    return start_gateway(procs, env=env)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def half_open(url: str) -> socket.socket:
    return hanging_request(url, b"GET /hea")


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_thousands_of_half_open_connections_leave_room_for_a_normal_client(
    guarded: str, sockets: list[socket.socket]
) -> None:
    # The test holds its own end of every connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < HALF_OPEN + FD_HEADROOM:
        pytest.skip(f"ulimit -n is {hard}: too low to open {HALF_OPEN} connections")
    sockets.extend(half_open(guarded) for _ in range(HALF_OPEN))
    started = time.monotonic()
    response = httpx.get(f"{guarded}/healthz", timeout=5)
    assert time.monotonic() - started < 1
    assert response.status_code == 200


def test_a_gateway_started_with_a_low_open_files_limit_serves_past_it(
    procs: Callable[..., Proc], sockets: list[socket.socket]
) -> None:
    # Under max_connections (4096), so none is closed: the gateway's own limit must allow them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < HALF_OPEN + FD_HEADROOM:
        pytest.skip(f"ulimit -n is {hard}: too low to open {HALF_OPEN} connections")
    # As a login shell often starts it; the kernel resets connections past the limit.
    with open_files_limit(LOW_OPEN_FILES):
        url = start_gateway(procs, env=GATEWAY_ENV)
    sockets.extend(half_open(url) for _ in range(HALF_OPEN))
    started = time.monotonic()
    response = httpx.get(f"{url}/healthz", timeout=5)
    assert time.monotonic() - started < 1
    assert response.status_code == 200


def test_the_gateway_raises_its_open_files_limit_to_what_max_connections_needs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < LOW_OPEN_FILES + FD_HEADROOM:
        pytest.skip(f"ulimit -n is {hard}")
    with open_files_limit(LOW_OPEN_FILES):
        raise_open_files_limit(LOW_OPEN_FILES)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == LOW_OPEN_FILES + FD_HEADROOM
    if hard != resource.RLIM_INFINITY:
        with open_files_limit(LOW_OPEN_FILES):
            raise_open_files_limit(hard)
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert "fewer than max_connections" in caplog.text


def test_a_header_over_max_header_bytes_is_431(client: httpx.Client) -> None:
    # 64 KiB is the default max_header_bytes.
    response = client.get("/healthz", headers={"X-Pad": "a" * (64 * 1024)})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert client.get("/healthz", headers={"X-Pad": "a" * (60 * 1024)}).status_code == 200


def test_headers_that_grow_past_max_header_bytes_without_an_end_are_431(
    gateway: str, sockets: list[socket.socket]
) -> None:
    sockets.append(hanging_request(gateway, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 70_000))
    sockets[0].settimeout(5)
    assert sockets[0].recv(4096).startswith(b"HTTP/1.1 431 ")


def test_a_connection_that_does_not_finish_its_headers_in_time_is_closed(
    guarded: str, sockets: list[socket.socket]
) -> None:
    sockets.append(hanging_request(guarded, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))
    # header_timeout_s is 0.5 s here.
    assert closed_by_peer(sockets[0], 3)


def test_past_max_connections_the_longest_idle_is_closed_for_a_newcomer(
    guarded: str, sockets: list[socket.socket]
) -> None:
    sockets.extend(half_open(guarded) for _ in range(2 * CAP))
    response = httpx.get(f"{guarded}/healthz", timeout=5)
    assert response.status_code == 200
    assert closed_by_peer(sockets[0], 0.2)


def test_past_max_connections_all_under_way_a_newcomer_is_503(
    guarded: str, client: httpx.Client, redis: Redis, sockets: list[socket.socket]
) -> None:
    clear_function(redis, "parked")
    tasks = [
        client.post("/v1/functions/parked/tasks", json={"input": i}).json()["id"]
        for i in range(CAP)
    ]
    for task_id in tasks:
        request = http_request("GET", f"/v1/tasks/{task_id}/result?wait=5")
        sockets.append(hanging_request(guarded, request))
    channels = [constants.task_channel(task_id) for task_id in tasks]
    wait_until(
        lambda: all(count for _, count in redis.pubsub_numsub(*channels)),
        what="every waiter to be under way",
    )
    refused = httpx.get(f"{guarded}/healthz", timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    clear_function(redis, "parked")
