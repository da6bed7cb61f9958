"""The state's generation (keys.GENERATION): a full call takes the state it kept by one field.

A full call of a loaded function library keeps the budget's state in Lua memory and
stamps P:s with a generation no other write has (store.lua's call.new_gen); the next full
call reads that field alone and, finding its stamp, takes the kept state without reading
P:s's other fields. So every other write of P:s's packed numbers or plain fields must
clear the stamp: each test below makes a full call (which keeps its state), then one
other writer's change, then a full call whose decision depends on that change. A writer
that forgot the stamp leaves the kept state taken, and the decision wrong. And stamps
must be unique: another library on the same server (another build), or the budget
deleted and made anew by one, must never write the stamp a library keeps.

The kept state exists only where the scripts are a function library (Redis 7+, Valkey):
on Redis 6.2 these tests skip.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.keys import GENERATION, LIVE_STAMP, Keys
from throttle_mw.backends.redis.scripts import library
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, HeldLease, Limits, Policy, Request

POLICY = Policy(dict.fromkeys(PRIORITIES, 5.0), tenant_idle_s=3600.0)
#: The other library's name: another build of throttle_mw loaded beside this one.
OTHER = "throttle_mw_otherbuild"


@pytest.fixture
def client(clean_redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = clean_redis_server.client()
    if redis_version(client) < (7, 0):
        pytest.skip("EVAL: nothing outlives a call, no state is kept")
    yield client
    client.close()


class OtherBuild(LuaScheduler):
    """The scheduler's calls through another library loaded on the same server (`other`)."""

    def _run(self, name: str, args: list[str], client: Any) -> Any:
        return client.fcall(f"{OTHER}_{name}", 1, self._key, *args)


def load_other(client: redis.Redis) -> None:
    """Another build's library: this one's text under another name (its own Lua state)."""
    own = library()
    client.function_load(own.text.replace(own.name, OTHER), replace=True)


def other_build(scheduler: LuaScheduler) -> LuaScheduler:
    """The same budget, its calls through the other library (`load_other`)."""
    other = copy.copy(scheduler)
    other.__class__ = OtherBuild
    return other


def by_eval(scheduler: LuaScheduler) -> LuaScheduler:
    """The same budget, its calls by EVALSHA (a client without FUNCTION: an ACL)."""
    other = copy.copy(scheduler)
    other._functions = False
    return other


@pytest.fixture(params=["this library", "another library"])
def writer(
    request: pytest.FixtureRequest, client: redis.Redis
) -> Callable[[LuaScheduler], LuaScheduler]:
    """Who makes a test's other write: the library whose full calls keep the state (which
    also drops what it kept: store.lua's call.drop_kept), or another one (another build:
    only the state's generation in Redis tells the first library)."""
    if request.param == "this library":
        return lambda scheduler: scheduler

    def other(scheduler: LuaScheduler) -> LuaScheduler:
        load_other(client)
        return other_build(scheduler)

    return other


def generation(scheduler: LuaScheduler) -> Any:
    return scheduler._client.hget(scheduler._key, GENERATION)


def admitted(decisions: list[Any]) -> list[bool]:
    return [isinstance(d, Admit) for d in decisions]


def batch_whole(scheduler: LuaScheduler, now: float, ops: list[str]) -> list[str]:
    """`ops` by as many script calls as it takes, as the batcher sends them: a call of more
    than TUNING.WORK_CHECK operations that finds Redis's clock past its work bound (a
    loaded machine preempts Redis) defers the rest (protocol.DEFERRED), sent again."""
    replies: list[str] = [protocol.DEFERRED] * len(ops)
    pending = list(range(len(ops)))
    for _ in range(20):
        lines = scheduler.batch(now, [ops[i] for i in pending])
        for i, line in zip(pending, lines, strict=False):
            replies[i] = line
        pending = [i for i in pending if replies[i] == protocol.DEFERRED]
        if not pending:
            return replies
    raise AssertionError(f"still deferred after 20 calls: {pending}")


