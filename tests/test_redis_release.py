"""release.lua: a release alone in its call, answered in one line when that is all it needs.

The script on a fake clock (LuaScheduler, FCALL or EVALSHA as the server has), against
batch.lua doing the same releases; then through RedisBackend: which script a lone release
goes by, and a release that is the first call after Redis lost its data and scripts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.keys import GENERATION
from throttle_mw.backends.redis.scripts import RECLAIM_GRACE_S, Scripts
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Enqueue, Granted, Limits, Policy, Request
from throttle_mw.settings import Settings

RELEASED = protocol.REPLY["released"]


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def _policy() -> Policy:
    return Policy(dict.fromkeys(PRIORITIES, 5.0))


def test_a_lone_release_is_one_line_only_when_the_caller_needs_no_trailer(
    client: redis.Redis, functions: bool
) -> None:
    """Nobody waiting and the epoch the caller knew: REPLY.released alone. The caller knew
    none, or another: the full reply, whose trailer tells the state's epoch. Either way
    the lease is out; a lease not there (released twice) changes nothing."""
    scheduler = LuaScheduler(client, Limits(concurrency=10), _policy(), 0.0, functions=functions)
    for i in range(4):
        decision, _ = scheduler.acquire(0.01 * (i + 1), Request(f"r{i}", "t"))
        assert isinstance(decision, Admit)
    epoch = scheduler.trailer.epoch
    assert epoch
    assert scheduler.lone_release(0.1, "r0") == [RELEASED]
    assert scheduler.in_flight == 3
    for known in ("", "1.5/another"):
        scheduler.known_epoch = known
        reply = scheduler.lone_release(0.2, "r1" if known else "r2")
        assert len(reply) == 1 + len(protocol.Trailer._fields), reply
        assert reply[0] == RELEASED
        assert protocol.trailer(reply).epoch == epoch
        assert protocol.trailer(reply).next_tick_s is None
    assert scheduler.in_flight == 1
    scheduler.known_epoch = None
    assert scheduler.lone_release(0.3, "r0") == [RELEASED]  # not there any more
    assert scheduler.in_flight == 1


def test_a_lone_release_that_finds_a_waiter_grants_it_in_the_same_call(
    client: redis.Redis, functions: bool
) -> None:
    """Someone waits: the release goes on as batch.lua's full call, dispatches at once (a
    grant on the waiter's process's list) and answers with the trailer."""
    scheduler = LuaScheduler(client, Limits(concurrency=1), _policy(), 0.0, functions=functions)
    decision, _ = scheduler.acquire(0.01, Request("held", "t"))
    assert isinstance(decision, Admit)
    decision, _ = scheduler.acquire(0.02, Request("waiter", "u"))
    assert isinstance(decision, Enqueue)
    events = scheduler.release(0.03, "held")
    assert [(type(e), e.id) for e in events] == [(Granted, "waiter")]
    assert len(scheduler.reply) == 1 + len(protocol.Trailer._fields), scheduler.reply
    assert scheduler.waiting == 0
    assert scheduler.in_flight == 1
    assert scheduler.lone_release(0.04, "waiter") == [RELEASED]  # nobody waits now
    assert scheduler.in_flight == 0


def _window_start(client: redis.Redis, tag: str) -> bytes:
    """The fair-rate window's start, win_at: the fourth packed number of P:s (store.lua's
    PACKED)."""
    packed = client.hget(f"{tag}:s", "nums")
    assert isinstance(packed, bytes)
    return packed.split(b"|")[3]


def test_a_lone_release_stays_one_line_after_the_fair_rate_window_ran_out(
    client: redis.Redis, functions: bool
) -> None:
    """A release while nobody waits rolls no fair-rate window, in the full call either
    (core.lua's release has no refill), so a window run out (WINDOW_S, 1 s) does not send
    it to the full call: before, every release went there until an acquire rolled the
    window (a quiet budget's releases, long requests ending: some 5 % of the releases of
    a fleet at 16 requests a second). The window is left as it was; the next acquire
    rolls it."""
    scheduler = LuaScheduler(client, Limits(concurrency=10), _policy(), 0.0, functions=functions)
    for i in range(5):
        decision, _ = scheduler.acquire(0.01 * (i + 1), Request(f"r{i}", "t"))
        assert isinstance(decision, Admit)
    assert scheduler.lone_release(0.1, "r0") == [RELEASED]
    # 1.2 s on: the idle sweep and the processes' count are due too (once a second): the
    # first release runs the full call for them, and sets them a second on.
    assert len(scheduler.lone_release(1.2, "r1")) > 1
    window = _window_start(client, scheduler._tag)
    assert scheduler.lone_release(1.3, "r2") == [RELEASED]
    assert scheduler.lone_release(1.4, "r3") == [RELEASED]
    assert scheduler.in_flight == 1
    assert _window_start(client, scheduler._tag) == window  # as the full call leaves it
    decision, _ = scheduler.acquire(1.5, Request("r5", "t"))
    assert isinstance(decision, Admit)
    assert _window_start(client, scheduler._tag) != window  # rolled by the acquire
    assert scheduler.lone_release(1.6, "r4") == [RELEASED]
    assert scheduler.in_flight == 1


def _contents(client: redis.Redis, tag: str) -> dict[str, Any]:
    """Every key of a budget (its hash tag left out of the names) with what it holds."""
    found: dict[str, Any] = {}
    for raw in client.keys(f"{tag}:*"):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "hash":
            value: Any = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        else:
            value = client.get(key)
        found[key.removeprefix(tag)] = value
    # The packed numbers' lm: a number the loaded library counts up by its full calls, of
    # whichever budget (store.lua's stamp_line), not a state of this one.
    nums = found[":s"][b"nums"].split(b"|")
    nums[19] = b""
    found[":s"][b"nums"] = b"|".join(nums)
    # So is the state's generation: a stamp of the library's full call, or cleared ('') by
    # another write (keys.GENERATION), whichever came last.
    found[":s"].pop(GENERATION.encode(), None)
    return found


def test_release_lua_leaves_what_batch_lua_leaves(client: redis.Redis, functions: bool) -> None:
    """Two budgets, the same calls, on the same clock; every release goes by release.lua in
    one and by batch.lua in the other: leases of cost 1 and 2 (lean_release stops on a cost
    other than 1: fast_release), over the lease anchor and back, requests waiting (the
    full call), and the processes counted again once a second. Every key of the two
    budgets holds the same after each call, and each release's reply line is the same
    (the whole reply, when release.lua's is the full one)."""
    limits = Limits(concurrency=24)
    by_release = LuaScheduler(client, limits, _policy(), 0.0, functions=functions)
    by_batch = LuaScheduler(client, limits, _policy(), 0.0, functions=functions)
    pairs = ((by_release, by_batch._tag), (by_batch, by_release._tag))
    held: list[str] = []
    now = 0.0
    short = full = 0

    def same(step: object) -> None:
        assert _contents(client, by_release._tag) == _contents(client, by_batch._tag), step

    for i in range(240):
        now += 0.013  # past PROCS_RECOUNT_S (1 s) several times
        if i % 3 == 2 or len(held) >= 30:
            rid = held.pop(0 if i % 2 else -1)
            line = by_batch.batch(now, [protocol.release_op(rid)])
            reply = by_release.lone_release(now, rid)
            assert reply[0] == line[0], i
            if len(reply) == 1:
                short += 1
            else:
                full += 1
                assert reply == by_batch.reply, i
        else:
            rid = f"r{i}"
            request = Request(rid, f"t{i % 3}", cost=2 if 60 <= i < 90 else 1)
            decisions = [s.acquire(now, request)[0] for s, _ in pairs]
            assert decisions[0] == decisions[1], i
            held.append(rid)
        same(i)
    assert short > 0, (short, full)
    assert full > 0, (short, full)
    while held:  # those still waiting get their grants from these releases
        now += 0.013
        rid = held.pop()
        by_batch.batch(now, [protocol.release_op(rid)])
        by_release.lone_release(now, rid)
        same(rid)


# --- through RedisBackend ---------------------------------------------------------------------


def _settings(server: RedisServer, prefix: str, **overrides: Any) -> Settings:
    overrides.setdefault("concurrency", "2")
    return Settings.from_env(
        {}, redis_url=server.url, key_prefix=prefix, redis_timeout_s=2.0, **overrides
    )


def _spy(backend: RedisBackend) -> list[tuple[str, Any]]:
    """The entry scripts `backend` calls, with their replies, in order."""
    calls: list[tuple[str, Any]] = []
    scripts = backend._scripts
    assert isinstance(scripts, Scripts)
    call = scripts.call

    async def spied(name: str, keys: Any, args: Any) -> Any:
        reply = await call(name, keys, args)
        calls.append((name, protocol.split_reply(reply) if name != "renew" else reply))
        return reply

    scripts.call = spied  # type: ignore[method-assign]
    return calls


def _request(rid: str) -> Request:
    return Request(rid, "acme", "normal", 1, False, False)


async def _until(check: Any, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_a_lone_release_goes_by_release_lua_and_others_by_batch_lua(
    redis_server: RedisServer,
) -> None:
    # Kept slots off: this is the per-request path's mechanics (which script each
    # release goes by); with the default THROTTLE_KEEP_SLOTS a finished request's slot
    # is kept and no release is sent (tests/test_redis_kept_slots.py).
    backend = RedisBackend(_settings(redis_server, "rl1", lease_ttl_s=30.0, keep_slots_s=0.0))
    await backend.start()
    client = redis_server.client(decode_responses=True)
    try:
        # (A first cycle: the heartbeat's first reply, which may come before the budget's
        # state is made and be read after, forgets the epoch; the next call tells it.)
        assert isinstance(await backend.acquire(_request("warm")), Admitted)
        backend.release("warm")
        await asyncio.sleep(0.1)
        calls = _spy(backend)
        held = await backend.acquire(_request("a"))
        assert isinstance(held, Admitted)
        assert held.lease
        epoch, breaker = backend._epoch, backend._breaker
        seen = backend._epoch_at
        backend.release("a")
        await _until(lambda: any(name == "release" for name, _ in calls))
        assert [(n, len(r)) for n, r in calls if n != "renew"] == [("batch", 5), ("release", 1)]
        assert calls[-1] == ("release", [RELEASED])
        assert int(float(client.hget("{rl1}:s", "inflight") or -1)) == 0
        # The short reply: the same epoch, known as of now; Redis answered.
        assert backend._epoch == epoch
        assert backend._epoch_at > seen
        assert not breaker.is_open
        # Two releases in one call, and a release with a cancel: batch.lua.
        for rid in ("b", "c"):
            assert isinstance(await backend.acquire(_request(rid)), Admitted)
        calls.clear()
        backend.release("b")
        backend.release("c")
        await _until(lambda: bool(calls))
        assert [name for name, _ in calls if name != "renew"] == ["batch"]
    finally:
        await backend.stop()
        client.close()


@pytest.mark.anyio
async def test_a_release_that_finds_a_waiter_of_another_process_grants_it_at_once(
    redis_server: RedisServer,
) -> None:
    one = RedisBackend(_settings(redis_server, "rl2", concurrency="1", lease_ttl_s=30.0))
    two = RedisBackend(_settings(redis_server, "rl2", concurrency="1", lease_ttl_s=30.0))
    await one.start()
    await two.start()
    try:
        held = await one.acquire(_request("a"))
        assert isinstance(held, Admitted)
        waiting = await two.acquire(_request("b"))
        assert isinstance(waiting, Waiting)
        calls = _spy(one)
        one.release("a")
        granted = await asyncio.wait_for(waiting.future, 2.0)
        assert isinstance(granted, Admitted)
        assert granted.lease
        await _until(lambda: any(name == "release" for name, _ in calls))
        (name, reply), *_ = [(n, r) for n, r in calls if n != "renew"]
        assert name == "release"
        assert len(reply) == 1 + len(protocol.Trailer._fields), reply  # the full call's
        two.release("b")
    finally:
        await one.stop()
        await two.stop()


@pytest.mark.anyio
async def test_a_release_first_after_redis_lost_its_data_and_scripts_reclaims_the_rest(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """FLUSHALL and the scripts gone (a restart without persistence): the release's call
    loads them again (FCALL's "Function not found", EVALSHA's NOSCRIPT), finds no state
    and makes it anew as batch.lua would, with the epoch it knew: the grace starts, and
    the full reply tells the new epoch, so the process reclaims the lease it still holds."""
    caplog.set_level(logging.WARNING, logger="throttle_mw")
    backend = RedisBackend(_settings(redis_server, "rl3", lease_ttl_s=30.0))
    other = RedisBackend(_settings(redis_server, "rl3", lease_ttl_s=30.0))
    await backend.start()
    await other.start()
    client = redis_server.client(decode_responses=True)
    try:
        for rid in ("a", "b"):
            held = await backend.acquire(_request(rid))
            assert isinstance(held, Admitted)
            assert held.lease
        old = backend._epoch
        client.flushall()
        redis_server.flush_scripts()
        calls = _spy(backend)
        backend.release("a")
        await _until(lambda: client.zrange("{rl3}:leases", 0, -1) == ["b"])
        name, reply = calls[0]
        assert name == "release"
        assert protocol.trailer(reply).epoch not in ("", old)
        assert backend._epoch == protocol.trailer(reply).epoch
        assert int(float(client.hget("{rl3}:s", "inflight") or -1)) == 1
        # The grace it started: another process waits for it to end, though there is room.
        started = time.monotonic()
        outcome = await other.acquire(_request("c"))
        assert isinstance(outcome, Waiting)
        assert time.monotonic() - started < RECLAIM_GRACE_S
        granted = await asyncio.wait_for(outcome.future, 5.0)
        assert isinstance(granted, Admitted)
        assert granted.lease
        other.release("c")
    finally:
        await backend.stop()
        await other.stop()
        client.close()
    assert "new (restarted empty?)" in caplog.text
