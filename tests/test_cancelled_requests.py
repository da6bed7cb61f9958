"""A request cancelled at any await of its admission gives back all it holds.

Servers do not cancel a request's task when its client leaves (uvicorn, hypercorn and
granian all let the app run on: checked by hand, docs/performance.md, "Hostile sweep,
fourth pass"), but an outer middleware may (a request timeout, a cancel-on-disconnect
wrapper), and so does a server's forced exit. Whenever that cancellation lands (reading
the body ahead, the acquire's round trip, queued, leaving the queue), the request must
leave nothing behind: no slot in memory or in Redis, no place in a queue, no bytes
counted against THROTTLE_BODY_BUFFER_TOTAL, no background task.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from tests.support.redis_server import RedisServer
from throttle_mw import ThrottleMiddleware
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.memory import MemoryBackend
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean_env")]


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads its body, works `scope["work"]` seconds or until `scope["hold"]` is set."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    hold = scope.get("hold")
    if hold is not None:
        await hold.wait()
    await asyncio.sleep(scope.get("work", 0.0))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(tenant: str, body: int = 0, **extra: Any) -> Scope:
    headers = [(b"x-tenant-id", tenant.encode())]
    if body:
        headers.append((b"content-length", str(body).encode()))
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/x",
        "raw_path": b"/x",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        **extra,
    }


async def _silent() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _body_then_silence(size: int) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"x" * size, "more_body": False}
        return await _silent()

    return receive


async def _ignore(message: Message) -> None:
    pass


def _watchers() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if (
            "RequestBody._watch" in repr(task.get_coro())
            or "RequestBody._follow" in repr(task.get_coro())
        )
        and not task.done()
    ]


async def _until(check: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.01)


async def _queued(middleware: ThrottleMiddleware, count: int) -> None:
    backend = middleware.backend
    assert backend is not None
    for _ in range(500):
        snapshot = await backend.snapshot()
        if sum(snapshot.queued_by_priority.values()) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} queued")


async def test_a_request_cancelled_while_queued_gives_its_body_bytes_back() -> None:
    """Its body read ahead, queued, cancelled: the bytes and the watcher go (on the old
    code the bytes stayed counted for good: a few such requests fill
    THROTTLE_BODY_BUFFER_TOTAL, and every later body waits for room until its 408)."""
    middleware = ThrottleMiddleware(
        _app, concurrency=1, body_buffer_bytes=1000, body_buffer_total_bytes=1000
    )
    await middleware.startup()
    try:
        release = asyncio.Event()
        holder = asyncio.create_task(
            middleware(_scope("h", hold=release), _body_then_silence(0), _ignore)
        )
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(middleware(_scope("q", 600), _body_then_silence(600), _ignore))
        await _queued(middleware, 1)
        assert middleware.body_buffers.used_bytes == 600
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await asyncio.sleep(0)
        assert middleware.body_buffers.used_bytes == 0
        assert _watchers() == []
        release.set()
        await holder
        snapshot = await middleware.backend.snapshot()  # type: ignore[union-attr]
        assert (snapshot.in_flight, sum(snapshot.queued_by_priority.values())) == (0, 0)
    finally:
        await middleware.shutdown()


class _SlowCancel(MemoryBackend):
    """The in-memory backend with a cancel that takes a while, as Redis's round trip
    does; `leaving` is set as a cancel starts, and it goes on once `go` is set."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.limits(), settings.policy())
        self.leaving = asyncio.Event()
        self.go = asyncio.Event()

    async def cancel(self, waiting: Waiting) -> Admitted | Any:
        self.leaving.set()
        await self.go.wait()
        return await super().cancel(waiting)


async def test_a_grant_found_by_the_cancel_of_a_cancelled_request_goes_back() -> None:
    """Queued; its client leaves; while its cancel is out, the holder finishes (the
    queued request is granted the slot) and the request's task is cancelled. The cancel
    then finds the grant: the slot must go back (on the old code nobody took the
    cancel's answer, and the slot stayed held for good)."""
    backend = _SlowCancel(Settings.from_env({}, concurrency=1))
    middleware = ThrottleMiddleware(_app, backend=backend)
    await middleware.startup()
    try:
        release = asyncio.Event()
        holder = asyncio.create_task(
            middleware(_scope("h", hold=release), _body_then_silence(0), _ignore)
        )
        await asyncio.sleep(0.02)
        gone = asyncio.Event()

        async def leaves() -> Message:
            await gone.wait()
            return {"type": "http.disconnect"}

        # (No body announced: the request's first read is the watcher's, which hears this.)

        queued = asyncio.create_task(middleware(_scope("q"), leaves, _ignore))
        await _queued(middleware, 1)
        gone.set()
        await asyncio.wait_for(backend.leaving.wait(), 2.0)
        release.set()
        await holder  # its release grants the slot to the queued request
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        backend.go.set()
        await asyncio.sleep(0.05)
        snapshot = await backend.snapshot()
        assert (snapshot.in_flight, sum(snapshot.queued_by_priority.values())) == (0, 0)
    finally:
        await middleware.shutdown()


