"""The scheduling rules, checked exactly with a fake clock (no sleeps).

Every rule is checked on both implementations: the Python scheduler the
in-memory backend runs, and the Lua scripts the Redis backend runs (in a real
redis-server, with the scripts' test-only clock). Fair shares are compared with
an independent max-min oracle. Runs are deterministic (fixed seeds), so the
bounds below are exact results, not hopes. The long multi-seed stories run on
the Python scheduler; one story compares both implementations decision by
decision.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from tests.support.fairness import max_min_shares
from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from tests.support.simulation import Arrival, Outcome, Simulation, even, poisson
from throttle_mw.priorities import PRIORITIES, Priority
from throttle_mw.scheduler import (
    Admit,
    Enqueue,
    Evicted,
    Granted,
    Limits,
    Policy,
    Reject,
    Request,
    Scheduler,
)
from throttle_mw.scheduler.constants import EPS, WINDOW_S
from throttle_mw.settings import DEFAULT_MAX_WAIT_S

RATE = 80.0
TOKEN_INTERVAL = 1.0 / RATE
WARMUP, END = 5.0, 35.0  # steady window: after start-up, before the load stops


def policy(max_wait_s: Mapping[Priority, float] | None = None, **kwargs: Any) -> Policy:
    """The default policy, with some maximum waits or other fields replaced."""
    return Policy({**DEFAULT_MAX_WAIT_S, **(max_wait_s or {})}, **kwargs)


Make = Callable[[Limits, Policy], Any]


@pytest.fixture(params=["python", pytest.param("lua", marks=pytest.mark.redis)])
def make(request: pytest.FixtureRequest) -> Iterator[Make]:
    """A scheduler factory for each implementation of the rules."""
    if request.param == "python":
        yield lambda limits, pol: Scheduler(limits, pol, 0.0)
        return
    server = request.getfixturevalue("redis_server_session")
    client = server.client()
    yield lambda limits, pol: LuaScheduler(client, limits, pol, 0.0)
    client.close()


def python(limits: Limits, pol: Policy) -> Scheduler:
    return Scheduler(limits, pol, 0.0)


def run(
    limits: Limits, arrivals: Iterable[Arrival], make: Make = python, **policy_kwargs: Any
) -> list[Outcome]:
    return Simulation(make(limits, policy(**policy_kwargs))).run(arrivals)


def served_rate(
    outcomes: Sequence[Outcome], tenant: str, lo: float = WARMUP, hi: float = END
) -> float:
    """Admissions per second by admission time inside [lo, hi)."""
    n = sum(
        1
        for o in outcomes
        if o.arrival.tenant == tenant and o.admitted_at is not None and lo <= o.admitted_at < hi
    )
    return n / (hi - lo)


def demand_rate(
    outcomes: Sequence[Outcome], tenant: str, lo: float = WARMUP, hi: float = END
) -> float:
    n = sum(1 for o in outcomes if o.arrival.tenant == tenant and lo <= o.arrival.at < hi)
    return n / (hi - lo)


def waits(outcomes: Sequence[Outcome], tenants: str, since: float = WARMUP) -> list[float]:
    return sorted(
        o.waited_s
        for o in outcomes
        if o.arrival.tenant in tenants and o.arrival.at >= since and o.waited_s is not None
    )


def busiest_window(times: Sequence[float], window: float) -> int:
    """Most events in any half-open window of this length (times sorted)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def story(kind: str, seed: int, duration: float = 40.0) -> list[Arrival]:
    """SurveyTool's busy day: A 10/s, B 30/s, C 150/s against a budget of 80/s."""
    rng = random.Random(seed)
    if kind == "even":
        return [
            *even("A", 10, 0, duration, phase=rng.random() / 10),
            *even("B", 30, 0, duration, phase=rng.random() / 30),
            *poisson("C", 150, 0, duration, rng),
        ]
    return [
        *poisson("A", 10, 0, duration, rng),
        *poisson("B", 30, 0, duration, rng),
        *poisson("C", 150, 0, duration, rng),
    ]


# --- the story ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["even", "poisson"])
def test_story_shares_match_the_oracle(kind: str, seed: int) -> None:
    out = run(Limits(rate=RATE, burst=16), story(kind, seed))
    demands = {t: demand_rate(out, t) for t in "ABC"}
    owed = max_min_shares(RATE, demands)
    for tenant in "ABC":
        assert served_rate(out, tenant) == pytest.approx(owed[tenant], abs=0.03 * RATE), tenant
    # A and B lose nothing; the total is the budget, never more.
    assert all(o.admitted_at is not None for o in out if o.arrival.tenant in "AB")
    total = sum(served_rate(out, t) for t in "ABC")
    assert total == pytest.approx(RATE, rel=0.01)
    admitted = sorted(o.admitted_at for o in out if o.admitted_at is not None)
    for window in (0.1, 1.0, 5.0):
        assert busiest_window(admitted, window) <= RATE * window + 16


@pytest.mark.parametrize("seed", range(3))
def test_story_even_arrivals_never_wait_beyond_one_token(seed: int) -> None:
    out = run(Limits(rate=RATE, burst=16), story("even", seed))
    assert max(waits(out, "AB")) <= TOKEN_INTERVAL + 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_story_poisson_bursts_go_ahead_of_the_flood(seed: int) -> None:
    """Banked credit lets B's Poisson bursts above its share pass C's flood."""
    out = run(Limits(rate=RATE, burst=16), story("poisson", seed))
    w = waits(out, "AB")
    beyond = sum(1 for x in w if x > TOKEN_INTERVAL + 1e-9)
    assert w[int(len(w) * 0.99)] <= TOKEN_INTERVAL
    assert beyond <= 0.002 * len(w)
    assert w[-1] <= 0.25


def test_story_without_credit_makes_b_queue_behind_the_flood() -> None:
    """The same run with no banked credit: B's bursts wait behind C (why credit exists)."""
    with_credit = waits(run(Limits(rate=RATE, burst=16), story("poisson", 4)), "B")
    without = waits(run(Limits(rate=RATE, burst=16), story("poisson", 4), credit_s=0.0), "B")
    assert without[int(len(without) * 0.99)] > 5 * max(
        TOKEN_INTERVAL, with_credit[int(len(with_credit) * 0.99)]
    )


def test_c_alone_gets_the_whole_budget() -> None:
    """Work-conserving: no per-tenant cap unless configured."""
    out = run(Limits(rate=RATE, burst=16), poisson("C", 150, 0, 40, random.Random(1)))
    assert served_rate(out, "C") == pytest.approx(RATE, rel=0.01)


