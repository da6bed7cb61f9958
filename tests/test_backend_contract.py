"""The Backend contract, run with the same assertions against every backend.

`MemoryBackend`, `RedisBackend` on one redis-server and `RedisBackend` on a
3-master Redis Cluster, through the async API the middleware uses, on a real
clock (budgets are small, so every wait here is a fraction of a second). Two
RedisBackend instances sharing one Redis stand for two processes of a fleet.
Rules that need no I/O (fair shares, estimates) are checked exactly with a fake
clock in test_scheduler.py; this suite checks that the backends keep the
contract in `throttle_mw/backends/base.py` around them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from tests.support.redis_server import RedisCluster, RedisServer
from throttle_mw.backends import (
    Admitted,
    Backend,
    MemoryBackend,
    Waiting,
)
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.priorities import Priority
from throttle_mw.scheduler import Reject, Request, Snapshot
from throttle_mw.settings import Settings

pytestmark = pytest.mark.anyio

#: Generous bound for a grant to arrive once it is due (shared 2-core CI machines).
GRANT_S = 2.0
_prefixes = itertools.count()


class Budget:
    """Opens started backends of one kind on one budget; stops them afterwards."""

    def __init__(
        self, kind: str, redis_url: str | None = None, flush: Callable[[], None] | None = None
    ) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.flush = flush

    def flush_scripts(self) -> None:
        assert self.flush is not None, "a memory budget has no scripts"
        self.flush()

    def settings(self, **overrides: Any) -> Settings:
        if self.redis_url is not None:
            overrides.setdefault("redis_url", self.redis_url)
            overrides.setdefault("redis_cluster", self.kind == "cluster")
            overrides.setdefault("key_prefix", f"contract{next(_prefixes)}")
            # The contract, not timeouts: a slow reply on a busy machine is no outage here.
            overrides.setdefault("redis_timeout_s", 2.0)
        overrides.setdefault("max_wait_s", 3.0)
        return Settings.from_env({}, **overrides)

    @asynccontextmanager
    async def open(self, processes: int = 1, **overrides: Any) -> AsyncIterator[list[Backend]]:
        """`processes` backends on one budget: instances of one process's budget for memory."""
        settings = self.settings(**overrides)
        backends: list[Backend] = []
        for _ in range(processes):
            if self.kind == "memory":
                assert processes == 1, "a memory budget lives in one process"
                limits, policy = settings.limits(), settings.policy()
                backends.append(MemoryBackend(limits, policy))
            else:
                backends.append(RedisBackend(settings))
        try:
            for backend in backends:
                await backend.start()
            yield backends
        finally:
            for backend in backends:
                await backend.stop()


#: The Redis kinds run on the redis-server under test: marked for CI's reruns (conftest.py).
_REDIS_KINDS = [pytest.param(kind, marks=pytest.mark.redis) for kind in ("redis", "cluster")]


@pytest.fixture(params=["memory", *_REDIS_KINDS])
def budget(request: pytest.FixtureRequest) -> Budget:
    return _budget(request, request.param)


@pytest.fixture(params=_REDIS_KINDS)
def fleet_budget(request: pytest.FixtureRequest) -> Budget:
    """Backends that share one budget between processes."""
    return _budget(request, request.param)


def _budget(request: pytest.FixtureRequest, kind: str) -> Budget:
    if kind == "memory":
        return Budget(kind)
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("clean_redis_server")
        return Budget(kind, server.url, server.flush_scripts)
    cluster: RedisCluster = request.getfixturevalue("clean_redis_cluster")

    def flush() -> None:
        for node in cluster.nodes:
            node.flush_scripts()

    return Budget(kind, cluster.url, flush)


# --- helpers ----------------------------------------------------------------------------------

_ids = itertools.count()


def req(
    tenant: str = "acme",
    priority: Priority = "normal",
    *,
    sheddable: bool = False,
    degradable: bool = False,
    name: str | None = None,
) -> Request:
    rid = name if name is not None else f"r{next(_ids)}"
    return Request(rid, tenant, priority, 1, sheddable or degradable, degradable)


async def admitted(backend: Backend, request: Request) -> Admitted:
    outcome = await backend.acquire(request)
    assert isinstance(outcome, Admitted), outcome
    assert not outcome.unthrottled, outcome
    assert not outcome.degraded, outcome
    return outcome


async def waiting(backend: Backend, request: Request) -> Waiting:
    outcome = await backend.acquire(request)
    assert isinstance(outcome, Waiting), outcome
    assert not outcome.future.done()
    return outcome


async def granted(w: Waiting, within_s: float = GRANT_S) -> Admitted:
    result = await asyncio.wait_for(asyncio.shield(w.future), within_s)
    assert isinstance(result, Admitted), result
    return result


