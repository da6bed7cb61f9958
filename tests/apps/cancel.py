"""A throttled app whose handlers outlive their clients (tests/test_e2e_cancel.py).

One worker process: what its handlers did is kept in memory and read back over
HTTP. The throttle is configured by ``THROTTLE_*`` only
(``THROTTLE_CANCEL_ON_DISCONNECT`` is what the tests turn on and off).

Routes: ``/slow?s=&tag=&read=`` (sleeps; first reads its body if `read`),
``/stream?s=&tag=`` (a chunk every 0.1 s for `s` seconds), ``/upload?s=&tag=``
(POST: reads its body slowly, a chunk every 0.2 s, then sleeps), and the
exempt ``/_journal`` (each handler's start, end or cancellation, and the
throttle's events) and ``/_budget`` (in flight, waiting).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from throttle_mw import Settings, ThrottleEvent, ThrottleMiddleware, priority
from throttle_mw.backends import make_backend

JOURNAL: list[dict[str, Any]] = []
#: A handler gives up after this long, so a failed test cannot leave a server stuck.
LIMIT_S = 30.0


def note(event: str, tag: str, **fields: Any) -> None:
    JOURNAL.append({"event": event, "tag": tag, "t": time.time(), **fields})


def observe(event: ThrottleEvent) -> None:
    note(f"throttle:{event.kind}", event.tenant)


async def slow(request: Request) -> Response:
    tag = request.query_params.get("tag", "slow")
    if request.query_params.get("read"):
        await request.body()  # (empty) read through the watch
    note("start", tag)
    try:
        await asyncio.sleep(min(LIMIT_S, float(request.query_params.get("s", "4"))))
    except asyncio.CancelledError:
        note("cancelled", tag)
        raise
    note("end", tag)
    return PlainTextResponse("slow")


async def stream(request: Request) -> Response:
    tag = request.query_params.get("tag", "stream")
    seconds = min(LIMIT_S, float(request.query_params.get("s", "4")))
    note("start", tag)

    async def body() -> AsyncIterator[bytes]:
        ends = time.monotonic() + seconds
        try:
            while time.monotonic() < ends:
                yield b"chunk\n"
                await asyncio.sleep(0.1)
        except BaseException as exc:  # cancelled, or stopped by Starlette (GeneratorExit)
            note("stopped", tag, why=type(exc).__name__)
            raise
        note("end", tag)

    return StreamingResponse(body(), media_type="text/plain")


async def upload(request: Request) -> Response:
    tag = request.query_params.get("tag", "upload")
    note("start", tag)
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            await asyncio.sleep(0.2)
        note("read", tag, size=size)
        await asyncio.sleep(min(LIMIT_S, float(request.query_params.get("s", "4"))))
    except asyncio.CancelledError:
        note("cancelled", tag, size=size)
        raise
    except Exception as exc:  # ClientDisconnect: the app's own read saw the client leave
        note("raised", tag, why=type(exc).__name__, size=size)
        raise
    note("end", tag, size=size)
    return JSONResponse({"size": size})


@priority("exempt")
async def journal(request: Request) -> Response:
    return JSONResponse(JOURNAL)


@priority("exempt")
async def budget(request: Request) -> Response:
    snapshot = await request.app.state.backend.snapshot()
    waiting = sum(snapshot.queued_by_priority.values())
    return JSONResponse({"in_flight": snapshot.in_flight, "waiting": waiting})


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/upload", upload, methods=["POST"]),
            Route("/_journal", journal),
            Route("/_budget", budget),
        ]
    )
    backend = make_backend(Settings.from_env())
    app.state.backend = backend
    # Observers send every request through the middleware's full path; without them a
    # request admitted at once takes its fast path (which the option must leave).
    observers = [observe] if os.environ.get("CANCEL_APP_OBSERVE") else []
    app.add_middleware(ThrottleMiddleware, backend=backend, observers=observers)
    return app


app = create_app()
