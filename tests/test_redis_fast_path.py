"""The middleware's fast path on the Redis backend (`RedisBackend.fast_path`).

A request this process admits without a call (a kept concurrency slot, tokens of its
lease of rate tokens) runs the middleware's short tail, as an in-memory admission at
once does: no `Request`, no `_throttle`, a lease keyed by a number of the backend's.
Its decisions are `acquire`'s: the slot is given back or kept as before, renewals of
the lease are started from it, and a backend whose breaker is open is not asked here.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio
from starlette.types import Receive, Scope, Send

from tests.support.redis_server import RedisServer
from tests.support.script_calls import ScriptCalls, own
from tests.test_redis_kept_slots import in_flight
from throttle_mw import ThrottleMiddleware
from throttle_mw.backends import Admitted
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.backends.redis.ratepool import RatePool
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings

LIMIT = 8
_prefixes = itertools.count()


def settings(url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": prefix,
        # Generous, for a loaded machine (the start's PING, the first call's FUNCTION
        # LOAD); nothing here freezes Redis, so no check is bounded by it.
        "redis_timeout_s": 3.0,
        **overrides,
    }
    return Settings.from_env({}, **values)


def count_full_path(middleware: ThrottleMiddleware) -> list[int]:
    """Count the requests that go `_throttle`'s way (the full path), not the fast one."""
    calls = [0]
    full: Callable[..., Awaitable[None]] = middleware._throttle

    async def counted(*args: Any) -> None:
        calls[0] += 1
        await full(*args)

    middleware._throttle = counted  # type: ignore[method-assign,assignment]
    return calls


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/boom":
        raise RuntimeError("the app failed")
    if scope["path"] == "/slow":
        await asyncio.sleep(0.1)
    decision = scope["state"]["throttle"]
    body = f"{decision.outcome} {decision.waited_s}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.anyio
async def test_requests_on_a_kept_slot_run_the_fast_path_and_keep_it(
    clean_redis_server: RedisServer,
) -> None:
    """The first request gets a lease from Redis (the full path) and leaves it kept; the
    next ones run on it by the fast path, without a call, and keep it again however they
    end; with the breaker open they go the full path (the failure mode), the kept slot
    untouched."""
    prefix = f"fp{next(_prefixes)}"
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    backend = RedisBackend(
        settings(clean_redis_server.url, prefix, concurrency=LIMIT, keep_slots_s=10.0)
    )
    middleware = ThrottleMiddleware(app, concurrency=LIMIT, keep_slots_s=10.0, backend=backend)
    full = count_full_path(middleware)
    transport = httpx.ASGITransport(app=middleware)
    async with (
        ScriptCalls(client) as calls,
        httpx.AsyncClient(transport=transport, base_url="http://test") as http,
    ):
        assert (await http.get("/ok")).status_code == 200  # from Redis, then kept
        assert full[0] == 1
        pool = backend.kept_slots
        assert pool is not None
        assert len(pool) == 1
        # The first request's acquire was seen (the count is not blind). Only the calls
        # requests cause are counted from here: the heartbeat (renew.lua, at start and
        # every lease_ttl_s / 3) runs for real and may fall in the ten requests, more
        # likely the longer they take (a loaded machine); on Redis 6.2 its first call is a
        # chain of round trips that can end after the first request.
        assert own(await calls.since())["batch"] >= 1
        for _ in range(5):
            response = await http.get("/ok")
            assert response.status_code == 200
            assert response.text == "admitted 0.0"  # decided at once, as in memory
            assert response.headers["server-timing"] == "throttle;dur=0.0"
            with pytest.raises(RuntimeError):
                await http.get("/boom")
        assert full[0] == 1  # every one of them on the fast path
        assert pool.local_admissions == 10
        assert len(pool) == 1  # given back to the pool each time
        assert not backend._borrowed
        assert own(await calls.since()) == Counter()  # no call for any of them
        assert await in_flight(client, prefix) == 1

        backend._breaker.failure()  # open (no probe: it stays open)
        response = await http.get("/ok")
        assert response.status_code == 200
        assert full[0] == 2  # the failure mode decides, on the full path
        assert pool.local_admissions == 10
        assert len(pool) == 1
        backend._breaker.success()
        assert (await http.get("/ok")).status_code == 200
        assert full[0] == 2
        assert pool.local_admissions == 11
    await backend.stop()
    assert await in_flight(client, prefix) == 0
    await client.aclose()


