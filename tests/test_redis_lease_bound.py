"""The earliest lease expiry a fast acquire knows (store.lua's S.le, fast.lua's
lapsed_lease): a time no lease in P:leases expires before, so that P:leases is asked for
its first lease about once per lease TTL, not on every acquire while leases are in
flight. A bound that is ever too late would let fast.lua admit past a lapsed lease (a
crashed process's) without expiring it first: these tests would see it in the decisions,
in flight or the lease set. Real redis-server, fake clock (LuaScheduler)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Limits, Policy, Reject, Request


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def _budget(client: redis.Redis, concurrency: int, lease_ttl_s: float) -> LuaScheduler:
    # (No waiting: a request that does not fit is rejected, so every acquire may go by
    # fast.lua.)
    policy = Policy(dict.fromkeys(PRIORITIES, 0.0))
    scheduler = LuaScheduler(client, Limits(concurrency=concurrency), policy, now=0.0)
    scheduler.lease_ttl_s = lease_ttl_s
    return scheduler


def _leases(client: redis.Redis, scheduler: LuaScheduler) -> dict[str, float]:
    found: Any = client.zrange(f"{scheduler._tag}:leases", 0, -1, withscores=True)
    return {member.decode(): float(score) for member, score in found}


def _admitted(decision: object) -> bool:
    return isinstance(decision, Admit)


def _bound(client: redis.Redis, scheduler: LuaScheduler) -> float | None:
    """S.le, the 22nd of P:s's packed numbers (store.lua's PACKED), or None if unset."""
    text: Any = client.hget(scheduler._key, "nums")
    assert isinstance(text, bytes)
    last = text.split(b"|")[21]
    return float(last) if last else None


def _zranges(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_zrange", {}).get("calls", 0))


# (Each test runs within one second of its budget's start, on one tenant: one fair-rate
# window, no idle sweep due, the tenant made by the first call; so every later acquire
# that finds room goes by fast.lua, whose bound decides whether it asks P:leases.)


def test_a_crashed_processs_lease_is_expired_before_the_next_acquire_sees_the_room(
    client: redis.Redis,
) -> None:
    s = _budget(client, concurrency=2, lease_ttl_s=0.5)
    assert _admitted(s.acquire(0.1, Request("crashed", "t"))[0])  # never released
    assert _admitted(s.acquire(0.2, Request("b", "t"))[0])
    assert _bound(client, s) == 0.6  # P:leases asked: the crashed lease's expiry
    s.release(0.3, "b")
    assert s.in_flight == 1
    # Past the crashed lease's expiry: the bound reached, P:leases asked, the lease lapsed:
    # the full call expires it first, and there is room for two again.
    assert _admitted(s.acquire(0.65, Request("c", "t"))[0])
    assert s.in_flight == 1
    assert set(_leases(client, s)) == {"c"}
    assert _admitted(s.acquire(0.7, Request("d", "t"))[0])
    assert isinstance(s.acquire(0.75, Request("e", "t"))[0], Reject)


def test_a_lease_that_expires_before_the_bound_lowers_it(client: redis.Redis) -> None:
    """A lease added with a shorter TTL (the callers' lease TTL changed) expires before the
    earliest known: the bound follows it down. (Left at 0.9, the acquire at 0.6 would go
    by fast.lua past the lapsed lease: three in flight, the lapsed one still held.)"""
    s = _budget(client, concurrency=3, lease_ttl_s=0.8)
    assert _admitted(s.acquire(0.1, Request("long", "t"))[0])
    assert _admitted(s.acquire(0.2, Request("b", "t"))[0])
    assert _bound(client, s) == 0.9
    s.lease_ttl_s = 0.2
    assert _admitted(s.acquire(0.3, Request("short", "t"))[0])  # expires at 0.5
    assert _bound(client, s) == 0.5
    s.release(0.35, "b")
    assert s.in_flight == 2
    # At 0.6 the short lease lapsed (its process crashed): expired before this acquire.
    assert _admitted(s.acquire(0.6, Request("d", "t"))[0])
    assert set(_leases(client, s)) == {"long", "d"}
    assert s.in_flight == 2


def test_a_renewed_lease_is_not_expired_and_the_bound_moves_to_it(
    client: redis.Redis,
) -> None:
    s = _budget(client, concurrency=3, lease_ttl_s=0.5)
    assert _admitted(s.acquire(0.1, Request("held", "t"))[0])
    assert _admitted(s.acquire(0.15, Request("b", "t"))[0])
    assert _bound(client, s) == 0.6
    s.release(0.2, "b")
    assert s.renew(0.3, ["held"]).held == (True,)  # its expiry now 0.8: 0.6 still a bound
    assert _bound(client, s) == 0.6
    assert _admitted(s.acquire(0.65, Request("c", "t"))[0])  # 0.6 reached: asked, 0.8 first
    assert _bound(client, s) == 0.8
    assert set(_leases(client, s)) == {"held", "c"}
    assert s.in_flight == 2
    s.release(0.66, "c")
    client.config_resetstat()
    for i in range(6):  # the bound (0.8) not reached: P:leases not asked
        assert _admitted(s.acquire(0.67 + 0.02 * i, Request(f"x{i}", "t"))[0])
        s.release(0.68 + 0.02 * i, f"x{i}")
    assert _zranges(client) == 0
    # Past 0.8 the held lease lapsed (no more renewals): expired before the next acquire.
    assert _admitted(s.acquire(0.85, Request("y", "t"))[0])
    assert set(_leases(client, s)) == {"y"}
    assert s.in_flight == 1


def test_a_state_made_anew_knows_no_bound_and_expires_a_reclaimed_lease_in_time(
    client: redis.Redis,
) -> None:
    """Redis lost everything (FLUSHALL): the new state (a new epoch) has no bound; a lease
    reclaimed there, never renewed, lapses and is expired before the next acquire."""
    s = _budget(client, concurrency=2, lease_ttl_s=0.5)
    assert _admitted(s.acquire(0.1, Request("a", "t"))[0])
    assert _admitted(s.acquire(0.2, Request("b", "t"))[0])
    assert _bound(client, s) == 0.6
    old = s.trailer.epoch
    client.flushall()
    s.batch(0.3, [protocol.reclaim_op("a", 1, old)])  # in the new state: expires at 0.8
    assert s.trailer.epoch != old
    assert _bound(client, s) is None
    assert set(_leases(client, s)) == {"a"}
    assert _admitted(s.acquire(0.35, Request("c", "t"))[0])
    assert s.in_flight == 2
    assert isinstance(s.acquire(0.4, Request("d", "t"))[0], Reject)
    # Past 0.8, a's lease lapsed (its process stopped renewing): expired, room for d.
    assert _admitted(s.acquire(0.82, Request("d", "t"))[0])
    assert set(_leases(client, s)) == {"c", "d"}
    assert s.in_flight == 2


@pytest.mark.parametrize("seed", range(6))
def test_fast_acquires_decide_and_leave_what_full_calls_do(client: redis.Redis, seed: int) -> None:
    """Two budgets, the same steps: in one each acquire goes alone (fast.lua where it can,
    the bound deciding when P:leases is asked), in the other with a tick in the same call
    (batch.lua's full call, which always expires lapsed leases first). Leases released,
    renewed or left to lapse (crashed), the lease TTL changed, time jumping: after every
    step the decisions, in flight and the leases with their expiries are the same."""
    rng = random.Random(seed)
    fast = _budget(client, concurrency=4, lease_ttl_s=1.0)
    full = _budget(client, concurrency=4, lease_ttl_s=1.0)
    now = 0.0
    held: list[str] = []
    for step in range(300):
        now += rng.choice([0.01, 0.05, 0.1, 0.3, 1.5])
        roll = rng.random()
        if roll < 0.5:
            req = Request(f"r{step}", f"t{rng.randrange(2)}")
            one = fast.acquire(now, req)[0]
            other = full.acquire_in_full(now, req)
            assert one == other, (step, one, other)
            if _admitted(one):
                held.append(req.id)
        elif roll < 0.75 and held:
            rid = held.pop(rng.randrange(len(held)))
            fast.release(now, rid)
            full.release(now, rid)
        elif roll < 0.85 and held:
            some = rng.sample(held, rng.randint(1, len(held)))
            assert fast.renew(now, some).held == full.renew(now, some).held
        elif roll < 0.9:
            ttl = rng.choice([0.2, 1.0, 5.0])
            fast.lease_ttl_s = ttl
            full.lease_ttl_s = ttl
        elif held:
            held.pop(rng.randrange(len(held)))  # its process crashed: never released
        assert fast.in_flight == full.in_flight, step
        assert _leases(client, fast) == _leases(client, full), step


def _zrangebyscores(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_zrangebyscore", {})
    return int(stats.get("calls", 0))


def test_a_full_call_asks_for_lapsed_leases_only_once_the_bound_is_reached(
    client: redis.Redis,
) -> None:
    """core.lua's expire_leases goes by the bound too: before it, no lease can have lapsed
    and P:leases is not asked (a ZRANGEBYSCORE a full call with leases in flight made on
    every call); from it on, a lapsed lease is expired as before."""
    s = _budget(client, concurrency=3, lease_ttl_s=0.5)
    assert _admitted(s.acquire(0.1, Request("crashed", "t"))[0])  # never released
    assert _admitted(s.acquire(0.15, Request("b", "t"))[0])
    assert _bound(client, s) == 0.6
    s.release(0.2, "b")
    asked = _zrangebyscores(client)
    assert s.tick(0.3) == []  # a full call, a lease in flight: none lapsed before 0.6
    assert _zrangebyscores(client) == asked
    assert set(_leases(client, s)) == {"crashed"}
    assert s.tick(0.65) == []  # past the bound: asked, and the crashed lease expired
    assert _zrangebyscores(client) == asked + 1
    assert _leases(client, s) == {}
    assert s.in_flight == 0
