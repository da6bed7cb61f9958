"""A throttled app with real, finite capacity, for end-to-end tests.

``/work`` can serve about 80 requests a second: 8 slots, each held 100 ms
with ±20 % jitter (docs/design.md: real services jitter, and fixed times make the
slots phase-lock). The throttle is configured only by ``THROTTLE_*``. Other
routes exercise streaming, failures, uploads and slow responses; ``/_budget``
(exempt) shows the live budget so tests can check that nothing leaked (and the
concurrency limit in force, learned or set), and
``/_running`` how many requests the app is running right now (and since its last
``?reset=1``: the most at once, and when the earliest of them arrived), ``/_held`` what
this process's Redis backend holds (leases, waiters; the soak checks they go
back to zero), and ``POST
/_slots?n=`` changes how many slots it has, mid-run). ``/big`` streams
``?mb=`` MiB in 64 KiB chunks (for stalled readers); ``/_body`` (exempt) shows
the middleware's read-ahead buffers and the process's resident memory. ``/ws``
echoes websocket messages, and the app's own lifespan prints
``story lifespan: startup`` and ``story lifespan: shutdown`` (both untouched by
the throttle).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import itertools
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from throttle_mw import Settings, ThrottleMiddleware, priority
from throttle_mw.backends import make_backend

SLOTS = int(os.environ.get("STORY_SLOTS", "8"))
WORK_S = float(os.environ.get("STORY_WORK_MS", "100")) / 1000.0
JITTER = float(os.environ.get("STORY_JITTER", "0.2"))


class Slots:
    """The app's real capacity: like a semaphore, but a test may change how many slots
    there are while it runs (``POST /_slots?n=``: a store that slows down).

    First come, first served, as a store's connection pool is: a freed slot goes to the
    longest waiter, never to a request that arrives as it is freed. (A condition's
    `wait_for` let such a newcomer barge in and sent the woken waiter to the back: wait
    times then spread far wider than a queue's, which the learned limit's shift test,
    comparing the fastest half of two stages, read as slower work in one CI run:
    docs/performance.md, "The shift test's verdict on CI's four-process run".)"""

    def __init__(self, n: int) -> None:
        self.n = n
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def __aenter__(self) -> None:
        if self.busy < self.n and not self._waiters:
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # (the slot was counted busy for it when it was handed over)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as it was cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self.busy -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.busy < self.n:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)

    async def resize(self, n: int) -> None:
        self.n = n
        self._hand_over()


_slots = Slots(SLOTS)
_running = 0
#: Most requests running in ``/work`` at once since the last ``/_running?reset=1``.
_peak = 0
#: When each request running in ``/work`` arrived (wall clock), and the earliest arrival
#: of any request that ran since the last reset: a peak is made of requests admitted
#: no earlier than that (a test holds it to the limits in force since).
_arrived: dict[int, float] = {}
_oldest: float | None = None
_tickets = itertools.count()


async def work(request: Request) -> Response:
    """Hold one of the slots for the work time; report only that as app;dur.

    Time spent waiting for a slot is not service time: a test's "added wait"
    (latency from due minus app;dur) must count every wait, wherever it happens.
    """
    global _running, _peak, _oldest
    _running += 1
    _peak = max(_peak, _running)
    ticket, arrived = next(_tickets), time.time()
    _arrived[ticket] = arrived
    if _oldest is None:
        _oldest = arrived
    try:
        async with _slots:
            started = time.perf_counter()
            await asyncio.sleep(WORK_S * (1 + JITTER * (2 * random.random() - 1)))
            service_ms = (time.perf_counter() - started) * 1000.0
    finally:
        _running -= 1
        del _arrived[ticket]
    return PlainTextResponse("done", headers={"server-timing": f"app;dur={service_ms:.1f}"})


async def slow(request: Request) -> Response:
    global _running
    _running += 1
    try:
        await asyncio.sleep(float(request.query_params.get("s", "1")))
    finally:
        _running -= 1
    return PlainTextResponse("slow")


async def stream(request: Request) -> Response:
    chunks = int(request.query_params.get("chunks", "20"))
    delay = float(request.query_params.get("delay", "0.05"))

    async def body() -> AsyncIterator[bytes]:
        global _running
        _running += 1
        try:
            for i in range(chunks):
                yield f"chunk {i}\n".encode()
                await asyncio.sleep(delay)
        finally:
            _running -= 1

    return StreamingResponse(body(), media_type="text/plain")


_CHUNK = b"x" * 65536


async def big(request: Request) -> Response:
    chunks = int(float(request.query_params.get("mb", "64")) * 16)

    async def body() -> AsyncIterator[bytes]:
        global _running
        _running += 1
        try:
            for _ in range(chunks):
                yield _CHUNK
        finally:
            _running -= 1

    return StreamingResponse(body(), media_type="application/octet-stream")


async def boom(request: Request) -> Response:
    await asyncio.sleep(0.01)
    raise RuntimeError("the app failed")


async def upload(request: Request) -> Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"sha256": digest.hexdigest(), "size": size})


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


@priority("exempt")
async def budget(request: Request) -> Response:
    backend = request.app.state.backend
    if backend is None:
        return JSONResponse({"enabled": False})
    snapshot = await backend.snapshot()
    limits, learned = snapshot.limits, snapshot.learned
    return JSONResponse(
        {
            "tokens": snapshot.tokens,
            "in_flight": snapshot.in_flight,
            "waiting": sum(snapshot.queued_by_priority.values()),
            "tenants": snapshot.tenants,
            # The concurrency limit in force (learned or set) and the learner's state.
            "concurrency": None if limits is None else limits.concurrency,
            "learned": None if learned is None else learned.limit,
            "baseline_ms": None if learned is None else learned.baseline_s * 1000.0,
            "reason": None if learned is None else learned.reason,
        }
    )


@priority("exempt")
async def running(request: Request) -> Response:
    global _peak, _oldest
    answer = {
        "running": _running,
        "peak": _peak,
        "busy": _slots.busy,
        "slots": _slots.n,
        "oldest": _oldest,
    }
    if request.query_params.get("reset") == "1":
        _peak = _running
        _oldest = min(_arrived.values(), default=None)
    return JSONResponse(answer)


@priority("exempt")
async def held(request: Request) -> Response:
    """What this process's backend holds right now: leases, waiters, orphans (Redis only)."""
    backend = request.app.state.backend
    names = {"leases": "_leases", "waiters": "_waiters", "orphans": "_orphans"}
    return JSONResponse({k: len(getattr(backend, v, ())) for k, v in names.items()})


