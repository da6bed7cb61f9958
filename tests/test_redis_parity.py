"""A budget decides the same whether its calls come by FCALL or by EVALSHA.

A loaded function library (Redis 7, Valkey) keeps things in Lua memory across calls (the
state by its generation stamp, the line the last call left, the limits' memo, remembered
texts and numbers); a script run by EVALSHA keeps nothing. Neither may move a decision:
each test below runs one random sequence of calls with one injected clock on a budget of
its own through the library, then through EVALSHA, and asserts every reply line and every
grant the same. The callers' weights change from call to call (replicas configured
differently, mid-deploy: each call carries its caller's weights; README, "Deployment"),
and some calls carry two operations (a deferred one sent again: batch_whole; no call
carries more than WORK_CHECK, so none is split by the work bound).

The Python scheduler has no per-call weight (a process's weights change with
`set_limits`, for every tenant at once, where the scripts reweigh a tenant when a call
brings its weight), so it is compared on the sequence a weight change makes in both: a
tenant waiting first in line reweighed by its next acquire (the tenant the library keeps
from the last call), alone or after a cancel of its own in the same call. Nothing is kept
on Redis 6.2: the library's tests skip there (EVALSHA's run).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.scripts import WORK_CHECK
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import (
    Admit,
    Decision,
    Enqueue,
    Granted,
    HeldLease,
    LeaseCharge,
    Limits,
    Policy,
    Reject,
    Request,
    Scheduler,
)

POLICY = Policy(
    dict.fromkeys(PRIORITIES, 1.5),
    queue_limit=12,
    tenant_queue_limit=3,
    tenant_idle_s=0.4,
    max_tenants=5,
)
#: Slots (releases), or rate tokens leased with charges (ratelease.lua).
LIMITS = {
    "slots": Limits(rate=8.0, burst=2.0, concurrency=3, tenant_rate=3.0, tenant_burst=2.0),
    "leases": Limits(rate=8.0, burst=2.0, tenant_rate=3.0, tenant_burst=2.0),
}
NAMES = [f"n{i}" for i in range(9)]


@pytest.fixture
def client(clean_redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = clean_redis_server.client()
    yield client
    client.close()


def functions_or_skip(client: redis.Redis, functions: bool) -> None:
    if functions and redis_version(client) < (7, 0):
        pytest.skip("this Redis has no functions (the scripts run by EVALSHA on it)")


def call_whole(scheduler: LuaScheduler, now: float, ops: list[str]) -> tuple[list[str], list[Any]]:
    """`ops` by as many calls as it takes (batch_whole's, with the grants of each call):
    operations deferred past the work bound (protocol.DEFERRED) sent again."""
    replies: list[str] = [protocol.DEFERRED] * len(ops)
    events: list[Any] = []
    pending = list(range(len(ops)))
    for _ in range(20):
        lines, granted = scheduler._call(now, [ops[i] for i in pending])
        events.extend(granted)
        for i, line in zip(pending, lines, strict=True):
            replies[i] = line
        pending = [i for i in pending if replies[i] == protocol.DEFERRED]
        if not pending:
            return replies, events
    raise AssertionError(f"still deferred after 20 calls: {pending}")


def run(client: redis.Redis, seed: int, limits: str, functions: bool, ops: int) -> list[Any]:
    """One random sequence (by `seed`) of calls of up to `ops` operations and a tick each
    (acquires of nine tenants, each with a weight of its caller's, cancels, releases or
    lease charges), on a budget of its own, by FCALL or EVALSHA. Returns every reply line
    and every event, in order."""
    rng = random.Random(seed)
    scheduler = LuaScheduler(client, LIMITS[limits], POLICY, 0.0, functions=functions)
    waiting: list[str] = []
    held: list[str] = []
    seen: list[Any] = []
    now = 0.0
    lease = HeldLease()
    for step in range(300):
        now += rng.choice([0.004, 0.02, 0.05, 0.12, 0.5])
        if limits == "leases" and rng.random() < 0.12:  # charges of tenants, one lease token
            charges = [LeaseCharge(rng.choice(NAMES), rng.choice([1, 2]), 1) for _ in range(2)]
            weights = {c.tenant: rng.choice([1.0, 2.0]) for c in charges}
            scheduler._limits = dataclasses.replace(LIMITS[limits], weights=weights)
            grant = scheduler.lease_tokens(now, 0.3, lease, rng.choice([0, 1]), charges)
            lease = HeldLease(grant.generation, grant.until, size=grant.kept + grant.taken)
            seen.append((step, "lease", grant.taken, grant.kept, grant.until))
            continue
        batch: list[str] = []
        asked: list[str | None] = []
        for n in range(rng.randint(1, ops)):
            kind = rng.random()
            if kind < 0.62 or not (waiting or held):
                rid = f"r{step}.{n}"
                req = Request(rid, rng.choice(NAMES), cost=rng.choice([1, 1, 2]))
                weight = rng.choice([1.0, 2.0])  # (this caller's)
                batch.append(protocol.acquire_op(rid, protocol.acquire_tail(req, weight, 1.5)))
                asked.append(rid)
            elif held and (kind < 0.8 or not waiting):
                batch.append(protocol.release_op(held.pop(rng.randrange(len(held)))))
                asked.append(None)
            else:
                batch.append(protocol.cancel_op(waiting.pop(rng.randrange(len(waiting)))))
                asked.append(None)
        # (The tick in a call of its own: a call of more than WORK_CHECK operations
        # checks Redis's clock and, past its work bound, defers the rest, which a loaded
        # machine decides differently for the two runs; a call split there runs its end
        # steps between the halves. Calls of WORK_CHECK operations at most are never split.)
        lines, events = call_whole(scheduler, now, batch)
        events = events + call_whole(scheduler, now, [protocol.TICK])[1]
        seen.append((step, lines, events))
        for event in events:
            if event.id in waiting:
                waiting.remove(event.id)
            if isinstance(event, Granted) and event.lease:
                held.append(event.id)
        for acquired, line in zip(asked, lines, strict=False):
            if acquired is None:
                continue
            decision = protocol.decode_acquire(line)
            if isinstance(decision, Enqueue):
                waiting.append(acquired)
            elif isinstance(decision, Admit) and decision.lease:
                held.append(acquired)
    return seen


@pytest.mark.parametrize("ops", [1, WORK_CHECK], ids=["single", "several"])
@pytest.mark.parametrize("limits", sorted(LIMITS))
@pytest.mark.parametrize("seed", range(3))
def test_the_library_decides_as_evalsha(
    client: redis.Redis, seed: int, limits: str, ops: int
) -> None:
    """The same calls with the same clock: every reply the same by FCALL as by EVALSHA."""
    functions_or_skip(client, True)
    assert run(client, seed, limits, True, ops) == run(client, seed, limits, False, ops)


# --- a weight change, against the Python scheduler ----------------------------------------------

BEFORE = Limits(rate=1.0, burst=1.0)
AFTER = Limits(rate=1.0, burst=1.0, weights={"A": 2.0})
WAIT = Policy(dict.fromkeys(PRIORITIES, 10.0))


def acquire_op(rid: str, tenant: str, limits: Limits) -> str:
    request = Request(rid, tenant)
    return protocol.acquire_op(rid, protocol.acquire_tail(request, limits.weight(tenant), 10.0))


def reweighed(make: str, client: redis.Redis, same_call: bool) -> list[Decision | str]:
    """A admitted, then two requests of A's waiting (A first in line), A's weight changed
    (set_limits at 0.1), then an acquire of A's with its new weight at 0.2 (after a cancel of
    A's own in the same call, if `same_call`), and one of B's at 0.3: their decisions."""
    if make == "python":
        python = Scheduler(BEFORE, WAIT, 0.0)
        first = [python.acquire(0.0, Request(rid, "A"))[0] for rid in ("a1", "a2", "a3")]
        python.set_limits(AFTER, 0.1)
        cancelled: list[Any] = []
        if same_call:
            cancelled.append(python.cancel(0.2, "a2")[0])
        return [
            *first,
            *cancelled,
            python.acquire(0.2, Request("a4", "A"))[0],
            python.acquire(0.3, Request("b1", "B"))[0],
        ]
    lua = LuaScheduler(client, BEFORE, WAIT, 0.0, functions=make == "fcall")
    first = [lua.acquire(0.0, Request(rid, "A"))[0] for rid in ("a1", "a2", "a3")]
    lua.set_limits(AFTER, 0.1)
    ops = [protocol.cancel_op("a2")] if same_call else []
    lines, _ = call_whole(lua, 0.2, [*ops, acquire_op("a4", "A", AFTER), protocol.TICK])
    replies: list[Any] = [protocol.decode_cancel(line) for line in lines[: len(ops)]]
    replies.append(protocol.decode_acquire(lines[len(ops)]))
    return [*first, *replies, lua.acquire(0.3, Request("b1", "B"))[0]]


@pytest.mark.parametrize("same_call", [False, True], ids=["alone", "after-a-cancel"])
@pytest.mark.parametrize("make", ["fcall", "evalsha"])
def test_a_new_weight_reaches_a_tenant_loaded_before_its_acquire(
    client: redis.Redis, make: str, same_call: bool
) -> None:
    """The Python scheduler's decisions after a weight change, by FCALL and by EVALSHA: the
    tenant first in line (which a library keeps from its last call) takes the weight its
    next acquire brings, as does one a cancel loaded earlier in the same call (by EVALSHA
    too: both were left with their old weight, a queued request's estimate from it)."""
    functions_or_skip(client, make == "fcall")
    decisions = reweighed(make, client, same_call)
    python = reweighed("python", client, same_call)
    if same_call:
        # The cancel's retry estimate is the one place the two differ by design: Python
        # reweighs every tenant at set_limits, the scripts each tenant when a call brings its
        # weight (here the acquire after the cancel), so the cancel reckons with A's old one.
        (mine,), (theirs,) = decisions[3:4], python[3:4]
        assert isinstance(mine, Reject)
        assert isinstance(theirs, Reject)
        assert mine.reason == theirs.reason
        decisions, python = decisions[:3] + decisions[4:], python[:3] + python[4:]
    assert decisions == python
    assert isinstance(decisions[-2], Enqueue)  # (the estimate checked: A's new weight)


# --- a release while nobody waits, against the Python scheduler ---------------------------------


def released_then_queued(make: str, client: redis.Redis, released_at: float) -> list[Any]:
    """Four tenants: a1 admitted at 0.12, b1 at 0.62, a1 released at `released_at` (nobody
    waiting), then c1 (cost 2) admitted at 1.62 and d1 queued at 1.72: every decision."""
    scheduler: Scheduler | LuaScheduler
    if make == "python":
        scheduler = Scheduler(LIMITS["slots"], POLICY, 0.0)
    else:
        scheduler = LuaScheduler(client, LIMITS["slots"], POLICY, 0.0, functions=make == "fcall")
    return [
        scheduler.acquire(0.12, Request("a1", "A"))[0],
        scheduler.acquire(0.62, Request("b1", "B"))[0],
        scheduler.release(released_at, "a1"),
        scheduler.acquire(1.62, Request("c1", "C", cost=2))[0],
        scheduler.acquire(1.72, Request("d1", "D"))[0],
    ]


@pytest.mark.parametrize("released_at", [0.7, 1.12], ids=["in-the-window", "past-the-window"])
@pytest.mark.parametrize("make", ["fcall", "evalsha"])
def test_a_release_while_nobody_waits_leaves_the_window_alone(
    client: redis.Redis, make: str, released_at: float
) -> None:
    """A release while nobody waits has no clock (Scheduler.release, release_at_once): it
    does not roll the fair-rate window, though a full call of batch.lua brings the bucket
    up to now first. Released past the window's end (WINDOW_S from 0), the scripts rolled
    it there, and D's estimate came from a window measured from 1.12 rather than from the
    next acquire's 1.62 (0.56 s against Python's 0.81 s); released inside it, the control."""
    functions_or_skip(client, make == "fcall")
    decisions = released_then_queued(make, client, released_at)
    assert decisions == released_then_queued("python", client, released_at)
    assert isinstance(decisions[-1], Enqueue)


# --- a capped tenant's idle time, against the Python scheduler ------------------------------

CAPPED = Limits(rate=100.0, burst=100.0, tenant_rate=1.0, tenant_burst=2.0)
SHORT_IDLE = Policy(dict.fromkeys(PRIORITIES, 10.0), tenant_idle_s=0.4)


def capped_after_a_pause(make: str, client: redis.Redis) -> list[Any]:
    """T takes its cap's whole burst at 0; a new tenant N arrives at 0.5 (past the idle
    time, well before T's cap has refilled: 2 s), then T asks for 2 more at 0.6."""
    scheduler: Scheduler | LuaScheduler
    if make == "python":
        scheduler = Scheduler(CAPPED, SHORT_IDLE, 0.0)
    else:
        scheduler = LuaScheduler(client, CAPPED, SHORT_IDLE, 0.0, functions=make == "fcall")
    return [
        scheduler.acquire(0.0, Request("t1", "T", cost=2))[0],
        scheduler.acquire(0.5, Request("n1", "N"))[0],
        scheduler.acquire(0.6, Request("t2", "T", cost=2))[0],
    ]


@pytest.mark.parametrize("make", ["fcall", "evalsha"])
def test_a_capped_tenant_is_kept_until_its_cap_has_refilled(client: redis.Redis, make: str) -> None:
    """Scheduler._forget_idle keeps an idle tenant at least as long as its rate cap takes
    to refill (tenant_burst / tenant_rate), whatever the idle time: forgotten sooner, it
    would come back with a full cap and exceed it (README, guarantee 6). The scripts'
    forget_idle went by the idle time alone: T, dropped at 0.5, was admitted again at 0.6
    with a cap made anew; in Python it waits for its cap."""
    functions_or_skip(client, make == "fcall")
    decisions = capped_after_a_pause(make, client)
    assert decisions == capped_after_a_pause("python", client)
    assert not isinstance(decisions[-1], Admit)


# --- a release of a lease no longer held, against the Python scheduler -----------------------

ONE_SLOT = Limits(concurrency=1)


def released_twice(make: str, client: redis.Redis) -> list[Any]:
    """One slot: a1 admitted at 0, b1 queued at 0.1 and granted by a1's release at 0.2, a2
    queued at 0.3; a1 released again at 1.5 (a lease no longer held, while a2 waits),
    then c1 at 1.6: every decision."""
    scheduler: Scheduler | LuaScheduler
    if make == "python":
        scheduler = Scheduler(ONE_SLOT, WAIT, 0.0)
    else:
        scheduler = LuaScheduler(client, ONE_SLOT, WAIT, 0.0, functions=make == "fcall")
    decisions: list[Any] = [
        scheduler.acquire(0.0, Request("a1", "A"))[0],
        scheduler.acquire(0.1, Request("b1", "B"))[0],
        scheduler.release(0.2, "a1"),
        scheduler.acquire(0.3, Request("a2", "A"))[0],
    ]
    if isinstance(scheduler, LuaScheduler):
        scheduler.lone_release(1.5, "a1")  # (sent whether held or not)
    else:
        scheduler.release(1.5, "a1")
    return [*decisions, scheduler.acquire(1.6, Request("c1", "C"))[0]]


@pytest.mark.parametrize("make", ["fcall", "evalsha"])
def test_a_release_of_a_lease_not_held_is_ignored(client: redis.Redis, make: str) -> None:
    """A release of a lease no longer held changes nothing (Scheduler.release: "extra
    calls are ignored"), someone waiting or not: the scripts' release drops no lease and
    stops there. Python's refilled first while someone waited, and the refill rolled the
    fair-rate window at the release's time (WINDOW_S past its start), so C's estimate came
    from a window measured from 1.5 rather than from 1.6 (0.75 s against the scripts'
    0.8 s); now Python ignores it too."""
    functions_or_skip(client, make == "fcall")
    decisions = released_twice(make, client)
    assert decisions == released_twice("python", client)
    assert isinstance(decisions[-1], Enqueue)
