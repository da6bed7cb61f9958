"""The Redis work of one script call, counted in commands (Redis's INFO commandstats).

Counts, not time: they are the same on a loaded machine as on an idle one, so these
tests cannot flake. The scripts run on a fake clock (LuaScheduler), in a real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import cast

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol, scripts
from throttle_mw.backends.redis.batcher import Batcher
from throttle_mw.backends.redis.keys import (
    LIVE_STAMP,
    RECENT_KEPT,
    TENANT_FIELDS,
    Keys,
    tenant_digest,
)
from throttle_mw.backends.redis.scripts import PROCS_RECOUNT_S, RECENT_SLACK
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Enqueue, Granted, Limits, Policy, Request

#: Commands sent by the test's own plumbing, not run by a script (Redis 6.2 names no
#: subcommands; redis-py's pipelines check their scripts with SCRIPT EXISTS).
_PLUMBING = {
    "fcall",
    "evalsha",
    "eval",
    "info",
    "config|resetstat",
    "config",
    "script",
    "lrange",
    "function|load",
}


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in _PLUMBING
    }


def saturated_tick_commands(client: redis.Redis, tenants: int) -> dict[str, float]:
    """Commands per tick, by command, of a saturated budget (50/s) with `tenants`
    tenants waiting (300 requests or more in all), all for longer than the idle time."""
    each = max(3, 300 // tenants)
    policy = Policy(
        dict.fromkeys(PRIORITIES, 900.0),
        queue_limit=2 * each * tenants,
        tenant_queue_limit=2 * each,
        tenant_idle_s=60.0,
        max_tenants=tenants // 2,  # fewer than wait: waiting ones are kept all the same
    )
    scheduler = LuaScheduler(client, Limits(rate=50.0, burst=5.0), policy, now=0.0)
    for i in range(each * tenants):
        scheduler.acquire(0.0, Request(f"r{i}", f"t{i % tenants}"))
    assert scheduler.waiting >= each * tenants - 10
    now = 100.0  # past the idle time: every tenant was last seen long ago
    for _ in range(60):  # a second of ticks first: whatever is due once a period is done
        now += 0.02
        scheduler.tick(now)
    client.config_resetstat()
    ticks = 100
    for _ in range(ticks):
        now += 0.02
        scheduler.tick(now)
    assert scheduler.waiting >= 100  # saturated all along
    return {name: calls / ticks for name, calls in commands(client).items()}


def test_a_saturated_budgets_script_work_does_not_grow_with_waiting_tenants(
    client: redis.Redis,
) -> None:
    """No step reads every waiting tenant (the idle sweep, the max-tenants bound, more
    tenants waiting than max_tenants): a call's commands are the same for 10 and 1,000."""
    few = saturated_tick_commands(client, 10)
    client.flushall()
    many = saturated_tick_commands(client, 1000)
    # Each tenant's queue gets its TTL pushed out once per quarter idle time, when a call
    # loads it: with many tenants, nearly every tick loads one due (one PEXPIRE; two while
    # each tenant was a key of its own, P:t:<h>, not a field of P:T).
    refreshes = many.pop("pexpire", 0.0) - few.pop("pexpire", 0.0)
    assert refreshes <= 1.25, refreshes
    assert sum(many.values()) <= sum(few.values()) + 0.5, (
        sorted(few.items()),
        sorted(many.items()),
    )
    # One admission per tick: a few dozen commands, not hundreds (26 besides the TTLs; 31
    # when a call asked again for what it had learned of its keys, step after step; 20
    # since a call takes the line as the last call left it: store.lua's recall_line).
    if redis_version(client) < (7, 0):  # (EVAL: nothing outlives a call)
        assert sum(many.values()) < 28, many
        return
    # 21 while each call asked for its heartbeat (ZSCORE); 23 while a tick read P:cfg and
    # P:dl every time
    assert sum(many.values()) < 20, many
    assert "zscore" not in many, many  # the heartbeat known (store.lua's call.heartbeat)
    # P:s; the tenant next in line (the first was known: its field of P:T, an HGET since
    # tenants are fields of one hash, an HMGET of P:t:<h> before); that tenant's queue and
    # P:active once (after the admission). P:cfg once a second (scripts.LIVE_REREAD_S: by
    # the live stamp in between); not the earliest deadline: the admitted one's was it, and
    # is a floor for the rest (store.lua, deadline_left). Asking for the first in line
    # again (P:active, its tenant, queue and head waiter, P:capped, P:dl): 6 more. P:s is
    # its generation alone (keys.GENERATION: the state kept by the call before; an HMGET
    # of its fields before), P:cfg an HMGET once a second.
    assert many.get("hmget", 0.0) <= 0.05, many
    assert many["zrange"] == 2.0, many
    # P:s's generation, the next one's field of P:T and its head waiter (the heartbeat:
    # rarely)
    assert 3.0 <= many["hget"] <= 3.05, many
    # P:T's fields counted once a second (the idle sweep's check for strays:
    # store.lua's call.sweep_strays)
    assert many["hlen"] <= 0.05, many


def saturated_by_a_hundred(client: redis.Redis) -> tuple[LuaScheduler, dict[str, str]]:
    """A budget of 50/s with 100 tenants waiting, one request each (the tenant of each
    request id)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 900.0), tenant_idle_s=60.0)
    scheduler = LuaScheduler(client, Limits(rate=50.0, burst=5.0), policy, now=0.0)
    tenant_of = {f"r{i}": f"t{i}" for i in range(100)}
    for request_id, tenant in tenant_of.items():
        scheduler.acquire(0.0, Request(request_id, tenant))
    return scheduler, tenant_of


def saturated_call_commands(client: redis.Redis) -> tuple[dict[str, float], dict[str, float]]:
    """Commands per call, by command, of a saturated budget (50/s, 100 tenants waiting, one
    request each) whose tenants queue again as soon as they are admitted: a tick that
    admits one, then that tenant's acquire, which queues. (ticks, acquires)"""
    scheduler, tenant_of = saturated_by_a_hundred(client)
    now = 100.0
    ticks: dict[str, int] = {}
    acquires: dict[str, int] = {}
    measured = 60
    for round_ in range(20 + measured):  # (20 first: the burst, the periodic steps)
        now += 0.02
        client.config_resetstat()
        granted = [e.id for e in scheduler.tick(now) if isinstance(e, Granted)]
        tick = commands(client)
        client.config_resetstat()
        for request_id in granted:
            tenant = tenant_of[request_id]
            tenant_of[f"r{len(tenant_of)}"] = tenant
            decision, _ = scheduler.acquire(now, Request(f"r{len(tenant_of) - 1}", tenant))
            assert isinstance(decision, Enqueue), decision
        acquire = commands(client)
        if round_ >= 20:
            assert len(granted) == 1, granted  # saturated: one admission per tick
            for total, counted in ((ticks, tick), (acquires, acquire)):
                for name, calls in counted.items():
                    total[name] = total.get(name, 0) + calls
    return (
        {name: calls / measured for name, calls in ticks.items()},
        {name: calls / measured for name, calls in acquires.items()},
    )