@pytest.mark.anyio
async def test_middlewares_sharing_a_redis_backend_give_back_their_kept_slots(
    clean_redis_server: RedisServer,
) -> None:
    """The fast path keys a kept slot by a number of the backend's: two middlewares on
    one backend, each with a request on a kept slot at once, each give back their own."""
    prefix = f"fp{next(_prefixes)}"
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    backend = RedisBackend(
        settings(clean_redis_server.url, prefix, concurrency=LIMIT, keep_slots_s=10.0)
    )
    await backend.start()
    ids = [f"{backend.process}.x{n}" for n in range(2)]
    for rid in ids:
        outcome = await backend.acquire(Request(rid, "acme"))
        assert isinstance(outcome, Admitted)
        assert outcome.lease
    for rid in ids:
        backend.release(rid)
    pool = backend.kept_slots
    assert pool is not None
    assert len(pool) == 2
    first = ThrottleMiddleware(app, concurrency=LIMIT, keep_slots_s=10.0, backend=backend)
    second = ThrottleMiddleware(app, concurrency=LIMIT, keep_slots_s=10.0, backend=backend)
    full = [count_full_path(first), count_full_path(second)]

    async def get(middleware: ThrottleMiddleware, path: str) -> int:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return (await http.get(path)).status_code

    slow = asyncio.create_task(get(first, "/slow"))
    for _ in range(100):
        if len(pool) == 1:
            break
        await asyncio.sleep(0.001)
    assert len(pool) == 1  # the slow request runs on one kept slot
    assert await get(second, "/ok") == 200  # on the other, and kept it again
    assert len(pool) == 1
    assert len(backend._borrowed) == 1  # the slow one's, still out
    assert await slow == 200
    assert len(pool) == 2
    assert not backend._borrowed
    assert full[0][0] == full[1][0] == 0
    assert pool.local_admissions == 2
    assert await in_flight(client, prefix) == 2
    await backend.stop()
    assert await in_flight(client, prefix) == 0
    await client.aclose()


async def renewed(pool: RatePool) -> None:
    """Wait (bounded) until no renewal of the lease is out. Not a fixed sleep: on a loaded
    machine a reply can take longer than a request, whose request would then find the pool
    empty and go to Redis right behind the renewal that took the bucket's tokens (its
    share, all the bucket holds then), wait there a token's time, and the "someone waits"
    signal that brings makes the pool give its lease back and pause half a T."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while pool.renewing:
        assert loop.time() < deadline, "a renewal of the lease was not answered in 2 s"
        await asyncio.sleep(0.001)


@pytest.mark.anyio
async def test_requests_from_a_lease_of_rate_tokens_run_the_fast_path_and_renew_it(
    clean_redis_server: RedisServer,
) -> None:
    """Leases of four tokens (half a burst of 8): most requests are admitted from them
    on the fast path, and the renewals those admissions start keep them coming."""
    prefix = f"fp{next(_prefixes)}"
    backend = RedisBackend(
        settings(clean_redis_server.url, prefix, rate=1000.0, burst=8.0, rate_lease_s=1.0)
    )
    middleware = ThrottleMiddleware(app, rate=1000.0, burst=8.0, rate_lease_s=1.0, backend=backend)
    full = count_full_path(middleware)
    transport = httpx.ASGITransport(app=middleware)
    n = 60
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/ok", headers={"X-Tenant-ID": "acme"})).status_code == 200
        pool = backend.rate_lease
        assert pool is not None
        for _ in range(n - 1):
            await asyncio.sleep(0.002)  # (at most 500 requests a second: within the rate)
            await renewed(pool)  # (a renewal's reply comes in between)
            assert (await http.get("/ok", headers={"X-Tenant-ID": "acme"})).status_code == 200
    size, calls, local = pool.size, pool.calls, pool.local_admissions
    await backend.stop()
    assert local + full[0] == n
    assert full[0] < n / 2, (full[0], local)
    assert size == 4
    # Each lease holds four tokens: the fast path's admissions started the renewals.
    assert calls >= local / 4, (calls, local)
