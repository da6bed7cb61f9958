"""Responses describe the limits in force, in every process, after a live change.

A rejection's ``RateLimit-Policy`` (``q``) and its ``Retry-After`` / ``t=`` come
from the limits the budget runs on now, not from the ones a process started
with: `Backend.limits`, which the in-memory backend takes from its scheduler
and the Redis backend from every batch reply (a trailer line, decoded only
when it changes). The failure mode `local` keeps enforcing the last limits seen.

Every app here rejects at once whatever cannot go at once
(``THROTTLE_TENANT_QUEUE_LIMIT=0``), and one tenant asks. Its burst is one
token, so each admission leaves the bucket empty, and a 429 right after it
waits for the next token: ``Retry-After`` is about one token interval, 1/rate
(less what has refilled since). From 5/s to 0.1/s it goes from 1 s to about
10 s.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer, start_all
from throttle_mw import ThrottleMiddleware
from throttle_mw.backends import Admitted, MemoryBackend
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.admin import Budget
from throttle_mw.backends.redis.keys import LIVE_STAMP, Keys
from throttle_mw.scheduler import Admit, Limits, Policy, Reject, Request, Scheduler
from throttle_mw.settings import DEFAULT_MAX_WAIT_S, Settings

OLD_RATE, NEW_RATE = 5.0, 0.1  # both with the default burst: one token
OLD_POLICY, NEW_POLICY = '"fleet";q=5;w=1', '"fleet";q=0.1;w=1'
#: At 5/s: 0.2 s, which is 1 s in whole seconds (2 s if the fair-rate measurement, from a
#: sparse window, says 0.5-1 admissions per second: the test's own traffic is sparse).
OLD_RETRY_AFTER = range(1, 3)
#: At 0.1/s: 10 s, less what refilled since the bucket emptied (the test gets there
#: within a few seconds, so at least half of it is left).
NEW_RETRY_AFTER = range(5, 11)
SETTINGS: dict[str, Any] = {"rate": OLD_RATE, "tenant_queue_limit": 0, "max_wait_s": 5.0}
_prefixes = itertools.count()


def check_rejection(response: httpx.Response, policy: str, retry_after: range) -> None:
    """A 429 over the fleet's rate that names `policy` and waits `retry_after` seconds."""
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.headers["ratelimit-policy"] == policy
    seconds = int(response.headers["retry-after"])
    assert seconds in retry_after, (seconds, retry_after)
    assert response.headers["ratelimit"] == f'"fleet";r=0;t={seconds}'
    assert response.json()["retry_after_s"] == seconds


# --- the in-memory backend ---------------------------------------------------------------------


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def next_rejection(client: httpx.AsyncClient, tries: int = 50) -> httpx.Response:
    """Requests until one is rejected (the bucket runs dry within a burst)."""
    for _ in range(tries):
        response = await client.get("/", headers={"X-Tenant-ID": "acme"})
        if response.status_code != 200:
            return response
    raise AssertionError(f"no rejection in {tries} requests")


@pytest.mark.anyio
async def test_memory_backend_rejections_follow_set_limits() -> None:
    settings = Settings.from_env({}, **SETTINGS)
    backend = MemoryBackend(settings.limits(), settings.policy())
    app = ThrottleMiddleware(hello, backend=backend, **SETTINGS)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        check_rejection(await next_rejection(client), OLD_POLICY, OLD_RETRY_AFTER)
        new = Limits(rate=NEW_RATE, burst=1.0)
        await backend.set_limits(new)
        assert backend.limits == new
        check_rejection(await next_rejection(client), NEW_POLICY, NEW_RETRY_AFTER)


# --- the Redis backend, in this process ----------------------------------------------------------


def redis_settings(url: str, **overrides: Any) -> Settings:
    values = {
        **SETTINGS,
        "redis_url": url,
        "key_prefix": f"live{next(_prefixes)}",
        "redis_timeout_s": 2.0,
        **overrides,
    }
    return Settings.from_env({}, **values)


async def acquire(backend: RedisBackend, n: int) -> Admitted | Reject:
    outcome = await backend.acquire(Request(f"{backend.process}.{n}", "acme"))
    assert isinstance(outcome, Admitted | Reject), outcome
    return outcome


