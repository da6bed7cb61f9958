"""The Python scheduler, FCALL and EVALSHA decide alike on random runs.

Each test runs one random sequence of calls (by its seed) three times: through the Python
`Scheduler`, through the scripts as a function library (FCALL, Redis 7 and Valkey) and by
EVALSHA, each on a budget of its own with the same clock, and asserts every decision, every
event (grants, evictions) and, after every call, the budget's state (tokens, in flight,
queued by priority, tenants) the same. The calls: acquires of seven tenants of different
weights, at random priorities and costs (one over the burst and the concurrency: clamped),
some sheddable or degradable; releases, a lone one by release.lua as the backend sends it;
cancels; now and then a release again or a cancel racing a grant (ignored alike); a tick in
a call of its own after half the calls (ticked after every call, a tick hid where a refill
runs: parity2's window roll); and, on a budget of rate leases, lease renewals with charges
or without (a renewal without charges sweeps nothing and leases nothing while a sweep is due,
on both sides: parity5).
Four budgets: slots (rate, concurrency and tenant caps), rate with caps (a burst of 3.5:
half a token), concurrency alone (the fair rate measured, not configured), rate leases.
Each under two policies: tenants kept (an idle time longer than the run, `max_tenants` the
number of tenants) and tenants forgotten (`FORGET`: an idle time of 0.4133 s, a few steps,
and `max_tenants` 3 of the 7: idle expiry and the bound, both sides sweeping at the end of
an operation that made a tenant or once a `SWEEP_PERIOD_S`, measuring idle time from a
tenant's last use, its last arrival or its last waiter leaving).

A call of the scripts carries at most WORK_CHECK operations (a call of more checks Redis's
clock and may defer the rest, differently on a loaded machine; tests/test_redis_parity.py).
The Python side runs a call's operations one by one at the same time.

Neutralized here, each a documented choice of the scripts (scheduler README, "Only in Lua",
"Lua-only steps inside twin functions" and "Memory") that would otherwise decide differently:

- the idle sweep's moment and ties (with `FORGET`): the scripts sweep at the end of a
  call, Python at the end of each operation. In a call of two operations (at one time) a
  sweep after the first drops what the call's end would keep or count differently (a
  tenant made by the first, then another's last waiter leaving: the bound counts one idle
  tenant more at the call's end), so runs with `FORGET` make calls of one operation. The
  idle list orders tenants last used in the same microsecond by digest, Python at the
  same time (`==`) by name: the names here sort as their digests (`NAMES`), and every time
  in a run is on a 2 ms grid, the idle time off it (no tenant's idle time ends within a
  microsecond of a sweep: there the list's whole microseconds decide, Python's `<=`);
- the deadline grace: a waiter still queued at its deadline is cancelled then by the
  driver, as the Redis backend cancels its own (all those due within EPS of it together:
  Python's tick evicts those); the scripts evict a waiter only `DEADLINE_GRACE_S` after
  (its process died), Python's tick at it;
- lease expiry: the leases' TTL (3600 s, the test scheduler's) outlasts the run; the
  scripts expire leases a crashed process did not renew, Python has none;
- the keys' TTL refresh: a lease renewal whose call does not save the state whole (one
  without charges, or charging leanly) takes no tokens while a refresh is due (the scripts'
  upkeep; Python has no TTLs); the test scheduler's T (7200 s) makes one due only every
  1800 s, after the run;
- one process: the scripts' `orphaned` (a dead process's waiters) never applies, and with
  a queue limit of 12 a dispatch never reaches `DISPATCH_LIMIT`;
- weights fixed per tenant: the scripts reweigh a tenant when a call brings its weight,
  Python at `set_limits` (tests/test_redis_parity.py compares a change);
- the order of capped tenants released together: on the budgets with tenant caps every
  tenant has a weight of its own (`DISTINCT`), so no two finish tags tie, and the order
  in which `release_capped` puts tenants back in line (Python's: as capped; the scripts':
  by digest) decides nothing.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import keys, protocol
from throttle_mw.backends.redis.scripts import WORK_CHECK
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import (
    Admit,
    Enqueue,
    Evicted,
    Granted,
    HeldLease,
    LeaseCharge,
    Limits,
    Policy,
    Reject,
    Request,
    Scheduler,
)
from throttle_mw.scheduler.constants import EPS, IDLE

#: Tenant names in the order of their digests (`keys.tenant_digest`): tenants last used at
#: the same time go by name in Python, by digest in the scripts' idle list (module docstring).
NAMES = ["a", "e", "f", "h", "n", "r", "s"]
#: Weights of the budgets without tenant caps: equal ones too (their tags tie, and ties go
#: in order of activation on both sides).
WEIGHTS = {"a": 2.0, "e": 3.0}
#: With tenant caps, every tenant's own weight, no cost over one weight the same as another
#: over another: tags never tie (see the module docstring, the order of capped tenants).
DISTINCT = dict(zip(NAMES, [1.0, 1.1, 1.3, 1.7, 2.3, 2.9, 3.7], strict=True))
POLICY = Policy(
    {"critical": 3.0, "high": 2.0, "normal": 1.5, "low": 0.8},
    queue_limit=12,
    tenant_queue_limit=3,
    tenant_idle_s=10_000.0,  # longer than any run: see the module docstring
    max_tenants=len(NAMES),
)
#: Idle tenants forgotten: an idle time a few steps long (off the 2 ms grid every time in a
#: run is on: the module docstring) and a bound below the seven tenants.
FORGET = Policy(
    POLICY.max_wait_s,
    queue_limit=POLICY.queue_limit,
    tenant_queue_limit=POLICY.tenant_queue_limit,
    tenant_idle_s=0.4133,
    max_tenants=3,
)
LIMITS = {
    "slots": Limits(
        rate=8.0, burst=4.0, concurrency=3, weights=DISTINCT, tenant_rate=3.0, tenant_burst=2.0
    ),
    "rate": Limits(rate=8.0, burst=3.5, weights=DISTINCT, tenant_rate=3.0, tenant_burst=2.0),
    "concurrency": Limits(concurrency=3, weights=WEIGHTS),
    "leases": Limits(rate=8.0, burst=4.0, weights=WEIGHTS),
}


@pytest.fixture
def client(clean_redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = clean_redis_server.client()
    yield client
    client.close()


def r6(x: float) -> float:
    return round(x, 6)


def norm(d: Any) -> Any:
    """A decision or event with its numbers rounded (the scripts' replies carry 17 digits)."""
    if isinstance(d, Admit):
        return ("admit", d.degraded, d.lease)
    if isinstance(d, Enqueue):
        return ("queue", r6(d.deadline), r6(d.estimated_wait_s))
    if isinstance(d, Reject):
        return ("reject", d.reason, r6(d.retry_after_s))
    if isinstance(d, Granted):
        return ("granted", d.id, r6(d.waited_s), d.lease)
    if isinstance(d, Evicted):
        return ("evicted", d.id, norm(d.reject))
    return d  # None: a cancel of a request no longer waiting


class Side:
    """One implementation behind the driver's three calls."""

    def __init__(self, make: str, client: redis.Redis, limits: Limits, policy: Policy) -> None:
        self.make = make
        self.limits = limits
        self.policy = policy
        if make == "python":
            self.py: Scheduler | None = Scheduler(limits, policy, 0.0)
        else:
            self.py = None
            self.lua = LuaScheduler(client, limits, policy, 0.0, functions=make == "fcall")

    def call(self, now: float, ops: list[tuple[str, Any]]) -> tuple[list[Any], list[Any]]:
        """One call of at most WORK_CHECK operations: their decisions, and the events."""
        assert len(ops) <= WORK_CHECK
        if self.py is not None:
            replies: list[Any] = []
            events: list[Any] = []
            for kind, arg in ops:
                if kind == "acquire":
                    decision, evs = self.py.acquire(now, arg)
                    replies.append(decision)
                elif kind == "cancel":
                    cancelled, evs = self.py.cancel(now, arg)
                    replies.append(cancelled)
                elif kind == "release":
                    evs = self.py.release(now, arg)
                    replies.append(None)
                else:
                    evs = self.py.tick(now)
                    replies.append(None)
                events.extend(evs)
            return replies, events
        lines: list[str] = []
        for kind, arg in ops:
            if kind == "acquire":
                tail = protocol.acquire_tail(
                    arg, self.limits.weight(arg.tenant), self.policy.max_wait_s[arg.priority]
                )
                lines.append(protocol.acquire_op(arg.id, tail))
            elif kind == "cancel":
                lines.append(protocol.cancel_op(arg))
            elif kind == "release":
                lines.append(protocol.release_op(arg))
            else:
                lines.append(protocol.TICK)
        if len(ops) == 1 and ops[0][0] == "release":  # a release alone: release.lua
            self.lua._leases.add(ops[0][1])
            return [None], self.lua.release(now, ops[0][1])
        results, events = self.lua._call(now, lines)
        assert protocol.DEFERRED not in results, results
        replies = []
        for (kind, _), line in zip(ops, results, strict=False):
            if kind == "acquire":
                replies.append(protocol.decode_acquire(line))
            elif kind == "cancel":
                told = protocol.decode_cancel(line)  # (AlreadyAdmitted: Python's None)
                replies.append(told if isinstance(told, Reject) else None)
            else:
                replies.append(None)
        return replies, events

    def lease(self, now: float, held: HeldLease, wants: int, charges: list[LeaseCharge]) -> Any:
        if self.py is not None:
            return self.py.lease_tokens(now, 0.3, held, wants, charges)
        return self.lua.lease_tokens(now, 0.3, held, wants, charges)

    def state(self, now: float) -> tuple[Any, ...]:
        """What must agree between calls: tokens, in flight, queued by priority, tenants.
        (Python's tokens refilled to `now` on a copy, as snapshot.lua reads them.)"""
        if self.py is not None:
            busy = sum(1 for t in self.py._tenants.values() if t.state != IDLE)
            assert self.py._busy == busy  # (max_tenants' count: the tenants with waiters)
            python = copy.deepcopy(self.py)
            python._refill(now)
            snap = python.snapshot()
        else:
            snap = self.lua.snapshot()
        tokens = None if snap.tokens is None else r6(snap.tokens)
        return (tokens, snap.in_flight, snap.queued_by_priority, snap.tenants)


def run(
    client: redis.Redis,
    make: str,
    seed: int,
    limits: str,
    steps: int = 200,
    policy: Policy = POLICY,
    per_call: int = WORK_CHECK,
) -> list[Any]:
    """One random run (by `seed`) on one side: every decision, event and state, in order.
    The run's choices follow its own replies (who waits, who holds a lease), so the three
    runs make the same calls until they first differ: the assertion shows that call."""
    rng = random.Random(seed)
    side = Side(make, client, LIMITS[limits], policy)
    waiting: dict[str, float] = {}  # request id: its deadline
    held: list[str] = []
    done: list[str] = []  # released or granted-then-cancelled ids, for stale operations
    seen: list[Any] = []
    now = 0.0
    lease = HeldLease()

    def record(step: Any, at: float, ops: list[tuple[str, Any]], tick: bool) -> None:
        replies, events = [], []
        for i in range(0, len(ops), per_call):
            got, evs = side.call(at, ops[i : i + per_call])
            replies.extend(got)
            events.extend(evs)
        if tick:
            events = events + side.call(at, [("tick", None)])[1]
        seen.append((step, r6(at), [norm(r) for r in replies], [norm(e) for e in events]))
        seen.append((step, "state", side.state(at)))
        for event in events:
            waiting.pop(event.id, None)
            if isinstance(event, Granted) and event.lease:
                held.append(event.id)
        for (kind, arg), reply in zip(ops, replies, strict=True):
            if kind != "acquire":
                continue
            if isinstance(reply, Enqueue):
                waiting[arg.id] = reply.deadline
            elif isinstance(reply, Admit) and reply.lease:
                held.append(arg.id)

    for step in range(steps):
        before = now
        now += rng.choice([0.004, 0.02, 0.05, 0.12, 0.5])
        # Waiters past their deadline: cancelled by their caller at it (the backend's rule).
        # (All those due within EPS of the first together: Python's tick evicts them.)
        while due := sorted((d, rid) for rid, d in waiting.items() if d <= now + EPS):
            at = max(before, min(due[0][0], now))
            gone = [rid for d, rid in due if d <= at + EPS]
            for rid in gone:
                del waiting[rid]
            record((step, "deadline"), at, [("cancel", rid) for rid in gone], rng.random() < 0.5)
        if limits == "leases" and rng.random() < 0.15:
            # (None at times: a renewal charging nothing runs no sweep, and leases nothing
            # while one is due, on both sides: parity5)
            charges = [
                LeaseCharge(rng.choice(NAMES), rng.choice([1, 2]), 1)
                for _ in range(rng.choice([0, 0, 1, 2]))
            ]
            grant = side.lease(now, lease, rng.choice([0, 1, 2]), charges)
            lease = HeldLease(grant.generation, grant.until, size=grant.kept + grant.taken)
            seen.append((step, "lease", grant.taken, grant.kept, r6(grant.until)))
            seen.append((step, "state", side.state(now)))
            continue
        ops: list[tuple[str, Any]] = []
        for n in range(rng.randint(1, WORK_CHECK)):
            kind = rng.random()
            if kind < 0.6 or not (waiting or held):
                rid = f"r{step}.{n}"
                shed = rng.random() < 0.08
                req = Request(
                    rid,
                    rng.choice(NAMES),
                    priority=rng.choice(PRIORITIES),
                    cost=rng.choice([1, 1, 1, 2, 3, 5]),
                    sheddable=shed,
                    degradable=shed and rng.random() < 0.5,
                )
                ops.append(("acquire", req))
            elif kind > 0.97 and (done or held):
                # A stale one: a release again, or a cancel racing the grant of a held one.
                if done and (kind < 0.985 or not held):
                    ops.append(("release", rng.choice(done)))
                else:
                    ops.append(("cancel", rng.choice(held)))
            elif held and (kind < 0.8 or not waiting):
                rid = held.pop(rng.randrange(len(held)))
                done.append(rid)
                ops.append(("release", rid))
            else:
                rid = rng.choice(sorted(waiting))
                del waiting[rid]
                ops.append(("cancel", rid))
        record(step, now, ops, rng.random() < 0.5)
    return seen


def first_difference(a: list[Any], b: list[Any]) -> str | None:
    """The first entry in which two runs differ, with both sides, or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"entry {i}:\n  {x}\n  {y}"
    return None if len(a) == len(b) else "lengths"


def test_the_names_sort_as_their_digests() -> None:
    """Tenants last used at the same time leave by name in Python, by digest in the idle
    list: this test's names are in the same order both ways (the module docstring)."""
    assert sorted(NAMES) == sorted(NAMES, key=keys.tenant_digest) == NAMES


@pytest.mark.parametrize("forget", [False, True], ids=["kept", "forgotten"])
@pytest.mark.parametrize("limits", sorted(LIMITS))
@pytest.mark.parametrize("seed", range(3))
def test_python_fcall_and_evalsha_decide_alike(
    client: redis.Redis, seed: int, limits: str, forget: bool
) -> None:
    """The same calls at the same times: the same replies, events and state from all three
    (FCALL's run skipped on a Redis without functions: 6.2). With tenants forgotten, calls
    of one operation (the module docstring)."""
    policy, per_call = (FORGET, 1) if forget else (POLICY, WORK_CHECK)
    python = run(client, "python", seed, limits, policy=policy, per_call=per_call)
    evalsha = run(client, "evalsha", seed, limits, policy=policy, per_call=per_call)
    assert first_difference(python, evalsha) is None
    if redis_version(client) >= (7, 0):
        fcall = run(client, "fcall", seed, limits, policy=policy, per_call=per_call)
        assert first_difference(python, fcall) is None
    if forget:  # (tenants forgotten: their count falls between two calls)
        counts = [entry[2][3] for entry in python if entry[1] == "state"]
        assert any(b < a for a, b in itertools.pairwise(counts))