# --- fairness ---------------------------------------------------------------------------


def test_weights_split_a_saturated_budget_1_2_4() -> None:
    rng = random.Random(7)
    arrivals = [a for t in "XYZ" for a in poisson(t, 100, 0, 40, rng)]
    out = run(Limits(rate=70, burst=14, weights={"X": 1, "Y": 2, "Z": 4}), arrivals)
    rates = {t: served_rate(out, t) for t in "XYZ"}
    assert rates["X"] == pytest.approx(10, rel=0.05)
    assert rates["Y"] == pytest.approx(20, rel=0.05)
    assert rates["Z"] == pytest.approx(40, rel=0.05)


def test_tenant_under_its_share_gets_all_it_asks() -> None:
    rng = random.Random(3)
    arrivals = [
        *poisson("D", 5, 0, 40, rng),
        *poisson("E", 100, 0, 40, rng),
        *poisson("F", 100, 0, 40, rng),
    ]
    out = run(Limits(rate=60, burst=12), arrivals)
    assert all(o.admitted_at is not None for o in out if o.arrival.tenant == "D")
    owed = max_min_shares(60, {t: demand_rate(out, t) for t in "DEF"})
    for tenant in "DEF":
        assert served_rate(out, tenant) == pytest.approx(owed[tenant], abs=1.5)


@pytest.mark.parametrize("seed", range(4))
def test_random_demands_and_weights_match_the_oracle(seed: int) -> None:
    rng = random.Random(100 + seed)
    tenants = [f"t{i}" for i in range(5)]
    demand = {t: rng.choice([2.0, 8.0, 20.0, 60.0, 120.0]) for t in tenants}
    weights = {t: float(rng.choice([1, 2, 3])) for t in tenants}
    arrivals = [a for t in tenants for a in poisson(t, demand[t], 0, 40, rng)]
    out = run(Limits(rate=100, burst=20, weights=weights), arrivals)
    owed = max_min_shares(100, {t: demand_rate(out, t) for t in tenants}, weights)
    for tenant in tenants:
        assert served_rate(out, tenant) == pytest.approx(
            owed[tenant], abs=max(1.5, 0.05 * owed[tenant])
        )


def test_a_critical_flood_cannot_starve_another_tenants_normal_traffic() -> None:
    rng = random.Random(5)
    arrivals = [
        *poisson("flood", 200, 0, 60, rng, priority="critical"),
        *even("quiet", 10, 0, 60, phase=0.003),
    ]
    out = run(Limits(rate=RATE, burst=16), arrivals)
    quiet = waits(out, "quiet")
    assert all(o.admitted_at is not None for o in out if o.arrival.tenant == "quiet")
    assert max(quiet) <= TOKEN_INTERVAL + 1e-9
    assert served_rate(out, "flood") == pytest.approx(RATE - 10, abs=1.0)


# --- priority -------------------------------------------------------------------------------


def test_priority_order_within_a_tenant(make: Make) -> None:
    """No low request of C is admitted while one of C's critical requests waits."""
    rng = random.Random(11)
    arrivals = [
        *poisson("C", 30, 0, 30, rng, priority="critical"),
        *poisson("C", 30, 0, 30, rng, priority="low"),
    ]
    out = run(Limits(rate=40, burst=4), arrivals, make)
    critical = [o for o in out if o.arrival.priority == "critical"]
    low = [o for o in out if o.arrival.priority == "low"]
    for o in low:
        if o.admitted_at is None:
            continue
        for c in critical:
            if c.arrival.at < o.admitted_at:
                assert c.admitted_at is not None or c.rejected_at is not None
                assert (c.admitted_at or c.rejected_at or 0) <= o.admitted_at
    assert all(o.admitted_at is not None for o in critical)
    assert sum(o.admitted_at is not None for o in low) < len(low)


def test_higher_priority_is_served_first_across_the_queue(make: Make) -> None:
    scheduler = make(Limits(rate=1, burst=1), policy({"low": 10.0}))
    decision, _ = scheduler.acquire(0.0, Request("first", "C"))
    assert isinstance(decision, Admit)
    for i, prio in enumerate(["low", "normal", "high", "critical"]):
        decision, _ = scheduler.acquire(0.0, Request(f"r{i}", "C", prio))  # type: ignore[arg-type]
        assert isinstance(decision, Enqueue)
    order = []
    for t in (1.0, 2.0, 3.0, 4.0):
        order += [e.id for e in scheduler.tick(t) if isinstance(e, Granted)]
    assert order == ["r3", "r2", "r1", "r0"]


# --- caps, costs, budgets ---------------------------------------------------------------------


def test_tenant_rate_cap_holds_even_with_free_capacity(make: Make) -> None:
    rng = random.Random(2)
    arrivals = [*poisson("capped", 50, 0, 30, rng), *even("other", 4, 0, 30)]
    out = run(Limits(rate=1000, burst=100, tenant_rate=5, tenant_burst=2), arrivals, make)
    times = sorted(
        o.admitted_at for o in out if o.arrival.tenant == "capped" and o.admitted_at is not None
    )
    for window in (0.5, 1.0, 5.0):
        assert busiest_window(times, window) <= 5 * window + 2
    assert served_rate(out, "capped", 5, 25) == pytest.approx(5, abs=0.25)
    assert all(o.admitted_at == o.arrival.at for o in out if o.arrival.tenant == "other")
    rejected = [o.rejected for o in out if o.rejected is not None]
    assert rejected
    assert {r.reason for r in rejected} == {"tenant_rate_cap"}
    assert all(r.status == 429 for r in rejected)


def test_cost_takes_that_many_tokens_and_slots(make: Make) -> None:
    scheduler = make(Limits(rate=10, burst=4, concurrency=4), policy())
    decision, _ = scheduler.acquire(0.0, Request("big", "T", cost=3))
    assert isinstance(decision, Admit)
    assert scheduler.in_flight == 3
    decision, _ = scheduler.acquire(0.0, Request("two", "T", cost=2))
    assert isinstance(decision, Enqueue)
    assert [e.id for e in scheduler.release(0.5, "big") if isinstance(e, Granted)] == ["two"]