def _redis_settings(server: RedisServer, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_timeout_s": 2.0,
        "concurrency": "1",
        "lease_ttl_s": 30.0,
        "keep_slots_s": 0.0,
        **overrides,
    }
    return Settings.from_env({}, redis_url=server.url, key_prefix=prefix, **values)


def _cancel_on_answer(backend: RedisBackend, kind: str) -> list[asyncio.Task[Any]]:
    """The next operation of `kind` the batcher answers: the task that submitted it is
    cancelled as the answer comes in, before that task runs again (a callback added
    before the task's own runs first), so asyncio throws the cancellation into it and
    the answer is not read. The task to cancel is put into the returned list."""
    batcher = backend._batcher
    assert batcher is not None
    submit = batcher.submit
    victims: list[asyncio.Task[Any]] = []

    def submitted(op: Any, on_orphan: Any = None, on_lost: Any = None) -> asyncio.Future[str]:
        future = submit(op, on_orphan, on_lost)
        if op.startswith(kind) and not victims:
            task = asyncio.current_task()
            assert task is not None
            victims.append(task)
            future.add_done_callback(lambda _: task.cancel())
        return future

    batcher.submit = submitted  # type: ignore[method-assign]
    return victims


async def _in_flight(server: RedisServer, prefix: str) -> int:
    client = server.client(decode_responses=True)
    try:
        return int(float(client.hget(f"{{{prefix}}}:s", "inflight") or 0))
    finally:
        client.close()


async def test_an_acquire_answered_as_its_caller_is_cancelled_is_undone(
    redis_server: RedisServer,
) -> None:
    """Redis admitted the request, and its task was cancelled between the answer and its
    next step: the lease goes back at once (on the old code nobody held or renewed it,
    and the slot was lost for the lease TTL, 30 s here)."""
    backend = RedisBackend(_redis_settings(redis_server, "ca1"))
    await backend.start()
    try:
        victims = _cancel_on_answer(backend, protocol.OP["acquire"] + protocol.SEP)
        task = asyncio.create_task(backend.acquire(Request("a", "acme", "normal", 1, False, False)))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert victims == [task]
        await _until(lambda: not backend._leases)
        deadline = time.monotonic() + 2.0
        while await _in_flight(redis_server, "ca1") != 0:
            assert time.monotonic() < deadline, "the lease stayed held in Redis"
            await asyncio.sleep(0.02)
        again = await backend.acquire(Request("b", "acme", "normal", 1, False, False))
        assert isinstance(again, Admitted)
        backend.release("b")
    finally:
        await backend.stop()


async def test_a_cancel_answered_with_a_grant_as_its_caller_is_cancelled_is_undone(
    redis_server: RedisServer,
) -> None:
    """Queued in one process, granted by another's release; its cancel reaches Redis
    after the grant (so it answers 'already admitted', a lease) and its caller is
    cancelled as that answer comes in: the lease goes back at once."""
    one = RedisBackend(_redis_settings(redis_server, "ca2"))
    two = RedisBackend(_redis_settings(redis_server, "ca2"))
    await one.start()
    await two.start()
    try:
        assert isinstance(
            await one.acquire(Request("a", "acme", "normal", 1, False, False)), Admitted
        )
        waiting = await two.acquire(Request("b", "beta", "normal", 1, False, False))
        assert isinstance(waiting, Waiting)
        two._waiters.pop("b")  # its grant is not heard: only the cancel's answer tells it
        one.release("a")
        await _until(lambda: "a" not in one._leases)
        await asyncio.sleep(0.1)  # the release's call ran: b holds the slot in Redis
        victims = _cancel_on_answer(two, protocol.OP["cancel"] + protocol.SEP)
        task = asyncio.create_task(two._cancel_in_redis("b", None))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert victims == [task]
        deadline = time.monotonic() + 2.0
        while await _in_flight(redis_server, "ca2") != 0:
            assert time.monotonic() < deadline, "the granted lease stayed held in Redis"
            await asyncio.sleep(0.02)
    finally:
        await one.stop()
        await two.stop()


