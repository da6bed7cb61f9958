"""The network between the app and Redis: replies lost after the script ran, resets,
a half-open connection (a partition that drops packets without a RST), and added latency.

Every backend here talks to a real redis-server through `TcpProxy` (tests/support/tcpproxy.py,
real sockets on 127.0.0.1); the test reads Redis directly, past the proxy. For rate mode and
concurrency mode, with the defaults (leases of rate tokens, kept slots) and without:

- a reply lost after the script ran (an acquire, a release, a lease of rate tokens): nothing
  is counted twice, nothing held in Redis is left behind once Redis answers again, and then
  the whole limit (or burst) is usable, no more;
- a partition (blackhole) or a reset under load: no request waits past its maximum wait and
  the time a call may take; the answers are the failure mode's (`local`), never an error;
  the app never runs more than the known limits allow; the budget is whole again soon after;
- 12.5 and 25 ms each way: the budget holds, throughput degrades (printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import redis.asyncio

from tests.support.redis_server import RedisServer
from tests.support.tcpproxy import TcpProxy
from throttle_mw.backends import Admitted
from throttle_mw.backends.base import Waiting
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.grants import BLOCK_S
from throttle_mw.backends.redis.keys import Keys
from throttle_mw.backends.redis.scripts import library, source
from throttle_mw.scheduler import Reject, Request
from throttle_mw.settings import Settings

LIMIT = 4
#: Lease TTL: a lease nobody renews lapses after it (the documented bound for capacity lost).
TTL_S = 6.0
#: What the tests allow for Redis to be used again and what a fault left to be given back
#: (measured: well under 0.5 s); well under TTL_S, so a lease left to lapse fails them.
BACK_S = 2.5
#: THROTTLE_REDIS_TIMEOUT: generous for a loaded machine, short beside the waits below.
TIMEOUT_S = 1.0
_prefixes = itertools.count()
_Case = TypeVar("_Case")
_Run = TypeVar("_Run")


def settings(url: str, prefix: str, kind: str, **overrides: Any) -> Settings:
    """`kind`: "concurrency" (kept slots off), "kept" (a concurrency budget alone: slots kept,
    the default), "rate" (leases off), "lease" (leases of rate tokens, T = 0.1 s)."""
    values: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": prefix,
        "redis_timeout_s": TIMEOUT_S,
        "lease_ttl_s": TTL_S,
    }
    if kind in ("concurrency", "kept"):
        values |= {"concurrency": LIMIT, "keep_slots_s": 0.1 if kind == "kept" else 0.0}
    else:
        values |= {"rate": 10.0, "burst": 10.0, "tenant_queue_limit": 0}
        values["rate_lease_s"] = 0.1 if kind == "lease" else 0.0
    return Settings.from_env({}, **{**values, **overrides})


def marker(server: RedisServer, script: str) -> bytes:
    """What a call of entry script `script` carries on the wire: its function's name (FCALL),
    or its SHA (EVALSHA, Redis 6.2)."""
    if server.has_functions:
        return library().functions[script].encode()
    return hashlib.sha1(source(script).encode()).hexdigest().encode()


def through(proxy: TcpProxy) -> str:
    return f"redis://{proxy.url_host_port}/0"


async def leases(client: redis.asyncio.Redis, prefix: str) -> list[str]:
    """The leases Redis counts in flight (the anchor aside)."""
    members = cast("list[bytes]", await client.zrange(Keys(prefix).leases, 0, -1))
    return sorted(m.decode() for m in members if not m.startswith(b"~"))


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.02
) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


async def in_redis(backend: RedisBackend, timeout_s: float = BACK_S) -> None:
    """Wait until `backend` decides in Redis again (its breaker closed)."""
    assert await eventually(lambda: _closed(backend), timeout_s), "Redis never came back"


async def _closed(backend: RedisBackend) -> bool:
    return backend._breaker.closed


async def fill(backend: RedisBackend, n: int, tag: str) -> list[Any]:
    """`n` acquires at once (one tenant each, so fairness has no say)."""
    return list(
        await asyncio.gather(*(backend.acquire(Request(f"{tag}{i}", f"t{i}")) for i in range(n)))
    )


def admitted_by_redis(outcomes: Sequence[Any]) -> int:
    return sum(1 for o in outcomes if isinstance(o, Admitted) and not o.unthrottled)


async def drain(backend: RedisBackend, outcomes: Sequence[Any]) -> None:
    """Release what was admitted, leave what waits."""
    for o in outcomes:
        if isinstance(o, Admitted):
            backend.release(o.request_id)
        elif isinstance(o, Waiting):
            await backend.cancel(o)


# --- a reply lost after the script ran ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["concurrency", "kept"])
@pytest.mark.parametrize("mode", ["local", "closed"])
@pytest.mark.parametrize("losses", [1, 2], ids=["retried", "lost-twice"])
async def test_an_acquire_whose_reply_is_lost_holds_no_slot_once_redis_answers(
    redis_server: RedisServer, kind: str, mode: str, losses: int
) -> None:
    """The acquire ran (a slot taken for it in Redis), then the connection was reset before
    its reply. Once: the batcher's retry is answered from what ran (one slot, not two).
    Twice (the retry's reply lost too): the failure mode answers it; once Redis answers
    again the slot is given back (or counted, as the failure mode's request that still
    runs), and then exactly the limit is admitted in Redis."""
    prefix = f"nf{next(_prefixes)}"
    direct = redis.asyncio.Redis.from_url(redis_server.url)
    with TcpProxy(redis_server.port) as proxy:
        backend = RedisBackend(settings(through(proxy), prefix, kind, failure_mode=mode))
        await backend.start()
        try:
            warm = await backend.acquire(Request("warm", "w"))  # the library loaded, a lease
            assert isinstance(warm, Admitted)
            assert warm.lease
            backend.release("warm")
            assert await eventually(lambda: _none(direct, prefix), TTL_S)

            for _ in range(losses):
                proxy.drop_next_reply(marker(redis_server, "batch"), reset=True)
            started = time.monotonic()
            lost = await asyncio.wait_for(backend.acquire(Request("lost", "acme")), 3 * TIMEOUT_S)
            took = time.monotonic() - started
            assert proxy.counts.drops == losses
            if losses == 1:
                assert backend._breaker.closed  # the retry was answered
                assert isinstance(lost, Admitted), lost
                assert lost.lease
                assert await leases(direct, prefix) == ["lost"]  # one slot, not two
            elif mode == "local":
                assert isinstance(lost, Admitted), lost  # its share: 4 of 4
                assert lost.lease
            else:
                assert lost == Reject("unavailable", 1.0), lost
            await in_redis(backend)
            # Counted once while it runs (the failure mode's lease, reclaimed), or not at all.
            expected = [] if isinstance(lost, Reject) else ["lost"]
            assert await eventually(lambda: _equal(direct, prefix, expected), BACK_S), await leases(
                direct, prefix
            )
            if isinstance(lost, Admitted):
                backend.release("lost")
            assert await eventually(lambda: _none(direct, prefix), BACK_S), await leases(
                direct, prefix
            )
            # The whole limit, and no more, from Redis, well before a lease TTL.
            outcomes = await fill(backend, LIMIT + 1, "after")
            print(f"lost acquire reply ({kind}, {mode}, x{losses}): {lost} in {took:.3f} s")
            assert admitted_by_redis(outcomes) == LIMIT, outcomes
            assert sorted(await leases(direct, prefix)) == [f"after{i}" for i in range(LIMIT)]
            await drain(backend, outcomes)
        finally:
            await backend.stop()
            await direct.aclose()


async def _none(client: redis.asyncio.Redis, prefix: str) -> bool:
    return not await leases(client, prefix)


async def _equal(client: redis.asyncio.Redis, prefix: str, expected: list[str]) -> bool:
    return await leases(client, prefix) == expected


async def _inflight(client: redis.asyncio.Redis, prefix: str) -> float:
    return float(await client.hget(Keys(prefix).state, "inflight") or 0)


@pytest.mark.anyio
@pytest.mark.parametrize("losses", [1, 2], ids=["retried", "lost-twice"])
async def test_a_release_whose_reply_is_lost_is_given_back_once(
    redis_server: RedisServer, losses: int
) -> None:
    """The release ran (the slot freed in Redis), then the connection was reset before its
    reply; the process sends it again (at once, or as an orphan once Redis answers). A
    release is idempotent per request id: the other request's slot stays counted, the
    in-flight count never goes below what runs, and then exactly the limit is admitted."""
    prefix = f"nf{next(_prefixes)}"
    direct = redis.asyncio.Redis.from_url(redis_server.url)
    with TcpProxy(redis_server.port) as proxy:
        backend = RedisBackend(settings(through(proxy), prefix, "concurrency"))
        await backend.start()
        try:
            held = await fill(backend, 2, "held")
            assert admitted_by_redis(held) == 2
            for _ in range(losses):
                proxy.drop_next_reply(marker(redis_server, "release"), reset=True)
            backend.release("held0")
            assert await eventually(lambda: _count(proxy, losses), BACK_S)
            await in_redis(backend)
            await asyncio.sleep(0.3)  # an orphan's second release has gone by now
            assert await leases(direct, prefix) == ["held1"]
            assert await _inflight(direct, prefix) == 1
            backend.release("held1")
            assert await eventually(lambda: _none(direct, prefix), BACK_S)
            assert await _inflight(direct, prefix) == 0
            outcomes = await fill(backend, LIMIT + 1, "after")
            print(f"lost release reply (x{losses}): breaker {backend._breaker.closed}")
            assert admitted_by_redis(outcomes) == LIMIT, outcomes
            assert await _inflight(direct, prefix) == LIMIT
            await drain(backend, outcomes)
        finally:
            await backend.stop()
            await direct.aclose()


async def _count(proxy: TcpProxy, drops: int) -> bool:
    return proxy.counts.drops == drops


async def _cuts(proxy: TcpProxy, cuts: int) -> bool:
    return proxy.counts.cuts == cuts


#: A rate for leases of many tokens: at 150 requests/s a process's lease is 15 (its rate
#: times T = 0.1 s, at most half the burst).
RATE, BURST = 200.0, 40.0


async def offer(backend: RedisBackend, seconds: float, tag: str, until: Callable[[], bool]) -> int:
    """About 150 requests/s (3 every 20 ms) for `seconds` or until `until()`; admitted."""
    admitted, n = 0, 0
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        outcomes = await fill(backend, 3, f"{tag}{n}.")
        admitted += sum(1 for o in outcomes if isinstance(o, Admitted))
        n += 1
        await asyncio.sleep(0.02)
    return admitted


@pytest.mark.anyio
async def test_a_lease_of_rate_tokens_whose_reply_is_lost_lapses_and_the_burst_comes_back(
    redis_server: RedisServer,
) -> None:
    """A ratelease.lua call ran (tokens leased to this process), its reply lost: the process
    drops the lease (its tokens lapse), and Redis stops counting them within about two `T`
    of the lease's end. Once the bucket has refilled, the fleet takes exactly its burst again,
    no less (nothing leaked), no more (nothing counted twice)."""
    prefix = f"nf{next(_prefixes)}"
    with TcpProxy(redis_server.port) as proxy:
        config = settings(through(proxy), prefix, "lease", rate=RATE, burst=BURST)
        backend = RedisBackend(config)
        await backend.start()
        fresh = RedisBackend(settings(redis_server.url, prefix, "rate", rate=RATE, burst=BURST))
        await fresh.start()
        try:
            pool = backend.rate_lease
            assert pool is not None
            admitted = await offer(backend, 1.0, "a", lambda: False)
            size = pool.size
            proxy.drop_next_reply(marker(redis_server, "ratelease"), reset=True)
            admitted += await offer(backend, 3.0, "b", lambda: proxy.counts.drops > 0)
            assert proxy.counts.drops == 1, "no lease call went by"
            await in_redis(backend)
            # The lapsed lease stops counting within ~2 T of its end (T = 0.1 s), and the
            # bucket refills from empty in BURST / RATE = 0.2 s: 1 s is room enough.
            await asyncio.sleep(1.0)
            # One script call on a quiet machine (one instant of Redis's clock); a loaded one
            # may split it, and the bucket refills between the calls.
            probing = time.monotonic()
            outcomes = await fill(fresh, int(BURST) + 5, "probe")
            refilled = RATE * (time.monotonic() - probing)
            got = admitted_by_redis(outcomes)
            print(
                f"lost lease reply: leases of {size} tokens before, {admitted} admitted;"
                f" {pool.leased} tokens leased in all; the burst afterwards: {got} of {BURST}"
                f" (refilled meanwhile: {refilled:.1f})"
            )
            assert size >= 2  # a lease worth losing (10 on a quiet machine)
            assert BURST <= got <= BURST + refilled + 1, (refilled, outcomes)
            await drain(fresh, outcomes)
        finally:
            await fresh.stop()
            await backend.stop()


# --- under load: a partition, resets, latency ---------------------------------------------


#: Every priority's maximum wait in the load tests.
MAX_WAIT_S = 2.0
#: The longest a decision may take: the wait, a call that gets no answer (THROTTLE_REDIS_TIMEOUT)
#: before it and the cancel's call after it, and a second's slack for a loaded machine.
DECIDED_S = MAX_WAIT_S + 2 * TIMEOUT_S + 1.0
#: Concurrency mode: each admitted request runs this long.
WORK_S = 0.05
PROCESSES = 3
_WORKERS = 4  # per process: 12 for 4 slots, so requests queue


@dataclass
class Load:
    """What the app saw, over all processes (times: time.monotonic)."""

    running: int = 0
    #: (time, requests running in the app) at every admission.
    peaks: list[tuple[float, int]] = field(default_factory=list)
    admitted: list[float] = field(default_factory=list)
    #: (time it was asked, seconds until it was decided, outcome's kind).
    decisions: list[tuple[float, float, str]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def peak(self, lo: float, hi: float) -> int:
        return max((n for t, n in self.peaks if lo <= t < hi), default=0)

    def rate(self, lo: float, hi: float) -> float:
        return sum(1 for t in self.admitted if lo <= t < hi) / (hi - lo)

    def most_in(self, window_s: float, lo: float, hi: float) -> int:
        """The most admissions in any `window_s` starting at an admission in [lo, hi)."""
        times = sorted(self.admitted)
        most, j = 0, 0
        for i, t in enumerate(times):
            if not lo <= t < hi:
                continue
            j = max(j, i)
            while j < len(times) and times[j] < t + window_s:
                j += 1
            most = max(most, j - i)
        return most

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for *_, kind in self.decisions:
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def _kind(outcome: Any) -> str:
    if isinstance(outcome, Admitted):
        return "unthrottled" if outcome.unthrottled else "admitted"
    if isinstance(outcome, Reject):
        return f"{outcome.status}/{outcome.reason}"
    return type(outcome).__name__


async def worker(
    backend: RedisBackend, load: Load, tenant: str, ids: itertools.count[int], until: float
) -> None:
    """A closed loop of requests, as the middleware makes them (a queued one waits until its
    deadline, then cancels); a concurrency budget's requests run for WORK_S."""
    loop = asyncio.get_running_loop()
    concurrency = backend.limits.concurrency is not None
    while time.monotonic() < until:
        rid = f"{backend.process}.{next(ids)}"
        asked = time.monotonic()
        try:
            outcome: Any = await backend.acquire(Request(rid, tenant))
            if isinstance(outcome, Waiting):
                waiting = outcome
                await asyncio.wait(
                    [waiting.future], timeout=max(0.0, waiting.deadline - loop.time())
                )
                if waiting.future.done():
                    outcome = waiting.future.result()
                else:
                    outcome = await asyncio.shield(backend.cancel(waiting))
        except Exception as exc:  # what would be a 500
            load.errors.append(exc)
            await asyncio.sleep(0.01)
            continue
        load.decisions.append((asked, time.monotonic() - asked, _kind(outcome)))
        if isinstance(outcome, Admitted):
            now = time.monotonic()
            load.admitted.append(now)
            if concurrency:
                load.running += 1
                load.peaks.append((now, load.running))
                await asyncio.sleep(WORK_S)
                load.running -= 1
                backend.release(outcome.request_id)
            else:
                await asyncio.sleep(0.005)
        else:
            await asyncio.sleep(0.02)  # a client backing off a little, not Retry-After


async def run_load(
    backends: Sequence[RedisBackend],
    seconds: float,
    faults: Callable[[float], Coroutine[Any, Any, None]] | None = None,
) -> tuple[Load, float]:
    """Every process's workers for `seconds`; `faults(t0)` beside them. (Load, t0)."""
    load = Load()
    ids = itertools.count()
    t0 = time.monotonic()
    tasks = [
        worker(b, load, f"t{i % 2}", ids, t0 + seconds) for b in backends for i in range(_WORKERS)
    ]
    if faults is not None:
        tasks.append(faults(t0))
    await asyncio.gather(*tasks)
    return load, t0


def load_settings(url: str, prefix: str, kind: str) -> Settings:
    extra: dict[str, Any] = {
        "max_wait_s": dict.fromkeys(("critical", "high", "normal", "low"), MAX_WAIT_S)
    }
    if kind == "lease":
        extra |= {"rate": RATE, "burst": BURST}
    return settings(url, prefix, kind, **extra)


async def fleet_of(url: str, prefix: str, kind: str) -> list[RedisBackend]:
    backends = [RedisBackend(load_settings(url, prefix, kind)) for _ in range(PROCESSES)]
    for backend in backends:
        await backend.start()
    return backends


FAULT_AT, FAULT_S = 1.5, 3.0
#: The partition heals this long after the first probe any process sends once it has lasted
#: FAULT_S: that probe's connection stays silent, so its process learns Redis is back only
#: from its next probe (the case that keeps a process in failure mode `local` longest).
HEAL_AFTER_PROBE_S = 0.05
#: The longest a heal waits for that probe (one goes at least every THROTTLE_REDIS_TIMEOUT
#: or pause, 1 s here; before branch probepause, their sum).
PROBE_WAIT_S = 2.5
#: From the heal, every process decides in Redis again within this: a probe out at the
#: heal times out (THROTTLE_REDIS_TIMEOUT), and the next goes at once, the pause (timed
#: from its send, at most 1 s) being over by then; slack for a loaded machine. (Before
#: branch probepause the pause ran from the failure: the probed process came back 1.75-1.95 s
#: after such a heal, the pause after that probe (0.8 or 1 s) on top of its timeout.)
BACK_S_AFTER_HEAL = TIMEOUT_S + 0.25
#: From this long after the fault, the budget is exact and fully used again: every process
#: is back (BACK_S_AFTER_HEAL), and what the failure mode admitted just before has run
#: (WORK_S, and as much again of slack). (A late failure no longer opens a breaker again:
#: see the partitions healed with calls still out, below.)
AFTER_S = BACK_S_AFTER_HEAL + 2 * WORK_S
END_S = FAULT_AT + FAULT_S + 1.0 + AFTER_S + 2.5


def check_answers(load: Load) -> None:
    """No error (a 500), no decision later than DECIDED_S, every rejection a 429 or a 503
    (their Retry-After is at least 1 s: `Reject.retry_after_header`)."""
    assert not load.errors, load.errors[:3]
    worst = max(d for _, d, _ in load.decisions)
    assert worst <= DECIDED_S, sorted(load.decisions, key=lambda d: -d[1])[:5]
    assert not [k for k in load.kinds() if k[:4] not in ("admi", "429/", "503/")], load.kinds()


@dataclass
class Partition:
    """One case's run of the partition or the resets under load, and what it left."""

    load: Load
    t0: float
    #: The fault's start and end (time.monotonic).
    marks: dict[str, float]
    #: Each process's breaker closed at the end.
    closed: list[bool]
    #: Nothing held in Redis once the processes stopped.
    left: bool
    counts: Any
    #: Every process's breaker, watched.
    breakers: Breakers
    #: (time, process) of every probe sent.
    probes: list[tuple[float, int]]


async def partition_run(server: RedisServer, kind: str, fault: str) -> Partition:
    """Three processes on one budget, through a proxy of their own, loaded for END_S; the
    fault from FAULT_AT for FAULT_S."""
    prefix = f"nf{next(_prefixes)}"
    direct = redis.asyncio.Redis.from_url(server.url)
    marks: dict[str, float] = {}
    probes: list[tuple[float, int]] = []
    breakers = Breakers()

    async def faults(t0: float) -> None:
        await asyncio.sleep(FAULT_AT)
        marks["start"] = time.monotonic()
        if fault == "blackhole":
            proxy.blackhole = True
            await asyncio.sleep(FAULT_S)
            # Heal just after a probe went out into the partition (HEAL_AFTER_PROBE_S).
            due = time.monotonic()
            while time.monotonic() < due + PROBE_WAIT_S:
                sent = [t for t, _ in probes if t >= due]
                if sent and time.monotonic() >= sent[0] + HEAL_AFTER_PROBE_S:
                    marks["probe"] = sent[0]
                    break
                await asyncio.sleep(0.002)
            proxy.blackhole = False
        else:
            while time.monotonic() < marks["start"] + FAULT_S:
                await asyncio.to_thread(proxy.reset_all)
                await asyncio.sleep(0.5)
        marks["end"] = time.monotonic()

    try:
        with TcpProxy(server.port) as proxy:
            backends = await fleet_of(through(proxy), prefix, kind)
            for i, backend in enumerate(backends):
                backend._probe = _told(backend._probe, probes, i)  # type: ignore[method-assign]
            try:
                watching = asyncio.ensure_future(breakers.watch(backends, time.monotonic() + END_S))
                load, t0 = await run_load(backends, END_S, faults)
                await watching
                closed = [b._breaker.closed for b in backends]
            finally:
                for backend in backends:
                    await backend.stop()
            left = await eventually(lambda: _none(direct, prefix), BACK_S)
            counts = proxy.counts
    finally:
        await direct.aclose()
    return Partition(load, t0, marks, closed, left, counts, breakers, probes)


def _told(
    probe: Callable[[], Awaitable[None]], probes: list[tuple[float, int]], process: int
) -> Callable[[], Coroutine[Any, Any, None]]:
    """`probe`, its sends written down in `probes`."""

    async def told() -> None:
        probes.append((time.monotonic(), process))
        await probe()

    return told


def selected(request: pytest.FixtureRequest, test: str) -> list[dict[str, Any]]:
    """The params of the cases of `test` (a function of this module) this session runs."""
    return [
        dict(item.callspec.params)
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.originalname == test
        and hasattr(item, "callspec")
    ]


async def side_by_side(
    cases: Sequence[_Case],
    together: Sequence[_Case],
    run: Callable[[_Case], Coroutine[Any, Any, _Run]],
) -> dict[_Case, _Run | BaseException]:
    """`run` each case: those in `together` at once, then the others one at a time; a case's
    error is its result (its test raises it), not the others'."""
    outs = await asyncio.gather(*(run(case) for case in together), return_exceptions=True)
    runs: dict[_Case, _Run | BaseException] = dict(zip(together, outs, strict=True))
    for case in cases:
        if case not in runs:
            try:
                runs[case] = await run(case)
            except Exception as exc:
                runs[case] = exc
    return runs


PARTITION_TEST = "test_a_partition_or_resets_under_load_cost_no_error_hang_or_capacity"
#: The kinds whose cases run at once. Not "lease": its bound, the most admissions in a 1 s
#: window, is the bucket's (RATE + BURST) and one, and the window is read from the times the
#: workers saw their admissions: a loop busier with other cases records them in bunches.
#: Alone its cases read 238-239; with the four at once 240 five times and 242 once in six
#: runs (docs/performance.md, "CI time, seventh pass"). A kept case's bound is the count in
#: flight, which a late reading does not change.
AT_ONCE = ("kept",)


@pytest.fixture(scope="module")
def partition_runs(
    redis_binary: Path, request: pytest.FixtureRequest
) -> dict[tuple[str, str], Partition | BaseException]:
    """Every case of the partition test this session runs, on one redis-server, each with
    three processes, a budget and a proxy of its own (its fault its proxy's alone): the
    cases of the kinds in AT_ONCE at once, in one loop, then the others one at a time. A
    case's own CPU is small (1.2 s in a 9 s case: the workers mostly wait on Redis and the
    app's 50 ms), and a kept case's bounds are seconds and counts in flight
    (docs/performance.md, "CI time, seventh pass"); an error in one case's run fails that
    case's test only."""
    cases = [
        (str(params["kind"]), str(params["fault"])) for params in selected(request, PARTITION_TEST)
    ]
    with RedisServer(binary=redis_binary) as server:
        return asyncio.run(
            side_by_side(
                cases,
                [case for case in cases if case[0] in AT_ONCE],
                lambda case: partition_run(server, *case),
            )
        )


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["kept", "lease"])
@pytest.mark.parametrize("fault", ["blackhole", "resets"])
def test_a_partition_or_resets_under_load_cost_no_error_hang_or_capacity(
    partition_runs: dict[tuple[str, str], Partition | BaseException], kind: str, fault: str
) -> None:
    """Three processes on one budget, loaded; for 3 s the network between them and Redis
    drops every packet without a RST (each connection that carries a byte goes half-open
    for good), or resets every connection twice a second.

    Pass: no error, no decision later than its maximum wait and two Redis timeouts (and a
    second of slack), every rejection with a Retry-After; failure mode `local` keeps the
    app within the known limits meanwhile (concurrency: the limit, plus one per process
    whose acquire's reply was lost, and the others' local shares beside one back on Redis;
    rate: the bucket's bound plus the others' local shares); from AFTER_S after the fault
    the budget is exact and fully used again, and Redis holds nothing once the processes
    stop. (The kept cases run at once, each on a proxy and budget of its own:
    `partition_runs`.)"""
    run_ = partition_runs[kind, fault]
    if isinstance(run_, BaseException):
        raise run_
    load, t0, marks, closed, left = run_.load, run_.t0, run_.marks, run_.closed, run_.left
    counts = run_.counts
    start, end = marks["start"], marks["end"]
    after = end + AFTER_S
    stop = t0 + END_S
    worst = max(d for _, d, _ in load.decisions)
    if kind == "lease":
        most = {
            "before": load.most_in(1.0, t0, start - 1.0),
            "during": load.most_in(1.0, start - 1.0, after),
            "after": load.most_in(1.0, after, stop - 1.0),
        }
        nominal = RATE
    else:
        most = {
            "before": load.peak(t0, start),
            "during": load.peak(start, after),
            "after": load.peak(after, stop),
        }
        nominal = LIMIT / WORK_S
    rates = {
        "before": load.rate(t0, start),
        "during": load.rate(start, end),
        "after": load.rate(after, stop),
    }
    print(
        f"{fault} ({kind}): {counts}; answers {load.kinds()}; slowest decision {worst:.2f} s;"
        f" admitted/s {rates} of {nominal:.0f}; most (1 s windows / in flight) {most}"
    )
    bins = [round(load.rate(end + i / 2, end + (i + 1) / 2)) for i in range(-2, 8)]
    print(f"admitted/s per 0.5 s from 1 s before the fault's end: {bins}")
    # After the heal: when each process decided in Redis again, and how far and how long the
    # app ran more than the limit (a process in `local` beside those back on Redis).
    backs = [run_.breakers.back(i, end, stop) - end for i in range(PROCESSES)]
    over = [(t - end, n) for t, n in load.peaks if end <= t < stop and n > LIMIT]
    overshoot_s = max(t for t, _ in over) + WORK_S if over else 0.0
    probe = marks.get("probe")
    print(
        f"after the heal ({'a probe out since %.3f s' % (end - probe) if probe else 'no probe'}):"
        f" processes back after {[round(b, 3) for b in backs]} s; over the limit"
        f" {len(over)} admissions, at most {max((n for _, n in over), default=0)} in flight,"
        f" until {overshoot_s:.3f} s after the heal; probes sent {len(run_.probes)}"
    )
    check_answers(load)
    assert all(closed), closed
    assert left
    # During the fault and until every process decides in Redis again, the known limits:
    # a process back on Redis may get the whole budget while the others still admit their
    # shares in failure mode `local`, and a request whose acquire's reply was lost runs
    # uncounted (one per process). Measured: far below (printed above).
    others = (PROCESSES - 1) / PROCESSES
    if kind == "lease":
        assert most["before"] <= RATE + BURST + 1, most
        assert most["during"] <= (RATE + BURST) * (1 + others), most
        assert most["after"] <= RATE + BURST + 1, most
    else:
        assert most["before"] <= LIMIT, most
        assert most["during"] <= LIMIT + (PROCESSES - 1) * (LIMIT // PROCESSES) + PROCESSES, most
        assert most["after"] <= LIMIT, most
    # A heal just after a probe went out: every process is back within a timeout (and
    # slack), and the app runs more than the limit no longer (before branch probepause: the
    # probed process 1.75-1.95 s, its local share beside the others' Redis budget).
    if fault == "blackhole":
        assert probe is not None, run_.probes
        assert max(backs) <= BACK_S_AFTER_HEAL, backs
        assert overshoot_s <= BACK_S_AFTER_HEAL + WORK_S, over
    # (Before the fixes: nothing admitted for 2-3 s after a partition, 0.57-0.65 of the
    # rate before it; after them 0.97 on a quiet machine, 0.78 or more beside two CPU hogs.)
    # (Resets: 0.74 once beside two CPU hogs, unexplained; the bug was the partition's.)
    assert rates["after"] >= (0.7 if fault == "blackhole" else 0.5) * rates["before"], rates


@pytest.mark.e2e
@pytest.mark.anyio
async def test_after_a_partition_a_grant_is_heard_at_once_not_at_the_listeners_timeout(
    redis_server: RedisServer,
) -> None:
    """A partition (blackhole) leaves the grant listener's connection half-open: its BLPOP
    gets no answer until the socket timeout (BLOCK_S + THROTTLE_REDIS_TIMEOUT + 1 s, 3 s
    here). Once the breaker has closed again (Redis answers on the call path), a request
    queued in Redis must hear its grant within a round trip, not at that timeout: meanwhile
    its slot, granted in Redis, would run nothing (the whole budget, under load: measured
    in the load test above, 2 s of nothing admitted)."""
    prefix = f"nf{next(_prefixes)}"
    with TcpProxy(redis_server.port) as proxy:
        backend = RedisBackend(
            settings(through(proxy), prefix, "concurrency", concurrency=1, failure_mode="closed")
        )
        await backend.start()
        try:
            hold = await backend.acquire(Request("hold", "a"))
            assert isinstance(hold, Admitted)
            assert hold.lease
            await asyncio.sleep(0.2)  # the listener is in BLPOP
            proxy.blackhole = True
            cut_off = await backend.acquire(Request("cut-off", "b"))  # no answer: TIMEOUT_S
            assert cut_off == Reject("unavailable", 1.0)
            proxy.blackhole = False
            await in_redis(backend)
            waiting = await backend.acquire(Request("waiter", "b"))
            assert isinstance(waiting, Waiting)
            released = time.monotonic()
            backend.release("hold")
            granted = await asyncio.wait_for(waiting.future, 10.0)
            heard = time.monotonic() - released
            print(f"after the partition: the grant heard {heard:.3f} s after the release")
            assert isinstance(granted, Admitted)
            assert heard <= 0.5, heard
            backend.release("waiter")
        finally:
            await backend.stop()


@pytest.mark.anyio
async def test_an_orphan_whose_cleanup_fails_is_cleaned_up_at_the_next_return(
    redis_server: RedisServer,
) -> None:
    """An acquire ran in Redis but its replies were lost (an orphan: a slot held in Redis that
    this process does not know of). Redis answers again, but the call that takes the orphan
    out fails too (a call sent before the network healed times out, and takes the calls
    queued behind it along). The orphan must stay one, cleaned up when Redis answers again,
    not left to hold its slot until the lease TTL (the whole budget, in the load test)."""
    prefix = f"nf{next(_prefixes)}"
    direct = redis.asyncio.Redis.from_url(redis_server.url)
    with TcpProxy(redis_server.port) as proxy:
        backend = RedisBackend(
            settings(through(proxy), prefix, "concurrency", failure_mode="closed")
        )
        await backend.start()
        try:
            warm = await backend.acquire(Request("warm", "w"))
            assert isinstance(warm, Admitted)
            backend.release("warm")
            assert await eventually(lambda: _none(direct, prefix), BACK_S)
            for _ in range(2):  # the call and its retry
                proxy.drop_next_reply(marker(redis_server, "batch"), reset=True)
            lost = await backend.acquire(Request("orphan-7", "acme"))
            assert lost == Reject("unavailable", 1.0)
            for _ in range(2):  # the cleanup's call (its ops name the orphan) and its retry
                proxy.cut_next(b"orphan-7")  # (cut in half: nothing of it runs)
            assert await leases(direct, prefix) == ["orphan-7"]  # it ran: a slot held
            assert await eventually(lambda: _cuts(proxy, 2), BACK_S), proxy.counts
            gone = await eventually(lambda: _none(direct, prefix), BACK_S)
            print(f"an orphan whose cleanup failed: {proxy.counts}; gone: {gone}")
            assert gone, await leases(direct, prefix)
            await in_redis(backend)
            outcomes = await fill(backend, LIMIT + 1, "after")
            assert admitted_by_redis(outcomes) == LIMIT, outcomes
            await drain(backend, outcomes)
        finally:
            await backend.stop()
            await direct.aclose()


LATENCY_S = 2.0


LATENCIES = (0.0, 0.0125, 0.025)
LATENCY_TEST = "test_added_latency_keeps_the_budget_and_costs_throughput_gracefully"
#: The kinds whose latency runs go at once, each kind's three latencies one after another as
#: before: the concurrency budgets, whose bound is the count in flight. Not "lease" (its
#: 1 s window count read 239 of its bound 241 run alone: AT_ONCE).
LATENCY_AT_ONCE = ("kept", "concurrency")


async def latency_run(server: RedisServer, kind: str) -> list[tuple[float, Load, float]]:
    """Three processes loaded for LATENCY_S at each added one-way latency, one after the
    other: (one-way latency, Load, t0) each."""
    runs = []
    for one_way in LATENCIES:
        prefix = f"nf{next(_prefixes)}"
        with TcpProxy(server.port) as proxy:
            proxy.latency_s = one_way
            backends = await fleet_of(through(proxy), prefix, kind)
            try:
                load, t0 = await run_load(backends, LATENCY_S)
            finally:
                for backend in backends:
                    await backend.stop()
        runs.append((one_way, load, t0))
    return runs


@pytest.fixture(scope="module")
def latency_runs(
    redis_binary: Path, request: pytest.FixtureRequest
) -> dict[str, list[tuple[float, Load, float]] | BaseException]:
    """Every kind of the latency test this session runs, on one redis-server, each on
    proxies and budgets of its own: the kinds in LATENCY_AT_ONCE at once, in one loop, then
    the others one at a time (docs/performance.md, "CI time, seventh pass")."""
    kinds = [str(params["kind"]) for params in selected(request, LATENCY_TEST)]
    with RedisServer(binary=redis_binary) as server:
        return asyncio.run(
            side_by_side(
                kinds,
                [kind for kind in kinds if kind in LATENCY_AT_ONCE],
                lambda kind: latency_run(server, kind),
            )
        )


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["kept", "concurrency", "lease"])
def test_added_latency_keeps_the_budget_and_costs_throughput_gracefully(
    latency_runs: dict[str, list[tuple[float, Load, float]] | BaseException], kind: str
) -> None:
    """Three processes, loaded, with 0, 12.5 and 25 ms added each way (RTT 25 and 50 ms).

    Pass: the budget holds exactly (concurrency: never more than the limit running; rate:
    no 1 s window over refill plus burst), no error, no decision later than DECIDED_S; the
    throughput at 50 ms RTT is at least a quarter of that without (generous: a request
    not on a kept slot holds its slot a round trip longer; printed). (The two concurrency
    kinds run at once: `latency_runs`.)"""
    runs = latency_runs[kind]
    if isinstance(runs, BaseException):
        raise runs
    rows: dict[float, tuple[float, int, float, float]] = {}
    for one_way, load, t0 in runs:
        check_answers(load)
        waits = sorted(d for _, d, kind_ in load.decisions if kind_ == "admitted")
        if kind == "lease":
            most = load.most_in(1.0, t0, t0 + LATENCY_S - 1.0)
            assert most <= RATE + BURST + 1, most
        else:
            most = load.peak(t0, t0 + LATENCY_S + 1.0)
            assert most <= LIMIT, most
        rows[one_way] = (
            load.rate(t0, t0 + LATENCY_S),
            most,
            waits[len(waits) // 2],
            waits[int(len(waits) * 0.99)],
        )
    print(f"added latency ({kind}, {PROCESSES} processes):")
    for one_way, (rate, most, p50, p99) in rows.items():
        print(
            f"  RTT +{2000 * one_way:.0f} ms: {rate:.0f} admitted/s, most {most}"
            f" (in flight / in 1 s), decision p50 {1000 * p50:.1f} ms p99 {1000 * p99:.1f} ms"
        )
    assert rows[0.025][0] >= 0.25 * rows[0.0][0], rows


@contextlib.asynccontextmanager
async def _grant_listener_silenced(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[RedisBackend, float]]:
    """One slot behind a proxy (failure mode `closed`, waits of 30 s), held by "hold", and
    the grant listener's connection gone silent (its next BLPOP, then nothing): the backend
    and when it went silent. Checked on leaving: the breaker never opened, only "waiter"
    holds a slot, and once it is released nothing is left in Redis."""
    prefix = f"nf{next(_prefixes)}"
    direct = redis.asyncio.Redis.from_url(redis_server.url)
    forever = dict.fromkeys(("critical", "high", "normal", "low"), 30.0)
    with TcpProxy(redis_server.port) as proxy:
        backend = RedisBackend(
            settings(
                through(proxy),
                prefix,
                "concurrency",
                concurrency=1,
                failure_mode="closed",
                max_wait_s=forever,
            )
        )
        await backend.start()
        try:
            hold = await backend.acquire(Request("hold", "a"))
            assert isinstance(hold, Admitted)
            proxy.silence_next(b"BLPOP")
            assert await eventually(lambda: _silenced(proxy), 2 * BLOCK_S + 1.0)
            yield backend, time.monotonic()
            assert backend._breaker.failures == 0
            assert await leases(direct, prefix) == ["waiter"]
            backend.release("waiter")
            assert await eventually(lambda: _none(direct, prefix), BACK_S)
        finally:
            await backend.stop()
            await direct.aclose()


async def _grant_the_waiter(backend: RedisBackend) -> float:
    """Queue "waiter" behind "hold" and release "hold"; returns once the waiter is
    admitted, with when "hold" was released."""
    waiting = await backend.acquire(Request("waiter", "b"))
    assert isinstance(waiting, Waiting)
    released = time.monotonic()
    backend.release("hold")
    granted = await asyncio.wait_for(waiting.future, 10.0)
    assert isinstance(granted, Admitted)
    return released


@pytest.mark.e2e
@pytest.mark.anyio
async def test_a_grant_listener_gone_half_open_alone_is_back_within_its_socket_timeout(
    redis_server: RedisServer,
) -> None:
    """Only the grant listener's connection goes silent (a middlebox dropped that one flow:
    no answer, no reset); Redis answers on the call path. Nothing tells the process but the
    listener's socket timeout (BLOCK_S + THROTTLE_REDIS_TIMEOUT + 1 s).

    Pass (the bound, pinned): the breaker never opens (nobody is answered by the failure
    mode); a waiter granted meanwhile is admitted once the listener has reconnected (its
    waiters re-submitted), within that timeout and a second of slack; one slot counted,
    nothing left behind."""
    async with _grant_listener_silenced(redis_server) as (backend, silenced):
        released = await _grant_the_waiter(backend)
        heard = time.monotonic()
        print(
            f"a half-open grant connection alone: the grant heard {heard - released:.2f} s"
            f" after the release, {heard - silenced:.2f} s after the connection went silent"
        )
        assert heard - silenced <= BLOCK_S + TIMEOUT_S + 1.0 + 1.0


async def _silenced(proxy: TcpProxy) -> bool:
    return proxy.counts.silenced > 0


#: Short partitions, each healed while calls sent into it are still out: one shorter than
#: THROTTLE_REDIS_TIMEOUT (the calls sent during it time out after the probe found Redis
#: back) and one longer (the probe sent just before the heal, the grant listener's BLPOP).
BLIPS = 4
#: From one heal to the next partition: every process back on Redis (measured: at most
#: 1.25 s after a heal), then time for the budget to be seen exact.
BLIP_GAP_S = 2.0


@dataclass
class Breakers:
    """Every process's breaker, watched every few ms: (time, process, closed) per change."""

    changes: list[tuple[float, int, bool]] = field(default_factory=list)

    async def watch(self, backends: Sequence[RedisBackend], until: float) -> None:
        state = [b._breaker.closed for b in backends]
        while time.monotonic() < until:
            for i, backend in enumerate(backends):
                if backend._breaker.closed != state[i]:
                    state[i] = not state[i]
                    self.changes.append((time.monotonic(), i, state[i]))
            await asyncio.sleep(0.002)

    def back(self, process: int, at: float, hi: float) -> float:
        """When `process` decided in Redis again after `at`: `at` if its breaker was closed
        then, its first close after `at` if open (inf: not before `hi`)."""
        closed = next((c for t, i, c in reversed(self.changes) if i == process and t < at), True)
        if closed:
            return at
        close = self.first_close(process, at, hi)
        return float("inf") if close is None else close

    def first_close(self, process: int, lo: float, hi: float) -> float | None:
        return next((t for t, i, c in self.changes if i == process and c and lo <= t < hi), None)

    def opened(self, process: int, lo: float, hi: float) -> list[float]:
        return [t for t, i, c in self.changes if i == process and not c and lo <= t < hi]


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.parametrize("blip_s", [0.6, 2.5])
async def test_after_a_partition_heals_a_late_failure_reopens_no_breaker_and_the_budget_holds(
    redis_server: RedisServer, blip_s: float
) -> None:
    """Three processes on one budget of 4 slots, loaded, failure mode `local`; the network
    to Redis goes silent (blackhole) BLIPS times for `blip_s`. Calls sent into it (a batch,
    a heartbeat, the breaker's probe, a lease) time out after the heal, some after their
    process found Redis back (its breaker closed): old news.

    Pass: once a process's breaker has closed after a heal, it stays closed until the next
    partition; and once every process's has (plus a request's run, WORK_S, for what the
    failure mode admitted before), never more than the limit runs. (Before the fix a late
    heartbeat's or probe's timeout opened the breaker again, its process admitting its
    local share beside the others' Redis budget: 5-6 in flight for 4.)"""
    prefix = f"nf{next(_prefixes)}"
    heals: list[tuple[float, float]] = []

    async def faults(t0: float) -> None:
        for n in range(BLIPS):
            # (phases varied against the heartbeats, probes and listener's timeouts)
            await asyncio.sleep(BLIP_GAP_S + 0.23 * n)
            start = time.monotonic()
            proxy.blackhole = True
            await asyncio.sleep(blip_s)
            proxy.blackhole = False
            heals.append((start, time.monotonic()))

    seconds = BLIPS * (BLIP_GAP_S + blip_s) + 0.23 * BLIPS * (BLIPS - 1) / 2 + 1.5
    breakers = Breakers()
    with TcpProxy(redis_server.port) as proxy:
        backends = await fleet_of(through(proxy), prefix, "kept")
        try:
            watching = asyncio.ensure_future(breakers.watch(backends, time.monotonic() + seconds))
            load, t0 = await run_load(backends, seconds, faults)
            await watching
        finally:
            for backend in backends:
                await backend.stop()
        counts = proxy.counts
    check_answers(load)
    # Old news: failures the breakers ignored; batch calls sent again (none of them seen).
    stale = [(b._breaker.stale, b._batcher.resent if b._batcher else 0) for b in backends]
    report = []
    problems = []
    for n, (_, heal) in enumerate(heals):
        upto = heals[n + 1][0] if n + 1 < len(heals) else t0 + seconds
        closes = [breakers.first_close(i, heal, upto) for i in range(PROCESSES)]
        # (a process none of whose calls met the partition never opened: back at the heal)
        back = max((c for c in closes if c is not None), default=heal)
        reopened = [breakers.opened(i, c, upto) for i, c in enumerate(closes) if c is not None]
        exact_from = back + WORK_S + 0.05
        peak = load.peak(exact_from, upto)
        report.append(
            f"heal {n}: back {back - heal:.2f} s after, reopened {[len(r) for r in reopened]},"
            f" most in flight after {peak} (before: {load.peak(heal, exact_from)})"
        )
        if any(reopened):
            problems.append(f"heal {n}: a breaker opened again {reopened}")
        if peak > LIMIT:
            over = [(round(t - heal, 3), k) for t, k in load.peaks if exact_from <= t < upto]
            problems.append(f"heal {n}: {peak} in flight for {LIMIT}: {over[:8]}")
    print(f"partitions of {blip_s} s: {counts}; old news (failures, calls sent again) {stale}")
    print("\n".join(report))
    assert not problems, problems
    assert all(b._breaker.closed for b in backends)


@pytest.mark.e2e
@pytest.mark.anyio
async def test_a_grant_listener_gone_half_open_alone_is_noticed_by_the_call_paths_replies(
    redis_server: RedisServer,
) -> None:
    """As above, but the process is not quiet: its call path makes calls (ticks, every
    0.1 s) and Redis answers them. Once the listener's BLPOP is overdue (out longer than
    BLOCK_S, when Redis answers it, and a Redis timeout), the next reply has the listener
    reconnect: the grant is heard about a second before its socket timeout (BLOCK_S +
    THROTTLE_REDIS_TIMEOUT + 1 s; measured there by the test above: 3.05 s). The breaker
    never opens; one slot counted, nothing left behind."""
    async with _grant_listener_silenced(redis_server) as (backend, silenced):
        ticking = True

        async def ticks() -> None:
            assert backend._batcher is not None
            while ticking:
                await backend._batcher.submit(protocol.TICK)
                await asyncio.sleep(0.1)

        calls = asyncio.ensure_future(ticks())
        try:
            await _grant_the_waiter(backend)
            heard = time.monotonic() - silenced
            ticking = False
            await calls
        finally:
            ticking = False
        print(f"a half-open grant connection alone, Redis answering: heard {heard:.2f} s")
        # Overdue at BLOCK_S + TIMEOUT_S; the next tick's reply within 0.1 s (and slack
        # for a loaded machine); the socket timeout (old: 3.05 s) is a second later.
        assert heard <= BLOCK_S + TIMEOUT_S + 0.5, heard
