"""Leases of rate tokens in the Redis backend (``THROTTLE_RATE_LEASE``), on real servers.

Several backends (each a process of the fleet, with its own connections and pool) drive
one rate budget, one request at a time each:

- the fleet admits no more than the bucket's refill plus its burst over the run (no lease
  is outstanding at its start), and most admissions are made from the pools, without a
  script call;
- a process that stops gives its unspent tokens back (the bucket has them again);
- Redis killed while a process holds a lease: the process admits at most what that lease
  held (no Redis call needed for those), then the failure mode applies; nothing admitted
  locally after the lease would have expired.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from tests.support.redis_server import RedisServer
from throttle_mw.backends import Admitted
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.keys import Keys, tenant_digest
from throttle_mw.backends.redis.ratepool import AUTO_LEASE_S
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings

RATE, BURST, LEASE_S = 200.0, 40.0, 0.2
_prefixes = itertools.count()


def settings(url: str, prefix: str, **overrides: Any) -> Settings:
    return default_settings(url, prefix, **{"rate_lease_s": LEASE_S, **overrides})


def default_settings(url: str, prefix: str, **overrides: Any) -> Settings:
    """`settings` with THROTTLE_RATE_LEASE unset (unless given): the library's default."""
    values: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": prefix,
        # Generous, for a loaded machine (the start's PING, the first call's FUNCTION
        # LOAD); the tests that freeze Redis give their own 1 s.
        "redis_timeout_s": 3.0,
        "rate": RATE,
        "burst": BURST,
        "tenant_queue_limit": 0,  # what cannot go at once is rejected: nothing waits
        **overrides,
    }
    return Settings.from_env({}, **values)


async def script_calls(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("fcall", "evalsha")
    )


async def redis_time(client: redis.asyncio.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1e6


async def drive(backend: RedisBackend, seconds: float, every_s: float) -> list[float]:
    """Requests one at a time, one every `every_s`: the loop times of those admitted."""
    loop = asyncio.get_running_loop()
    admitted: list[float] = []
    end = loop.time() + seconds
    n = 0
    while loop.time() < end:
        n += 1
        outcome = await backend.acquire(Request(f"{backend.process}.{n}", f"t{n % 5}"))
        if isinstance(outcome, Admitted):
            assert not outcome.unthrottled
            admitted.append(loop.time())
        await asyncio.sleep(every_s)
    return admitted


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("rate", "every_s"), [(1000.0, 0.01), (100.0, 0.002)], ids=["within", "over"]
)
async def test_a_fleet_with_leases_admits_within_the_budget_with_fewer_calls(
    clean_redis_server: RedisServer, rate: float, every_s: float
) -> None:
    """Four processes, one request at a time each: within the budget (at most 4 x 100/s
    against 1000/s) everything is admitted, most of it from the pools; over it (up to
    4 x 500/s against 100/s) the fleet admits what the bucket allows, no more."""
    prefix = f"rl{next(_prefixes)}"
    burst = rate / 5
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    # (Failure mode `closed`: a stall of Redis, were there one, admits nothing locally.)
    backends = [
        RedisBackend(
            settings(clean_redis_server.url, prefix, rate=rate, burst=burst, failure_mode="closed")
        )
        for _ in range(4)
    ]
    for backend in backends:
        await backend.start()
    await asyncio.sleep(0.3)  # the heartbeats: every process knows the fleet's size
    calls = await script_calls(client)
    loop = asyncio.get_running_loop()
    started, redis_started = loop.time(), await redis_time(client)
    runs = await asyncio.gather(*(drive(b, 2.0, every_s) for b in backends))
    elapsed = loop.time() - started
    # The bucket refills by Redis's clock (TIME: the wall clock), the run is timed by the
    # loop's (monotonic): a step of the host's wall clock refills the bucket by as much.
    redis_elapsed = await redis_time(client) - redis_started
    calls = await script_calls(client) - calls
    admitted = sum(len(run) for run in runs)
    local = sum(b.rate_lease.local_admissions for b in backends if b.rate_lease is not None)
    offered = sum(b.rate_lease.requests for b in backends if b.rate_lease is not None)
    for backend in backends:
        await backend.stop()
    await client.aclose()
    assert admitted <= rate * max(elapsed, redis_elapsed) + burst, (elapsed, redis_elapsed)
    if rate == 1000.0:
        assert admitted == offered
        assert local > 0.7 * admitted, (local, admitted)
        # (the heartbeats' calls counted too: renew.lua, every 0.2 s per process)
        assert calls < 0.4 * admitted, (calls, admitted)
    else:
        assert admitted > 0.9 * rate * elapsed, (admitted, rate * elapsed)
        # Saturated, leases cost a little: a request the bucket cannot take goes to Redis
        # as without leases, and each process makes at most two lease calls per T (a
        # renewal short of what it asked waits half a T), plus its heartbeats.
        assert calls <= offered + 4 * elapsed * (2 / LEASE_S + 5) + 8, (calls, offered)