def test_concurrency_and_rate_budgets_together(make: Make) -> None:
    rng = random.Random(9)
    arrivals = [Arrival(a.at, a.tenant, service_s=0.2) for a in poisson("T", 100, 0, 15, rng)]
    simulation = Simulation(make(Limits(rate=50, burst=5, concurrency=4), policy()))
    out = simulation.run(arrivals)
    assert simulation.max_in_service <= 4
    times = sorted(o.admitted_at for o in out if o.admitted_at is not None)
    assert busiest_window(times, 1.0) <= 50 + 5
    assert served_rate(out, "T", 3, 13) == pytest.approx(4 / 0.2, rel=0.03)


def test_a_queued_request_says_whether_the_concurrency_limit_held_it(make: Make) -> None:
    """`Enqueue.limited` (a learned limit's `Sample.waited`): the limit was full for it
    when it queued; not when it queued only for rate tokens or its tenant's cap while
    the limit had room (branch carry2)."""
    # Rate tokens short, the limit with room: not limited.
    paced = make(Limits(rate=10, burst=1, concurrency=4), policy())
    assert isinstance(paced.acquire(0.0, Request("a", "T"))[0], Admit)
    decision, _ = paced.acquire(0.0, Request("b", "T"))
    assert isinstance(decision, Enqueue)
    assert not decision.limited
    # The tenant's cap short, the limit with room: not limited.
    capped = make(Limits(concurrency=4, tenant_rate=10, tenant_burst=1), policy())
    assert isinstance(capped.acquire(0.0, Request("a", "T"))[0], Admit)
    decision, _ = capped.acquire(0.0, Request("b", "T"))
    assert isinstance(decision, Enqueue)
    assert not decision.limited
    # The limit full (tokens to spare): limited; and behind it, one more.
    full = make(Limits(rate=100, burst=10, concurrency=2), policy())
    for rid in ("a", "b"):
        assert isinstance(full.acquire(0.0, Request(rid, "T"))[0], Admit)
    for rid, tenant in (("c", "T"), ("d", "U")):
        decision, _ = full.acquire(0.0, Request(rid, tenant))
        assert isinstance(decision, Enqueue)
        assert decision.limited
    # A cost that does not fit the room left: limited too.
    wide = make(Limits(concurrency=4), policy())
    assert isinstance(wide.acquire(0.0, Request("a", "T", cost=3))[0], Admit)
    decision, _ = wide.acquire(0.0, Request("b", "T", cost=2))
    assert isinstance(decision, Enqueue)
    assert decision.limited


@pytest.mark.parametrize("rate", [None, 100.0], ids=["concurrency", "rate-and-concurrency"])
def test_a_queue_s_first_window_is_the_one_whose_estimates_miss_the_limit(
    make: Make, rate: float | None
) -> None:
    """The queue-wait estimate knows no service time, so not what a concurrency limit
    admits a second: until the queue's first window is measured (WINDOW_S) it goes by the
    rate (or by nothing), and requests the limit cannot serve in their maximum wait queue,
    then expire at it. The harm's bound (branch carry2, measured, not changed): only
    arrivals of that first window, each waiting its maximum and no longer; from the
    measured window on, the hopeless are rejected at arrival. 2 slots of 0.5 s (4/s),
    20 arrivals a second, 2 s of maximum wait."""
    simulation = Simulation(
        make(Limits(rate=rate, burst=10, concurrency=2), policy(dict.fromkeys(PRIORITIES, 2.0)))
    )
    out = simulation.run([Arrival(i / 20, "T", service_s=0.5) for i in range(160)])
    queue_formed = 0.1  # (the third arrival: two slots)
    expired = [o for o in out if o.rejected is not None and o.rejected_at != o.arrival.at]
    assert expired  # (the miss is real: 8 or 9 of the first window's 20)
    for o in expired:
        assert o.arrival.at < queue_formed + WINDOW_S + EPS
        assert o.rejected_at is not None
        assert o.rejected_at - o.arrival.at <= 2.0 + EPS
    assert all(o.waited_s <= 2.0 + EPS for o in out if o.waited_s is not None)
    later = [o for o in out if o.arrival.at >= queue_formed + WINDOW_S + EPS]
    assert sum(o.rejected is not None and o.rejected_at == o.arrival.at for o in later) >= 100


def test_concurrency_budget_alone_is_work_conserving(make: Make) -> None:
    rng = random.Random(4)
    arrivals = [Arrival(a.at, a.tenant, service_s=0.1) for a in poisson("C", 120, 0, 12, rng)]
    simulation = Simulation(make(Limits(concurrency=8), policy()))
    out = simulation.run(arrivals)
    assert simulation.max_in_service == 8
    assert served_rate(out, "C", 3, 10) == pytest.approx(80, rel=0.02)


# --- waiting, early rejection, queue limits -------------------------------------------------------


def test_no_request_waits_beyond_its_maximum() -> None:
    rng = random.Random(8)
    arrivals = [
        *poisson("C", 150, 0, 30, rng, priority="critical"),
        *poisson("C", 150, 0, 30, rng, priority="low"),
        *poisson("D", 60, 0, 30, rng, priority="normal"),
    ]
    out = run(Limits(rate=RATE, burst=16), arrivals, tenant_queue_limit=1000)
    for o in out:
        limit = DEFAULT_MAX_WAIT_S[o.arrival.priority]
        if o.waited_s is not None:
            assert o.waited_s <= limit + 1e-9
        if o.rejected_at is not None:
            assert o.rejected_at - o.arrival.at <= limit + 1e-9


def test_hopeless_requests_are_rejected_at_once_with_an_honest_retry_after(make: Make) -> None:
    scheduler = make(Limits(rate=10, burst=1), policy(max_wait_s={"normal": 1.0}))
    outcomes = [scheduler.acquire(0.0, Request(str(i), "T"))[0] for i in range(30)]
    assert isinstance(outcomes[0], Admit)
    queued = [d for d in outcomes if isinstance(d, Enqueue)]
    rejected = [d for d in outcomes if isinstance(d, Reject)]
    assert len(queued) == 10
    assert all(d.estimated_wait_s <= 1.0 + 1e-9 for d in queued)
    assert len(rejected) == 19
    assert {r.status for r in rejected} == {429}
    # Each would have waited 1.1 s (rejected ones never join the queue): 0.1 s too long.
    assert all(r.retry_after_s == pytest.approx(0.1) for r in rejected)
    assert all(r.retry_after_header == 1 for r in rejected)


