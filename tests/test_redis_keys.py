"""Nothing a budget writes lives forever: every key has a TTL, and an unused budget goes.

keys.py's table gives each key its TTL: T (the longest maximum wait, the
deadline grace and the lease TTL), idle+T for what describes tenants, and
``THROTTLE_LIVE_LIMITS_TTL`` for live limits and weights. A key gets its TTL
when it is created (Redis drops a key that empties, and its TTL with it; a
later write makes a new key without one) and has it pushed out when a quarter
of it has passed. The first test checks that after *every* call of simulated
runs that create and empty every kind of key; the fleet test stops real
processes (one without lifespan, one killed while it holds a lease and a
waiter) and waits for the budget to leave Redis on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer, start_all, wait_until
from tests.support.simulation import Arrival, Simulation, poisson
from throttle_mw.backends import Admitted
from throttle_mw.backends.redis import RedisBackend, keys, scripts
from throttle_mw.backends.redis.admin import Budget
from throttle_mw.backends.redis.backend import key_ttl_s
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Limits, Policy, Request
from throttle_mw.settings import DEFAULT_MAX_WAIT_S, Settings


def keys_of(client: redis.Redis, tag: str) -> set[str]:
    """Every key under the budget's tag (SCAN skips keys already expired)."""
    return {str(k, "utf-8") for k in client.scan_iter(match=tag + "*", count=1000)}


def fields(client: redis.Redis, key: str) -> set[str]:
    return {str(k, "utf-8") for k in cast(list[bytes], client.hkeys(key))}