@pytest.mark.anyio
async def test_a_process_that_stops_gives_its_unspent_tokens_back(
    clean_redis_server: RedisServer,
) -> None:
    prefix = f"rl{next(_prefixes)}"
    url = clean_redis_server.url
    backend = RedisBackend(settings(url, prefix, rate=1.0, burst=200.0, rate_lease_s=5.0))
    await backend.start()
    await drive(backend, 0.2, 0.01)  # leases as large as the requests seen so far
    if backend._lease_task is not None:
        await backend._lease_task  # (a renewal out: its grant in the pool)
    pool = backend.rate_lease
    assert pool is not None
    assert pool.tokens > 0
    held = pool.tokens
    other = RedisBackend(settings(url, prefix, rate=1.0, burst=200.0, rate_lease_s=0.0))
    before = (await other.snapshot()).tokens
    await backend.stop()
    after = (await other.snapshot()).tokens
    await other.stop()
    assert before is not None
    assert after is not None
    assert after == pytest.approx(min(200.0, before + held), abs=0.5)  # (1/s refills meanwhile)


@pytest.mark.anyio
async def test_redis_killed_during_a_lease_costs_at_most_that_lease(
    redis_server: RedisServer,
) -> None:
    """Failure mode `closed`: once Redis is gone, the process admits only what its lease
    held, and only until the lease would have expired; then it rejects (the failure mode)
    and asks Redis nothing for admitted requests meanwhile."""
    backend = RedisBackend(
        settings(redis_server.url, "rlkill", rate=1000.0, burst=1000.0, failure_mode="closed",
                 rate_lease_s=0.5)
    )  # fmt: skip
    await backend.start()
    await asyncio.sleep(0.3)
    pool = backend.rate_lease
    assert pool is not None
    # Leases sized for a few hundred requests a second: a lease follows the rate seen over
    # the last T or two, so on a loaded machine it can take a few rounds to grow.
    for _ in range(10):
        await drive(backend, 0.3, 0.002)
        if backend._lease_task is not None:
            await backend._lease_task
        if pool.tokens > 20:
            break
    loop = asyncio.get_running_loop()
    held, expires = pool.tokens, pool.expires_at
    assert held > 0
    redis_server.kill()
    # Fewer requests than it holds: what stops it is its first call to Redis (a renewal
    # at three quarters of T) failing, or the lease's end, not running out of tokens.
    after = await drive(backend, 1.0, 0.05)
    await backend.stop()
    assert held > 20
    assert len(after) <= held, (len(after), held)
    assert after
    assert all(at < expires for at in after), (after[-1], expires)
    assert loop.time() > expires


@pytest.mark.anyio
async def test_the_metrics_count_what_the_lease_admitted(clean_redis_server: RedisServer) -> None:
    from prometheus_client import CollectorRegistry

    from throttle_mw.metrics import ThrottleMetrics

    backend = RedisBackend(settings(clean_redis_server.url, f"rl{next(_prefixes)}", rate=1000.0))
    metrics = ThrottleMetrics(registry=CollectorRegistry(), backend=backend)
    await backend.start()
    admitted = await drive(backend, 0.3, 0.005)
    await backend.stop()
    pool = backend.rate_lease
    assert pool is not None
    assert 0 < pool.local_admissions <= len(admitted)
    text = metrics.render()[0].decode()
    assert f"throttle_rate_lease_admissions_total {float(pool.local_admissions)}" in text
    assert f"throttle_rate_lease_calls_total {float(pool.calls)}" in text
    assert f'throttle_rate_lease_tokens_total{{how="leased"}} {float(pool.leased)}' in text


