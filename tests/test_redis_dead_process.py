"""A process that dies (SIGKILL: no leave, no more heartbeats, its timers gone) while it
holds admitted requests and has requests queued, and the survivors only hold or wait.

Its leases lapse a lease TTL after its last heartbeat; something must then run a call that
expires them and dispatches (core.lua's expire_leases and dispatch): a tick at the
earliest lease expiry (next_due), claimed by one process (claim_tick), the others keeping
a fallback TICK_SLACK later. A survivor with none of its own requests queued made no call
since the dead process's requests queued: no reply told it of a tick due; and once nobody
waits, no tick is due at all. renew.lua's reply tells each heartbeat when a lease lapsed,
and the process ticks (backend.py's _renew_loop). Two or three RedisBackend processes in
one test loop on a real Redis; the dead one vanishes (`vanish`).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends import Admitted
from throttle_mw.backends.base import Waiting
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Enqueue, Granted, Limits, Policy, Request
from throttle_mw.settings import Settings

pytestmark = pytest.mark.redis

#: The lease TTL here (the heartbeat beats every third of it).
LEASE_TTL_S = 1.0
#: What the slots' return may take past the lease TTL: a heartbeat's period (a survivor's
#: beat after the expiry), and margin for a loaded machine. Without the heartbeat's tick
#: nothing comes back at all (no call is made): the tests wait CHECK_S for it.
BACK_S = LEASE_TTL_S + LEASE_TTL_S / 3.0 + 1.0
CHECK_S = BACK_S + 2.0
_prefixes = itertools.count()


def settings(server: RedisServer, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": server.url,
        "key_prefix": prefix,
        "redis_timeout_s": 3.0,
        "failure_mode": "closed",
        "concurrency": 4,
        "lease_ttl_s": LEASE_TTL_S,
        **overrides,
    }
    return Settings.from_env({}, **values)


async def vanish(backend: RedisBackend) -> None:
    """As SIGKILL leaves it: no leave, no heartbeat, no tick, no grant read any more; what
    it holds and queued stays in Redis."""
    for timer in (backend._tick, backend._settle, backend._lease_timer, backend._slots_timer):
        if timer is not None:
            timer.cancel()
    backend._tick = None
    backend._closing = True
    for task in [*backend._tasks, backend._renewer, backend._learning_task]:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if backend._listener is not None:
        await backend._listener.stop()
    await backend._fallback.stop()
    if backend._batcher is not None:
        await backend._batcher.close()
    for client in backend._clients or []:
        await client.aclose()


async def admitted(backend: RedisBackend, rid: str, tenant: str) -> None:
    assert isinstance(await backend.acquire(Request(rid, tenant)), Admitted), rid


async def queued(backend: RedisBackend, rid: str, tenant: str) -> Waiting:
    outcome = await backend.acquire(Request(rid, tenant))
    assert isinstance(outcome, Waiting), (rid, outcome)
    return outcome


async def back_after(probe: RedisBackend, in_flight: int, waiting: int) -> float | None:
    """Seconds until the budget shows `in_flight` and `waiting` (read-only snapshots, no
    call that dispatches), or None if not within CHECK_S."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < CHECK_S:
        snap = await probe.snapshot()
        if snap.in_flight == in_flight and sum(snap.queued_by_priority.values()) == waiting:
            return loop.time() - start
        await asyncio.sleep(0.02)
    return None


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.parametrize("keep_slots_s", [0.0, 5.0])
async def test_a_dead_process_s_slots_come_back_while_the_survivors_only_hold(
    clean_redis_server: RedisServer, keep_slots_s: float
) -> None:
    """Concurrency 4: A holds 2 and queued 2, B and C hold one each (admitted before anyone
    waited: their replies told of no tick). A dies. Its slots come back within a lease TTL
    and a heartbeat: its leases expired, its waiters dropped (its heartbeat lapsed), though
    neither survivor makes a call of its own."""
    prefix = f"dead{next(_prefixes)}"
    a, b, c = (
        RedisBackend(settings(clean_redis_server, prefix, keep_slots_s=keep_slots_s))
        for _ in range(3)
    )
    for backend in (a, b, c):
        await backend.start()
    try:
        await admitted(b, "b-hold", "beta")
        await admitted(c, "c-hold", "gamma")
        await admitted(a, "a-hold-0", "acme")
        await admitted(a, "a-hold-1", "acme")
        await queued(a, "a-wait-0", "acme")
        await queued(a, "a-wait-1", "delta")
        await vanish(a)
        took = await back_after(b, in_flight=2, waiting=0)
        assert took is not None, "the dead process's slots and waiters stayed"
        assert took < BACK_S, took
    finally:
        await b.stop()
        await c.stop()


