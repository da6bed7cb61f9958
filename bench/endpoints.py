"""The one route every variant serves, and the plain apps around it.

``BENCH_APP`` picks what the route does, the same for every variant of a run:

- ``hello`` (default): answers ``Hello, world!`` at once. The throughput and
  round-trip benchmarks use it: differences come from what wraps the route.
- ``story``: a backend with real, finite capacity, as docs/design.md asks for the
  overload story: ``BENCH_STORY_SLOTS`` slots (default 8), each request holding
  one for ``BENCH_STORY_WORK_MS`` (default 100) ms, uniformly within
  +-``BENCH_STORY_JITTER`` (default 0.2) of it, so 80 requests/s at most. The
  jitter keeps the slots from phase-locking. Requests that find every slot busy
  wait for one, as they would for a connection pool. The response carries
  ``Server-Timing: app;dur=<ms>`` (slot wait and work).

Both answer ``Hello, world!`` at `HELLO_PATH`, so the servers' readiness check
is the same for every variant and app.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

HELLO_PATH = "/"
HELLO_BODY = b"Hello, world!"
APP_ENV = "BENCH_APP"
SLOTS_ENV = "BENCH_STORY_SLOTS"
WORK_MS_ENV = "BENCH_STORY_WORK_MS"
JITTER_ENV = "BENCH_STORY_JITTER"
#: The header the load generators name the tenant in; every limiter keys on it.
TENANT_HEADER = "X-Tenant-ID"

Endpoint = Callable[[Request], Awaitable[Response]]


async def hello(request: Request) -> Response:
    return PlainTextResponse(HELLO_BODY)


def story_endpoint(slots: int, work_s: float, jitter: float) -> Endpoint:
    """The overload story's backend: `slots` requests at once, each for about `work_s`."""
    # Created on first use: a lock belongs to the event loop that serves the app.
    state: dict[str, asyncio.Semaphore] = {}
    spread = jitter * work_s
    draw = random.Random(os.getpid()).uniform

    async def work(request: Request) -> Response:
        started = time.perf_counter()
        pool = state.get("pool")
        if pool is None:
            pool = state["pool"] = asyncio.Semaphore(slots)
        async with pool:
            await asyncio.sleep(max(0.0, work_s + draw(-spread, spread)))
        dur_ms = (time.perf_counter() - started) * 1000.0
        return PlainTextResponse(HELLO_BODY, headers={"Server-Timing": f"app;dur={dur_ms:.1f}"})

    # Peers' decorators name routes after the endpoint; keep the names of `hello`.
    work.__name__ = work.__qualname__ = "hello"
    return work


def endpoint(env: Mapping[str, str]) -> Endpoint:
    """The route's endpoint for the app `env` selects (``BENCH_APP``)."""
    kind = env.get(APP_ENV, "hello") or "hello"
    if kind == "hello":
        return hello
    if kind == "story":
        return story_endpoint(
            int(env.get(SLOTS_ENV, "8")),
            float(env.get(WORK_MS_ENV, "100")) / 1000.0,
            float(env.get(JITTER_ENV, "0.2")),
        )
    raise ValueError(f"{APP_ENV}={kind!r}: expected 'hello' or 'story'")


def starlette_app(
    env: Mapping[str, str],
    middleware: Sequence[Middleware] = (),
    wrap: Callable[[Endpoint], Endpoint] | None = None,
) -> Starlette:
    """The Starlette app of the route, in `middleware`, its endpoint decorated by `wrap`."""
    route = endpoint(env) if wrap is None else wrap(endpoint(env))
    return Starlette(routes=[Route(HELLO_PATH, route)], middleware=list(middleware))


def fastapi_app(env: Mapping[str, str], dependencies: Sequence[Any] = ()) -> Any:
    """The same route in a FastAPI app (for peers that only work with FastAPI)."""
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route(
        HELLO_PATH,
        endpoint(env),
        methods=["GET"],
        dependencies=list(dependencies),
        response_class=PlainTextResponse,
    )
    return app


def tenant_of(headers: Mapping[str, str], client: str | None) -> str:
    """The tenant as every peer is configured to see it: the header, else the client address."""
    return headers.get(TENANT_HEADER.lower()) or client or "unknown"