@pytest.mark.parametrize(
    ("limits", "pooled"),
    [
        ({}, True),  # a rate alone: auto
        ({"concurrency": 8}, False),
        ({"concurrency": "auto"}, False),
        ({"tenant_rate": 5.0}, False),
        ({"rate_lease_s": 0}, False),  # explicitly off: the exact per-request path
        ({"rate_lease_s": "off"}, False),
    ],
)
def test_the_default_is_auto_for_a_rate_alone_and_off_for_other_budgets(
    limits: dict[str, Any], pooled: bool
) -> None:
    """THROTTLE_RATE_LEASE unset: a pool of `auto` (AUTO_LEASE_S) for a rate budget alone;
    none where a concurrency budget or a tenant's cap counts each request in Redis."""
    backend = RedisBackend(default_settings("redis://127.0.0.1:1/0", "rld", **limits))
    pool = backend.rate_lease
    assert (pool is not None) == pooled
    if pool is not None:
        assert (pool.lease_s, pool.auto) == (AUTO_LEASE_S, True)


@pytest.mark.anyio
@pytest.mark.parametrize("explicit", [True, False], ids=["auto", "default"])
async def test_auto_leases_for_a_busy_process_and_not_for_a_quiet_one(
    clean_redis_server: RedisServer, explicit: bool
) -> None:
    """THROTTLE_RATE_LEASE=auto, or unset (the default for a rate alone): the process at
    200/s admits most of its requests from leases; the one at 5/s makes no lease call
    (its requests go to Redis one by one)."""
    prefix = f"rl{next(_prefixes)}"
    url = clean_redis_server.url
    make = settings if explicit else default_settings
    lease: dict[str, Any] = {"rate_lease_s": "auto"} if explicit else {}
    busy, quiet = (
        RedisBackend(make(url, prefix, rate=1000.0, burst=200.0, **lease)) for _ in range(2)
    )
    for backend in (busy, quiet):
        await backend.start()
    await asyncio.sleep(0.3)  # the heartbeats: every process knows the fleet's size
    runs = await asyncio.gather(drive(busy, 1.5, 0.005), drive(quiet, 1.5, 0.2))
    for backend in (busy, quiet):
        await backend.stop()
    busy_pool, quiet_pool = busy.rate_lease, quiet.rate_lease
    assert busy_pool is not None
    assert quiet_pool is not None
    assert busy_pool.lease_s == quiet_pool.lease_s == AUTO_LEASE_S
    assert busy_pool.local_admissions > 0.5 * len(runs[0]), (busy_pool.local_admissions, runs)
    assert (quiet_pool.calls, quiet_pool.local_admissions) == (0, 0)
    assert len(runs[1]) == quiet_pool.requests


@pytest.mark.anyio
async def test_lease_admissions_are_charged_to_their_tenant_in_redis(
    clean_redis_server: RedisServer,
) -> None:
    """One tenant alone, most of its requests admitted from leases: once the process has
    stopped (its last renewal sends what is left to charge), its finish tag in Redis is
    where the admissions one by one through Redis would have put it: one past the clock
    it started at, plus one per admission."""
    prefix = f"rl{next(_prefixes)}"
    backend = RedisBackend(settings(clean_redis_server.url, prefix, rate=1000.0, burst=200.0))
    await backend.start()
    loop = asyncio.get_running_loop()
    admitted, end = 0, loop.time() + 0.5
    while loop.time() < end:
        outcome = await backend.acquire(Request(f"s{admitted}", "solo"))
        assert isinstance(outcome, Admitted)
        admitted += 1
        await asyncio.sleep(0.002)
    await backend.stop()
    pool = backend.rate_lease
    assert pool is not None
    assert pool.local_admissions > admitted / 2
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    text = await client.hget(Keys(prefix).tenant_hash, tenant_digest("solo"))
    await client.aclose()
    assert text is not None
    assert float(protocol.tenant_state(text)["f"]) == admitted + 1


async def charged_tag(url: str, prefix: str, tenant: str) -> float:
    client = redis.asyncio.Redis.from_url(url)
    text = await client.hget(Keys(prefix).tenant_hash, tenant_digest(tenant))
    await client.aclose()
    assert text is not None
    return float(protocol.tenant_state(text)["f"])