@pytest.mark.parametrize(
    "limits",
    [Limits(rate=150, burst=30, concurrency=2), Limits(concurrency=2)],
    ids=["rate-and-concurrency", "concurrency"],
)
def test_a_rate_measured_over_an_idle_window_rejects_no_one_at_arrival(
    make: Make, limits: Limits
) -> None:
    """The stopped-fleet test's run (docs/performance.md, branch keysflake), exactly: one
    admission, then 1.5 s idle; the holders' call closes that window, whose virtual clock
    moved 1 in 1.5 s. Two requests of a new tenant queue behind the held slots: measured
    over that window, the second one's 2 virtual units ahead took 3 s, over its 2 s, and
    it was rejected at arrival (429 tenant_over_share). Nobody waited in that window: the
    clock's speed then was the demand, not the fair rate, and says nothing of the wait.
    Both queue; they leave at their deadline if the slots are still held then."""
    scheduler = make(limits, policy(max_wait_s={"normal": 2.0}))
    assert isinstance(scheduler.acquire(0.0, Request("a", "A"))[0], Admit)
    scheduler.release(0.01, "a")
    for i in range(2):
        assert isinstance(scheduler.acquire(1.5, Request(f"h{i}", f"holder-{i}"))[0], Admit)
    waiters = [scheduler.acquire(1.5, Request(f"w{i}", "waiter"))[0] for i in range(2)]
    assert [type(d) for d in waiters] == [Enqueue, Enqueue], waiters
    assert scheduler.waiting == 2
    assert all(scheduler.cancel(3.5, f"w{i}")[0] is not None for i in range(2))  # still waiting


def test_a_drained_queues_rate_rejects_no_one_in_the_next_queue(make: Make) -> None:
    """X (weight 20) keeps a queue for 2 s, served 20 a second: the virtual clock moves
    1/s, measured while X waits. X's queue drains; two holders take the slots and a new
    tenant's two requests queue behind them. At 1/s the second one's 2 virtual units ahead
    took 2 s, over its 1.5 s: rejected at arrival, by the contention of a queue that is
    gone (X's share). The queue that forms drops that rate: both queue."""
    limits = Limits(rate=200, burst=20, concurrency=2, weights={"X": 20.0})
    scheduler = make(limits, policy(max_wait_s={"normal": 1.5}))
    for i in range(2):
        assert isinstance(scheduler.acquire(0.0, Request(f"x{i}", "X"))[0], Admit)
    for i in range(2, 50):
        assert isinstance(scheduler.acquire(0.0, Request(f"x{i}", "X"))[0], Enqueue)
    running = ["x0", "x1"]
    for k in range(1, 21):  # each pair runs 0.1 s
        t = round(0.1 * k, 6)
        granted = [e.id for r in running for e in scheduler.release(t, r) if isinstance(e, Granted)]
        assert len(granted) == 2
        running = granted
    for i in range(42, 50):  # X's waiters go away: its queue drains
        assert scheduler.cancel(2.05, f"x{i}")[0] is not None
    assert scheduler.waiting == 0
    for r in running:
        scheduler.release(2.1, r)
    for i in range(2):
        assert isinstance(scheduler.acquire(2.1, Request(f"h{i}", f"holder-{i}"))[0], Admit)
    waiters = [scheduler.acquire(2.1, Request(f"w{i}", "waiter"))[0] for i in range(2)]
    assert [type(d) for d in waiters] == [Enqueue, Enqueue], waiters


def test_a_queue_that_moves_too_slowly_still_rejects_at_arrival(make: Make) -> None:
    """What the rule above keeps: one slot, X's requests each held 0.5 s and X always
    waiting, so the windows are measured, 2 virtual units a second. A new tenant's fifth
    request has 5 units ahead of it (its tag 1 ahead of the clock, then its four before it),
    2.5 s at that speed, over its 2 s: rejected at arrival, the first four queued."""
    scheduler = make(Limits(concurrency=1), policy(max_wait_s={"normal": 2.0}))
    assert isinstance(scheduler.acquire(0.0, Request("x0", "X"))[0], Admit)
    for i in range(1, 8):
        assert isinstance(scheduler.acquire(0.0, Request(f"x{i}", "X"))[0], Enqueue)
    for k in range(4):  # x0..x3 run 0.5 s each
        granted = scheduler.release(0.5 * (k + 1), f"x{k}")
        assert [e.id for e in granted if isinstance(e, Granted)] == [f"x{k + 1}"]
    decisions = [scheduler.acquire(2.0, Request(f"y{i}", "Y"))[0] for i in range(5)]
    assert [type(d) for d in decisions] == [Enqueue] * 4 + [Reject], decisions
    assert [d.estimated_wait_s for d in decisions[:4]] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    last = decisions[4]
    assert isinstance(last, Reject)
    assert last.reason == "tenant_over_share"
    assert last.retry_after_s == pytest.approx(0.5)


@pytest.mark.parametrize("calm_s", [2.0, 5.0])
def test_banked_credit_outlasts_a_calm_spell_with_slots_alone(make: Make, calm_s: float) -> None:
    """One slot, no rate. X keeps a queue for 2 s (five waiting, each held 0.1 s), Y sends
    one request in it: Y is under its share, its tag falls behind the clock. After a calm
    spell X queues two and Y two: Y's go first, on its banked credit. A queue that forms
    drops the fair rate measured before (branch idlerate); after 5 s (over `STALE_WINDOWS`
    windows) the throughput is stale too, and with no fair rate the credit was 0: Y's first
    admission started at the clock and its second went after X's (docs/performance.md,
    branch idlerate2). The last throughput measured bounds the credit then."""
    scheduler = make(Limits(concurrency=1), policy())
    for i in range(6):
        scheduler.acquire(0.0, Request(f"x{i}", "X"))
    running, queued, n = "x0", {f"x{i}" for i in range(1, 6)}, 6
    for k in range(1, 21):
        t = round(0.1 * k, 6)
        if k == 10:
            assert isinstance(scheduler.acquire(0.95, Request("y", "Y"))[0], Enqueue)
            queued.add("y")
        granted = [e.id for e in scheduler.release(t, running) if isinstance(e, Granted)]
        assert len(granted) == 1
        running = granted[0]
        queued.discard(running)
        if running.startswith("x"):
            scheduler.acquire(t, Request(f"x{n}", "X"))
            queued.add(f"x{n}")
            n += 1
    assert "y" not in queued
    for request_id in sorted(queued):
        assert scheduler.cancel(2.0, request_id)[0] is not None
    scheduler.release(2.0, running)
    at = 2.0 + calm_s
    assert isinstance(scheduler.acquire(at, Request("x-a", "X"))[0], Admit)
    for request_id, tenant in (("x-b0", "X"), ("x-b1", "X"), ("y-0", "Y"), ("y-1", "Y")):
        assert isinstance(scheduler.acquire(at + 0.001, Request(request_id, tenant))[0], Enqueue)
    order, running = [], "x-a"
    for k in range(1, 5):
        granted = [e.id for e in scheduler.release(at + 0.1 * k, running) if isinstance(e, Granted)]
        running = granted[0]
        order.append(running)
    assert order == ["y-0", "y-1", "x-b0", "x-b1"]


