"""A throttled app that tells the Redis fleet tests what its throttle did.

The endpoints are cheap (the fleet tests are about the shared budget, not about
a backend's capacity). Every admission is logged with its wall-clock time, so a
test can count the fleet's admissions by time on the server side, across
processes (all on one machine, one clock). A pure ASGI counter sits *inside*
the throttle: a request counts as running from the moment the throttle hands it
to the app until its last body chunk has been sent, which is when the throttle
releases its lease; `/_probe` reports it. Configured by ``THROTTLE_*`` only.

Routes: ``/work`` (normal; ``?ms=`` holds it that long, ``&stream=1`` sends the
headers first and the end of the body after that time), ``/critical`` and
``/low`` (those priorities), ``/hold`` (held until ``/_unhold``), and the exempt
``/_probe``, ``/_unhold``, ``/_sentinel`` (see `sentinel`) and ``/healthz``.

With ``PROBE_LOG_REDIS=1`` the backend's Redis messages (lost, back) are
written to stderr with their wall-clock time: ``redis-log <time> <message>``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from throttle_mw import ThrottleMiddleware, priority
from throttle_mw.backends.base import Backend

if os.environ.get("PROBE_LOG_REDIS") == "1":
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("redis-log %(created).3f %(message)s"))
    _redis_log = logging.getLogger("throttle_mw.redis")
    _redis_log.addHandler(_handler)
    _redis_log.setLevel(logging.INFO)
    _redis_log.propagate = False

#: (wall-clock time, tenant, priority, outcome) of every admission, in order.
admissions: list[tuple[float, str, str, str]] = []
_unhold = asyncio.Event()


class Counts:
    now = 0
    started = 0
    ended = 0
    cut = 0  # ended without sending the whole response (the client went away)
    changed_at = 0.0  # time.monotonic() of the latest start or end


counts = Counts()


class Running:
    """Counts the requests the app is running (inside the throttle), and their starts and ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(("/_", "/healthz")):
            await self.app(scope, receive, send)
            return
        counts.now += 1
        counts.started += 1
        counts.changed_at = time.monotonic()
        counted = True

        def end(complete: bool) -> None:
            nonlocal counted
            if counted:
                counted = False
                counts.now -= 1
                counts.ended += 1
                counts.cut += not complete
                counts.changed_at = time.monotonic()

        async def send_counting(message: Message) -> None:
            try:
                await send(message)
            finally:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    end(True)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            end(False)


def _admitted(request: Request) -> None:
    decision = request.state.throttle
    admissions.append((time.time(), decision.tenant, decision.priority, decision.outcome))


def _done(started: float) -> Response:
    ms = (time.perf_counter() - started) * 1000.0
    return PlainTextResponse("ok", headers={"server-timing": f"app;dur={ms:.2f}"})


async def work(request: Request) -> Response:
    started = time.perf_counter()
    _admitted(request)
    seconds = float(request.query_params.get("ms", "0")) / 1000.0
    if request.query_params.get("stream") == "1":
        # Headers first, the rest after the work: a client that leaves midway cuts it off.
        async def body() -> AsyncIterator[bytes]:
            yield b"start\n"
            await asyncio.sleep(seconds)
            yield b"done\n"

        return StreamingResponse(body(), media_type="text/plain")
    if seconds > 0:
        await asyncio.sleep(seconds)
    return _done(started)


@priority("critical")
async def critical(request: Request) -> Response:
    return await work(request)


@priority("low")
async def low(request: Request) -> Response:
    return await work(request)


async def hold(request: Request) -> Response:
    started = time.perf_counter()
    _admitted(request)
    await _unhold.wait()
    return _done(started)


@priority("exempt")
async def unhold(request: Request) -> Response:
    _unhold.set()
    return PlainTextResponse("ok")


@priority("exempt")
async def probe(request: Request) -> Response:
    since = int(float(request.query_params.get("since", "0")))
    body: dict[str, Any] = {
        "pid": os.getpid(),
        "running": counts.now,
        "started": counts.started,
        "ended": counts.ended,
        "cut": counts.cut,
        "idle_ms": (time.monotonic() - counts.changed_at) * 1000.0,
        "admissions": admissions[since:],
    }
    return JSONResponse(body)


def _backend(request: Request) -> Backend:
    node = request.app.middleware_stack
    while not isinstance(node, ThrottleMiddleware):
        node = node.app
    assert node.backend is not None
    return node.backend


@priority("exempt")
async def sentinel(request: Request) -> Response:
    """Sentinel reads through the throttle's own Redis connections (CVE-2023-28858/9's class).

    First ``n`` snapshot calls are cancelled at random points mid-flight (as a
    metrics scrape's timeout does); then ``n`` ECHOs of unique tokens go through
    the same pool at once, with ``n`` snapshots: a reply read by the wrong
    caller shows up as an ECHO of someone else's token or a snapshot that does
    not parse. Errors (the proxy cut a call) are counted apart from mismatches.
    """
    backend: Any = _backend(request)
    n = int(request.query_params.get("n", "32"))
    counts = {"cancelled": 0, "echo_ok": 0, "mismatches": 0, "errors": 0, "snapshots_ok": 0}

    async def cut() -> None:
        try:
            await asyncio.wait_for(backend.snapshot(), timeout=random.uniform(0.0, 0.02))
        except TimeoutError:
            counts["cancelled"] += 1
        except (RedisError, OSError):
            counts["errors"] += 1

    async def echo(i: int) -> None:
        token = f"sentinel-{os.getpid()}-{i}-{random.getrandbits(64)}".encode()
        try:
            clients = backend._clients  # the pool the throttle's calls use
            assert clients is not None
            reply = await clients.calls.echo(token)
        except (RedisError, OSError):
            counts["errors"] += 1
            return
        counts["echo_ok" if reply == token else "mismatches"] += 1

    async def snapshot() -> None:
        try:
            state = await backend.snapshot()
        except (RedisError, OSError):
            counts["errors"] += 1
        except ValueError:  # not the JSON the snapshot script returns: someone else's reply
            counts["mismatches"] += 1
        else:
            ok = isinstance(state.in_flight, int) and state.in_flight >= 0
            counts["snapshots_ok" if ok else "mismatches"] += 1

    await asyncio.gather(*(cut() for _ in range(n)))
    await asyncio.gather(*(echo(i) for i in range(n)), *(snapshot() for _ in range(n)))
    return JSONResponse(counts)


@priority("exempt")
async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/work", work),
        Route("/critical", critical),
        Route("/low", low),
        Route("/hold", hold),
        Route("/_unhold", unhold),
        Route("/_probe", probe),
        Route("/_sentinel", sentinel),
        Route("/healthz", healthz),
    ],
    # The first is outermost: the counter runs inside the throttle.
    middleware=[Middleware(ThrottleMiddleware), Middleware(Running)],
)
