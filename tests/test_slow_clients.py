"""Slow clients do not hold the budget (guarantee 15), in-process and exact.

A hand-driven ASGI server stands in for uvicorn: the test decides when each
body chunk arrives and when a `send` returns, so read-ahead, the receive
timeout, the process-wide buffer and the client hold are checked step by step.
The same behaviour over real sockets is in tests/test_e2e_slow_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from throttle_mw import ThrottleEvent, ThrottleMiddleware
from throttle_mw.asgi.body import BodyBuffers
from throttle_mw.backends import MemoryBackend
from throttle_mw.settings import ConfigError, Settings

App = Callable[[Scope, Receive, Send], Awaitable[None]]


pytestmark = pytest.mark.usefixtures("clean_env")


class Conn:
    """One request on a hand-driven server: `feed` body chunks, `sent` what came back."""

    def __init__(self, method: str = "GET", length: int | None = None) -> None:
        headers = [(b"host", b"test"), (b"x-tenant-id", b"acme")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": "/",
            "raw_path": b"/",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
        }
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: list[Message] = []
        self.reads = 0
        #: While clear, a body chunk with more to come waits in `send` (back-pressure).
        self.writable = asyncio.Event()
        self.writable.set()
        if length is None:
            self.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})

    def feed(self, chunk: bytes, more: bool = True) -> None:
        self.inbox.put_nowait({"type": "http.request", "body": chunk, "more_body": more})

    def leave(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})

    async def receive(self) -> Message:
        self.reads += 1
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("more_body"):
            await self.writable.wait()
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return int(starts[0]["status"]) if starts else None

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"]).get(name)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def run(self, app: App) -> asyncio.Task[None]:
        return asyncio.ensure_future(app(self.scope, self.receive, self.send))


async def read_all(receive: Receive) -> list[Message]:
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


async def respond(send: Send, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def make(
    app: App, observers: list[Any] | None = None, **settings: Any
) -> tuple[ThrottleMiddleware, MemoryBackend]:
    merged = {"concurrency": 1, **settings}
    parsed = Settings.from_env(**merged)
    backend = MemoryBackend(parsed.limits(), parsed.policy())
    middleware = ThrottleMiddleware(app, backend=backend, observers=observers or (), **merged)
    return middleware, backend


async def in_flight(backend: MemoryBackend) -> int:
    return (await backend.snapshot()).in_flight


async def until_given_back(backend: MemoryBackend, within_s: float = 5.0) -> None:
    """Until nothing is in flight (the hold gave the slot back), `within_s` at most."""
    deadline = asyncio.get_running_loop().time() + within_s
    while await in_flight(backend) != 0:
        assert asyncio.get_running_loop().time() < deadline, "the slot was not given back"
        await asyncio.sleep(0.01)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# --- the hot path is untouched -------------------------------------------------------------


@pytest.mark.anyio
async def test_a_request_without_a_body_gets_the_servers_own_receive() -> None:
    seen: list[Receive] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(receive)
        await respond(send)

    middleware, _ = make(app)
    conn = Conn()
    await conn.run(middleware)
    assert seen == [conn.receive]  # no wrapper, no read ahead
    assert conn.reads == 0
    assert conn.status == 200


# --- read ahead ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "version", "reads_ahead"),
    [
        ([(b"content-length", b"3"), (b"x-tenant-id", b"acme")], "1.1", True),
        ([(b"x-tenant-id", b"acme"), (b"content-length", b"3")], "1.1", True),
        ([(b"content-length", b"0"), (b"transfer-encoding", b"chunked")], "1.1", False),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"0")], "1.1", True),
        ([(b"x-tenant-id", b"acme")], "1.1", False),
        ([(b"x-tenant-id", b"acme")], "2", True),  # HTTP/2 need not announce a body
        ([(b"content-length", b" 0 "), (b"x-tenant-id", b"acme")], "2", False),
    ],
)
async def test_one_pass_over_the_headers_finds_the_tenant_and_the_body(
    headers: list[tuple[bytes, bytes]], version: str, reads_ahead: bool
) -> None:
    # The first Content-Length or Transfer-Encoding decides, wherever the tenant is.
    seen: list[tuple[int, str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((conn.reads, scope["state"]["throttle"].tenant))
        await read_all(receive)
        await respond(send)

    middleware, _ = make(app)
    conn = Conn("POST")
    conn.scope["headers"] = headers
    conn.scope["http_version"] = version
    await conn.run(middleware)
    assert conn.status == 200
    named = (b"x-tenant-id", b"acme") in headers
    assert seen == [(1 if reads_ahead else 0, "acme" if named else "ip:127.0.0.1")]


@pytest.mark.anyio
async def test_a_body_arrives_before_its_request_asks_for_budget() -> None:
    received: list[list[Message]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.append(await read_all(receive))
        await respond(send)

    middleware, backend = make(app)
    upload = Conn("POST", length=6)
    task = upload.run(middleware)
    upload.feed(b"abc")
    await settle()
    assert await in_flight(backend) == 0  # half a body: not admitted, holds nothing

    get = Conn()  # meanwhile the single slot serves someone else at once
    await get.run(middleware)
    assert get.status == 200
    assert received == [[{"type": "http.request", "body": b"", "more_body": False}]]

    upload.feed(b"def", more=False)
    await task
    assert upload.status == 200
    assert received[1] == [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.request", "body": b"def", "more_body": False},
    ]
    assert middleware.body_buffers.used_bytes == 0
    assert middleware.body_buffers.peak_bytes == 6
    assert await in_flight(backend) == 0


@pytest.mark.anyio
async def test_a_body_past_the_receive_timeout_gets_a_clean_408(
    caplog: pytest.LogCaptureFixture,
) -> None:
    called: list[bool] = []
    events: list[ThrottleEvent] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(True)
        await respond(send)

    middleware, backend = make(app, receive_timeout_s=0.05, observers=[events.append])
    upload = Conn("POST", length=1000)
    upload.feed(b"x" * 10)
    with caplog.at_level(logging.INFO, logger="throttle_mw"):
        await upload.run(middleware)
    assert called == []
    assert upload.status == 408
    assert upload.header(b"content-type") == b"application/problem+json"
    assert upload.header(b"connection") == b"close"
    problem = json.loads(upload.body())
    assert problem["status"] == 408
    assert problem["reason"] == "body_timeout"
    assert [(e.kind, e.status, e.reason) for e in events] == [("rejected", 408, "body_timeout")]
    assert "THROTTLE_RECEIVE_TIMEOUT" in caplog.text
    assert middleware.body_buffers.used_bytes == 0
    assert await in_flight(backend) == 0


@pytest.mark.anyio
async def test_a_client_that_leaves_while_uploading_takes_nothing() -> None:
    called: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(True)

    middleware, backend = make(app)
    upload = Conn("POST", length=100)
    upload.feed(b"x" * 10)
    upload.leave()
    await upload.run(middleware)
    assert called == []
    assert upload.sent == []
    assert middleware.body_buffers.used_bytes == 0
    assert await in_flight(backend) == 0


@pytest.mark.anyio
async def test_read_ahead_pauses_while_the_process_total_is_full() -> None:
    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            await gate.wait()  # holds the only slot
        await read_all(receive)
        await respond(send)

    middleware, _ = make(app, body_buffer_bytes=8, body_buffer_total_bytes=8)
    holder = Conn()
    held = holder.run(middleware)
    first, second = Conn("POST", length=16), Conn("POST", length=4)
    one = first.run(middleware)
    first.feed(b"12345678")  # the process's whole total; it queues with it
    await settle()
    two = second.run(middleware)
    second.feed(b"abcd", more=False)
    await settle()
    assert middleware.body_buffers.used_bytes == 8
    assert second.reads == 0  # paused: its bytes stay with the server (TCP back-pressure)
    gate.set()  # the slot frees up, the first is admitted and its app reads its buffer ...
    await held
    first.feed(b"87654321", more=False)
    await one
    await two  # ... so the second could read on, and is served too
    assert (first.status, second.status) == (200, 200)
    assert middleware.body_buffers.used_bytes == 0
    assert middleware.body_buffers.peak_bytes == 8  # never above the total


def test_body_buffers_wake_waiters_when_bytes_are_given_back() -> None:
    async def scenario() -> list[str]:
        buffers = BodyBuffers(10)
        order: list[str] = []
        buffers.take(10)

        async def waiter() -> None:
            await buffers.room()
            order.append("room")

        task = asyncio.ensure_future(waiter())
        await settle()
        order.append("full")
        buffers.give(1)
        await task
        return order

    assert asyncio.run(scenario()) == ["full", "room"]


@pytest.mark.anyio
@pytest.mark.parametrize("buffer", [0, 256 * 1024])
async def test_a_queued_client_that_leaves_is_noticed_whatever_the_buffer(buffer: int) -> None:
    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await gate.wait()
        await respond(send)

    middleware, backend = make(app, body_buffer_bytes=buffer, max_wait_s=30)
    holder = Conn()
    held = holder.run(middleware)
    await settle()
    queued = Conn()
    waiting = queued.run(middleware)
    await settle()
    assert (await backend.snapshot()).queued_by_priority["normal"] == 1
    queued.leave()
    await waiting  # noticed at once, not after its 30 s
    assert queued.sent == []
    assert (await backend.snapshot()).queued_by_priority["normal"] == 0
    gate.set()
    await held


# --- the client hold ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_send_held_up_by_the_client_gives_the_slot_back_after_the_hold() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    # (A hold of 0.5 s checked at 0.05 s, and given back waited for: with a hold of 0.1 s
    # checked at 0.05 s and 0.15 s, a stall of 50 ms on a loaded machine failed either check.)
    hold_s = 0.5
    middleware, backend = make(app, client_hold_s=hold_s)
    reader = Conn()
    reader.writable.clear()  # the client reads nothing
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = reader.run(middleware)
    await asyncio.sleep(0.05)
    assert await in_flight(backend) == 1  # the app's own time and a bit of waiting
    await until_given_back(backend)
    assert loop.time() - started >= hold_s  # waited on the client past the hold, not before
    assert not task.done()
    other = Conn()
    await other.run(middleware)  # the slot is free for someone else
    assert other.status == 200
    reader.writable.set()
    await task
    assert reader.body() == b"chunk" * 3 + b"end"
    assert await in_flight(backend) == 0  # released once, not twice


@pytest.mark.anyio
async def test_streaming_to_a_client_that_keeps_up_holds_the_slot_to_the_end() -> None:
    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await gate.wait()  # the app's own work: the slot stays held
        await send({"type": "http.response.body", "body": b"b", "more_body": False})

    middleware, backend = make(app, client_hold_s=0.05)
    conn = Conn()
    task = conn.run(middleware)
    await asyncio.sleep(0.15)
    assert await in_flight(backend) == 1
    gate.set()
    await task
    assert await in_flight(backend) == 0


@pytest.mark.anyio
async def test_the_rest_of_a_body_beyond_the_buffer_counts_against_the_hold() -> None:
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.extend(await read_all(receive))
        await respond(send)

    hold_s = 0.5  # (as in the send's test above: no 50 ms margins)
    middleware, backend = make(app, body_buffer_bytes=4, client_hold_s=hold_s)
    upload = Conn("POST", length=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = upload.run(middleware)
    upload.feed(b"1234")  # the buffer's worth: admitted with the rest still to come
    await settle()
    assert await in_flight(backend) == 1
    await until_given_back(backend)
    assert loop.time() - started >= hold_s  # the app waited on the client past the hold
    upload.feed(b"567890", more=False)
    await task
    assert b"".join(m["body"] for m in received) == b"1234567890"
    assert received[-1]["more_body"] is False
    assert upload.status == 200


@pytest.mark.anyio
async def test_dry_run_and_a_zero_buffer_read_nothing_ahead() -> None:
    seen: list[Receive] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(receive)
        await read_all(receive)
        await respond(send)

    for settings in ({"dry_run": True}, {"body_buffer_bytes": 0}):
        middleware, _ = make(app, **settings)
        upload = Conn("POST", length=3)
        upload.feed(b"abc", more=False)
        await upload.run(middleware)
        assert seen[-1] == upload.receive
        assert upload.status == 200


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("262144", 262144), ("256K", 262144), ("256 KiB", 262144), ("1m", 1 << 20), ("0", 0)],
)
def test_body_buffer_sizes_take_k_and_m_suffixes(raw: str, expected: int) -> None:
    settings = Settings.from_env({"THROTTLE_RATE": "10", "THROTTLE_BODY_BUFFER": raw})
    assert settings.body_buffer_bytes == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"THROTTLE_BODY_BUFFER": "lots"}, "THROTTLE_BODY_BUFFER"),
        ({"THROTTLE_BODY_BUFFER": "-1"}, "THROTTLE_BODY_BUFFER"),
        ({"THROTTLE_BODY_BUFFER_TOTAL": "0"}, "THROTTLE_BODY_BUFFER_TOTAL"),
        (
            {"THROTTLE_BODY_BUFFER": "1M", "THROTTLE_BODY_BUFFER_TOTAL": "512K"},
            "THROTTLE_BODY_BUFFER_TOTAL",
        ),
        ({"THROTTLE_RECEIVE_TIMEOUT": "0"}, "THROTTLE_RECEIVE_TIMEOUT"),
        ({"THROTTLE_CLIENT_HOLD": "soon"}, "THROTTLE_CLIENT_HOLD"),
    ],
)
def test_bad_slow_client_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"THROTTLE_RATE": "10", **env})
    assert str(caught.value).startswith(f"{variable}=")
    assert "expected" in str(caught.value)