@priority("exempt")
async def resize_slots(request: Request) -> Response:
    await _slots.resize(int(request.query_params["n"]))
    return JSONResponse({"slots": _slots.n})


def _rss_kib() -> int:
    status = Path("/proc/self/status").read_text()  # procfs: no disk to wait for
    return next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")


@priority("exempt")
async def body_buffers(request: Request) -> Response:
    node = request.app.middleware_stack
    while node is not None and not isinstance(node, ThrottleMiddleware):
        node = getattr(node, "app", None)
    rss_kib = _rss_kib()
    if node is None:
        return JSONResponse({"rss_kib": rss_kib})
    buffers = node.body_buffers
    return JSONResponse(
        {"used": buffers.used_bytes, "peak": buffers.peak_bytes, "rss_kib": rss_kib}
    )


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await websocket.send_text(await websocket.receive_text())


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    print("story lifespan: startup", flush=True)
    yield
    print("story lifespan: shutdown", flush=True)


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/work", work),
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/big", big),
            Route("/boom", boom),
            Route("/upload", upload, methods=["POST"]),
            Route("/hello", hello),
            Route("/_budget", budget),
            Route("/_running", running),
            Route("/_held", held),
            Route("/_slots", resize_slots, methods=["POST"]),
            Route("/_body", body_buffers),
            WebSocketRoute("/ws", ws_echo),
        ],
        lifespan=lifespan,
    )
    settings = Settings.from_env()
    backend = make_backend(settings) if settings.enabled else None
    app.state.backend = backend
    app.add_middleware(ThrottleMiddleware, backend=backend)
    return app


app = create_app()
# As long-running servers do: keep start-up objects out of the collector's reach, so a
# full collection (tens of ms on a small machine) does not land in the p99 being tested.
gc.collect()
gc.freeze()