class _Missed(AssertionError):
    """What the tests below show: a rejection at arrival that the waits contradict."""


@pytest.mark.xfail(raises=_Missed, reason="leftover (a): slots are not in the first estimate")
@pytest.mark.parametrize(
    "limits",
    [Limits(rate=200, burst=20, concurrency=2), Limits(concurrency=2)],
    ids=["rate-and-concurrency", "concurrency"],
)
def test_a_new_queue_held_by_its_slots_rejects_at_arrival_who_cannot_leave_in_time(
    make: Make, limits: Limits
) -> None:
    """Leftover (a) of branch idlerate (docs/performance.md, branch idlerate2). Every
    request holds its slot 0.8 s: five calm ones, then 9 s of nothing; then B sends eight
    within 0.07 s, at most 1 s each to wait. Two go at once, two more when those finish
    (0.8 s later), the other four not before 1.6 s: an exact estimate rejects those four at
    arrival. The queue's first second goes by the rate (200 a second: a few ms each) or,
    with slots alone after the calm spell, by nothing (0: no fair-rate term): all six queue,
    and four expire after their full second (503 instead of a clean 429 at arrival)."""
    scheduler = make(limits, policy(max_wait_s={"normal": 1.0}))
    for k in range(5):
        assert isinstance(scheduler.acquire(float(k), Request(f"c{k}", "calm"))[0], Admit)
        scheduler.release(k + 0.8, f"c{k}")
    decisions = [scheduler.acquire(10.0 + 0.01 * i, Request(f"b{i}", "B"))[0] for i in range(8)]
    admitted = [type(d) for d in decisions[:2]]
    assert admitted == [Admit, Admit], decisions
    granted = [e.id for r in ("b0", "b1") for e in scheduler.release(10.8, r)]
    assert granted == ["b2", "b3"], granted  # waited 0.78 s and 0.77 s: within their 1 s
    # The slots are held to 11.6 s: those queued are cancelled at their deadlines, 1 s after
    # arrival, still waiting (as the backends cancel theirs).
    expired = [
        f"b{i}"
        for i, d in enumerate(decisions)
        if isinstance(d, Enqueue) and scheduler.cancel(d.deadline, f"b{i}")[0] is not None
    ]
    if expired:
        raise _Missed(f"queued, then expired after 1 s: {expired}; {decisions}")


class _Queued(Scheduler):
    """The scheduler with one request's estimate 0: it queues whatever its estimate."""

    forced = ""

    def _estimate(self, tenant: Any, rank: int, now: float, waiter: Any = None) -> Any:
        if waiter is not None and waiter.id == self.forced:
            return 0.0, "overloaded"
        return super()._estimate(tenant, rank, now, waiter)


@pytest.mark.xfail(raises=_Missed, reason="leftover (b): credit holds the measured clock back")
def test_tenants_served_on_credit_make_no_one_rejected_at_arrival_who_would_go(
    make: Make,
) -> None:
    """Leftover (b) of branch idlerate: the stopped-fleet test's traffic, open loop (300
    tenants, three requests each 0.3 s apart, rate 200, concurrency 2, 5-15 ms each).
    Within one queue, the returning tenants are served on banked credit, which leaves the
    virtual clock where it is: measured then it moved 1.0 a second while the budget served
    ~195, and a tenant with two requests in line had its third 3 units away, 2-3 s at that
    speed, over its 1.5 s: rejected at arrival, while the whole queue drained in ~1.2 s.
    Each rejection is checked by running the same arrivals again on the Python scheduler
    with that request queued instead: it is admitted within its wait, and one more request
    is admitted in all (bench/arrivalestimate.py, scenario ``credit``: 80 of 5,400 on six
    seeds; this seed: 5 of 900)."""
    rng = random.Random(5)
    arrivals = []
    for i in range(300):
        t0 = rng.uniform(0, 3)
        for k in range(3):
            at = t0 + 0.3 * k + 0.001 * rng.random()
            arrivals.append(Arrival(at, f"t{i}", service_s=0.005 + 0.01 * rng.random()))
    arrivals.sort(key=lambda a: a.at)
    limits = Limits(rate=200, burst=20, concurrency=2)
    pol = policy(max_wait_s={"normal": 1.5})
    out = Simulation(make(limits, pol)).run(arrivals)
    reference = Simulation(Scheduler(limits, pol, 0.0)).run(arrivals)  # (Lua: its twin's)
    assert [(o.admitted_at, o.rejected) for o in out] == [
        (o.admitted_at, o.rejected) for o in reference
    ]
    admitted = sum(o.admitted_at is not None for o in out)
    rejected = [i for i, o in enumerate(out) if o.rejected and o.rejected_at == o.arrival.at]
    wrong = []
    for i in rejected:
        scheduler = _Queued(limits, pol, 0.0)
        scheduler.forced = str(i)
        again = Simulation(scheduler).run(arrivals)
        if (
            again[i].admitted_at is not None
            and sum(o.admitted_at is not None for o in again) > admitted
        ):
            wrong.append(i)
    if wrong:
        raise _Missed(f"rejected at arrival, admitted within the wait if queued: {wrong}")


def test_flood_excess_is_mostly_rejected_on_arrival() -> None:
    out = run(Limits(rate=RATE, burst=16), story("poisson", 1), tenant_queue_limit=1000)
    rejected = [o for o in out if o.rejected is not None]
    at_once = [o for o in rejected if o.rejected_at == o.arrival.at]
    assert len(at_once) >= 0.9 * len(rejected)
    assert {o.arrival.tenant for o in rejected} == {"C"}