def acquires(scheduler: LuaScheduler, now: float, *asked: str | tuple[str, int]) -> list[Any]:
    """Acquires in one full call (batch.lua's, never fast.lua's: a tick after them), each an
    id (cost 1) or (id, cost), each its own tenant."""
    ops = []
    for one in asked:
        rid, cost = (one, 1) if isinstance(one, str) else one
        tail = protocol.acquire_tail(Request(rid, "t-" + rid, cost=cost), 1.0, 5.0)
        ops.append(protocol.acquire_op(rid, tail))
    lines = batch_whole(scheduler, now, [*ops, protocol.TICK])
    return [protocol.decode_acquire(line) for line in lines[: len(asked)]]


def stamped(scheduler: LuaScheduler, now: float, first: Any = "a", cost: int = 0) -> Any:
    """The state stamped and kept by this library: a full call that admits `first` and
    leaves a request (`q`, of the whole burst or `cost`) waiting. The stamp."""
    burst = int(scheduler._limits.burst)
    assert admitted(acquires(scheduler, now, first, ("q", cost or burst))) == [True, False]
    stamp = generation(scheduler)
    assert stamp
    return stamp


def cancelled(scheduler: LuaScheduler, now: float) -> None:
    """`q` cancelled (a full call that takes the state by its stamp): nobody waits, and the
    stamp is cleared (a stamp is only there while someone waits: fast.lua's calls, which
    write only while nobody does, neither read nor clear it)."""
    scheduler.batch(now, [protocol.cancel_op("q"), protocol.TICK])
    assert generation(scheduler) == b""


def then_two(scheduler: LuaScheduler, now: float) -> list[bool]:
    """A full call: `q` cancelled, then two acquires (b, c; c in the next call if this one
    was past its work bound: batch_whole)."""
    ops = [protocol.cancel_op("q")]
    for rid in ("b", "c"):
        ops.append(
            protocol.acquire_op(rid, protocol.acquire_tail(Request(rid, "t-" + rid), 1.0, 5.0))
        )
    lines = batch_whole(scheduler, now, [*ops, protocol.TICK])
    return admitted([protocol.decode_acquire(line) for line in lines[1:3]])


def test_a_full_call_reads_the_generation_alone_while_it_holds_the_state(
    client: redis.Redis,
) -> None:
    """A saturated budget's calls: each full call after the first reads P:s with one HGET of
    its generation (no HMGET of its fields), and the stamp stays while this library is the
    only writer; after another write (here the live stamp and the generation deleted, as
    Keys.live_changed does) the next full call reads P:s whole and stamps it anew."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=1.0), POLICY, 0.0)
    scheduler.acquire(0.01, Request("a", "t"))  # admitted: the bucket empty
    now = 0.02
    for stamped in range(2):
        scheduler.acquire_in_full(now, Request(f"first{stamped}", "t"))  # queued: stamped
        stamp = generation(scheduler)
        assert stamp
        for i in range(5):
            now += 0.01
            client.config_resetstat()
            scheduler.acquire_in_full(now, Request(f"w{stamped}-{i}", "t"))  # queued
            stats = client.info("commandstats")
            assert "cmdstat_hmget" not in stats, stats.get("cmdstat_hmget")
            assert generation(scheduler) == stamp
        Keys(scheduler._tag[1:-1]).live_changed(client)
        now += 0.01
    assert generation(scheduler) is None
    scheduler.acquire_in_full(now, Request("last", "t"))
    assert generation(scheduler) not in (None, b"", stamp)


def test_a_fast_acquire_after_a_stamp_is_seen(
    client: redis.Redis, writer: Callable[[LuaScheduler], LuaScheduler]
) -> None:
    """fast.lua's acquire (store.lua's call.save_acquire) takes a token after the stamp was
    cleared: the full call after it finds 8 left of 10, not 9."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0), POLICY, 0.0)
    stamped(scheduler, 0.01)  # 9 tokens
    cancelled(scheduler, 0.015)
    decision, _ = writer(scheduler).acquire(0.02, Request("b", "t-a"))  # fast: nobody waits
    assert isinstance(decision, Admit)
    assert admitted(acquires(scheduler, 0.03, ("z", 9))) == [False]