@pytest.mark.e2e
@pytest.mark.anyio
async def test_a_survivor_s_waiter_runs_when_the_dead_process_claimed_the_tick(
    clean_redis_server: RedisServer,
) -> None:
    """B's request queued first, then A's (A's call claimed the fleet's tick at its first
    lease's expiry; B keeps the fallback TICK_SLACK later); A dies. B's waiter is admitted
    within a lease TTL and a heartbeat of the death, on the dead process's slot."""
    prefix = f"dead{next(_prefixes)}"
    a, b = (RedisBackend(settings(clean_redis_server, prefix, concurrency=3)) for _ in range(2))
    await a.start()
    await b.start()
    loop = asyncio.get_running_loop()
    try:
        await admitted(a, "a-hold-0", "acme")
        await admitted(a, "a-hold-1", "acme")
        await admitted(b, "b-hold", "beta")
        waiting = await queued(b, "b-wait", "beta")
        await queued(a, "a-wait", "acme")  # the last call: A claims the tick
        await vanish(a)
        died = loop.time()
        result = await asyncio.wait_for(waiting.future, CHECK_S)
        assert isinstance(result, Admitted), result
        assert loop.time() - died < BACK_S
        assert await back_after(b, in_flight=2, waiting=0) is not None
        b.release("b-wait")
        b.release("b-hold")
    finally:
        await b.stop()


def test_a_heartbeat_says_tick_once_a_lease_lapsed(
    redis_server: RedisServer,
) -> None:
    """renew.lua's tick flag, on a fake clock (lease TTL 1 s): not while the leases are
    live; yes once one lapsed, whether or not someone waits behind it; no more once a tick
    expired it (and dispatched the waiter)."""
    client = redis_server.client()
    try:
        policy = Policy(dict.fromkeys(PRIORITIES, 30.0))
        dead = LuaScheduler(client, Limits(concurrency=3), policy, now=0.0)
        dead.lease_ttl_s = 1.0
        survivor = dead.joined("survivor")
        assert isinstance(dead.acquire(0.1, Request("gone", "t"))[0], Admit)  # until 1.1
        assert isinstance(survivor.acquire(0.2, Request("s", "u"))[0], Admit)
        assert not survivor.renew(0.6, ["s"]).tick  # live
        assert survivor.renew(1.2, ["s"]).tick  # "gone" lapsed (1.1), nobody waits
        assert survivor.in_flight == 2
        survivor.tick(1.22)
        assert survivor.in_flight == 1
        assert not survivor.renew(1.24, ["s"]).tick
        assert isinstance(survivor.acquire(1.25, Request("s2", "u"))[0], Admit)
        assert isinstance(dead.acquire(1.3, Request("d", "t"))[0], Admit)  # until 2.3
        assert dead.renew(1.4, ["d"]).held == (True,)  # until 2.4: its last heartbeat
        assert isinstance(survivor.acquire(1.5, Request("w", "u"))[0], Enqueue)
        assert not survivor.renew(1.9, ["s", "s2"]).tick  # d is live
        assert not survivor.renew(2.3, ["s", "s2"]).tick
        assert survivor.renew(2.5, ["s", "s2"]).tick  # d lapsed at 2.4, w waits behind it
        assert survivor.in_flight == 3
        assert survivor.waiting == 1
        events = survivor.tick(2.55)
        assert [type(e) for e in events] == [Granted], events
        assert survivor.in_flight == 3
        assert survivor.waiting == 0
        assert not survivor.renew(2.6, ["s", "s2", "w"]).tick
    finally:
        client.close()