# --- cancelled at random times -----------------------------------------------------------------


async def _one(middleware: ThrottleMiddleware, rnd: random.Random) -> str:
    """One request: maybe a body (sent in two chunks), maybe a client that leaves, an
    outer timeout of 0-60 ms that cancels it wherever it is."""
    size = rnd.choice([0, 0, 100, 3000])
    chunks = [b"x" * (size // 2), b"y" * (size - size // 2)] if size else [b""]
    leaves_after = rnd.random() * 0.05 if rnd.random() < 0.3 else None
    started = time.monotonic()

    async def receive() -> Message:
        if chunks:
            await asyncio.sleep(rnd.random() * 0.002)
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        if leaves_after is not None:
            await asyncio.sleep(max(0.0, started + leaves_after - time.monotonic()))
            return {"type": "http.disconnect"}
        return await _silent()

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = _scope(f"t{rnd.randrange(4)}", size, work=rnd.random() * 0.02)
    try:
        async with asyncio.timeout(rnd.random() * 0.06):
            await middleware(scope, receive, send)
    except TimeoutError:
        return "cancelled"
    return str(statuses[0]) if statuses else "left"


async def _admits_at_once(middleware: ThrottleMiddleware, count: int) -> None:
    """`count` requests held at once, none of them queued: the budget is whole."""
    release = asyncio.Event()
    starts: list[float] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            starts.append(time.monotonic())

    async def held(scope: Scope, receive: Receive, send_: Send) -> None:
        starts.append(time.monotonic())
        await release.wait()
        await _app(scope, receive, send_)

    middleware.app = held
    try:
        tasks = [
            asyncio.create_task(middleware(_scope(f"w{i}"), _body_then_silence(0), send))
            for i in range(count)
        ]
        await _until(lambda: len(starts) == count, 3.0)
        release.set()
        await asyncio.gather(*tasks)
    finally:
        middleware.app = _app


@pytest.mark.e2e
@pytest.mark.parametrize(
    "store",
    [
        "memory",
        "memory-cancel",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cancel", marks=pytest.mark.redis),
        pytest.param("redis-kept", marks=pytest.mark.redis),
        pytest.param("redis-two", marks=pytest.mark.redis),
    ],
)
async def test_requests_cancelled_at_random_times_leave_the_budget_whole(
    store: str, request: pytest.FixtureRequest
) -> None:
    """200 requests in waves of 12 on a budget of 2 (one or two processes), each under an
    outer timeout of 0-60 ms, bodies and clients that leave mixed in (and, "-cancel",
    THROTTLE_CANCEL_ON_DISCONNECT with a learned limit): afterwards nothing is in flight
    or queued, no body byte is counted, no watcher runs, and two requests run at once."""
    rnd = random.Random(4)
    settings: dict[str, Any] = {
        "concurrency": 2,
        "body_buffer_bytes": 4096,
        "body_buffer_total_bytes": 8192,
    }
    if store.endswith("-cancel"):
        # Cancel on disconnect (branch cancel) beside the outer timeouts (branch audit4),
        # with a learned limit's bookkeeping: the clients that leave while their app runs
        # have it cancelled, and each path still gives back all it holds exactly once.
        store = store.removesuffix("-cancel")
        settings.update(
            cancel_on_disconnect=True, concurrency="auto", concurrency_min=2, concurrency_max=2
        )
    processes = 1
    if store != "memory":
        server = request.getfixturevalue("redis_server")
        settings.update(redis_url=server.url, key_prefix="cr", lease_ttl_s=30.0)
        if store != "redis-kept":
            settings["keep_slots_s"] = 0.0
        processes = 2 if store == "redis-two" else 1
    middlewares = [ThrottleMiddleware(_app, **settings) for _ in range(processes)]
    for middleware in middlewares:
        assert middleware.error is None
        await middleware.startup()
    try:
        outcomes: Counter[str] = Counter()
        for _ in range(17):
            outcomes.update(
                await asyncio.gather(*(_one(rnd.choice(middlewares), rnd) for _ in range(12)))
            )
        assert outcomes["cancelled"] > 20, outcomes
        assert outcomes["200"] > 10, outcomes
        for middleware in middlewares:
            buffers = middleware.body_buffers
            await _until(lambda buffers=buffers: buffers.used_bytes == 0, 2.0)  # type: ignore[misc]
        await _until(lambda: not _watchers(), 2.0)
        for middleware in middlewares:
            backend = middleware.backend
            assert backend is not None

            async def whole(backend: Any = backend) -> tuple[int, int]:
                snapshot = await backend.snapshot()
                return snapshot.in_flight, sum(snapshot.queued_by_priority.values())

            deadline = time.monotonic() + 3.0
            while (state := await whole()) != (0, 0):
                # (kept slots count in flight until they are given back, within 1 s idle)
                assert time.monotonic() < deadline, (state, outcomes)
                await asyncio.sleep(0.05)
        await asyncio.wait_for(_admits_at_once(middlewares[0], 2), 5.0)
    finally:
        for middleware in middlewares:
            await middleware.shutdown()


@pytest.mark.e2e
async def test_an_acquire_cancelled_while_redis_is_frozen_is_cleaned_up_after_the_thaw(
    redis_server: RedisServer,
) -> None:
    """The caller gives up (an outer timeout) while its acquire is out to a frozen Redis;
    the call then times out, and Redis runs the acquire when it thaws, with nobody to hold
    the lease. The failed call now records it as an orphan, given back once Redis answers
    again; on the old code nobody knew of it and the slot stayed taken for the lease TTL
    (30 s here)."""
    backend = RedisBackend(_redis_settings(redis_server, "ca3", redis_timeout_s=0.3))
    await backend.start()
    try:
        warm = await backend.acquire(Request("warm", "acme", "normal", 1, False, False))
        assert isinstance(warm, Admitted)
        backend.release("warm")
        await asyncio.sleep(0.2)
        redis_server.freeze()
        try:
            task = asyncio.create_task(
                backend.acquire(Request("a", "acme", "normal", 1, False, False))
            )
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.6)  # the call times out: the breaker opens
        finally:
            redis_server.thaw()
        deadline = time.monotonic() + 5.0
        seen: list[int] = []
        while (held := await _in_flight(redis_server, "ca3")) != 0 or not seen:
            seen.append(held)
            assert time.monotonic() < deadline, f"a lease nobody holds stayed: {seen[-5:]}"
            await asyncio.sleep(0.05)
        again = await backend.acquire(Request("b", "acme", "normal", 1, False, False))
        assert isinstance(again, Admitted)
        backend.release("b")
    finally:
        await backend.stop()


async def test_an_orphaned_acquire_queued_then_granted_before_its_cancel_is_given_back(
    redis_server: RedisServer,
) -> None:
    """An acquire whose caller was gone when Redis answered 'queued' is taken out of the
    queue (`_undo_acquire`'s cancel, whose answer nobody awaits). If a release granted it
    the slot before that cancel ran, the cancel answers 'already admitted', a lease: it
    goes back at once (on the old code the batcher set that answer on a future nobody
    read, never calling `_undo_cancel`, and the slot stayed held until the lease TTL)."""
    one = RedisBackend(_redis_settings(redis_server, "ca3"))
    two = RedisBackend(_redis_settings(redis_server, "ca3"))
    await one.start()
    await two.start()
    try:
        assert isinstance(
            await one.acquire(Request("a", "acme", "normal", 1, False, False)), Admitted
        )
        waiting = await two.acquire(Request("b", "beta", "normal", 1, False, False))
        assert isinstance(waiting, Waiting)
        two._waiters.pop("b")  # as an orphan: nobody waits for it in this process
        one.release("a")
        await _until(lambda: "a" not in one._leases)
        await asyncio.sleep(0.1)  # the release's call ran: b holds the slot in Redis
        assert await _in_flight(redis_server, "ca3") == 1
        queued = protocol.SEP.join((protocol.REPLY["queued"], "0", "0", "1"))
        two._undo_acquire("b", queued)
        deadline = time.monotonic() + 2.0
        while await _in_flight(redis_server, "ca3") != 0:
            assert time.monotonic() < deadline, "the granted lease stayed held in Redis"
            await asyncio.sleep(0.02)
    finally:
        await one.stop()
        await two.stop()