def test_tenant_queue_limit_and_displacement_by_priority(make: Make) -> None:
    scheduler = make(Limits(rate=1, burst=1), policy({"low": 10.0}, tenant_queue_limit=3))
    assert isinstance(scheduler.acquire(0.0, Request("go", "T"))[0], Admit)
    for i in range(3):
        assert isinstance(scheduler.acquire(0.0, Request(f"low{i}", "T", "low"))[0], Enqueue)
    full, _ = scheduler.acquire(0.0, Request("low3", "T", "low"))
    assert isinstance(full, Reject)
    assert full.reason == "tenant_queue_full"
    assert full.status == 429
    decision, events = scheduler.acquire(0.0, Request("crit", "T", "critical"))
    assert isinstance(decision, Enqueue)
    assert [(e.id, e.reject.reason) for e in events if isinstance(e, Evicted)] == [
        ("low2", "tenant_queue_full")
    ]
    assert scheduler.waiting == 3


def test_full_fleet_queue_drops_from_the_longest_queue(make: Make) -> None:
    scheduler = make(
        Limits(rate=1, burst=1), policy({"normal": 10.0}, queue_limit=4, tenant_queue_limit=4)
    )
    assert isinstance(scheduler.acquire(0.0, Request("go", "big"))[0], Admit)
    for i in range(4):
        assert isinstance(scheduler.acquire(0.0, Request(f"b{i}", "big"))[0], Enqueue)
    decision, events = scheduler.acquire(0.0, Request("s0", "small"))
    assert isinstance(decision, Enqueue)
    assert [e.id for e in events if isinstance(e, Evicted)] == ["b3"]
    again, _ = scheduler.acquire(0.0, Request("b4", "big"))
    assert isinstance(again, Reject)
    assert again.reason == "tenant_queue_full"


# --- shedding -------------------------------------------------------------------------------------


def test_sheddable_routes_shed_while_requests_wait(make: Make) -> None:
    scheduler = make(Limits(rate=1, burst=1), policy())
    idle, _ = scheduler.acquire(0.0, Request("s0", "T", "low", sheddable=True))
    assert isinstance(idle, Admit)
    assert not idle.degraded
    assert isinstance(scheduler.acquire(0.0, Request("w", "T"))[0], Enqueue)
    shed, _ = scheduler.acquire(0.0, Request("s1", "U", "low", sheddable=True))
    assert isinstance(shed, Reject)
    assert (shed.reason, shed.status) == ("shed", 503)
    degraded, _ = scheduler.acquire(0.0, Request("s2", "U", "low", sheddable=True, degradable=True))
    assert isinstance(degraded, Admit)
    assert degraded.degraded
    assert scheduler.waiting == 1  # shedding touched nothing else


# --- bookkeeping ------------------------------------------------------------------------------


def test_cancel_release_and_races_leave_no_capacity_behind(make: Make) -> None:
    scheduler = make(Limits(concurrency=1), policy())
    assert isinstance(scheduler.acquire(0.0, Request("a", "T"))[0], Admit)
    assert isinstance(scheduler.acquire(0.0, Request("b", "T"))[0], Enqueue)
    assert isinstance(scheduler.acquire(0.0, Request("c", "T"))[0], Enqueue)
    reject, _ = scheduler.cancel(0.1, "b")
    assert reject is not None
    granted = scheduler.release(0.2, "a")
    assert [e.id for e in granted if isinstance(e, Granted)] == ["c"]
    assert scheduler.release(0.2, "a") == []  # idempotent
    assert scheduler.cancel(0.3, "c")[0] is None  # granted before the cancel: caller releases
    scheduler.release(0.4, "c")
    assert (scheduler.in_flight, scheduler.waiting) == (0, 0)


def test_idle_tenants_are_forgotten_and_their_number_is_bounded(make: Make) -> None:
    scheduler = make(Limits(rate=1e6, burst=1e6), policy(max_tenants=300, tenant_idle_s=10))
    for i in range(1500):
        scheduler.acquire(i * 0.001, Request(str(i), f"tenant-{i}"))
        assert scheduler.snapshot().tenants <= 300 + 64 if i % 100 == 0 else True
    assert scheduler.snapshot().tenants <= 300 + 64
    for step in range(20):  # each call may forget a bounded number of idle tenants
        scheduler.tick(100.0 + step)
    assert scheduler.snapshot().tenants == 0


def test_tenants_with_waiters_do_not_count_against_the_idle_bound(make: Make) -> None:
    """`max_tenants` bounds the *idle* tenants (those with waiters come on top, at most
    `queue_limit`): A and B wait, the bound is 2, so C, made while they wait, is kept and
    its queue limit of 2 holds. Counted against all tenants, C was dropped from the table
    as it was made (the only idle one) and each of its requests made C anew: a third queued
    past its limit. The Lua scripts have always counted the idle list alone."""
    pol = policy({"normal": 10.0}, tenant_queue_limit=2, max_tenants=2)
    scheduler = make(Limits(rate=1, burst=1), pol)
    assert isinstance(scheduler.acquire(0.0, Request("a1", "A"))[0], Admit)
    for rid, name in (("a2", "A"), ("b1", "B"), ("c1", "C"), ("c2", "C")):
        assert isinstance(scheduler.acquire(0.0, Request(rid, name))[0], Enqueue)
    third, _ = scheduler.acquire(0.0, Request("c3", "C"))
    assert isinstance(third, Reject)
    assert third.reason == "tenant_queue_full"
    assert scheduler.snapshot().tenants == 3


def test_a_tenants_idle_time_starts_when_its_last_waiter_leaves(make: Make) -> None:
    """Idle means unused: A's a2 waits from 0 s and is granted at 1 s, so at 1.5 s A has
    been idle 0.5 s of its 1 s, and B's arrival (a sweep) keeps it. Python measured from
    A's last arrival (0 s) and dropped it, its tag and queue state with it; the scripts'
    idle list takes a tenant back, as seen then, when its last waiter leaves."""
    scheduler = make(Limits(rate=1, burst=1), policy({"normal": 10.0}, tenant_idle_s=1.0))
    assert isinstance(scheduler.acquire(0.0, Request("a1", "A"))[0], Admit)
    assert isinstance(scheduler.acquire(0.0, Request("a2", "A"))[0], Enqueue)
    assert [e.id for e in scheduler.tick(1.0)] == ["a2"]
    assert isinstance(scheduler.acquire(1.5, Request("b1", "B"))[0], Enqueue)
    assert scheduler.snapshot().tenants == 2
    assert [e.id for e in scheduler.tick(2.7)] == ["b1"]  # (a sweep due: A idle 1.7 s)
    assert scheduler.snapshot().tenants == 1