def keys_without_ttl(client: redis.Redis, tag: str) -> list[tuple[str, int]]:
    """Keys under the budget's tag that would live forever (PTTL -1), and their PTTL."""
    keys = list(client.scan_iter(match=tag + "*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    return [(k.decode(), t) for k, t in zip(keys, pipe.execute(), strict=True) if t < 0]


class Checked(LuaScheduler):
    """The Lua scheduler, checking after every call that every key of its budget has a TTL."""

    def __init__(self, client: redis.Redis, limits: Limits, policy: Policy) -> None:
        self.forever: list[tuple[float, str, str]] = []  # (when, operation, key)
        self.calls = 0
        super().__init__(client, limits, policy, 0.0)

    def _call(
        self, now: float, ops: list[str], entry: str = "batch"
    ) -> tuple[list[str], list[Any]]:
        result = super()._call(now, ops, entry)
        self.calls += 1
        for key, _ in keys_without_ttl(self._client, self._tag):
            self.forever.append((now, ops[0][:1], key))
        return result


def scenario(name: str) -> tuple[Limits, list[Arrival], dict[str, Any]]:
    rng = random.Random(7)
    if name == "one tenant floods":  # P:active emptied and made again by every grant
        return Limits(rate=20, burst=2), poisson("C", 60, 0, 5, rng), {}
    if name == "caps, priorities, concurrency":  # P:capped, leases, several queues
        arrivals = [
            Arrival(a.at, a.tenant, a.priority, service_s=0.05 + 0.1 * rng.random())
            for tenant, prio in (("P", "critical"), ("Q", "low"), ("R", "normal"))
            for a in poisson(tenant, 25, 0, 5, rng, priority=prio)
        ]
        limits = Limits(rate=40, burst=8, concurrency=4, tenant_rate=15, tenant_burst=3)
        return limits, arrivals, {"tenant_queue_limit": 20, "queue_limit": 50}
    if name == "concurrency, often idle":  # leases' keys come and go
        arrivals = [Arrival(a.at, a.tenant, service_s=0.02) for a in poisson("X", 30, 0, 5, rng)]
        return Limits(concurrency=2), arrivals, {}
    # Many tenants, forgotten while idle and over the bound, coming back.
    arrivals = [Arrival(rng.random() * 5, f"t{rng.randrange(300)}") for _ in range(600)]
    return Limits(rate=50, burst=5), arrivals, {"tenant_idle_s": 0.5, "max_tenants": 50}


@pytest.mark.parametrize(
    "name",
    [
        "one tenant floods",
        "caps, priorities, concurrency",
        "concurrency, often idle",
        "many tenants come and go",
    ],
)
def test_every_key_has_a_ttl_after_every_call(name: str, redis_server_session: RedisServer) -> None:
    limits, arrivals, policy = scenario(name)
    client = redis_server_session.client()
    try:
        scheduler = Checked(client, limits, Policy(DEFAULT_MAX_WAIT_S, **policy))
        # The run's clock starts at 0 and its T is hours: no refresh falls due after the
        # first call, so what this checks is that every key got its TTL when it was made.
        as_scheduler: Any = scheduler  # the Scheduler's interface, run by Redis
        outcomes = Simulation(as_scheduler).run(arrivals)
    finally:
        client.close()
    assert any(o.rejected or (o.waited_s or 0) > 0 for o in outcomes)  # queues formed
    assert scheduler.calls > 300
    assert scheduler.forever == []


def test_the_idle_list_keeps_its_anchor_and_its_ttl(redis_server_session: RedisServer) -> None:
    """P:tenants holds an anchor member (keys.IDLE_ANCHOR, +inf), so it is not emptied, and
    made anew without a TTL, when its last tenant starts waiting: the call that puts a
    tenant back on it needs no PEXPIRE. A list without the anchor (made by an older build)
    gets it from the next full call, its TTL kept; one made anew gets a TTL; the snapshot
    counts tenants without it."""
    client = redis_server_session.client()
    try:
        client.flushall()
        scheduler = LuaScheduler(
            client, Limits(rate=1.0, burst=1.0), Policy(DEFAULT_MAX_WAIT_S), now=0.0
        )
        idle = f"{scheduler._tag}:tenants"
        scheduler.acquire(0.0, Request("r1", "a"))  # admitted (a new budget: a full call)
        assert client.zrange(idle, 0, -1) == [
            keys.tenant_digest("a").encode(),
            keys.IDLE_ANCHOR.encode(),
        ]
        scheduler.acquire(0.1, Request("r2", "a"))  # queues: off the list, the anchor stays
        assert client.zrange(idle, 0, -1, withscores=True) == [
            (keys.IDLE_ANCHOR.encode(), float("inf"))
        ]
        assert client.pttl(idle) > 5_000
        client.pexpire(idle, 5_000)  # (what is left of its TTL, later)
        scheduler.tick(1.5)  # r2 admitted: "a" back on the list, which keeps its TTL
        assert client.zcard(idle) == 2
        assert 0 < client.pttl(idle) <= 5_000
        # An older build's list: a tenant on it, no anchor: the next full call adds it.
        client.zrem(idle, keys.IDLE_ANCHOR)
        client.zadd(idle, {"older": 1.0})
        scheduler.acquire(1.6, Request("r4", "a"))  # queues: "a" off the list
        scheduler.tick(2.5)  # r4 admitted: "a" back on it, with the anchor
        assert client.zscore(idle, keys.IDLE_ANCHOR) == float("inf")
        assert client.pttl(idle) > 0
        assert scheduler.snapshot().tenants == 2  # "a" and "older", not the anchor
        client.delete(idle)  # made anew by the next call that puts a tenant on it
        scheduler.acquire(10.0, Request("r5", "b"))  # admitted (fast.lua: without the anchor)
        assert client.pttl(idle) > 5_000
    finally:
        client.close()


def settings(url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": url, "key_prefix": prefix, "redis_timeout_s": 2.0}
    return Settings.from_env({}, **{**values, **overrides})


@pytest.mark.anyio
async def test_live_overrides_get_the_live_ttl_and_use_refreshes_them(
    clean_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    week_ms = 7 * 86400 * 1000
    try:
        await Budget(client, "ttl").set({"rate": "5.0"}, {"acme": 2.0})
        for key in ("{ttl}:cfg", "{ttl}:w", "{ttl}:wn"):
            assert week_ms - 60_000 < await client.pttl(key) <= week_ms, key

        # A process whose live TTL is an hour uses the budget: its refresh sets it.
        backend = RedisBackend(
            settings(clean_redis_server.url, "ttl", rate=5.0, live_limits_ttl_s=3600.0)
        )
        await backend.start()
        try:
            assert isinstance(await backend.acquire(Request("r1", "acme")), Admitted)
        finally:
            await backend.stop()
        for key in ("{ttl}:cfg", "{ttl}:w", "{ttl}:wn"):
            assert 3_500_000 < await client.pttl(key) <= 3_600_000, key
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_lease_held_longer_than_the_state_ttl_keeps_its_keys(
    clean_redis_server: RedisServer,
) -> None:
    """T is 3 s here; a request holds its slot for 4 s with no other call meanwhile. (Lease
    TTL 1.5 s, renewed every 0.5 s: a heartbeat may be 1 s late on a loaded machine before
    the lease lapses; with 1 s, renewed every 1/3 s, it had 0.67 s.)"""
    config = settings(
        clean_redis_server.url, "long", concurrency=1, max_wait_s=0.5, lease_ttl_s=1.5
    )
    assert key_ttl_s(config) == 3.0
    backend = RedisBackend(config)
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    await backend.start()
    try:
        held = await backend.acquire(Request("long.1", "acme"))
        assert isinstance(held, Admitted)
        assert held.lease
        await asyncio.sleep(4.0)  # the heartbeat (every 0.5 s) keeps the lease and its keys
        assert await client.zscore("{long}:leases", "long.1") is not None
        assert await client.hget("{long}:s", "inflight") == b"1"
        backend.release("long.1")
        for _ in range(100):  # (the release goes out in the background: waited for, 5 s at most)
            if await client.hget("{long}:s", "inflight") == b"0":
                break
            await asyncio.sleep(0.05)
        assert await client.hget("{long}:s", "inflight") == b"0"
    finally:
        await backend.stop()
        await client.aclose()


# --- a fleet stops, and its budget leaves Redis on its own ---------------------------------------

APP = "tests.apps.fleet_probe:app"
#: T = 2 + 1 + 1 = 4 s; idle+T = 5 s; live limits 6 s: the longest.
FLEET = {
    "THROTTLE_KEY_PREFIX": "gone",
    "THROTTLE_RATE": "200",
    "THROTTLE_CONCURRENCY": "2",
    "THROTTLE_MAX_WAIT": "2",
    "THROTTLE_LEASE_TTL": "1",
    "THROTTLE_TENANT_IDLE": "1",
    "THROTTLE_LIVE_LIMITS_TTL": "6",
    "THROTTLE_REDIS_TIMEOUT": "1",
}
TENANTS = 150


@contextlib.contextmanager
def started(servers: list[AppServer]) -> Iterator[list[AppServer]]:
    try:
        start_all(servers)
        yield servers
    finally:
        for server in servers:
            server.close()


async def serve_many_tenants(urls: list[str]) -> set[int]:
    """Three requests per tenant, spread over the processes, a few dozen at a time."""
    statuses: set[int] = set()
    gate = asyncio.Semaphore(24)
    async with httpx.AsyncClient(timeout=15) as client:

        async def one(i: int) -> None:
            async with gate:
                tenant = f"tenant-{i % TENANTS}"
                url = urls[i % len(urls)]
                response = await client.get(f"{url}/work", headers={"X-Tenant-ID": tenant})
                statuses.add(response.status_code)

        await asyncio.gather(*(one(i) for i in range(3 * TENANTS)))
    return statuses


def held_request(url: str, tenant: str, ms: int) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{url}/work?ms={ms}", headers={"X-Tenant-ID": tenant}, timeout=30)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def probe(server: AppServer) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/_probe", timeout=10).json()
    return body


@pytest.mark.e2e
def test_a_stopped_fleet_leaves_every_key_with_a_ttl_and_then_nothing(
    clean_redis_server: RedisServer,
) -> None:
    url = clean_redis_server.url
    env = {**FLEET, "THROTTLE_REDIS_URL": url}
    config = Settings.from_env(env)
    longest_s = max(config.live_limits_ttl_s, config.tenant_idle_s + key_ttl_s(config))
    assert longest_s == 6.0
    servers = [
        AppServer(APP, env=env, health_path="/healthz"),
        AppServer(APP, env=env, health_path="/healthz"),
        AppServer(APP, env=env, health_path="/healthz", extra_args=("--lifespan", "off")),
        AppServer(APP, env=env, health_path="/healthz"),  # crashes holding a lease and a waiter
    ]
    client = redis.Redis.from_url(url)
    with started(servers) as (first, second, no_lifespan, crashing):
        done = subprocess.run(
            [sys.executable, "-m", "throttle_mw", "--redis-url", url, "--prefix", "gone",
             "set", "--rate", "150", "--weight", "tenant-7=2"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        statuses = asyncio.run(serve_many_tenants([s.url for s in servers]))
        assert statuses <= {200, 429, 503}, statuses
        assert 200 in statuses
        first.stop()  # SIGTERM: lifespan shutdown, the process leaves
        second.stop()
        no_lifespan.stop()  # SIGTERM without lifespan: it never leaves

        # The last process dies holding both slots, with a request queued behind them.
        holders = [held_request(crashing.url, f"holder-{i}", 20_000) for i in range(2)]
        assert wait_until(lambda: probe(crashing)["running"] == 2, timeout_s=10)
        # Two waiters of one tenant: its queue gets a key of its own (P:q:<h>; a lone
        # waiter is kept in its tenant's field of P:T, store.lua's enqueue). Both queue: a
        # waiter is rejected at once only when its estimated wait exceeds the maximum wait,
        # and the queue they form drops the fair rate measured before (serve_many_tenants'
        # queue, or a window with the stops' idle gap, which is not measured): the
        # estimate goes by the budget's rate (branches keysflake, idlerate).
        waiters = [held_request(crashing.url, "waiter", 10) for _ in range(2)]
        assert wait_until(lambda: client.hlen("{gone}:r") == 2, timeout_s=5)
        crashing.kill()
        for thread in (*holders, *waiters):
            thread.join(timeout=10)

        left = keys_of(client, "{gone}")
        kinds = {k.split(":")[1] for k in left}
        # What the issue found without a TTL, and what a crash leaves behind, is there...
        # (P:lc holds only leases of a cost other than 1: none here)
        expected = {"s", "tenants", "procs", "cfg", "w", "wn", "T", "q", "leases", "r"}
        assert expected | {"dl", "qlen", "active"} <= kinds, kinds
        # (the tenants are fields of P:T, no key each: how many are left varies, as the
        # last process sweeps tenants idle for THROTTLE_TENANT_IDLE while it runs alone)
        assert "t" not in kinds, kinds
        # ...and every key of it expires, none later than the longest TTL.
        assert keys_without_ttl(client, "{gone}") == []
        assert max(client.pttl(k) for k in left) <= longest_s * 1000

        gone = wait_until(lambda: not keys_of(client, "{gone}"), timeout_s=longest_s + 5.0)
        assert gone, sorted(keys_of(client, "{gone}"))
    client.close()


def test_a_tenant_whose_idle_list_entry_was_lost_is_swept_from_p_t(
    redis_server_session: RedisServer,
) -> None:
    """Every tenant is a field of P:T, with no TTL of its own: it leaves by the idle sweep or
    the max_tenants bound, both of which walk the idle list. A field whose entry there was
    lost (a script that failed halfway) is a stray that neither would ever drop: an idle
    sweep that counts more fields in P:T than tenants listed and requests waiting walks
    scripts.STRAY_BATCH fields of P:T from a cursor in P:s and drops those neither on the
    idle list nor waiting, a bounded step a sweep. The tenants on the list, and the one
    waiting (off the list), stay."""
    client = redis_server_session.client()
    try:
        client.flushall()
        scheduler = LuaScheduler(
            client, Limits(rate=0.01, burst=2.0), Policy(dict.fromkeys(PRIORITIES, 600.0)), now=0.0
        )
        tenant_hash = scheduler._keys.tenant_hash
        scheduler.acquire(0.0, Request("r1", "idle"))  # admitted: on the idle list
        scheduler.acquire(0.0, Request("r2", "busy"))  # admitted
        scheduler.acquire(0.0, Request("r3", "busy"))  # waits (100 s a token): off the list
        # (and P:T's anchor, scripts.ENCODING_ANCHOR: kept by every sweep)
        known = {keys.tenant_digest("idle"), keys.tenant_digest("busy"), scripts.ENCODING_ANCHOR}
        assert fields(client, tenant_hash) == known
        assert client.zscore(f"{scheduler._tag}:tenants", keys.tenant_digest("busy")) is None
        # Strays: more than one sweep's batch (P:T is a hashtable from its first tenant,
        # walked by cursor).
        text = cast(bytes, client.hget(tenant_hash, keys.tenant_digest("idle")))
        strays = {f"{i:024x}": text for i in range(300)}
        client.hset(tenant_hash, mapping=cast(Any, strays))
        left = []
        for i in range(40):  # a tick a sweep period
            scheduler.tick(1.0 + i * scripts.SWEEP_PERIOD_S)
            left.append(len(fields(client, tenant_hash) & strays.keys()))
            if left[-1] == 0:
                break
        assert left[0] > 0, left  # bounded: not all in one sweep
        assert left[-1] == 0, left
        assert fields(client, tenant_hash) == known
        assert client.hget(f"{scheduler._tag}:s", keys.TENANT_CURSOR) is None  # a pass done
    finally:
        client.close()
