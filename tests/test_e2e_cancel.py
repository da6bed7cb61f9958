"""THROTTLE_CANCEL_ON_DISCONNECT over real sockets: a client that leaves gives its slot back.

With a concurrency budget of 1, a client asks for a handler that sleeps 4 s
and leaves after 0.3 s. Without the option (the default) the handler runs on
and keeps the slot: the next request waits for it, about 3.7 s. With it, the
middleware cancels the handler when the client's ``http.disconnect`` arrives
and the next request is served at once. Under uvicorn, hypercorn and granian
(each delivers the disconnect to a running app), with the in-memory and the
Redis backend, for a streamed response (the slot comes back exactly once:
two requests never run at once afterwards), for a handler still reading its
body slowly (the watch never takes a message the app needs: a client that
stays gets its whole body read), for a body beyond the read-ahead buffer (the
app's own read meets the disconnect), for an HTTP/2 stream reset, and across
a SIGTERM (a shutdown is no disconnect: the running request finishes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.h2client import H2Client
from tests.support.redis_server import RedisServer
from tests.support.servers import HOST, AppServer, ServerKind, wait_until

pytestmark = pytest.mark.e2e

APP = "tests.apps.cancel:app"
LEAVE_AFTER_S = 0.3
HANDLER_S = 4.0
#: The next request, served with the option on: well before the handler would have ended.
SERVED_WITHIN_S = 1.5
SERVERS: tuple[ServerKind, ...] = ("uvicorn", "hypercorn", "granian")


def start(
    start_app_server: Callable[..., AppServer],
    server: ServerKind,
    cancel: bool | None,
    **env: str,
) -> AppServer:
    settings = {"THROTTLE_CONCURRENCY": "1", "THROTTLE_MAX_WAIT": "30", **env}
    if cancel is not None:
        settings["THROTTLE_CANCEL_ON_DISCONNECT"] = "true" if cancel else "false"
    return start_app_server(APP, server=server, env=settings, health_path="/_budget")


def leave(port: int, head: bytes, body: bytes = b"", after_s: float = LEAVE_AFTER_S) -> None:
    """Send a request, wait `after_s` (reading nothing, or the response's start), close."""
    with socket.create_connection((HOST, port)) as sock:
        sock.sendall(head + body)
        time.sleep(after_s)


def get_head(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()


def timed_get(server: AppServer, path: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(f"{server.url}{path}", timeout=30.0, trust_env=False)
    return response.status_code, time.monotonic() - started


def journal(server: AppServer) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = httpx.get(f"{server.url}/_journal", timeout=5.0).json()
    return entries


def events(server: AppServer, tag: str) -> list[str]:
    return [e["event"] for e in journal(server) if e["tag"] == tag]


def wait_free(server: AppServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{server.url}/_budget", timeout=5.0).json()
        if state["in_flight"] == 0 and state["waiting"] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"budget still {state} after {timeout_s} s")
        time.sleep(0.05)


def leave_then_next(server: AppServer, path: str) -> float:
    """A client leaves `path` after 0.3 s; how long the next request then waits for its slot."""
    leave(server.port, get_head(f"{path}&tag=left", server.port))
    # `read`: the app reads its (empty) body, which the watch has read and kept for it.
    status, elapsed = timed_get(server, "/slow?s=0&tag=next&read=1")
    assert status == 200
    return elapsed


@pytest.mark.parametrize("server", SERVERS)
def test_a_client_that_leaves_gives_its_slot_back_at_once(
    start_app_server: Callable[..., AppServer], server: ServerKind
) -> None:
    app = start(start_app_server, server, cancel=True)
    elapsed = leave_then_next(app, f"/slow?s={HANDLER_S}")
    assert elapsed < SERVED_WITHIN_S, f"{server}: the next request waited {elapsed:.2f} s"
    assert events(app, "left") == ["start", "cancelled"]
    wait_free(app)
    log = app.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("server", SERVERS)
def test_without_the_option_the_handler_keeps_its_slot(
    start_app_server: Callable[..., AppServer], server: ServerKind
) -> None:
    app = start(start_app_server, server, cancel=None)  # the default
    elapsed = leave_then_next(app, f"/slow?s={HANDLER_S}")
    assert elapsed > HANDLER_S - LEAVE_AFTER_S - 0.8, f"{server}: {elapsed:.2f} s"
    assert events(app, "left") == ["start", "end"]


def test_with_redis_the_lease_comes_back_at_once(
    start_app_server: Callable[..., AppServer], clean_redis_server: RedisServer
) -> None:
    app = start(start_app_server, "uvicorn", cancel=True, THROTTLE_REDIS_URL=clean_redis_server.url)
    elapsed = leave_then_next(app, f"/slow?s={HANDLER_S}")
    assert elapsed < SERVED_WITHIN_S, f"the next request waited {elapsed:.2f} s"
    assert events(app, "left") == ["start", "cancelled"]
    wait_free(app)


@pytest.mark.parametrize("server", SERVERS)
def test_observers_count_the_cancellation_and_the_slot_comes_back_once(
    start_app_server: Callable[..., AppServer], server: ServerKind
) -> None:
    """A streamed response left mid-stream: cancelled, its slot given back once only."""
    app = start_app_server(
        APP,
        server=server,
        env={
            "THROTTLE_CONCURRENCY": "1",
            "THROTTLE_CANCEL_ON_DISCONNECT": "true",
            "CANCEL_APP_OBSERVE": "1",
        },
        health_path="/_budget",
    )
    elapsed = leave_then_next(app, f"/stream?s={HANDLER_S}")
    assert elapsed < SERVED_WITHIN_S, f"{server}: the next request waited {elapsed:.2f} s"
    assert events(app, "left")[0] == "start"
    assert events(app, "left")[1] in ("stopped", "cancelled")
    wait_free(app)

    # Given back once: the budget of 1 still runs one request at a time.
    async def two() -> list[int]:
        async with httpx.AsyncClient(base_url=app.url, timeout=30.0, trust_env=False) as client:
            responses = await asyncio.gather(
                client.get("/slow?s=0.5&tag=one"), client.get("/slow?s=0.5&tag=two")
            )
        return [r.status_code for r in responses]

    assert asyncio.run(two()) == [200, 200]
    entries = journal(app)
    spans = {
        tag: [e["t"] for e in entries if e["tag"] == tag and e["event"] in ("start", "end")]
        for tag in ("one", "two")
    }
    first, second = sorted(spans.values())
    assert second[0] >= first[1] - 0.01, f"ran at once: {spans}"
    kinds = [e["event"] for e in entries if e["event"].startswith("throttle:")]
    assert kinds.count("throttle:cancelled") == 1, kinds
    log = app.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "without completing" not in log, log[-3000:]  # uvicorn's word for a cut response


def upload_head(port: int, size: int, s: float, tag: str) -> bytes:
    return (
        f"POST /upload?s={s}&tag={tag} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()


def send_chunked(
    port: int, pieces: int, piece: bytes, tag: str, leave_after_s: float | None
) -> int:
    """POST `pieces` pieces quickly (each its own TCP write), then leave or read the answer."""
    size = pieces * len(piece)
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(upload_head(port, size, 0.2, tag))
        for _ in range(pieces):
            sock.sendall(piece)
            time.sleep(0.01)
        if leave_after_s is not None:
            time.sleep(leave_after_s)
            return 0
        sock.settimeout(30.0)
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        return size


@pytest.mark.parametrize("cancel", [True, False], ids=["cancel", "default"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_handler_reading_its_body_slowly(
    start_app_server: Callable[..., AppServer], server: ServerKind, cancel: bool
) -> None:
    """Eight pieces read 0.2 s apart: a client that stays gets all of it read; one that leaves
    after 0.3 s (the handler still reading) has its handler cancelled, with the option."""
    app = start(start_app_server, server, cancel=cancel)
    piece = b"x" * 1024
    assert send_chunked(app.port, 8, piece, "stays", None) == 8 * 1024
    assert events(app, "stays") == ["start", "read", "end"]
    assert [e["size"] for e in journal(app) if e["tag"] == "stays" and e["event"] == "end"] == [
        8 * 1024
    ]
    send_chunked(app.port, 8, piece, "leaves", LEAVE_AFTER_S)
    status, elapsed = timed_get(app, "/slow?s=0&tag=next")
    assert status == 200
    if cancel:
        assert elapsed < SERVED_WITHIN_S - 0.5, f"{server}: the next request waited {elapsed:.2f} s"
        assert events(app, "leaves") == ["start", "cancelled"], journal(app)
    else:  # read on to the end (1.6 s), then 0.2 s more
        assert elapsed > 1.0, f"{server}: {elapsed:.2f} s"
        assert events(app, "leaves") == ["start", "read", "end"], journal(app)
    wait_free(app)


@pytest.mark.parametrize("server", SERVERS)
def test_a_body_beyond_the_buffer_that_never_ends(
    start_app_server: Callable[..., AppServer], server: ServerKind
) -> None:
    """The app reads the rest of a body itself (past THROTTLE_BODY_BUFFER) and its client
    leaves half-way: the app's own read meets the disconnect first, and the app's own
    handling of it (Starlette's ClientDisconnect, logged by the server as without the
    option) ends the request; its slot is back at once, nothing more is logged."""
    app = start(
        start_app_server, server, cancel=True, THROTTLE_BODY_BUFFER="1024", CANCEL_APP_OBSERVE="1"
    )
    with socket.create_connection((HOST, app.port)) as sock:
        sock.sendall(upload_head(app.port, 8 * 1024, HANDLER_S, "partial") + b"x" * 2048)
        time.sleep(LEAVE_AFTER_S)
    status, elapsed = timed_get(app, "/slow?s=0&tag=next")
    assert status == 200
    assert elapsed < SERVED_WITHIN_S, f"{server}: the next request waited {elapsed:.2f} s"
    assert events(app, "partial") == ["start", "raised"], journal(app)
    # Raised, not cancelled: the cancellation did not end it, so it is not counted.
    assert [e["event"] for e in journal(app)].count("throttle:cancelled") == 0
    wait_free(app)
    log = app.log_path.read_text()
    assert log.count("Traceback (most recent call last)") == 1, log[-3000:]
    assert "ClientDisconnect" in log
    assert "CancelledError" not in log, log[-3000:]


@pytest.mark.parametrize("server", SERVERS)
def test_sigterm_lets_running_requests_finish(
    start_app_server: Callable[..., AppServer], server: ServerKind
) -> None:
    """A shutdown is not a client leaving: the running request is not cancelled (its
    client stays), the queued one is turned away with 503, the server exits cleanly."""
    app = start(start_app_server, server, cancel=True)

    async def scenario() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=app.url, timeout=30.0, trust_env=False) as client:
            running = asyncio.create_task(client.get("/slow?s=1.5&tag=running"))
            await asyncio.sleep(0.3)
            queued = asyncio.create_task(client.get("/slow?s=0&tag=queued"))
            await asyncio.sleep(0.3)
            os.kill(app.pid, signal.SIGTERM)
            return (await running).status_code, (await queued).status_code

    assert asyncio.run(scenario()) == (200, 503)
    exited = wait_until(lambda: not app.is_running, timeout_s=15.0)
    log = app.log_path.read_text()
    assert exited, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
def test_an_http2_stream_reset_cancels_its_handler(
    start_app_server: Callable[..., AppServer], server: ServerKind
) -> None:
    """HTTP/2 (prior knowledge): the client resets its stream and the connection goes on."""
    app = start(start_app_server, server, cancel=True)

    async def scenario() -> tuple[int, float]:
        async with H2Client(HOST, app.port) as client:
            left = await client.get(f"/slow?s={HANDLER_S}&tag=left")
            await asyncio.sleep(LEAVE_AFTER_S)
            await client.reset(left)
            started = time.monotonic()
            after = await client.get("/slow?s=0&tag=next")
            stream = await client.response(after)
            return stream.status or 0, time.monotonic() - started

    status, elapsed = asyncio.run(scenario())
    assert status == 200
    assert elapsed < SERVED_WITHIN_S, f"{server}: the next request waited {elapsed:.2f} s"
    assert events(app, "left") == ["start", "cancelled"], journal(app)
    wait_free(app)