def test_a_lean_release_after_a_stamp_is_seen(
    client: redis.Redis, writer: Callable[[LuaScheduler], LuaScheduler]
) -> None:
    """fast.lua's lean_release (release.lua's short reply) writes in flight alone: the full
    call after it finds both slots free."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0, concurrency=2), POLICY, 0.0)
    stamped(scheduler, 0.01)  # a holds a slot
    cancelled(scheduler, 0.015)
    assert writer(scheduler).lone_release(0.02, "a") == [protocol.REPLY["released"]]  # lean
    assert admitted(acquires(scheduler, 0.03, "b", "c")) == [True, True]


def test_a_fast_release_after_a_stamp_is_seen(
    client: redis.Redis, writer: Callable[[LuaScheduler], LuaScheduler]
) -> None:
    """fast.lua's fast_release (a lease of cost 2: save(true)) frees two slots: the full call
    after it admits a request of cost 3."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0, concurrency=3), POLICY, 0.0)
    stamped(scheduler, 0.01, ("a", 2))  # a holds two slots
    cancelled(scheduler, 0.015)
    writer(scheduler).batch(0.02, [protocol.release_op("a")])  # one operation: fast.lua's
    assert admitted(acquires(scheduler, 0.03, ("b", 3))) == [True]


def test_a_lease_of_rate_tokens_clears_the_generation(
    client: redis.Redis, writer: Callable[[LuaScheduler], LuaScheduler]
) -> None:
    """ratelease.lua gives a lease's 3 unspent tokens back while someone waits: a call after
    it finds them in the bucket (9, not 6)."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0), POLICY, 0.0)
    grant = scheduler.lease_tokens(0.005, 10.0, HeldLease(), 3)  # nobody waits: 7 left
    assert grant.taken == 3
    stamped(scheduler, 0.01, "a", cost=7)  # 6 tokens, q waits for 7
    held = HeldLease(grant.generation, grant.until, size=3, returned=3)
    writer(scheduler).lease_tokens(0.02, 10.0, held, 0)
    assert generation(scheduler) == b""
    snapshot = scheduler.snapshot()
    assert snapshot.tokens is not None
    assert snapshot.tokens > 8.0, snapshot


def test_a_live_change_clears_the_generation(
    client: redis.Redis, writer: Callable[[LuaScheduler], LuaScheduler]
) -> None:
    """live.lua (`throttle-mw set`) sets a concurrency of 1 on a rate budget: the full call
    after it reads the live limits anew and admits one request of two."""
    scheduler = LuaScheduler(client, Limits(rate=100.0, burst=100.0), POLICY, 0.0)
    stamped(scheduler, 0.01)  # (a rate alone: a holds no slot)
    writer(scheduler).live_change(0.02, {"concurrency": "1"})
    assert not generation(scheduler)
    assert then_two(scheduler, 0.03) == [True, False]


def test_a_live_change_without_the_live_stamp_clears_the_generation(
    client: redis.Redis, writer: Callable[[LuaScheduler], LuaScheduler]
) -> None:
    """live.lua where the state has no live stamp (deleted by hand, the generation left: as a
    tool of an older build would): it deletes the generation with the stamp, and the full
    call after it reads the live limits anew."""
    scheduler = LuaScheduler(client, Limits(rate=100.0, burst=100.0), POLICY, 0.0)
    stamped(scheduler, 0.01)
    client.hdel(scheduler._key, LIVE_STAMP)
    writer(scheduler).live_change(0.02, {"concurrency": "1"})
    assert generation(scheduler) is None
    assert then_two(scheduler, 0.03) == [True, False]


def test_a_live_change_from_python_clears_the_generation(client: redis.Redis) -> None:
    """Keys.live_changed (the learner, the weights tool) deletes the live stamp and with it
    the generation: the full call after it reads P:cfg anew, a burst of 1."""
    scheduler = LuaScheduler(client, Limits(rate=100.0, burst=100.0), POLICY, 0.0)
    stamped(scheduler, 0.01)
    keys = Keys(scheduler._tag[1:-1])
    client.hset(keys.cfg, mapping={"rate": "0.001", "burst": "1"})
    keys.live_changed(client)
    assert client.hget(keys.state, LIVE_STAMP) is None
    assert generation(scheduler) is None
    assert then_two(scheduler, 0.03) == [True, False]


def test_a_full_call_that_keeps_nothing_clears_the_generation(client: redis.Redis) -> None:
    """A full call by EVALSHA (nothing kept: another client of the fleet without FUNCTION)
    cancels q and takes 9 tokens: the library's full call after it finds none and nobody
    waiting."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0), POLICY, 0.0)
    stamped(scheduler, 0.01)  # 9 tokens, q waits
    tail = protocol.acquire_tail(Request("b", "t-b", cost=9), 1.0, 5.0)
    lines = by_eval(scheduler).batch(
        0.02, [protocol.cancel_op("q"), protocol.acquire_op("b", tail), protocol.TICK]
    )
    assert isinstance(protocol.decode_acquire(lines[1]), Admit)
    assert generation(scheduler) == b""
    snapshot = scheduler.snapshot()
    assert snapshot.tokens is not None
    assert snapshot.tokens < 1.0, snapshot
    assert sum(snapshot.queued_by_priority.values()) == 0, snapshot