async def eventually(
    check: Callable[[], Awaitable[bool]], within_s: float = GRANT_S, what: str = ""
) -> None:
    """Poll an async condition (bounded): Redis releases are fire-and-forget."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.01)


async def state(backend: Backend) -> Snapshot:
    return await backend.snapshot()


def queued(snapshot: Snapshot) -> int:
    return sum(snapshot.queued_by_priority.values())


async def settle(backend: Backend, waits: Iterable[Waiting]) -> None:
    """Leave nothing queued or held: cancel waiters, release what they were granted."""
    for w in waits:
        result = await backend.cancel(w)
        if isinstance(result, Admitted) and result.lease:
            backend.release(result.request_id)


# --- the contract -----------------------------------------------------------------------------


async def test_admits_at_once_while_there_is_room(budget: Budget) -> None:
    async with budget.open(rate=100, burst=3) as [backend]:
        outcomes = [await admitted(backend, req()) for _ in range(3)]
        assert [o.lease for o in outcomes] == [False] * 3
    async with budget.open(concurrency=2) as [backend]:
        first, second = await admitted(backend, req()), await admitted(backend, req())
        assert first.lease
        assert second.lease
        assert first.waited_s == 0.0


async def test_queued_request_is_granted_when_a_slot_is_released(budget: Budget) -> None:
    async with budget.open(concurrency=1) as [backend]:
        holder = await admitted(backend, req())
        w = await waiting(backend, req())
        assert w.estimated_wait_s >= 0.0
        await asyncio.sleep(0.05)
        assert not w.future.done(), "granted while the only slot was held"
        backend.release(holder.request_id)
        result = await granted(w)
        assert result.lease
        assert result.request_id == w.request_id
        assert result.waited_s >= 0.04
        backend.release(result.request_id)
        await eventually(lambda: _in_flight(backend, 0), what="the slot comes back")


async def test_queued_request_is_granted_when_a_token_refills(budget: Budget) -> None:
    async with budget.open(rate=5, burst=1) as [backend]:
        # Timed from before the admission that empties the bucket: its token is due 0.2 s
        # after it, so at least 0.2 s after `started` however late the calls' replies come
        # (timed from after it, `took >= 0.15` had 50 ms for that reply on a loaded machine).
        started = time.monotonic()
        await admitted(backend, req())
        w = await waiting(backend, req())
        asked = time.monotonic() - started
        # One token at 5/s, less what went by between the two calls (at most `asked`).
        assert 0.2 - asked - 0.01 <= w.estimated_wait_s <= 0.25, (w.estimated_wait_s, asked)
        result = await granted(w)
        took = time.monotonic() - started
        assert not result.lease
        assert 0.19 <= took <= 1.0, took  # not before the token is due, and no polling lag


async def test_release_is_idempotent(budget: Budget) -> None:
    async with budget.open(concurrency=1) as [backend]:
        holder = await admitted(backend, req())
        for rid in (holder.request_id, holder.request_id, "never-admitted"):
            backend.release(rid)
        again = await admitted(backend, req())
        w = await waiting(backend, req())  # two releases did not free two slots
        await eventually(lambda: _in_flight(backend, 1), what="one slot in flight")
        await settle(backend, [w])
        backend.release(again.request_id)
        backend.release(again.request_id)
        await eventually(lambda: _in_flight(backend, 0), what="nothing in flight")


async def test_cancel_before_grant_rejects_and_takes_nothing(budget: Budget) -> None:
    async with budget.open(concurrency=1) as [backend]:
        holder = await admitted(backend, req())
        w = await waiting(backend, req())
        result = await backend.cancel(w)
        assert isinstance(result, Reject), result
        assert result.status == 503
        assert result.retry_after_s >= 0.0
        assert w.future.done()
        assert w.future.result() == result
        assert queued(await state(backend)) == 0
        backend.release(holder.request_id)
        after = await admitted(backend, req())  # the cancelled one did not take the slot
        backend.release(after.request_id)
        await eventually(lambda: _in_flight(backend, 0), what="nothing in flight")


async def test_cancel_after_grant_returns_the_admission(budget: Budget) -> None:
    async with budget.open(concurrency=1) as [backend]:
        holder = await admitted(backend, req())
        w = await waiting(backend, req())
        backend.release(holder.request_id)
        # The grant has happened in the budget; whether its message arrived or not,
        # the cancel must report the admission, and the caller releases it.
        await eventually(lambda: _granted_in_budget(backend), what="the grant")
        result = await backend.cancel(w)
        assert isinstance(result, Admitted), result
        assert result.lease
        assert result.request_id == w.request_id
        backend.release(result.request_id)
        await eventually(lambda: _in_flight(backend, 0), what="the grant is released")
        await admitted(backend, req())


async def test_rejects_early_when_the_wait_would_exceed_the_maximum(budget: Budget) -> None:
    # 1 token/s and waits of 1.2 s at most, so that "at once" can be 1 s for the four calls
    # (at 2/s and 0.6 s it was 0.5 s, which a loaded machine's replies could take).
    async with budget.open(rate=1, burst=1, max_wait_s=1.2) as [backend]:
        started = time.monotonic()
        await admitted(backend, req())
        w = await waiting(backend, req())  # one token away: 1 s
        # Each 2 s away (a rejected request takes no place in line).
        outcomes = [await backend.acquire(req()) for _ in range(2)]
        took = time.monotonic() - started
        for outcome in outcomes:
            assert isinstance(outcome, Reject), outcome
            assert outcome.reason in ("tenant_over_share", "overloaded")
            # the honest excess: the wait beyond the maximum (at most that less the time since)
            assert 0.8 - took - 0.01 <= outcome.retry_after_s <= 0.8 + 0.01, (outcome, took)
            assert outcome.retry_after_header >= 1
        assert took < 1.0, "the rejection came at once, not after waiting (1.2 s)"
        await granted(w)


async def test_sheddable_routes_are_rejected_or_degraded_while_requests_wait(
    budget: Budget,
) -> None:
    async with budget.open(concurrency=1) as [backend]:
        holder = await admitted(backend, req())
        shed_when_full = await backend.acquire(req(sheddable=True))
        assert isinstance(shed_when_full, Reject)
        assert shed_when_full.reason == "shed"
        w = await waiting(backend, req())
        shed = await backend.acquire(req(sheddable=True))
        assert isinstance(shed, Reject)
        assert shed.reason == "shed"
        assert shed.status == 503
        degraded = await backend.acquire(req(degradable=True))
        assert isinstance(degraded, Admitted), degraded
        assert degraded.degraded
        assert not degraded.lease
        backend.release(holder.request_id)
        result = await granted(w)  # shedding touched nothing else
        backend.release(result.request_id)
        await eventually(lambda: _in_flight(backend, 0), what="nothing in flight")
        normal = await backend.acquire(req(sheddable=True))  # no load: served normally
        assert isinstance(normal, Admitted)
        assert not normal.degraded
        assert normal.lease


async def test_higher_priority_goes_first_within_a_tenant(budget: Budget) -> None:
    async with budget.open(concurrency=1, max_wait_s=5.0) as [backend]:
        holder = await admitted(backend, req())
        order: list[Priority] = ["low", "normal", "critical", "high"]
        waits = {p: await waiting(backend, req(priority=p)) for p in order}
        held = holder.request_id
        served: list[Priority] = []
        for _ in order:
            backend.release(held)
            pending = {w.future: p for p, w in waits.items() if p not in served}
            done, _ = await asyncio.wait(pending, timeout=GRANT_S, return_when="FIRST_COMPLETED")
            assert len(done) == 1, f"{len(done)} grants for one slot after {served}"
            (future,) = done
            result = future.result()
            assert isinstance(result, Admitted), result
            served.append(pending[future])
            held = result.request_id
        backend.release(held)
        assert served == ["critical", "high", "normal", "low"]


async def test_snapshot_counts_flight_queues_and_tenants(budget: Budget) -> None:
    async with budget.open(concurrency=2, max_wait_s=5.0) as [backend]:
        holders = [await admitted(backend, req("acme")), await admitted(backend, req("globex"))]
        waits = [
            await waiting(backend, req("acme", "critical")),
            await waiting(backend, req("acme", "low")),
            await waiting(backend, req("globex", "normal")),
        ]
        snap = await state(backend)
        assert snap.in_flight == 2
        assert snap.queued_by_priority == {"critical": 1, "high": 0, "normal": 1, "low": 1}
        assert snap.tenants == 2
        assert snap.busiest[0].tenant == "acme"
        assert snap.busiest[0].queued == 2
        await settle(backend, waits)
        for h in holders:
            backend.release(h.request_id)
        await eventually(lambda: _in_flight(backend, 0), what="nothing in flight")
        assert queued(await state(backend)) == 0


async def test_set_limits_takes_effect(budget: Budget) -> None:
    async with budget.open(concurrency=1) as [backend]:
        settings = budget.settings(concurrency=1)
        holder = await admitted(backend, req())
        w = await waiting(backend, req())
        await backend.set_limits(replace(settings.limits(), concurrency=2))
        result = await granted(w)  # the raised limit admits the waiter: no release needed
        third = await backend.acquire(req())
        assert isinstance(third, Waiting), "the new limit is 2, both are in flight"
        await backend.set_limits(replace(settings.limits(), concurrency=3))
        fourth = await granted(third)
        for rid in (holder.request_id, result.request_id, fourth.request_id):
            backend.release(rid)
        await eventually(lambda: _in_flight(backend, 0), what="nothing in flight")
    async with budget.open(rate=1000, burst=50) as [backend]:
        settings = budget.settings(rate=1000, burst=50)
        await backend.set_limits(replace(settings.limits(), rate=1.0, burst=1.0))
        await admitted(backend, req())
        second = await backend.acquire(req())
        assert not isinstance(second, Admitted), "the lowered rate still admitted at once"
        if isinstance(second, Waiting):
            await backend.cancel(second)


# --- between processes (Redis only) -----------------------------------------------------------


async def test_grant_reaches_a_waiter_in_another_process(fleet_budget: Budget) -> None:
    async with fleet_budget.open(2, concurrency=1) as [one, two]:
        holder = await admitted(one, req())
        w = await waiting(two, req())
        one.release(holder.request_id)
        result = await granted(w)
        assert result.lease
        two.release(result.request_id)
        await eventually(lambda: _in_flight(one, 0), what="the slot comes back")
    # A token a second: the second process must ask before it is back (at 5/s it was back
    # in 0.2 s, and the second process's first call took up to 0.07 s on a loaded machine),
    # and only its own tick can grant it (nothing is released), within GRANT_S.
    async with fleet_budget.open(2, rate=1, burst=1) as [one, two]:
        await admitted(one, req())
        w = await waiting(two, req())  # the token refills: the waiting process ticks itself
        await granted(w)


async def test_priority_holds_across_processes(fleet_budget: Budget) -> None:
    async with fleet_budget.open(2, concurrency=1, max_wait_s=5.0) as [one, two]:
        holder = await admitted(one, req())
        low = await waiting(one, req(priority="low"))
        critical = await waiting(two, req(priority="critical"))
        one.release(holder.request_id)
        first = await granted(critical)
        assert not low.future.done()
        two.release(first.request_id)
        second = await granted(low)
        one.release(second.request_id)


async def test_cancel_after_a_grant_from_another_process(fleet_budget: Budget) -> None:
    async with fleet_budget.open(2, concurrency=1) as [one, two]:
        holder = await admitted(one, req())
        w = await waiting(two, req())
        one.release(holder.request_id)
        await eventually(lambda: _granted_in_budget(one), what="the grant")
        result = await two.cancel(w)  # message delivered or not: the admission stands
        assert isinstance(result, Admitted)
        assert result.lease
        two.release(result.request_id)
        await eventually(lambda: _in_flight(one, 0), what="the slot comes back")


async def test_script_flush_is_invisible(
    fleet_budget: Budget, caplog: pytest.LogCaptureFixture
) -> None:
    """Scripts and function libraries gone (a restart, a failover, SCRIPT/FUNCTION FLUSH)
    are loaded again (NOSCRIPT, "Function not found"); nobody notices."""
    caplog.set_level(logging.WARNING, logger="throttle_mw")
    # (Lease TTL 1.5 s, renewed every 0.5 s: a renewal late by 1 s on a loaded machine, not
    # 0.4 s, lets the lease lapse and the waiter below be admitted.)
    settings: dict[str, Any] = {"concurrency": 1, "failure_mode": "closed", "lease_ttl_s": 1.5}
    async with fleet_budget.open(2, **settings) as [one, two]:
        holder = await admitted(one, req())
        fleet_budget.flush_scripts()
        w = await waiting(two, req())
        fleet_budget.flush_scripts()
        one.release(holder.request_id)
        result = await granted(w)
        fleet_budget.flush_scripts()
        assert (await state(one)).in_flight == 1
        fleet_budget.flush_scripts()
        await asyncio.sleep(1.2)  # lease renewals run (every 0.5 s) on flushed scripts
        w2 = await waiting(one, req())
        fleet_budget.flush_scripts()
        cancelled = await one.cancel(w2)
        assert isinstance(cancelled, Reject)
        assert cancelled.reason != "unavailable"
        two.release(result.request_id)
        await eventually(lambda: _in_flight(one, 0), what="nothing in flight")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# --- checks -----------------------------------------------------------------------------------


async def _in_flight(backend: Backend, count: int) -> bool:
    return (await backend.snapshot()).in_flight == count


async def _granted_in_budget(backend: Backend) -> bool:
    snap = await backend.snapshot()
    return snap.in_flight == 1 and queued(snap) == 0
