"""The smallest app for testing the server plumbing itself (tests/support/servers.py).

`HELLO_GREETING` is validated at import, as a real app validates its settings,
so a bad value stops uvicorn at start-up with a message naming the variable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

GREETING = os.environ.get("HELLO_GREETING", "hello")
if not GREETING.strip():
    raise ValueError(f"HELLO_GREETING={GREETING!r} is invalid: expected a non-blank greeting")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(GREETING)


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def slow(request: Request) -> StreamingResponse:
    """Sends "start", sleeps `?s=` seconds, sends "done".

    A client that has read the headers knows the request is in flight: the
    moment for a graceful-shutdown test to send SIGTERM.
    """
    seconds = float(request.query_params.get("s", "1"))

    async def body() -> AsyncIterator[bytes]:
        yield b"start\n"
        await asyncio.sleep(seconds)
        yield b"done\n"

    return StreamingResponse(body(), media_type="text/plain")


async def env(request: Request) -> JSONResponse:
    """The process id and its THROTTLE_* variables, to check what the child really got."""
    throttle = {k: v for k, v in os.environ.items() if k.startswith("THROTTLE_")}
    return JSONResponse({"pid": os.getpid(), "throttle": throttle})


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/healthz", healthz),
        Route("/slow", slow),
        Route("/env", env),
    ]
)
