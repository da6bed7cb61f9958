"""A tenant kept past the idle time keeps its keys: a capped tenant never comes back full.

core.lua's forget_idle keeps an idle tenant capped by a per-tenant rate until its cap
could have refilled, tenant_burst / tenant_rate (Scheduler._forget_idle), which can be
longer than the idle time. What describes tenants (P:T, the idle list P:tenants, a
tenant's queue) lives that long plus T (keys.py, "TTL"; store.lua's call.kept_s): were it
idle + T, a budget left alone for longer would lose its tenants with their caps, and a
tenant that spent its cap would come back with a full one, over its cap (burst + rate x
time). The tenant rate can be set live (``throttle_mw set --tenant-rate``), so this is
sized by the limits in force on each call, not refused by the settings' validation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Limits, Policy, Request


@pytest.fixture
def client(clean_redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = clean_redis_server.client()
    yield client
    client.close()


def test_the_tenant_keys_outlive_the_longest_keep(client: redis.Redis) -> None:
    """A 0.1/s cap with a burst of 5 keeps a tenant 50 s; idle 10 s, T 5 s: P:T and the idle
    list get 50 + 5 s, not 10 + 5 s."""
    limits = Limits(rate=100.0, burst=100.0, tenant_rate=0.1, tenant_burst=5.0)
    policy = Policy(dict.fromkeys(PRIORITIES, 1.0), tenant_idle_s=10.0)
    scheduler = LuaScheduler(client, limits, policy, 0.0, key_ttl_s=5.0)
    for i in range(5):
        decision, _ = scheduler.acquire(0.0, Request(f"r{i}", "capped"))
        assert isinstance(decision, Admit), decision
    keys = scheduler._keys
    for key in (keys.tenant_hash, keys.tenants):
        # (a second's margin for a slow call; the old TTL was 15 s)
        assert 54_000 < client.pttl(key) <= 55_000, key
    # Without a tenant cap, idle + T as before.
    plain = LuaScheduler(client, Limits(rate=100.0, burst=100.0), policy, 0.0, key_ttl_s=5.0)
    assert isinstance(plain.acquire(0.0, Request("p", "plain"))[0], Admit)
    assert 14_000 < client.pttl(plain._keys.tenant_hash) <= 15_000


def test_a_spent_cap_survives_a_quiet_budget(client: redis.Redis) -> None:
    """A tenant spends its cap (2, refilling at 0.4/s: kept 5 s); nothing calls for 0.8 s,
    longer than idle + T (0.1 + 0.2 s: the state itself lapses) but shorter than its keep.
    At 1 s its cap has refilled 0.4: one more request is over it, not admitted by a cap
    made anew."""
    limits = Limits(rate=1000.0, burst=1000.0, tenant_rate=0.4, tenant_burst=2.0)
    policy = Policy(dict.fromkeys(PRIORITIES, 0.05), tenant_idle_s=0.1)
    scheduler = LuaScheduler(client, limits, policy, 0.0, key_ttl_s=0.2)
    for i in range(2):
        assert isinstance(scheduler.acquire(0.0, Request(f"r{i}", "capped"))[0], Admit)
    assert not isinstance(scheduler.acquire(0.0, Request("over", "capped"))[0], Admit)
    time.sleep(0.8)
    assert client.exists(scheduler._keys.state) == 0  # the state lapsed (T)
    decision, _ = scheduler.acquire(1.0, Request("again", "capped"))
    assert not isinstance(decision, Admit), decision


def test_a_live_change_that_keeps_a_tenant_longer_reaches_its_keys_at_the_next_call(
    client: redis.Redis,
) -> None:
    """A cap of 10/s, burst 2, keeps a tenant 0.2 s (idle 0.1 s, T 0.2 s: its keys 0.4 s).
    It spends its cap at 0; a live change (``throttle-mw set --tenant-rate 0.4``) keeps it
    5 s; a known tenant's call comes at once, then none for 0.8 s (the keys' refresh, T/4
    on the test clock, not due by then). The keys lapsed at their old TTL before: the tenant
    came back at 1 s with a cap made anew, full (admitted, over the 0.4 its cap refilled).
    live.lua makes the refresh due: that call sets the tenant keys' TTL by the new keep."""
    limits = Limits(rate=1000.0, burst=1000.0, tenant_rate=10.0, tenant_burst=2.0)
    policy = Policy(dict.fromkeys(PRIORITIES, 0.05), tenant_idle_s=0.1)
    scheduler = LuaScheduler(client, limits, policy, 0.0, key_ttl_s=0.2)
    for i in range(2):
        assert isinstance(scheduler.acquire(0.0, Request(f"r{i}", "capped"))[0], Admit)
    assert not isinstance(scheduler.acquire(0.0, Request("over", "capped"))[0], Admit)
    assert isinstance(scheduler.acquire(0.0, Request("o0", "other"))[0], Admit)
    keys = scheduler._keys
    assert client.pttl(keys.tenant_hash) <= 400
    scheduler.live_change(0.0, {"tenant_rate": "0.4"})
    # (a tenant known: a call that makes one sets P:T's TTL anyway, not the idle list's)
    assert isinstance(scheduler.acquire(0.0, Request("o1", "other"))[0], Admit)
    for key in (keys.tenant_hash, keys.tenants):
        assert client.pttl(key) > 5_000, key  # 5 s + T
    time.sleep(0.8)
    decision, _ = scheduler.acquire(1.0, Request("again", "capped"))
    assert not isinstance(decision, Admit), decision


def test_a_live_change_that_keeps_a_tenant_longer_keeps_its_keys_with_no_call_after(
    client: redis.Redis,
) -> None:
    """As above, with no call at all after the change (a quiet budget): live.lua keeps the
    tenants' keys as long as the live limits until a call sets them by the new keep. They
    lapsed at their old TTL before (0.4 s), and the tenant came back at 1 s with a full cap;
    the next call sets them by the new keep (5 s + T), not the live limits' TTL."""
    limits = Limits(rate=1000.0, burst=1000.0, tenant_rate=10.0, tenant_burst=2.0)
    policy = Policy(dict.fromkeys(PRIORITIES, 0.05), tenant_idle_s=0.1)
    scheduler = LuaScheduler(client, limits, policy, 0.0, key_ttl_s=0.2)
    for i in range(2):
        assert isinstance(scheduler.acquire(0.0, Request(f"r{i}", "capped"))[0], Admit)
    assert not isinstance(scheduler.acquire(0.0, Request("over", "capped"))[0], Admit)
    scheduler.live_change(0.0, {"tenant_rate": "0.4"})
    keys = scheduler._keys
    assert client.pttl(keys.tenant_hash) > 5_400  # (the live limits' TTL: 7200 s)
    time.sleep(0.8)
    decision, _ = scheduler.acquire(1.0, Request("again", "capped"))
    assert not isinstance(decision, Admit), decision
    assert 4_000 < client.pttl(keys.tenant_hash) <= 5_200  # 5 s + T, from the 1 s call