def test_idle_tenants_are_swept_once_a_period_or_when_one_is_made(make: Make) -> None:
    """Idle tenants are forgotten when an operation makes a tenant, or once a
    `SWEEP_PERIOD_S` (1 s): B's arrival at 0.8 s swept (A idle 0.8 s of its 1 s, kept), so
    at 1.2 s A is past its idle time but no sweep is due until 1.8 s. Python swept at
    every tick and dropped A at 1.2 s; the scripts' sweep is the one both follow now."""
    scheduler = make(Limits(rate=100, burst=10), policy(tenant_idle_s=1.0))
    scheduler.acquire(0.0, Request("a1", "A"))
    scheduler.acquire(0.8, Request("b1", "B"))
    scheduler.tick(1.2)
    assert scheduler.snapshot().tenants == 2
    scheduler.tick(1.85)
    assert scheduler.snapshot().tenants == 0


def test_a_new_tenant_that_queues_is_not_counted_against_the_idle_bound(make: Make) -> None:
    """The idle bound is counted at the operation's end: X, made for a request that
    queues, waits by then, so A (idle) is the only idle tenant and `max_tenants` 1 keeps
    it. Python counted X as idle as it was made (before it queued) and dropped A."""
    scheduler = make(Limits(rate=1, burst=1), policy({"normal": 10.0}, max_tenants=1))
    assert isinstance(scheduler.acquire(0.0, Request("a1", "A"))[0], Admit)
    assert isinstance(scheduler.acquire(0.1, Request("x1", "X"))[0], Enqueue)
    assert scheduler.snapshot().tenants == 2


def test_idle_tenants_used_at_the_same_time_leave_the_bound_by_name(make: Make) -> None:
    """Over `max_tenants`, tenants last used at the same time are dropped by name, not in
    the order they happened to be used in: "e" and "a" both at 0 s ("e" first), X's arrival
    drops "a" and "e" keeps its spent cap (its next request is not admitted). Python
    dropped "e" (made anew: a full cap). The scripts' idle list orders such ties by digest,
    and these two names' digests sort as the names do (tests/test_redis_three_way.py)."""
    limits = Limits(rate=100, burst=10, tenant_rate=1, tenant_burst=1)
    scheduler = make(limits, policy(max_tenants=2))
    for rid, name in (("e1", "e"), ("a1", "a")):
        assert isinstance(scheduler.acquire(0.0, Request(rid, name))[0], Admit)
    assert isinstance(scheduler.acquire(0.1, Request("x1", "X"))[0], Admit)
    assert not isinstance(scheduler.acquire(0.1, Request("e2", "e"))[0], Admit)


def test_a_weight_sum_left_by_rounding_is_no_one_in_line(make: Make) -> None:
    """The weights in line are summed as tenants come and go: A (0.1) and B (0.2) wait,
    B is admitted and A capped at 0.5, and what is left is 2.8e-17, not 0. Before any
    window was measured the fair rate is the rate over the weight in line (1 when none):
    over that remainder it was 7e16, so A's next request was estimated by its cap alone
    (3.5 s) where its share says 7.5 s (20 virtual units ahead at weight 0.1, 2 a second).
    Both implementations had it (Python's sum came out below zero by luck in other orders)."""
    limits = Limits(rate=2, burst=1, weights={"A": 0.1, "B": 0.2}, tenant_rate=0.5)
    scheduler = make(limits, policy(dict.fromkeys(("normal",), 30.0)))
    for rid, name in (("a1", "A"), ("b1", "B"), ("a2", "A")):
        scheduler.acquire(0.0, Request(rid, name))
    assert [e.id for e in scheduler.tick(0.5)] == ["b1"]
    decision, _ = scheduler.acquire(0.5, Request("a3", "A"))
    assert isinstance(decision, Enqueue)
    assert decision.estimated_wait_s == pytest.approx(7.5)


def test_a_new_tenant_id_has_no_banked_credit(make: Make) -> None:
    """During a flood, a known tenant under its share takes a reserve token at once; a
    never-seen id cannot (credit is earned, so rotating ids buy no reserve access)."""
    scheduler = make(Limits(rate=10, burst=4), policy())
    t = 0.0
    for i in range(400):  # 20 s: a flood from C, a trickle from A
        t = i * 0.05
        scheduler.acquire(t, Request(f"c{i}", "C"))
        if i % 10 == 0:
            scheduler.acquire(t, Request(f"a{i}", "A"))
        scheduler.tick(t)
    known, _ = scheduler.acquire(t, Request("a-late", "A"))
    newcomer, _ = scheduler.acquire(t, Request("n-late", "never-seen"))
    assert isinstance(known, Admit)
    assert isinstance(newcomer, Enqueue)


# --- both implementations, decision by decision ------------------------------------------------


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
@pytest.mark.parametrize(
    "scenario",
    ["story", "weighted flood", "caps and concurrency", "bursts after idle gaps"],
)
def test_lua_makes_the_same_decisions_as_python(
    scenario: str, functions: bool, redis_server_session: RedisServer
) -> None:
    rng = random.Random(21)
    pol: dict[str, Any] = {}
    if scenario == "story":
        limits = Limits(rate=RATE, burst=16)
        arrivals = story("poisson", 2, duration=12.0)
    elif scenario == "weighted flood":
        limits = Limits(rate=30, burst=6, weights={"X": 1, "Y": 2, "Z": 4})
        arrivals = [a for t in "XYZ" for a in poisson(t, 40, 0, 10, rng)]
    elif scenario == "bursts after idle gaps":
        # Queues form and drain: windows closed with and without waiters, and restarted
        # when a queue forms (the fair rate measured only while someone waits).
        limits = Limits(rate=40, burst=8, concurrency=3)
        arrivals = sorted(
            (
                Arrival(a.at, a.tenant, service_s=0.05 + 0.3 * rng.random())
                for k in range(5)
                for t in "UVW"
                for a in poisson(t, 25, 2.5 * k, 2.5 * k + 0.6, rng)
            ),
            key=lambda a: a.at,
        )
        pol = {"max_wait_s": {**DEFAULT_MAX_WAIT_S, "normal": 2.0}, "tenant_queue_limit": 20}
    else:
        limits = Limits(rate=40, burst=8, concurrency=4, tenant_rate=15, tenant_burst=3)
        arrivals = [
            Arrival(a.at, a.tenant, a.priority, service_s=0.05 + 0.1 * rng.random())
            for t, prio in (("P", "critical"), ("Q", "low"), ("R", "normal"))
            for a in poisson(t, 25, 0, 10, rng, priority=prio)
        ]
        pol = {"tenant_queue_limit": 20, "queue_limit": 50}
    client = redis_server_session.client()
    try:
        if functions and redis_version(client) < (7, 0):
            pytest.skip("this Redis has no functions (the scripts run by EVALSHA on it)")
        lua = run(
            limits,
            arrivals,
            lambda lim, p: LuaScheduler(client, lim, p, 0.0, functions=functions),
            **pol,
        )
    finally:
        client.close()
    reference = run(limits, arrivals, python, **pol)

    def decisions(outcomes: Sequence[Outcome]) -> list[tuple[float | None, str | None]]:
        return [
            (
                None if o.admitted_at is None else round(o.admitted_at, 6),
                None if o.rejected is None else o.rejected.reason,
            )
            for o in outcomes
        ]

    assert decisions(lua) == decisions(reference)


