"""A throttled app for the server matrix (tests/test_e2e_servers.py), one per ASGI server.

Every handler run is written to a journal file that all worker processes
share (``MATRIX_DIR/journal.jsonl``: one JSON line per start and end, with
the tag the test gave, the process id and the wall-clock time), so a test can
tell whether a request's handler ever ran, and how many ran at once across
processes. ``/hold`` runs until the test creates ``MATRIX_DIR/release-<key>``:
a file, because with several workers an HTTP call would reach only one of
them. The throttle is configured by ``THROTTLE_*`` only.

Routes: ``/hello`` (the throttle's decision as JSON), ``/hold?key=&tag=``,
``/slow?s=&tag=``, ``/stream?chunks=&delay=``, ``/boom`` (raises),
``/upload`` (POST: the body's size and SHA-256), and the exempt ``/_budget``
(the live budget, fleet-wide with Redis), ``/_pid`` (which worker answered)
and ``/healthz``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from throttle_mw import Settings, ThrottleMiddleware, priority
from throttle_mw.backends import make_backend

DIR = Path(os.environ.get("MATRIX_DIR", "."))
JOURNAL = DIR / "journal.jsonl"
#: A held request gives up after this long, so a failed test cannot leave a server stuck.
HOLD_LIMIT_S = 60.0


def journal(event: str, tag: str) -> None:
    line = json.dumps({"event": event, "tag": tag, "pid": os.getpid(), "t": time.time()})
    # One O_APPEND write per line: lines from several processes never interleave.
    fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def hello(request: Request) -> Response:
    decision = request.state.throttle
    return JSONResponse({"outcome": decision.outcome, "tenant": decision.tenant})


async def hold(request: Request) -> Response:
    tag = request.query_params.get("tag", "hold")
    released = DIR / f"release-{request.query_params['key']}"
    journal("start", tag)
    deadline = time.monotonic() + HOLD_LIMIT_S
    # A file, polled: the test's signal must reach every worker process.
    while not released.exists() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    journal("end", tag)
    return PlainTextResponse("held")


async def slow(request: Request) -> Response:
    tag = request.query_params.get("tag", "slow")
    journal("start", tag)
    await asyncio.sleep(float(request.query_params.get("s", "0.1")))
    journal("end", tag)
    return PlainTextResponse("slow")


async def stream(request: Request) -> Response:
    chunks = int(request.query_params.get("chunks", "10"))
    delay = float(request.query_params.get("delay", "0.01"))

    async def body() -> AsyncIterator[bytes]:
        for i in range(chunks):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(delay)

    return StreamingResponse(body(), media_type="text/plain")


async def boom(request: Request) -> Response:
    await asyncio.sleep(0.01)
    raise RuntimeError("the app failed")


async def upload(request: Request) -> Response:
    journal("start", "upload")
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"sha256": digest.hexdigest(), "size": size})


@priority("exempt")
async def budget(request: Request) -> Response:
    snapshot = await request.app.state.backend.snapshot()
    waiting = sum(snapshot.queued_by_priority.values())
    return JSONResponse({"in_flight": snapshot.in_flight, "waiting": waiting})


@priority("exempt")
async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


@priority("exempt")
async def pid(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/hold", hold),
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/upload", upload, methods=["POST"]),
            Route("/_budget", budget),
            Route("/healthz", healthz),
            Route("/_pid", pid),
        ]
    )
    backend = make_backend(Settings.from_env())
    app.state.backend = backend
    app.add_middleware(ThrottleMiddleware, backend=backend)
    return app


app = create_app()
