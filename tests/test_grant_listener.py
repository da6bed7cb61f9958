"""The grant listener's own connection dropped, Redis fine: nobody else notices.

One process's listener (BLPOP on its grant list) loses its connection (CLIENT KILL on a
real redis-server) while Redis answers every other call: the breaker stays closed, so
failure mode `closed` rejects nothing, and a grant pushed while the listener was away
still reaches its waiter. Redis really away is still noticed through the listener alone.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from tests.support.redis_server import RedisServer
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.scheduler import Reject, Request
from throttle_mw.settings import Settings


def _backend(server: RedisServer, concurrency: str = "1") -> RedisBackend:
    settings = Settings.from_env(
        {},
        redis_url=server.url,
        key_prefix="gl",
        # (Generous: the start loads the library, and a loaded machine's Redis may take
        # more than a second; no check here is bounded by this timeout.)
        redis_timeout_s=3.0,
        concurrency=concurrency,
        failure_mode="closed",
    )
    return RedisBackend(settings)


def _listeners(client: redis.Redis) -> list[str]:
    """Ids of the connections blocked in BLPOP: the grant listeners."""
    return [str(c["id"]) for c in client.client_list() if c.get("cmd") == "blpop"]


async def _one_held_one_waiting(backend: RedisBackend) -> Waiting:
    """Request "a" holds the one slot (with a lease), "b" waits for it."""
    held = await backend.acquire(Request("a", "acme"))
    assert isinstance(held, Admitted)
    assert held.lease
    waiting = await backend.acquire(Request("b", "acme"))
    assert isinstance(waiting, Waiting)
    return waiting


async def _kill_listener(client: redis.Redis) -> str:
    for _ in range(100):
        ids = _listeners(client)
        if ids:
            [victim] = ids
            assert client.client_kill_filter(_id=victim) == 1
            return victim
        await asyncio.sleep(0.01)
    raise AssertionError("no grant listener blocked in BLPOP")


@pytest.mark.anyio
async def test_a_dropped_listener_connection_opens_no_breaker(
    clean_redis_server: RedisServer,
) -> None:
    client = clean_redis_server.client(decode_responses=True)
    backend = _backend(clean_redis_server)
    await backend.start()
    try:
        waiting = await _one_held_one_waiting(backend)
        victim = await _kill_listener(client)
        await asyncio.sleep(0.01)  # the listener reads the closed socket
        backend.release("a")  # the grant for "b" is pushed whether the listener is back or not
        granted = await asyncio.wait_for(waiting.future, 3.0)
        assert isinstance(granted, Admitted)
        backend.release("b")
        # Acquire and release for a while after the drop: nothing is rejected.
        outcomes = []
        until = time.monotonic() + 0.4
        n = 0
        while time.monotonic() < until:
            outcome = await backend.acquire(Request(f"r{n}", "acme"))
            outcomes.append(outcome)
            backend.release(f"r{n}")
            n += 1
        assert [o for o in outcomes if isinstance(o, Reject)] == []
        assert backend._breaker.failures == 0
        assert not backend._breaker.is_open
        # The listener is back, on a new connection.
        for _ in range(200):
            if _listeners(client) and _listeners(client) != [victim]:
                break
            await asyncio.sleep(0.01)
        assert _listeners(client) not in ([], [victim])
    finally:
        await backend.stop()
        client.close()


@pytest.mark.anyio
async def test_a_grant_lost_with_the_listener_s_connection_still_arrives(
    clean_redis_server: RedisServer,
) -> None:
    """A grant popped from the list but never read (the connection died under it): the
    waiter is asked about again once the listener is back, and Redis answers it."""
    client = clean_redis_server.client(decode_responses=True)
    backend = _backend(clean_redis_server)
    await backend.start()
    try:
        waiting = await _one_held_one_waiting(backend)
        assert backend._listener is not None
        await backend._listener.stop()  # as if its BLPOP's reply were lost in flight
        backend.release("a")
        grants = f"{{gl}}:g:{backend.process}"
        for _ in range(100):
            if client.llen(grants):
                break
            await asyncio.sleep(0.01)
        assert client.delete(grants) == 1  # the grant message is gone
        backend._listener_back()  # what the listener calls once connected again
        granted = await asyncio.wait_for(waiting.future, 3.0)
        assert isinstance(granted, Admitted)
        assert granted.lease
        assert not backend._breaker.is_open
        backend.release("b")
    finally:
        await backend.stop()
        client.close()


@pytest.mark.anyio
async def test_redis_really_away_is_noticed_through_the_listener(
    redis_server: RedisServer,
) -> None:
    """No request in flight to notice: the listener's failure, checked, opens the breaker,
    and its waiters are settled by the failure mode."""
    backend = _backend(redis_server)
    await backend.start()
    try:
        waiting = await _one_held_one_waiting(backend)
        redis_server.stop()
        settled = await asyncio.wait_for(waiting.future, 8.0)
        assert isinstance(settled, Reject)
        assert settled.reason == "unavailable"
        assert backend._breaker.is_open
    finally:
        await backend.stop()