def _state(s: Scheduler) -> tuple[Any, ...]:
    """Everything a decision depends on, to compare two Python schedulers exactly."""
    tenants = tuple(
        (name, t.finish, t.cap_tokens, t.cap_at, t.seen_at, t.state, t.version, t.cost_by_rank)
        for name, t in s._tenants.items()
    )
    window = s._window
    return (
        s._tokens,
        s._refilled_at,
        s._in_flight,
        dict(s._leases),
        s._vtime,
        tuple(s._waiting),
        s._busy,
        tenants,
        (window.start, window.cost, window.v0, window.v_rate, window.throughput),
    )


@pytest.mark.parametrize(
    "limits",
    [
        Limits(rate=50.0, burst=6.0, concurrency=4),
        Limits(rate=50.0, burst=6.0),
        Limits(concurrency=3),
        Limits(rate=50.0, burst=4.0, weights={"a": 2.0, "c": 0.5}),
        Limits(rate=80.0, burst=8.0, concurrency=6, tenant_rate=40.0, tenant_burst=4.0),
    ],
    ids=["both", "rate", "concurrency", "weights", "tenant-cap"],
)
def test_the_fast_path_leaves_the_state_acquire_would(limits: Limits) -> None:
    """`admit_at_once` (the in-memory backend's path, written out for speed) admits
    exactly when `acquire` would admit at once, and leaves the same state behind:
    a random mix of arrivals (costs, tenants, sheddable), releases and ticks,
    replayed on two schedulers, one trying the fast path first."""
    rng = random.Random(14)
    pol = policy(max_tenants=6, tenant_idle_s=0.5)
    fast, slow = Scheduler(limits, pol, 0.0), Scheduler(limits, pol, 0.0)
    now, held, fast_path_taken = 0.0, [], 0
    for i in range(3000):
        now += rng.choice((0.0, 0.0005, 0.003, 0.02, 0.05, 0.1, 0.3))
        roll = rng.random()
        if roll < 0.45:
            req = Request(
                f"r{i}",
                rng.choice("abcdefgh"),
                rng.choice(("critical", "normal", "low")),
                50 if rng.random() < 0.01 else rng.choice((1, 1, 1, 1, 2, 3)),
                sheddable=rng.random() < 0.2,
                degradable=rng.random() < 0.5,
            )
            if fast.admit_at_once(now, req):
                fast_path_taken += 1
                got: Any = Admit(lease=limits.concurrency is not None)
                fast_events: list[Any] = []
            else:
                got, fast_events = fast.acquire(now, req)
            want, slow_events = slow.acquire(now, req)
            assert (got, fast_events) == (want, slow_events), i
            if isinstance(want, Admit) and want.lease:
                held.append(req.id)
            held.extend(e.id for e in slow_events if isinstance(e, Granted) and e.lease)
        elif roll < 0.9 and held:
            rid = held.pop(rng.randrange(len(held)))
            fast_events = [] if fast.release_at_once(rid) else fast.release(now, rid)
            slow_events = slow.release(now, rid)
            assert fast_events == slow_events, i
            held.extend(e.id for e in slow_events if isinstance(e, Granted) and e.lease)
        else:
            events = slow.tick(now)
            assert fast.tick(now) == events, i
            held.extend(e.id for e in events if isinstance(e, Granted) and e.lease)
        assert _state(fast) == _state(slow), i
    assert fast_path_taken > 300  # the fast path was exercised, not only the fallback


def test_the_newest_tenant_kept_is_the_last_one() -> None:
    """`admit_unsheddable` finds the most recent tenant (`_newest`) without a lookup or
    a move, so it must always be None or the last tenant in `_tenants`, through
    arrivals (repeats of one tenant among others), queueing and grants (a waiter's
    tenant goes last when its last waiter leaves), cancels, releases, ticks and idle
    tenants forgotten (the newest among them)."""
    rng = random.Random(8)
    pol = policy(max_tenants=3, tenant_idle_s=0.2, queue_limit=12)
    s = Scheduler(Limits(rate=40.0, burst=4.0, concurrency=3), pol, 0.0)
    now, held, waiting, hits = 0.0, [], [], 0
    names = [str(n) for n in "abcde"]  # the same string objects each time, as the caches give
    for i in range(4000):
        now += rng.choice((0.0, 0.001, 0.01, 0.05, 0.3))
        roll = rng.random()
        if roll < 0.5:
            name = names[0] if rng.random() < 0.5 else rng.choice(names)
            req = Request(f"r{i}", name, "normal", rng.choice((1, 1, 2)))
            if s._newest is not None and s._newest.name is name:
                hits += 1
            if s.admit_at_once(now, req):
                held.append(req.id)
            else:
                got, events = s.acquire(now, req)
                if isinstance(got, Admit):
                    held.append(req.id)
                elif isinstance(got, Enqueue):
                    waiting.append(req.id)
                held.extend(e.id for e in events if isinstance(e, Granted) and e.lease)
        elif roll < 0.8 and held:
            events = s.release(now, held.pop(rng.randrange(len(held))))
            held.extend(e.id for e in events if isinstance(e, Granted) and e.lease)
        elif roll < 0.9 and waiting:
            _, events = s.cancel(now, waiting.pop(rng.randrange(len(waiting))))
            held.extend(e.id for e in events if isinstance(e, Granted) and e.lease)
        else:
            events = s.tick(now)
            held.extend(e.id for e in events if isinstance(e, Granted) and e.lease)
        last = next(reversed(s._tenants.values()), None)
        assert s._newest is None or s._newest is last, i
    assert hits > 500  # the shortcut was taken, not only the lookup