@pytest.mark.anyio
async def test_redis_backend_learns_live_limits_from_its_next_call_and_decodes_only_changes(
    clean_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real_decode = protocol.decode_limits

    def counting(line: str, weights: Any) -> Limits:
        decoded.append(line)
        return real_decode(line, weights)

    monkeypatch.setattr(protocol, "decode_limits", counting)
    settings = redis_settings(clean_redis_server.url, tenant_weights="acme=2")
    backend = RedisBackend(settings)
    await backend.start()
    client = redis.asyncio.Redis.from_url(clean_redis_server.url)
    try:
        assert backend.limits == settings.limits()  # before any reply: its own
        for n in range(20):
            await acquire(backend, n)
        assert backend.limits == settings.limits()
        assert len(decoded) == 1  # twenty replies, one line: decoded once

        # Another process (here: the live-limits tool's code) changes the rate.
        await Budget(client, settings.key_prefix).set({"rate": "0.1", "burst": "1.0"}, {})
        assert backend.limits.rate == OLD_RATE  # not until its next call
        outcome = await acquire(backend, 100)
        assert backend.limits == Limits(
            rate=0.1, burst=1.0, weights={"acme": 2.0}, tenant_burst=1.0
        )
        assert backend._fallback.limits == backend.limits
        assert isinstance(outcome, Reject | Admitted)
        for n in range(101, 110):
            await acquire(backend, n)
        assert len(decoded) == 2
    finally:
        await backend.stop()
        await client.aclose()


@pytest.mark.anyio
async def test_failure_mode_local_enforces_the_last_limits_in_force(
    redis_server: RedisServer,
) -> None:
    # (Redis timeout 3 s: generous, for a loaded machine; Redis stopped refuses at once.)
    settings = redis_settings(redis_server.url, failure_mode="local", redis_timeout_s=3.0)
    backend = RedisBackend(settings)
    await backend.start()
    try:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        await Budget(client, settings.key_prefix).set({"rate": "0.1", "burst": "1.0"}, {})
        await client.aclose()
        await acquire(backend, 0)
        assert backend.limits.rate == NEW_RATE
        redis_server.stop()
        # Redis is gone: this process decides alone, on the limits last in force (its
        # share of them: it is the fleet's only process).
        outcomes = [await acquire(backend, n) for n in range(1, 6)]
        rejected = [o for o in outcomes if isinstance(o, Reject)]
        assert rejected, outcomes
        assert all(r.retry_after_header in NEW_RETRY_AFTER for r in rejected), rejected
        assert backend.limits.rate == NEW_RATE
    finally:
        await backend.stop()


# --- four uvicorn processes, one Redis, a live change with the tool ------------------------------


APP = "tests.apps.fleet_probe:app"


@pytest.fixture
def four_processes(clean_redis_server: RedisServer) -> Iterator[tuple[str, list[AppServer]]]:
    env = {
        "THROTTLE_REDIS_URL": clean_redis_server.url,
        "THROTTLE_KEY_PREFIX": "live",
        "THROTTLE_RATE": f"{OLD_RATE:g}",
        "THROTTLE_TENANT_QUEUE_LIMIT": "0",
        "THROTTLE_FAILURE_MODE": "closed",  # a slow Redis must not answer for the budget
        "THROTTLE_REDIS_TIMEOUT": "1",
    }
    servers = [AppServer(APP, env=env, health_path="/healthz") for _ in range(4)]
    try:
        start_all(servers)
        yield clean_redis_server.url, servers
    finally:
        for server in servers:
            server.close()


def first_rejection(server: AppServer, tries: int = 50) -> httpx.Response:
    """This process's next rejection: requests until one is not admitted."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(tries):
            response = client.get("/work", headers={"X-Tenant-ID": "acme"})
            if response.status_code != 200:
                return response
    raise AssertionError(f"{server.url}: no rejection in {tries} requests")


def admit_one(server: AppServer, tries: int = 100) -> float:
    """Requests until one is admitted (the bucket is empty then); when that one was sent."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(tries):
            sent = time.monotonic()
            if client.get("/work", headers={"X-Tenant-ID": "acme"}).status_code == 200:
                return sent
            time.sleep(0.05)
    raise AssertionError(f"{server.url}: nothing admitted in {tries} requests")


def throttle_mw(*argv: str) -> subprocess.CompletedProcess[str]:
    """The live-limits tool, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "throttle_mw", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
def test_every_process_s_next_429_describes_a_live_rate_change(
    four_processes: tuple[str, list[AppServer]],
) -> None:
    url, servers = four_processes
    for server in servers:
        check_rejection(first_rejection(server), OLD_POLICY, OLD_RETRY_AFTER)

    # The bucket emptied at a known time, just before the change. (In Redis a bucket is
    # refilled when a call finds it, at the rate in force then: what one left part-full by
    # the last rejection gained before the change counts at the new rate, so a 429 that
    # came 0.1-0.2 s after the last admission on a loaded machine made the next say 1-4 s.)
    emptied = admit_one(servers[0])
    done = throttle_mw("--redis-url", url, "--prefix", "live", "set", "--rate", f"{NEW_RATE:g}")
    assert done.returncode == 0, done.stderr
    for server in servers:
        response = first_rejection(server)
        # 10 s less what refilled since (at most the time since the admission was sent);
        # at least 3 s: the old rate's 429s said 1-2 s.
        left = math.floor(1 / NEW_RATE - (time.monotonic() - emptied))
        assert left >= 3, f"{1 / NEW_RATE - left:.0f} s since the bucket emptied: too slow"
        check_rejection(response, NEW_POLICY, range(left, 11))
    for server in servers:
        assert "Traceback" not in server.log()


# --- tokens earned across a live change: the Python scheduler and the scripts alike -------------
#
# A live change at time c: the bucket earns at the limits in force before c up to c (at
# most their burst), then holds at most the new burst and earns at the new rate. Python's
# `Scheduler.set_limits` does that; the scripts by live.lua, which the CLI and the backend
# run for every change (`Budget.set` / `Budget.reset`). Each case drains the bucket, makes
# its changes with no call between them (as an operator's changes meet the fleet), then
# compares the tokens and every decision after, on a fake clock, exactly.

GIVEN = Limits(rate=10.0, burst=10.0)  # the processes' own (THROTTLE_RATE, THROTTLE_BURST)
#: Nothing queues: what cannot go at once is rejected, its Retry-After from the tokens.
LIVE_POLICY = Policy(dict(DEFAULT_MAX_WAIT_S), tenant_queue_limit=0)

#: (time, the limits in force from then: None is a reset to GIVEN), in order.
Changes = list[tuple[float, Limits | None]]
LIVE_CASES: dict[str, tuple[Changes, float]] = {
    # 10/s to 1/s half a second into the refill: 5 tokens earned, then 1 more by 1.5 s.
    "rate lowered": ([(0.5, Limits(rate=1.0, burst=10.0))], 1.5),
    # 10/s to 40/s: 5 tokens earned by 0.5 s, 4 more by 0.6 s (not 10 at once).
    "rate raised": ([(0.5, Limits(rate=40.0, burst=10.0))], 0.6),
    # a raised burst fills at the rate from the change on, not from the last call
    "burst raised": ([(0.5, Limits(rate=10.0, burst=30.0))], 1.2),
    # several changes between two calls, the last a reset to the processes' own limits
    "changes then reset": (
        [
            (0.2, Limits(rate=2.0, burst=10.0)),
            (0.4, Limits(rate=30.0, burst=4.0)),
            (0.45, Limits(rate=0.5, burst=10.0)),
            (0.7, None),
        ],
        0.75,
    ),
    # the rate off for a while: nothing earned meanwhile, then the rate again
    "rate off and on": (
        [(0.2, Limits(rate=None, burst=10.0)), (0.9, Limits(rate=5.0, burst=10.0))],
        1.3,
    ),
}


@pytest.fixture
def lua_live(redis_server_session: RedisServer, functions: bool) -> Iterator[Any]:
    """A LuaScheduler factory on the session's server, by FCALL or by EVALSHA."""
    client = redis_server_session.client()
    yield lambda: LuaScheduler(client, GIVEN, LIVE_POLICY, 0.0, functions=functions)
    client.close()


def drain(scheduler: Scheduler | LuaScheduler, now: float, n: int, tag: str) -> list[Any]:
    return [scheduler.acquire(now, Request(f"{tag}{i}", "acme"))[0] for i in range(n)]


@pytest.mark.parametrize("case", list(LIVE_CASES))
def test_a_live_change_earns_at_the_old_limits_until_it_and_the_new_after(
    case: str, lua_live: Any
) -> None:
    changes, then = LIVE_CASES[case]
    python, lua = Scheduler(GIVEN, LIVE_POLICY, 0.0), lua_live()
    decisions = {}
    for name, scheduler in (("python", python), ("lua", lua)):
        drained = drain(scheduler, 0.0, 10, "a")
        assert drained == [Admit()] * 10, (name, drained)
        for at, limits in changes:
            if isinstance(scheduler, Scheduler):
                scheduler.set_limits(limits or GIVEN, at)
            elif limits is None:
                scheduler.live_change(at, {}, everything=True)
            else:
                scheduler.live_change(at, protocol.encode_live_limits(limits))
        decisions[name] = drain(scheduler, then, 40, "b")
    # (snapshot.lua's JSON has 14 significant digits: the tokens to that precision)
    assert lua.snapshot().tokens == pytest.approx(python.snapshot().tokens, abs=1e-12)
    assert decisions["lua"] == decisions["python"]
    # Every case's admissions after the changes are the whole tokens earned at the limits
    # in force over each stretch of time (counted here by hand).
    expected = {
        "rate lowered": 5 + 1,
        "rate raised": 5 + 4,
        "burst raised": 5 + 7,
        "changes then reset": 4,  # 2 + 0.4 + 1.5 (under the burst of 4) + 0.125 + 0.5
        "rate off and on": 2 + 2,
    }[case]
    admitted = sum(isinstance(d, Admit) for d in decisions["python"])
    assert admitted == expected, decisions["python"]


def test_a_live_change_then_a_tick_is_the_python_set_limits(lua_live: Any) -> None:
    """`set_limits` on both: the Lua side's live change and a tick at the same time."""
    python, lua = Scheduler(GIVEN, LIVE_POLICY, 0.0), lua_live()
    trace: dict[str, list[Any]] = {}
    for name, scheduler in (("python", python), ("lua", lua)):
        seen = drain(scheduler, 0.0, 10, "a")
        seen.append(
            scheduler.set_limits(Limits(rate=2.0, burst=10.0), 0.3)
            if isinstance(scheduler, Scheduler)
            else scheduler.set_live_limits(Limits(rate=2.0, burst=10.0), 0.3)
        )
        seen += drain(scheduler, 0.8, 6, "b")
        seen.append(pytest.approx(scheduler.snapshot().tokens, abs=1e-12))
        trace[name] = seen
    assert trace["lua"] == trace["python"]


def test_a_live_override_never_lapses_before_the_bucket_it_governs(
    redis_server_session: RedisServer,
) -> None:
    """A live TTL shorter than the state's counts as the state's, when the change is made
    and at every TTL refresh: an override cannot lapse (a change nobody made at a known
    time) under a bucket that outlives it; it goes with the bucket."""
    client = redis_server_session.client()
    lua = LuaScheduler(client, GIVEN, LIVE_POLICY, 0.0)
    lua.live_ttl_s = 1.0  # the state's: 7200 s (LuaScheduler's key TTL)
    keys = Keys(lua._tag[1:-1])
    lua.live_change(0.5, {"rate": "1.0"})
    assert client.pttl(keys.cfg) >= client.pttl(keys.state) > 3_600_000
    lua.tick(3600.0)  # past a quarter of the state's TTL: every key's TTL pushed out
    assert client.pttl(keys.cfg) >= client.pttl(keys.state) > 3_600_000
    client.close()


def test_a_live_change_without_the_processes_own_limits_known_still_applies(
    redis_server_session: RedisServer,
) -> None:
    """No stamp (a learned-limit step deleted it, or an older version made the state): a
    change made then cannot know the limits before it where P:cfg sets none, so the bucket
    meets it at its next call (the old behaviour), and the change is still made."""
    client = redis_server_session.client()
    lua = LuaScheduler(client, GIVEN, LIVE_POLICY, 0.0)
    keys = Keys(lua._tag[1:-1])
    for at, changes, everything in (
        (0.1, {"rate": "1.0", "burst": "3.0"}, False),  # P:cfg sets both: known
        (0.2, {}, True),  # a reset: the limits after are the processes' own
        (0.3, {"rate": "2.0"}, False),  # neither before nor after known
    ):
        client.hdel(keys.state, LIVE_STAMP)
        lua.live_change(at, changes, everything=everything)
        assert client.hget(keys.state, LIVE_STAMP) is None
    assert client.hgetall(keys.cfg) == {b"rate": b"2.0"}
    decision, _ = lua.acquire(0.4, Request("x", "acme"))
    assert decision == Admit()
    in_force = protocol.decode_limits(lua.trailer.limits, {})
    assert (in_force.rate, in_force.burst) == (2.0, GIVEN.burst)
    client.close()