async def until_closed(backend: RedisBackend, seconds: float = 15.0) -> None:
    """Wait for the breaker to close (its probe found Redis back)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while backend._breaker.is_open:
        assert loop.time() < end, "Redis did not come back for the backend"
        await asyncio.sleep(0.05)


async def lease_then(backend: RedisBackend, tenant: str, fault: Any) -> int:
    """Requests of `tenant` one at a time until the pool has admitted some from its leases
    and has admissions not sent yet, then `await fault()`, then more until one is not
    admitted (the failure mode `closed`: the fault is noticed). The admissions (none
    unthrottled)."""
    pool = backend.rate_lease
    assert pool is not None
    faulted = False
    for n in range(5000):
        outcome = await backend.acquire(Request(f"{tenant}{n}", tenant))
        if not isinstance(outcome, Admitted):
            assert faulted
            return n  # (the requests before it)
        assert not outcome.unthrottled
        if not faulted and pool.local_admissions >= 20 and pool.pending and not pool.renewing:
            await fault()
            faulted = True
        await asyncio.sleep(0.001)
    raise AssertionError("the fault was not noticed")


@pytest.mark.anyio
async def test_charges_not_sent_when_redis_stops_are_charged_once_it_is_back_with_its_data(
    redis_binary: Path,
) -> None:
    """Redis shut down (saving its data) while the process has admitted requests from its
    lease that it has not sent to be charged: its next call fails (refused: never run;
    the renewal carrying them, or another). Back with its data (the same state), the
    charges go with the first renewal: the tenant's finish tag is one past the clock plus
    one per admission, as if nothing had happened (lost, the tenant got those admissions
    free of its share)."""
    prefix = f"rl{next(_prefixes)}"
    with RedisServer(binary=redis_binary) as server:
        backend = RedisBackend(
            settings(server.url, prefix, rate=1000.0, burst=200.0, rate_lease_s=5.0,
                     failure_mode="closed")
        )  # fmt: skip
        await backend.start()
        try:

            async def shut_down() -> None:
                with server.client() as client:
                    client.shutdown(save=True)  # (SHUTDOWN SAVE: the data kept on disk)
                # (Its connections seen closed: the next call is refused, not cut, as a
                # call to a Redis that is down is. One cut may have run: not sent again.)
                await asyncio.sleep(0.2)

            admitted = await lease_then(backend, "solo", shut_down)
            for _ in range(500):  # (its process ends as it closes its connections: bounded)
                if not server.is_running:
                    break
                await asyncio.sleep(0.01)
            server.start()  # (the same port and directory: the data loaded back)
            await until_closed(backend)
        finally:
            await backend.stop()  # (its last renewal sends what is left to charge)
        assert await charged_tag(server.url, prefix, "solo") == admitted + 1


@pytest.mark.anyio
async def test_charges_of_a_frozen_redis_are_charged_once(redis_server: RedisServer) -> None:
    """Redis frozen (SIGSTOP) while the process admits from its lease: the renewal that
    goes out meanwhile times out (Redis runs it when it resumes: its charges are not sent
    again, else charged twice); the admissions recorded after it was sent stay, for the
    first renewal once Redis is back. Each admission is charged once: the tenant's finish
    tag is one past the clock plus one per admission. (Only admissions from the lease
    while frozen: an acquire sent then would run as Redis resumes, its client told no.)"""
    prefix = f"rl{next(_prefixes)}"
    backend = RedisBackend(
        settings(redis_server.url, prefix, rate=1000.0, burst=200.0, rate_lease_s=5.0,
                 failure_mode="closed", redis_timeout_s=1.0)
    )  # fmt: skip
    await backend.start()
    pool = backend.rate_lease
    assert pool is not None
    loop = asyncio.get_running_loop()
    admitted, after = 0, 0
    try:
        for n in range(5000):
            outcome = await backend.acquire(Request(f"s{n}", "solo"))
            assert isinstance(outcome, Admitted)
            admitted += 1
            if pool.local_admissions >= 20 and pool.pending and not pool.renewing:
                break
            await asyncio.sleep(0.001)
        redis_server.freeze()
        while pool.tokens >= 1 and loop.time() < pool.expires_at and after < 5:
            outcome = await backend.acquire(Request(f"f{admitted}", "solo"))
            assert isinstance(outcome, Admitted)  # (from the lease: nothing sent)
            admitted += 1
            after += pool.renewing  # (recorded after the renewal out was sent)
            await asyncio.sleep(0.001)
        assert after, "no renewal went out while Redis was frozen"
        end = loop.time() + 10.0
        while backend._breaker.allow():  # (the renewal's timeout, or the heartbeat's)
            assert loop.time() < end
            await asyncio.sleep(0.05)
    finally:
        redis_server.thaw()
    try:
        await until_closed(backend)
    finally:
        await backend.stop()
    assert await charged_tag(redis_server.url, prefix, "solo") == admitted + 1
