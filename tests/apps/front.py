"""A throttled front end: forwards ``/work`` to one shared backend (``FRONT_BACKEND``).

Several of these, each its own process sharing one budget through Redis, stand
in front of one app whose capacity is what the fleet's learned limit must find
(the fleet test starts ``tests.apps.story`` unthrottled as that backend).
Configured by ``THROTTLE_*`` only; ``/healthz`` and ``/_limits`` (the limits this process
has in force) are exempt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from throttle_mw import Settings, ThrottleMiddleware, priority
from throttle_mw.backends import make_backend

BACKEND = os.environ.get("FRONT_BACKEND", "http://127.0.0.1:8000")
_client: httpx.AsyncClient | None = None


async def work(request: Request) -> Response:
    assert _client is not None
    answer = await _client.get("/work")
    return PlainTextResponse(
        answer.text,
        status_code=answer.status_code,
        headers={"server-timing": answer.headers.get("server-timing", "")},
    )


@priority("exempt")
async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


@priority("exempt")
async def limits(request: Request) -> Response:
    """The limits this process has in force, as it last heard them (no I/O)."""
    return JSONResponse({"concurrency": _backend.limits.concurrency, "learned": _backend.learning})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _client
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=BACKEND, limits=limits, timeout=30.0) as client:
        _client = client
        yield


_backend = make_backend(Settings.from_env())
app = Starlette(
    routes=[Route("/work", work), Route("/healthz", healthz), Route("/_limits", limits)],
    lifespan=lifespan,
)
app.add_middleware(ThrottleMiddleware, backend=_backend)
