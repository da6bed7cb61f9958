"""THROTTLE_CANCEL_ON_DISCONNECT in process: what the app's ``receive`` sees, when it is cancelled.

The watch for the disconnect reads the server's ``receive`` while the app runs, so
it must hand the app every message in order, never make the app wait for the client
to leave to get a message already read, and cancel nothing once the response is
complete. Over real servers: tests/test_e2e_cancel.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from throttle_mw import ThrottleMiddleware

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean_env")]


def scope(method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }


def server_receive(messages: Sequence[Message], gone: asyncio.Event) -> Callable[[], Any]:
    """A server's receive: `messages` in order, then a disconnect once `gone` is set."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


async def ignore(message: Message) -> None:
    pass


def middleware(app: Callable[[Scope, Receive, Send], Any]) -> ThrottleMiddleware:
    throttle = ThrottleMiddleware(app, concurrency=1, cancel_on_disconnect=True)
    assert throttle.error is None
    return throttle


@pytest.mark.parametrize("queued", [False, True], ids=["at-once", "queued"])
async def test_the_app_gets_every_message_at_once_and_the_disconnect_after(queued: bool) -> None:
    """A body read ahead (three chunks) and a bodyless GET: each read the app makes is
    answered at once, in order, and the read after the body waits for the client."""
    seen: list[Message] = []
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/first":
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        while True:
            message = await receive()  # never waits on the client (the call is bounded)
            seen.append(message)
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    throttle = middleware(app)
    gone, never = asyncio.Event(), asyncio.Event()
    first = None
    if queued:  # holds the one slot, so the request below waits in the queue
        first_scope = {**scope(), "path": "/first"}
        first = asyncio.create_task(throttle(first_scope, server_receive([], never), ignore))
        await asyncio.sleep(0.05)
    chunks = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
    ]
    body_headers = [(b"content-length", b"3")]
    call = asyncio.create_task(
        throttle(scope("POST", body_headers), server_receive(chunks, gone), ignore)
    )
    if first is not None:
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(first, 2.0)
    await asyncio.wait_for(call, 2.0)
    assert b"".join(m["body"] for m in seen) == b"abc"
    assert seen[-1]["more_body"] is False

    seen.clear()
    empty = [{"type": "http.request", "body": b"", "more_body": False}]
    await asyncio.wait_for(throttle(scope(), server_receive(empty, gone), ignore), 2.0)
    assert seen == [{"type": "http.request", "body": b"", "more_body": False}]


async def test_the_disconnect_cancels_and_is_handed_to_the_app_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "throttle_mw")
    received: list[str] = []
    cancelled = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.append((await receive())["type"])  # the empty body
        try:
            received.append((await receive())["type"])  # cancelled when the client leaves
        except asyncio.CancelledError:
            cancelled.set()
            # The message the watch read is the app's too: asked for, it is there at once.
            received.append((await receive())["type"])
            raise

    throttle = middleware(app)
    gone = asyncio.Event()
    empty = [{"type": "http.request", "body": b"", "more_body": False}]
    call = asyncio.create_task(throttle(scope(), server_receive(empty, gone), ignore))
    await asyncio.sleep(0.05)
    gone.set()
    await asyncio.wait_for(call, 2.0)  # ends quietly
    assert cancelled.is_set()
    assert received == ["http.request", "http.disconnect"]
    (line,) = [r for r in caplog.records if r.getMessage().startswith("throttle cancelled")]
    assert line.getMessage().startswith("throttle cancelled GET / tenant=ip:127.0.0.1")
    assert line.__dict__["throttle"]["outcome"] == "cancelled"


async def test_a_disconnect_after_the_response_cancels_nothing() -> None:
    """Background work after the last chunk (Starlette's BackgroundTasks) runs to its end,
    though uvicorn answers a receive with a disconnect once the response is complete."""
    finished = asyncio.Event()
    gone = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        gone.set()  # the server now says http.disconnect
        await asyncio.sleep(0.1)
        finished.set()

    throttle = middleware(app)
    empty = [{"type": "http.request", "body": b"", "more_body": False}]
    await asyncio.wait_for(throttle(scope(), server_receive(empty, gone), ignore), 2.0)
    assert finished.is_set()


async def test_a_learned_limit_keeps_the_queued_flag_and_takes_no_sample_of_cancelled_work() -> (
    None
):
    """With a learned limit (branch carry2's `Sample.waited`) and cancel on disconnect: a
    request queued for the limit that runs to its end reports it waited; one queued for
    the limit whose client leaves while its app runs is cancelled, takes no sample, and
    gives back its slot, its place in flight and its body's bytes."""
    from tests.test_learned_limit import Recording

    backend = Recording(concurrency="auto", concurrency_min=1, concurrency_max=1)
    go = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        if scope["path"] == "/hold":
            await go.wait()
        elif scope["path"] == "/forever":
            await asyncio.Event().wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    throttle = ThrottleMiddleware(app, backend=backend, cancel_on_disconnect=True)
    assert throttle.error is None
    await throttle.startup()
    try:
        never, gone = asyncio.Event(), asyncio.Event()
        empty = [{"type": "http.request", "body": b"", "more_body": False}]
        body = [{"type": "http.request", "body": b"x" * 100, "more_body": False}]
        length = [(b"content-length", b"100")]
        holder = asyncio.create_task(
            throttle({**scope(), "path": "/hold"}, server_receive(empty, never), ignore)
        )
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(throttle(scope(), server_receive(empty, never), ignore))
        await asyncio.sleep(0.05)
        go.set()
        await asyncio.wait_for(asyncio.gather(holder, queued), 2.0)
        assert [s.waited for s in backend.samples] == [False, True]

        go.clear()
        holder = asyncio.create_task(
            throttle({**scope(), "path": "/hold"}, server_receive(empty, never), ignore)
        )
        await asyncio.sleep(0.05)
        leaves = asyncio.create_task(
            throttle(
                {**scope("POST", length), "path": "/forever"}, server_receive(body, gone), ignore
            )
        )
        await asyncio.sleep(0.05)
        go.set()
        await asyncio.wait_for(holder, 2.0)
        await asyncio.sleep(0.05)  # the app runs, its slot held
        assert backend.flight.running == 1
        gone.set()
        await asyncio.wait_for(leaves, 2.0)  # cancelled: ends quietly
        assert [s.waited for s in backend.samples] == [False, True, False]  # the holder's
        assert backend.flight.running == 0
        assert throttle.body_buffers.used_bytes == 0
        snapshot = await backend.snapshot()
        assert (snapshot.in_flight, sum(snapshot.queued_by_priority.values())) == (0, 0)
    finally:
        await throttle.shutdown()