def test_a_saturated_acquire_takes_the_line_from_the_call_before(client: redis.Redis) -> None:
    """The call after a tick knows who is first in line, the first capped release and the
    earliest deadline without asking (store.lua, "The line as the last call left it"): an
    acquire that queues reads P:s once (fast.lua is not tried: the last call left requests
    waiting) and its tenant, and asks no sorted set anything (P:cfg and the live weights
    only when the live stamp moved). Its tenant's lone waiter is a field of its text in P:T
    (store.lua's enqueue): no queue key made, so no TTL to give one."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    ticks, acquires = saturated_call_commands(client)
    reads = {name: acquires.get(name, 0.0) for name in ("hmget", "hget", "zrange")}
    # P:s's generation (keys.GENERATION: the state kept by the tick; an HMGET of its
    # fields before), and its tenant's field of P:T (an HMGET of P:t:<h> before); 3:
    # fast.lua's try
    assert reads == {"hmget": 0.0, "hget": 2.0, "zrange": 0.0}, acquires
    # No PEXPIRE: its tenant's lone waiter is its field of P:T (store.lua's enqueue), not a
    # key made with a TTL (1 while it was; 2 when the tenant too was a key with one)
    assert "pexpire" not in acquires, acquires
    # (and the test's own DEL of the grant list, in both)
    # 13 while each call asked for its heartbeat (ZSCORE); 15; 23 when each call asked
    assert sum(acquires.values()) <= 12.05, acquires
    # The tick puts its tenant back on the idle list, which kept its anchor (keys.IDLE_ANCHOR):
    # no PEXPIRE of P:tenants (3 before); the grant list's. (2 while the granted tenant was
    # a key of its own with a TTL, P:t:<h>: a field of P:T now, whose TTL is the budget's.)
    assert ticks.get("pexpire") == 1.0, ticks
    # 18 while each tenant had a key of its own; 19 while each call asked for its
    # heartbeat; 20 while the idle list was made anew by each tick; 22 while each tick read
    # P:cfg and P:dl; 28
    assert sum(ticks.values()) <= 17.1, ticks


def test_the_fast_path_is_tried_again_once_nobody_waits(client: redis.Redis) -> None:
    """A call after one that left requests waiting skips fast.lua (it would read the state
    only to give up); once a call leaves nobody waiting, the next one-request call takes
    the fast path again (no heartbeat ZADD: only the idle list's)."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
    scheduler = LuaScheduler(client, Limits(rate=10.0, burst=1.0), policy, now=0.0)
    assert isinstance(scheduler.acquire(0.0, Request("a", "t"))[0], Admit)
    assert isinstance(scheduler.acquire(0.0, Request("b", "t"))[0], Enqueue)
    client.config_resetstat()
    assert isinstance(scheduler.acquire(0.0, Request("c", "u"))[0], Enqueue)
    # P:s once, its generation (keys.GENERATION: the state kept): not fast.lua (u's field of
    # P:T and live weight)
    used = commands(client)
    assert (used.get("hmget"), used.get("hget")) == (None, 3), used
    assert [e.id for e in scheduler.tick(0.1)] == ["b"]
    assert [e.id for e in scheduler.tick(0.2)] == ["c"]  # nobody waits now
    client.config_resetstat()
    assert isinstance(scheduler.acquire(0.5, Request("d", "t"))[0], Admit)
    assert commands(client).get("zadd") == 1, commands(client)  # fast.lua's call


def test_the_heartbeat_is_asked_for_only_when_not_known_to_be_there(
    client: redis.Redis,
) -> None:
    """A loaded library remembers the caller's heartbeat as it last read or wrote it (batch.lua,
    renew.lua), with its expiry and the state's epoch, and asks P:procs again only when the
    heartbeat may be gone: lapsed (any renew sweeps it), the process left (leave.lua), the
    state made anew (a Redis emptied meanwhile). Each time it is asked, a missing one is
    registered again (ZADD NX)."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    ttl = 60.0  # (the heartbeat's: the lease TTL)
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    scheduler.lease_ttl_s = ttl
    procs = f"{scheduler._tag}:procs"

    def asks(now: float) -> dict[str, int]:
        client.config_resetstat()
        scheduler.acquire_in_full(now, Request(f"r{now}", "a"))  # (batch.lua, not fast.lua)
        used = commands(client)
        return {name: used.get(name, 0) for name in ("zscore", "zadd")}

    asks(1.0)  # registered (or seen)
    assert asks(2.0)["zscore"] == 0  # known: its expiry is ahead
    scheduler._run("leave", [scheduler._tag, "sim"], client)  # (the process's id)
    assert asks(3.0) == {"zscore": 1, "zadd": 2}  # left: asked, registered (and the idle list)
    assert client.zscore(procs, "sim") == 3.0 + ttl
    assert asks(ttl + 4.0)["zscore"] == 1  # lapsed: asked (there, not swept: no ZADD)
    scheduler.renew(ttl + 5.0, [])  # the heartbeat renewed: known again
    assert asks(ttl + 6.0)["zscore"] == 0
    client.flushall()  # Redis emptied: the state made anew has another epoch
    assert asks(ttl + 7.0)["zscore"] == 1
    assert client.zscore(procs, "sim") == 2 * ttl + 7.0


def test_a_waiters_process_is_asked_for_only_when_not_known_alive(client: redis.Redis) -> None:
    """A grant to a waiter of another process first checks that process is alive (core.lua's
    orphaned): P:procs is asked only when the loaded library does not know its heartbeat is
    there (the fleet's processes call the same library: their calls and renewals tell it). A
    lapsed one is asked, and its waiter dropped, not granted."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
    first = LuaScheduler(client, Limits(rate=1.0, burst=1.0), policy, now=0.0)  # (3600 s)
    other = first.joined("other")
    other.lease_ttl_s = 10.0  # its heartbeat: 10 s from its first call
    other.acquire(0.0, Request("r0", "a"))  # the bucket emptied
    other.acquire(0.1, Request("r1", "a"))  # waits
    grants = f"{first._tag}:g:other"  # (the other process's grant list)
    client.config_resetstat()
    first.tick(1.1)
    assert "zscore" not in commands(client), commands(client)  # both known alive
    listed = [str(m, "utf-8") for m in client.lrange(grants, 0, -1) if isinstance(m, bytes)]
    assert [m.split("|")[:2] for m in listed] == [["g", "r1"]]
    client.delete(grants)
    other.acquire(1.2, Request("r2", "a"))  # waits; then its process's heartbeat lapses
    client.config_resetstat()
    first.tick(12.0)
    assert commands(client).get("zscore") == 1, commands(client)  # lapsed: asked
    assert client.hget(f"{first._tag}:r", "r2") is None  # dropped, not granted
    listed = [str(m, "utf-8") for m in client.lrange(grants, 0, -1) if isinstance(m, bytes)]
    assert not any(m.startswith("g|r2") for m in listed)


def test_a_tick_that_admits_nothing_asks_no_sorted_set(client: redis.Redis) -> None:
    """A tick between two admissions of a saturated budget (the fallback tick of a process
    that did not claim the fleet's tick, or one woken early) finds nothing admittable from
    the line the call before left (store.lua, "The line as the last call left it"): it
    reads P:s (P:cfg by the live stamp: once a second), knows its heartbeat is there (the
    loaded library saw it, not lapsed: store.lua's call.heartbeat) and writes P:s once
    (the refilled bucket and the call's stamp), and asks no sorted set or waiter anything."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    scheduler, tenant_of = saturated_by_a_hundred(client)
    now = 100.0
    idle: dict[str, int] = {}
    measured = 40
    for round_ in range(20 + measured):  # (20 first: the burst, the periodic steps)
        now += 0.02
        for event in scheduler.tick(now):
            assert isinstance(event, Granted), event
            tenant = tenant_of[event.id]
            tenant_of[f"r{len(tenant_of)}"] = tenant
            decision, _ = scheduler.acquire(now, Request(f"r{len(tenant_of) - 1}", tenant))
            assert isinstance(decision, Enqueue), decision
        client.config_resetstat()
        assert scheduler.tick(now + 0.005) == []  # a quarter of a token: nothing fits
        if round_ >= 20:
            for name, calls in commands(client).items():
                idle[name] = idle.get(name, 0) + calls
    per_tick = {name: calls / measured for name, calls in idle.items()}
    # (and the test's own DEL of the grant list)
    # (The heartbeat not asked: the last call saw it, with an expiry ahead. Before, a
    # ZSCORE each call; before that, a ZADD NX whose score took a 17-digit formatting to
    # change nothing.)
    every = {name: per_tick.pop(name, 0.0) for name in ("zscore", "hset", "del")}
    assert every == {"zscore": 0.0, "hset": 1.0, "del": 1.0}, every
    # P:s's generation (keys.GENERATION: the state kept by the call before), and P:cfg
    # once a second (an HMGET)
    assert per_tick.pop("hget") == 1.0, per_tick
    assert per_tick.pop("hmget", 0.0) <= 0.05, per_tick
    # What is due once a second falls on some of these ticks: the idle sweep (ZRANGEBYSCORE,
    # ZCARD; HLEN, its check for stray tenants in P:T) and the live processes' count
    # (ZCOUNT); nothing else.
    assert set(per_tick) <= {"zrangebyscore", "zcard", "zcount", "hlen"}, per_tick
    assert all(calls <= 0.05 for calls in per_tick.values()), per_tick


def test_a_change_by_another_writer_is_seen_by_the_next_call(client: redis.Redis) -> None:
    """The line a call remembers is taken only while P:s is as that call left it: here
    another writer (the same scripts by EVALSHA, as a process without FUNCTION rights
    runs them) cancels the request first in line, at the same instant, between two calls
    of the library; the next tick admits the one after it."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    limits, policy = Limits(rate=1.0, burst=1.0), Policy(dict.fromkeys(PRIORITIES, 30.0))
    library = LuaScheduler(client, limits, policy, now=0.0, functions=True)
    other = LuaScheduler(client, limits, policy, now=0.0, functions=False)
    other._tag, other._key = library._tag, library._key  # the same budget
    assert isinstance(library.acquire(0.0, Request("r0", "a"))[0], Admit)  # the bucket empty
    assert isinstance(library.acquire(0.1, Request("r1", "b"))[0], Enqueue)
    assert isinstance(library.acquire(0.1, Request("r2", "c"))[0], Enqueue)
    assert library.tick(0.5) == []  # nothing due yet: r1 first in line, remembered
    cancelled, _ = other.cancel(0.5, "r1")
    assert cancelled is not None
    events = library.tick(1.05)
    assert [e.id for e in events if isinstance(e, Granted)] == ["r2"], events


@pytest.mark.parametrize("change", ["reweighed", "dropped"])
def test_a_granted_tenant_changed_by_another_writer_is_read_again(
    client: redis.Redis, change: str
) -> None:
    """The tenant a tick granted is kept for the next call (store.lua, recall_tenant),
    which reads its field of P:T while it waits for nothing and takes the kept tenant only
    if that is the text the library wrote: a tenant another writer reweighed (an acquire
    it then rejected) or dropped as idle, with P:s as it was, is read again whole, and the
    acquire that queues for it writes what a load would."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    scheduler, tenant_of = saturated_by_a_hundred(client)
    now = 100.0
    for _ in range(30):  # (the burst, the periodic steps; every tenant asks again)
        now += 0.02
        for event in scheduler.tick(now):
            tenant = tenant_of[event.id]
            tenant_of[f"r{len(tenant_of)}"] = tenant
            scheduler.acquire(now, Request(f"r{len(tenant_of) - 1}", tenant))
    now += 0.02
    granted = [e.id for e in scheduler.tick(now) if isinstance(e, Granted)]
    assert len(granted) == 1, granted
    tenant = tenant_of[granted[0]]
    tenants, h = scheduler._keys.tenant_hash, tenant_digest(tenant)
    state = protocol.tenant_state(cast(bytes, client.hget(tenants, h)))
    assert state["n"] in ("", "0"), state  # it waits for nothing: kept, checked
    if change == "reweighed":
        state["w"] = "3"
        text = protocol.SEP.join([*(state[f] for f in TENANT_FIELDS), state["name"]])
        client.hset(tenants, h, text)
    else:
        client.hdel(tenants, h)
    decision, _ = scheduler.acquire(now, Request("again", tenant))
    assert isinstance(decision, Enqueue), decision
    state = protocol.tenant_state(cast(bytes, client.hget(tenants, h)))
    assert state["w"] in ("", "1"), state  # the caller's weight again
    assert state["f"] != "", state
    assert state["n"] == "1", state
    if change == "dropped":
        assert state["name"] == tenant, state  # made anew


def test_a_plain_field_changed_alone_is_seen_by_the_next_full_call(client: redis.Redis) -> None:
    """A full call takes the state as the last full call left it only while P:s holds
    what that call wrote (store.lua, call.take_state): a release by fast.lua's
    lean_release writes in flight alone (the packed numbers as they were), and the
    next full call counts the slot it freed."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
    scheduler = LuaScheduler(client, Limits(concurrency=1), policy, now=0.0)
    assert isinstance(scheduler.acquire(0.0, Request("r0", "a"))[0], Admit)
    assert scheduler.tick(0.1) == []  # a full call: its state kept
    packed = client.hget(scheduler._key, "nums")
    client.config_resetstat()
    assert scheduler.release(0.1, "r0") == []  # lean_release: in flight, nothing else
    assert commands(client).get("hset") == 1, commands(client)
    assert client.hget(scheduler._key, "nums") == packed
    replies = scheduler.batch(0.1, new_tenants(0, 2))  # two acquires: a full call
    assert admitted(replies) == 1, replies  # the freed slot, and one waits


def new_tenants(first: int, count: int) -> list[str]:
    """Acquire operations of `count` tenants never seen before."""
    requests = [Request(f"r{i}", f"new{i}") for i in range(first, first + count)]
    return [protocol.acquire_op(r.id, protocol.acquire_tail(r, 1.0, 30.0)) for r in requests]


def admitted(replies: list[str]) -> int:
    return sum(reply.startswith(protocol.REPLY["admitted"]) for reply in replies)


def admit_new(scheduler: LuaScheduler, now: float, first: int, count: int) -> None:
    """`count` new tenants admitted, the ones a call deferred sent again (a call stops at
    its work check once Redis's clock says WORK_US went by: on a loaded machine Redis may
    lose its core mid-call and take only the first two), in five calls at most."""
    done = 0
    for _ in range(5):
        done += admitted(scheduler.batch(now, new_tenants(first + done, count - done)))
        if done == count:
            return
    raise AssertionError(f"{done} of {count} admitted in five calls")


def test_a_call_of_new_tenants_writes_each_once_and_the_idle_list_once(
    client: redis.Redis,
) -> None:
    """The tenants made in a call are written to P:T (each one field: its state in one text,
    its name last) with one HSET per work check that has some to write and one at the
    call's end, not one each; each is read with one HGET (no key of its own: no EXISTS, no
    PEXPIRE); the idle list (P:tenants) gets one ZADD for all of them. Counted per
    admitted tenant: a slow machine may defer some (WORK_US)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), max_tenants=10_000)
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    cpu_clock = has_cpu_clock(client)
    first, made = 0, 0
    for width in (4, 32):
        client.config_resetstat()
        n = admitted(scheduler.batch(1.0 + width, new_tenants(first, width)))
        first += width
        made += n
        assert n >= 2
        used = commands(client)
        # the budget's state, and the tenants at most once per work check (a TIME each,
        # where TIME is the work clock; with os.clock, one per WORK_CHECK operations at
        # most) and at the end (n + 1 while each tenant was a key of its own)
        checks = n // scripts.WORK_CHECK if cpu_clock else used["time"]
        assert 2 <= used["hset"] <= 1 + checks, (n, used)
        if n >= 8:
            assert used["hset"] < n, (n, used)
        assert used["zadd"] == 1, used  # the idle list
        # whether any live weight is set, once (an EXISTS per tenant too before)
        assert used.get("exists", 0) <= 1, used
        assert used.get("pexpire", 0) <= 3, used  # the keys this call made, not per tenant
        # The caller's heartbeat, known from the call before (store.lua's call.heartbeat;
        # Redis 6.2: asked, there, no ZADD NX)
        assert used.get("zscore", 0) == (1 if redis_version(client) < (7, 0) else 0), used
        # each tenant's field once; whether a live weight is set asked once, not per tenant
        assert n <= used["hget"] <= n + 1, used
        # P:s and P:cfg (Redis 6.2: nothing outlives a call)
        assert used["hmget"] <= 2, used
    tenants = scheduler._keys.tenant_hash
    assert client.pttl(tenants) > 0  # its TTL: the budget's (idle+T)
    assert client.keys("*:t:*") == []  # no key per tenant
    texts = cast(dict[bytes, bytes], client.hgetall(tenants))
    # P:T's anchor, a field longer than a compact hash allows: a hashtable from its first
    # tenant, so a tenant's HGET and HSET do not search the others, whatever
    # hash-max-listpack-* are set to (here only a few dozen tenants, some 60 bytes each)
    assert texts.pop(scripts.ENCODING_ANCHOR.encode()) == b""
    assert client.object("encoding", tenants) == b"hashtable"
    states = [protocol.tenant_state(v) for v in texts.values()]
    assert len(states) == made, states
    # A new tenant at rest: its name, finish tag, cap bucket and its queue's TTL refresh;
    # its weight (1), waiting count and costs (0), state (idle) and member ('') are their
    # defaults ('').
    at_rest = {"name", "f", "cap", "cap_at", "xp"}
    assert [{k for k, v in state.items() if v} for state in states] == [at_rest] * made
    heavy = Request("r-heavy", "heavy")
    op = protocol.acquire_op(heavy.id, protocol.acquire_tail(heavy, 2.0, 30.0))
    assert admitted(scheduler.batch(40.0, [op])) == 1
    state = protocol.tenant_state(cast(bytes, client.hget(tenants, tenant_digest("heavy"))))
    assert (state["w"], state["st"], state["name"]) == ("2", "", "heavy"), state


def deferred(replies: list[str]) -> int:
    return sum(reply == protocol.DEFERRED for reply in replies)


def test_a_calls_work_is_bounded_by_its_count_whatever_the_clock(client: redis.Redis) -> None:
    """A call of many operations takes on no more than its counted work
    (scripts.WORK_UNITS: 1 an operation, MADE_UNITS more for a tenant it makes) and answers
    the rest "deferred", so the commands it runs stay bounded however fast Redis runs it:
    before, only Redis's clock (WORK_US) stopped a call, so a fast machine took on 40 and
    more new tenants, with their writes and the drops they cause after the loop. The
    clock can only stop a call sooner: the bounds below hold on a loaded machine too."""
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), max_tenants=64)
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    first, now = 0, 1.0
    while first < 64:  # the tenant set at its bound: each new tenant drops one after the loop
        replies = scheduler.batch(now, new_tenants(first, 8))
        first += 8 - deferred(replies)
        now += 0.01
    per_tenant = 1 + scripts.MADE_UNITS
    for _ in range(5):
        client.config_resetstat()
        replies = scheduler.batch(now, new_tenants(first, 256))
        used = commands(client)
        taken = 256 - deferred(replies)
        assert 0 < taken <= scripts.WORK_UNITS // per_tenant, taken
        first += taken
        now += 0.01
        # Per tenant its EXISTS, HSET and PEXPIRE (a TIME per work check at most); the
        # call's own: state, heartbeat, idle list, drops, write-back (some 16).
        assert sum(used.values()) <= 4 * taken + 24, (taken, used)
        # (the idle list's tenants: its anchor, keys.IDLE_ANCHOR, at +inf, not counted)
        assert client.zcount(f"{scheduler._tag}:tenants", "-inf", "(+inf") == 64
    # 256 new tenants queueing at once on an empty bucket: each also queued (its waiter,
    # the deadline list, the line).
    queueing = LuaScheduler(client, Limits(rate=1.0, burst=1.0), policy, now=0.0)
    queueing.batch(0.5, new_tenants(10_000, 1))  # the bucket emptied
    client.config_resetstat()
    replies = queueing.batch(0.5, new_tenants(20_000, 256))
    used = commands(client)
    taken = 256 - deferred(replies)
    assert 0 < taken <= scripts.WORK_UNITS // per_tenant, taken
    assert sum(used.values()) <= 12 * taken + 40, (taken, used)


def has_cpu_clock(client: redis.Redis) -> bool:
    """Whether the server's Lua has os.clock, the work clock there (fast.lua's clock_us)."""
    probe = "local ok, o = pcall(function() return os end) "
    probe += "return ok and type(o) == 'table' and o.clock ~= nil and 1 or 0"
    return bool(client.eval(probe, 0))


@contextlib.contextmanager
def work_us(us: int) -> Iterator[None]:
    """WORK_US at `us` in the scripts loaded meanwhile (restored after)."""
    tuning = scripts.SHARED["TUNING"]
    assert isinstance(tuning, dict)
    saved = tuning["WORK_US"]
    tuning["WORK_US"] = us
    scripts.source.cache_clear()  # (the texts made from SHARED: made anew, now and after)
    scripts.library.cache_clear()
    try:
        yield
    finally:
        tuning["WORK_US"] = saved
        scripts.source.cache_clear()
        scripts.library.cache_clear()


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_a_calls_work_clock_moves_on_every_server(client: redis.Redis, functions: bool) -> None:
    """The work bound's clock moves within a call: since Redis 7.2, and in Valkey, TIME is
    frozen for a script's whole run, so a bound by TIME alone never stopped a call there
    (fast.lua's clock_us reads os.clock where the server has it). With WORK_US at 1 us, a
    call of 8 acquires stops at its first work check (after WORK_CHECK) on every server."""
    if functions and redis_version(client) < (7, 0):
        pytest.skip("this Redis has no functions")
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
    with work_us(1):
        scheduler = LuaScheduler(
            client, Limits(rate=1e6, burst=1e6), policy, now=0.0, functions=functions
        )
        requests = [Request(f"r{i}", "one") for i in range(8)]
        ops = [protocol.acquire_op(r.id, protocol.acquire_tail(r, 1.0, 30.0)) for r in requests]
        replies = scheduler.batch(1.0, ops)
    assert admitted(replies) == scripts.WORK_CHECK, replies
    assert deferred(replies) == 8 - scripts.WORK_CHECK, replies
    if functions:  # the library as it was for the tests after
        client.function_load(scripts.library().text, replace=True)


def test_the_batcher_sends_again_what_a_bounded_call_deferred(client: redis.Redis) -> None:
    """256 new tenants' acquires at once through the backend's batcher and the real script:
    each call takes what its work bound allows, the batcher sends the rest again first
    in the next, and every acquire is answered once, admitted."""
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), max_tenants=64)
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    sent: list[int] = []

    async def call(ops: Sequence[str], retry: bool) -> list[str]:
        sent.append(len(ops))
        scheduler.batch(1.0 + len(sent) / 1000, list(ops))
        return scheduler.reply

    async def run() -> list[str]:
        batcher = Batcher(call, lambda trailer: None)
        futures = [batcher.submit(op) for op in new_tenants(0, 256)]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            await batcher.close()

    replies = asyncio.run(run())
    assert admitted(replies) == 256, replies
    assert len(sent) >= 256 // (scripts.WORK_UNITS // (1 + scripts.MADE_UNITS)), sent


@pytest.mark.parametrize("why", ["idle", "beyond max_tenants"])
def test_idle_tenants_are_dropped_in_a_few_commands(client: redis.Redis, why: str) -> None:
    """forget_idle drops a batch of tenants with one HDEL (their fields of P:T; a DEL of
    their keys before) and one ZREMRANGEBYRANK (they are the idle list's first members: no
    ZREM of each by name), not a few commands per tenant (a call of many new
    tenants dropped as many old ones after its work budget); while nobody waits, without
    asking P:qlen which of them wait (a ZMSCORE). Nor is P:T walked for strays: it holds no
    more tenants than the idle list (one HLEN tells)."""
    count = 40
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), tenant_idle_s=60.0, max_tenants=10_000)
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    for i in range(count):
        scheduler.acquire(1.0, Request(f"old{i}", f"old{i}"))
    client.config_resetstat()
    if why == "idle":
        scheduler.tick(100.0)  # all idle for longer than tenant_idle_s: a sweep's batch goes
        dropped = scripts.SWEEP_BATCH
    else:
        scheduler._policy = Policy(dict.fromkeys(PRIORITIES, 30.0), max_tenants=8)
        scheduler.tick(5.0)  # the next sweep: the 32 least recent beyond 8 go
        dropped = count - 8
    used = commands(client)
    assert used.get("hget", 0) == 0, used
    assert used.get("zmscore", 0) == 0, used
    assert used.get("del", 0) <= 1, used  # (the test's: the grant list)
    assert used.get("hdel", 0) == 1, used
    assert used.get("zremrangebyrank", 0) == 1, used
    assert used.get("zrem", 0) == 0, used
    assert used.get("hlen", 0) == 1, used
    assert "hscan" not in used, used
    assert client.hlen(scheduler._keys.tenant_hash) == count - dropped + 1  # + its anchor


def test_a_waiting_tenant_found_on_the_idle_list_is_not_dropped(client: redis.Redis) -> None:
    """While anyone waits, the drop asks P:qlen (one ZMSCORE for the batch) which of the
    tenants it read wait: a waiting one is off the idle list, except in a state written
    before that was so, and keeps its field of P:T."""
    policy = Policy(dict.fromkeys(PRIORITIES, 900.0), tenant_idle_s=60.0, max_tenants=10_000)
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=1.0), policy, now=0.0)
    for i in range(4):
        scheduler.acquire(1.0, Request(f"old{i}", f"old{i}"))  # the first admitted, the rest wait
    tag, tenants = scheduler._tag, scheduler._keys.tenant_hash
    assert client.zscore(f"{tag}:qlen", tenant_digest("old3")) is not None
    client.zadd(f"{tag}:tenants", {tenant_digest("old3"): 1})  # (as an older build left it)
    client.config_resetstat()
    scheduler.tick(100.0)  # old0 idle past tenant_idle_s: dropped; old3 read with it
    assert not client.hexists(tenants, tenant_digest("old0"))
    assert client.hexists(tenants, tenant_digest("old3"))
    assert commands(client).get("zmscore", 0) == 1


def one_at_a_time_commands(client: redis.Redis, limits: Limits) -> dict[str, float]:
    """Commands per call of one request at a time (fast.lua's calls): an acquire admitted
    at once and, with a lease, its release, tenants seen before, nobody waiting."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, limits, policy, now=0.0)
    now = 0.0
    for round_ in range(2):  # the first round makes the tenants (full calls)
        if round_ == 1:
            client.config_resetstat()
        for i in range(20):
            now += 0.001  # within the window, the sweep period and the TTL refresh period
            decision, _ = scheduler.acquire(now, Request(f"r{round_}-{i}", f"t{i % 4}"))
            assert isinstance(decision, Admit)
            scheduler.release(now, f"r{round_}-{i}")
    stats = commands(client)
    stats.pop("del")  # LuaScheduler's own, after each call
    calls = 20 * (2 if limits.concurrency is not None else 1)
    return {name: n / calls for name, n in sorted(stats.items())}


def test_one_request_at_a_time_costs_a_few_commands_per_call(client: redis.Redis) -> None:
    """The budget state (P:s) is one read and at most one write; a release touches no
    tenant. (TIME is not called: LuaScheduler passes the time; production adds one.)"""
    rate = one_at_a_time_commands(client, Limits(rate=1e6, burst=1e6))
    # Its numbers packed into one field (store.lua): a read of one field, not of sixteen.
    # (No generation, keys.GENERATION: a stamp only while someone waits.)
    (state,) = client.keys("*:s")
    assert client.hlen(state) <= 9, client.hkeys(state)
    # P:s and the tenant read (its field of P:T: an HGET); the idle list; P:s and the
    # tenant written; the recent admission (no lease) kept. Not on every call: the live
    # limits and whether any live weight is set (P:cfg, P:w: read again only when the
    # state's LIVE_STAMP changed), the processes' count (once a second, batch.lua's
    # live_processes) and the recent admissions' TTL (a quarter of T apart). With EVAL
    # (Redis 6.2) the library keeps no memory: P:cfg, P:w and the TTL on every call.
    expected = {"hmget": 1.0, "hget": 1.0, "hset": 2.0, "lpush": 1.0, "zadd": 1.0}
    if redis_version(client) < (7, 0):
        expected.update(pexpire=1.0, hmget=2.0, exists=1.0)
    assert rate == expected, rate
    client.flushall()
    concurrency = one_at_a_time_commands(client, Limits(concurrency=1000))
    # Per call, acquire and release averaged: the acquire as above but with its lease (one
    # ZADD: a lease of cost 1 has no P:lc entry; the first lease makes P:leases anew, and
    # gives it its TTL), the release reads P:s, takes the lease out (one ZREM) and writes
    # P:s: it touches no tenant.
    expected = {"hmget": 1.0, "hget": 0.5, "hset": 1.5, "pexpire": 0.5, "zadd": 1.0, "zrem": 0.5}
    if redis_version(client) < (7, 0):
        # (the release, by release.lua, reads no P:cfg: its short reply states no limits;
        # 2.5 when releases went by batch.lua)
        expected.update(hmget=1.5, exists=0.5)
    assert concurrency == expected, concurrency


def test_with_leases_in_flight_an_acquire_asks_for_the_first_lease_once_per_lease_ttl(
    client: redis.Redis,
) -> None:
    """fast.lua gives up on a lapsed lease, but asks P:leases for its first lease only once
    `now` reaches the state's bound on it (store.lua's `le`): with leases held meanwhile,
    an acquire and its release cost what they cost without them (a ZRANGE per acquire
    before: 0.5 a call)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(concurrency=1000), policy, now=0.0)
    now = 0.0
    for i in range(8):  # the tenants made, five leases held, the bound asked once
        now += 0.001
        decision, _ = scheduler.acquire(now, Request(f"held{i}", f"t{i % 4}"))
        assert isinstance(decision, Admit)
    for i in range(5, 8):
        scheduler.release(now, f"held{i}")
    client.config_resetstat()
    for i in range(20):
        now += 0.001  # within the window, the sweep period, the TTL refresh and the leases'
        decision, _ = scheduler.acquire(now, Request(f"r{i}", f"t{i % 4}"))
        assert isinstance(decision, Admit)
        scheduler.release(now, f"r{i}")
    stats = commands(client)
    stats.pop("del")  # LuaScheduler's own, after each call
    per_call = {name: n / 40 for name, n in sorted(stats.items())}
    expected = {"hmget": 1.0, "hget": 0.5, "hset": 1.5, "zadd": 1.0, "zrem": 0.5}
    if redis_version(client) < (7, 0):
        expected.update(hmget=1.5, exists=0.5)
    assert per_call == expected, per_call
    assert scheduler.in_flight == 5


def test_a_release_with_nobody_waiting_reads_the_state_once_and_writes_in_flight(
    client: redis.Redis,
) -> None:
    """fast.lua's lean_release: P:s read (one HMGET), the lease out (one ZREM), in flight
    written (one HSET); no tenant, no P:lc, no TTL, no count of the processes. By
    release.lua (LuaScheduler.release, as the backend sends a release alone) the same with
    EVAL (Redis 6.2): its short reply states no limits, so P:cfg is not read. By batch.lua
    with EVAL, the library keeps no memory: the live limits (P:cfg) are read too."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(concurrency=1000), policy, now=0.0)
    now = 0.0
    for i in range(21):  # the tenants made, leases in flight
        now += 0.001
        scheduler.acquire(now, Request(f"r{i}", f"t{i % 4}"))
    (state,) = client.keys("*:s")
    for i in range(19):
        now += 0.001
        client.config_resetstat()
        scheduler.release(now, f"r{i}")
        used = commands(client)
        used.pop("del")  # LuaScheduler's own, after each call
        assert used == {"hmget": 1, "zrem": 1, "hset": 1}, (i, used)
        assert int(client.hget(state, "inflight") or -1) == 20 - i
    # By batch.lua (a call of one release, as every release went before release.lua).
    now += 0.001
    client.config_resetstat()
    assert scheduler.batch(now, [protocol.release_op("r19")]) == [protocol.REPLY["released"]]
    used = commands(client)
    used.pop("del")
    expected = {"hmget": 1, "zrem": 1, "hset": 1}
    if redis_version(client) < (7, 0):
        expected["hmget"] = 2
    assert used == expected, used
    # A lease not there any more (released twice): nothing written.
    client.config_resetstat()
    scheduler.batch(now, [protocol.release_op("r0")])
    used = commands(client)
    assert used.get("zrem") == 1, used
    assert used.get("hset", 0) == 0, used
    assert int(client.hget(state, "inflight") or -1) == 1


def test_a_release_with_someone_waiting_dispatches_at_once(client: redis.Redis) -> None:
    """The release that makes room admits the first waiter in the same call: a grant on
    its process's list, in flight still the limit."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(concurrency=2), policy, now=0.0)
    for i in range(2):
        decision, _ = scheduler.acquire(0.01 * (i + 1), Request(f"held{i}", "t"))
        assert isinstance(decision, Admit)
        assert decision.lease
    decision, _ = scheduler.acquire(0.03, Request("waiter", "u"))
    assert isinstance(decision, Enqueue)
    assert scheduler.waiting == 1
    events = scheduler.release(0.04, "held0")
    assert [(e.id, e.lease) for e in events if isinstance(e, Granted)] == [("waiter", True)]
    assert scheduler.waiting == 0
    assert scheduler.in_flight == 2
    # Then nobody waits: the next release takes its lease out alone.
    assert scheduler.release(0.05, "held1") == []
    assert scheduler.in_flight == 1


def test_a_lean_release_leaves_what_the_fast_release_leaves(client: redis.Redis) -> None:
    """Two budgets, the same requests: in one every release goes as it comes (fast.lua's
    lean_release, or fast_release where it stops), in the other the state's live stamp is
    deleted before each release (lean_release stops: fast_release runs). In flight, the
    leases with their expiries and costs, and every reply are the same after each step."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    lean = LuaScheduler(client, Limits(concurrency=40), policy, now=0.0)
    fast = LuaScheduler(client, Limits(concurrency=40), policy, now=0.0)

    def keys(scheduler: LuaScheduler) -> tuple[object, ...]:
        tag = scheduler._tag
        return (
            scheduler.in_flight,
            client.zrange(f"{tag}:leases", 0, -1, withscores=True),
            client.hgetall(f"{tag}:lc"),
            client.exists(f"{tag}:leases", f"{tag}:lc"),
        )

    now = 0.0
    held: list[str] = []

    def acquire(rid: str, cost: int) -> None:
        replies = [
            s.acquire(now, Request(rid, f"t{len(held) % 3}", cost=cost)) for s in (lean, fast)
        ]
        assert replies[0] == replies[1]
        held.append(rid)

    def release(rid: str) -> None:
        held.remove(rid)
        Keys(fast._tag[1:-1]).live_changed(client)  # (as the tool does after its write)
        lines = [s.batch(now, [protocol.release_op(rid)]) for s in (lean, fast)]
        assert lines[0] == lines[1]

    # In flight climbs over the anchor (cost 1 only: lean_release), then leases of cost 2
    # come and go (fast_release while one is in flight), then all go, the last with the
    # anchor and the lease keys.
    for i in range(90):
        now += 0.003
        if i % 3 == 2:
            release(held[0 if i % 2 else -1])
        else:
            acquire(f"r{i}", 2 if 40 <= i < 50 else 1)
        assert keys(lean) == keys(fast), i
    assert lean.in_flight > scripts.LEASE_ANCHOR_AT
    while held:
        now += 0.003
        release(held[-1])
        assert keys(lean) == keys(fast), len(held)
    assert keys(lean) == (0, [], {}, 0)


@pytest.mark.parametrize("costs", [[1] * 20, [1, 3] * 10, [3] * 20])
def test_releases_leave_no_lease_keys_and_nothing_in_flight(
    client: redis.Redis, costs: list[int]
) -> None:
    """Over LEASE_ANCHOR_AT in flight (the anchor set), leases of cost 1 and of others
    (P:lc): released one by one, lean or not, in flight counts down by each one's cost and
    the last takes the lease keys with it (a budget at rest keeps none)."""
    assert len(costs) > scripts.LEASE_ANCHOR_AT
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(concurrency=1000), policy, now=0.0)
    now = 0.0
    for i, cost in enumerate(costs):
        now += 0.001
        decision, _ = scheduler.acquire(now, Request(f"r{i}", f"t{i % 4}", cost=cost))
        assert isinstance(decision, Admit)
        assert decision.lease
    (leases,) = client.keys("*:leases")
    assert client.zscore(leases, scripts.LEASE_ANCHOR) is not None  # the anchor is set
    held = sum(costs)
    assert scheduler.in_flight == held
    for i, cost in enumerate(costs):
        now += 0.001
        scheduler.release(now, f"r{i}")
        held -= cost
        assert scheduler.in_flight == held, i
    assert client.keys("*:leases") == []
    assert client.keys("*:lc") == []


def test_the_live_processes_are_counted_once_a_second_and_at_once_on_joining(
    client: redis.Redis,
) -> None:
    """The trailer's live processes: kept in the state, counted again once PROCS_RECOUNT
    has passed, or at once by the call that registers its process."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=10.0)
    assert scheduler.trailer.processes == 1  # the first call registered its process
    (procs,) = client.keys("*:procs")
    client.zadd(procs, {"another": 1e9})  # another process's heartbeat (renew.lua's)
    scheduler.acquire(10.5, Request("a", "t"))
    assert scheduler.trailer.processes == 1  # not yet counted again
    scheduler.acquire(10.0 + PROCS_RECOUNT_S, Request("b", "t"))
    assert scheduler.trailer.processes == 2
    client.zadd(procs, {"another": 11.5})  # its heartbeat lapses at 11.5
    scheduler.acquire(11.6, Request("c", "t"))
    assert scheduler.trailer.processes == 2
    scheduler.acquire(12.0 + PROCS_RECOUNT_S, Request("d", "t"))
    assert scheduler.trailer.processes == 1


def test_the_recent_admissions_are_trimmed_now_and_then_and_keep_a_ttl(
    client: redis.Redis,
) -> None:
    """At least RECENT_KEPT of them, at most RECENT_SLACK more; the list always expires."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    sizes = []
    for i in range(3 * RECENT_KEPT):
        scheduler.acquire(0.001 * (i + 1), Request(f"r{i}", "t"))
        (recent,) = client.keys("*:rc:*")
        sizes.append(client.llen(recent))
        assert client.pttl(recent) > 0
    assert max(sizes) == RECENT_KEPT + RECENT_SLACK
    assert min(sizes[RECENT_KEPT:]) == RECENT_KEPT
    assert client.lindex(recent, 0) == f"r{3 * RECENT_KEPT - 1}".encode()


def test_live_limits_and_weights_are_read_again_once_their_stamp_is_deleted(
    client: redis.Redis,
) -> None:
    """P:cfg and P:w are read when the state's LIVE_STAMP is not the one of the reading
    the library remembers: whoever changes them deletes it (Budget.set and reset, the
    learner), and the next call reads both again and stamps the state anew."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(rate=100.0, burst=100.0), policy, now=0.0)
    scheduler.acquire(0.001, Request("a", "t"))  # the budget and its tenant made
    (state,) = client.keys("*:s")
    stamp = client.hget(state, LIVE_STAMP)
    assert stamp
    cfg = (state.decode() if isinstance(state, bytes) else state).removesuffix(":s") + ":cfg"
    client.hset(cfg, "rate", "50.0")  # by hand, the stamp left: not read yet
    client.config_resetstat()
    scheduler.acquire(0.002, Request("b", "t"))
    used = commands(client)  # P:s and the tenant (its field of P:T)
    assert (used.get("hmget"), used.get("hget")) == (1, 1), used
    assert scheduler.trailer.limits.startswith("100|"), scheduler.trailer
    Keys(scheduler._tag[1:-1]).live_changed(client)  # as the tool does after its write
    client.config_resetstat()
    scheduler.acquire(0.003, Request("c", "t"))
    used = commands(client)
    assert (used.get("hmget"), used.get("hget")) == (2, 1), used  # P:s, P:cfg; the tenant
    assert used.get("exists") == 1, used  # whether any live weight is set, once
    assert scheduler.trailer.limits.startswith("50|"), scheduler.trailer
    assert client.hget(state, LIVE_STAMP) not in (None, stamp)
    client.config_resetstat()
    scheduler.acquire(0.004, Request("d", "t"))
    assert commands(client).get("hmget") == 1, commands(client)  # stamped: P:cfg not read


def test_a_full_call_reads_the_live_limits_again_once_a_second_whatever_the_stamp(
    client: redis.Redis,
) -> None:
    """A full call (a tick here) takes the live limits by the state's stamp, as the fast
    path does, while its library read P:cfg less than LIVE_REREAD_S ago: a live override
    that expires on its own (its key's TTL; nobody deletes the stamp) is seen by a
    saturated budget, whose calls are all full, that late at most."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=1.0), policy, now=0.0)
    assert isinstance(scheduler.acquire(0.0, Request("a", "t"))[0], Admit)
    assert isinstance(scheduler.acquire(0.0, Request("b", "t"))[0], Enqueue)
    scheduler.tick(0.1)  # P:cfg read (its first full call): the library's reading at 0.1
    (state,) = client.keys("*:s")
    cfg = (state.decode() if isinstance(state, bytes) else state).removesuffix(":s") + ":cfg"
    client.hset(cfg, "rate", "50.0")  # by hand, the stamp left (as if an override lapsed)
    scheduler.tick(0.1 + scripts.LIVE_REREAD_S / 2)
    assert scheduler.trailer.limits.startswith("1|"), scheduler.trailer
    scheduler.tick(0.1 + scripts.LIVE_REREAD_S)
    assert scheduler.trailer.limits.startswith("50|"), scheduler.trailer


def test_a_deadline_earlier_than_the_known_floor_is_not_missed(client: redis.Redis) -> None:
    """A call that admits the waiter of the earliest deadline keeps that deadline as a
    floor for the rest and does not ask for the next one while the floor is later than its
    next tick (store.lua, deadline_left); a waiter queued after with an earlier deadline
    lowers the floor: the next tick is due at its deadline's grace, where it is dropped."""
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call")
    waits = dict.fromkeys(PRIORITIES, 5000.0)  # later than a lease's expiry (3600 s)
    waits[PRIORITIES[-1]] = 5.0
    scheduler = LuaScheduler(client, Limits(concurrency=1), Policy(waits), now=0.0)
    assert isinstance(scheduler.acquire(0.0, Request("a", "t1"))[0], Admit)
    assert isinstance(scheduler.acquire(0.0, Request("b", "t2"))[0], Enqueue)
    assert isinstance(scheduler.acquire(0.0, Request("c", "t3"))[0], Enqueue)
    client.config_resetstat()
    assert [e.id for e in scheduler.release(1.0, "a")] == ["b"]  # b's deadline was first
    assert scheduler.trailer.next_tick_s == pytest.approx(3600.0)  # b's lease expiry
    # P:active and the first lease; not P:dl (4 when it was asked), nor c's queue (its lone
    # waiter is its field of P:T, store.lua's enqueue: 3 while it was a key)
    assert commands(client).get("zrange") == 2, commands(client)
    decision, _ = scheduler.acquire(2.0, Request("d", "t4", PRIORITIES[-1]))
    assert isinstance(decision, Enqueue), decision
    assert scheduler.trailer.next_tick_s == pytest.approx(5.0 + scripts.DEADLINE_GRACE_S)
    events = scheduler.tick(2.0 + 5.0 + scripts.DEADLINE_GRACE_S + 0.001)
    assert [(type(e).__name__, e.id) for e in events] == [("Evicted", "d")], events


def test_a_heartbeat_renews_many_leases_in_a_few_commands(client: redis.Redis) -> None:
    """renew.lua asks which leases Redis has with one ZMSCORE and renews them with one
    ZADD XX per UNPACK_MAX of them (a lease is its member in P:leases)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 5.0))
    scheduler = LuaScheduler(client, Limits(concurrency=10_000), policy, now=0.0)
    held = 2 * scripts.UNPACK_MAX + 7
    for i in range(held):
        decision, _ = scheduler.acquire(0.001, Request(f"l{i}", f"t{i % 8}"))
        assert isinstance(decision, Admit)
    ids = [f"l{i}" for i in range(held)] + ["gone"]
    args = protocol.renew_args("1.0", scheduler._tag, "p", 30.0, 60.0, ids)
    client.config_resetstat()
    renewed = protocol.decode_renew(scheduler._run("renew", args, client))
    assert renewed.held == (True,) * held + (False,)
    chunks = -(-len(ids) // scripts.UNPACK_MAX)
    used = commands(client)
    assert used["zmscore"] == chunks, used
    assert used["zadd"] == chunks + 1, used  # and the heartbeat's
    (leases,) = client.keys("*:leases")
    assert client.zscore(leases, "l0") == pytest.approx(31.0)


def test_a_new_tenant_that_queues_in_its_call_is_not_put_on_the_idle_list(
    client: redis.Redis,
) -> None:
    """touch puts a call's tenants on the idle list as the ZADD's arguments (its own list),
    and a later change in the same call overrides that (push: the tenant waits; unlink: it
    is idle again): of three new tenants in one call, the one admitted is listed, the one
    that queued is not, and the one that queued then left (its request cancelled) is listed,
    once: the list made anew by that ZADD gets its TTL (it counts its members, so a tenant
    given twice would leave the key without one)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 900.0), max_tenants=10_000)
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=1.0), policy, now=0.0)
    scheduler.acquire(0.5, Request("first-1", "first"))  # the budget made, its keys' TTLs set
    listed = f"{scheduler._tag}:tenants"
    client.delete(listed)  # (as if lost: made anew below)
    reqs = [Request(f"{name}-1", name) for name in ("alone", "waits", "leaves")]
    ops = [protocol.acquire_op(r.id, protocol.acquire_tail(r, 1.0, 900.0)) for r in reqs]
    lines, _ = scheduler._call(2.0, [*ops, protocol.cancel_op("leaves-1")])
    assert [line[:1] for line in lines] == ["A", "Q", "Q", "X"], lines
    assert client.zscore(listed, tenant_digest("alone")) is not None
    assert client.zscore(listed, tenant_digest("waits")) is None
    assert client.zscore(listed, tenant_digest("leaves")) is not None
    assert client.pttl(listed) > 0