def test_another_library_s_stamps_are_never_this_one_s(client: redis.Redis) -> None:
    """Two builds' libraries on one budget, both keeping the state: each counts its full calls
    from 1 in its own Lua state, so without a seed of its own the other's stamp of its second
    call would be this one's kept stamp (its second call's). A call after the other's finds
    their tokens gone: 7 left, not 9."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0), POLICY, 0.0)  # (its tick: 1)
    kept = stamped(scheduler, 0.01)  # its call 2, stamped: 9 tokens, q waits
    load_other(client)
    other = other_build(scheduler)
    tail = protocol.acquire_tail(Request("b", "t-b"), 1.0, 5.0)
    lines = other.batch(0.02, [protocol.cancel_op("q"), protocol.acquire_op("b", tail)])
    assert isinstance(protocol.decode_acquire(lines[1]), Admit)  # its first: 8 tokens, no stamp
    assert admitted(acquires(other, 0.03, "c", ("r", 10))) == [True, False]  # second, stamped
    assert generation(scheduler) not in (kept, b"", None)
    snapshot = scheduler.snapshot()
    assert snapshot.tokens is not None
    assert snapshot.tokens < 8.0, snapshot


def test_a_state_deleted_and_made_anew_never_has_the_kept_stamp(client: redis.Redis) -> None:
    """The budget's keys deleted (FLUSHALL: Redis restarted empty, functions kept), then made
    anew by another library's calls (a fresh Lua state counting from 1): its stamp is not
    the one this library kept before the deletion, and a call after them takes the new
    state: 7 tokens of the new bucket, not the old one's 9."""
    scheduler = LuaScheduler(client, Limits(rate=1.0, burst=10.0), POLICY, 0.0)  # (its tick: 1)
    kept = stamped(scheduler, 0.01)  # its call 2, stamped: 9 tokens
    client.flushall()
    load_other(client)
    other = other_build(scheduler)
    assert admitted(acquires(other, 0.02, ("b", 2))) == [True]  # its first: 8 tokens
    assert admitted(acquires(other, 0.03, "c", ("r", 10))) == [True, False]  # second, stamped
    assert generation(scheduler) not in (kept, b"", None)
    snapshot = scheduler.snapshot()
    assert snapshot.tokens is not None
    assert snapshot.tokens < 8.0, snapshot
