"""Leases of rate tokens (``THROTTLE_RATE_LEASE``): a process takes k tokens out of the
shared bucket in one call and admits the next k requests without asking Redis.

- `Scheduler.lease_tokens` and ``ratelease.lua`` (core.lua's ``lease_tokens``) on one fake
  clock: the same tokens taken and given back, the same bucket after.
- Nobody waiting is required to lease: a queued request blocks new leases (it would be
  overtaken), but unspent tokens still go back.
- The process's pool (``ratepool.py``) on a fake clock: admit while a token is there,
  nothing waits in this process and the lease is unexpired; renew early; sized by the
  process's recent rate x T, within its share of the burst; told that someone waits,
  admit nothing more and give every token back at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.keys import TENANT_FIELDS, tenant_digest
from throttle_mw.backends.redis.protocol import SEP
from throttle_mw.backends.redis.ratepool import (
    AUTO_LEASE_S,
    AUTO_MIN_TOKENS,
    MAX_CHARGED,
    RETRY_SHARE,
    RatePool,
)
from throttle_mw.scheduler import (
    Admit,
    Enqueue,
    HeldLease,
    LeaseCharge,
    LeaseGrant,
    Limits,
    Policy,
    Request,
    Scheduler,
)

RATE = Limits(rate=10.0, burst=20.0)
POLICY = Policy(max_wait_s={"critical": 5.0, "high": 5.0, "normal": 5.0, "low": 5.0})


@pytest.fixture
def lua(redis_server_session: RedisServer, functions: bool) -> Iterator[Any]:
    """A LuaScheduler factory on the session's server, by FCALL or by EVALSHA."""
    client = redis_server_session.client()
    yield lambda limits=RATE, policy=POLICY: LuaScheduler(
        client, limits, policy, 0.0, functions=functions
    )
    client.close()


def tokens(scheduler: Scheduler | LuaScheduler) -> float:
    snapshot = scheduler.snapshot()
    assert snapshot.tokens is not None
    return snapshot.tokens


LEASE_S = 0.2


class Process:
    """A process's side of its leases as the parity tests play it: the last grant (its
    generation, expiry and size), told back at the next lease."""

    def __init__(self) -> None:
        self.grant = LeaseGrant()

    def lease(
        self, scheduler: Scheduler | LuaScheduler, now: float, returned: int, kept: int,
        wants: int, **kwargs: Any,
    ) -> LeaseGrant:  # fmt: skip
        # (A tick first, as the backend's acquires between leases make: a renewal without
        # charges leases nothing while a sweep is due, on both sides, nor, in ratelease.lua,
        # while a TTL refresh is (Python has no TTLs): tests below.)
        scheduler.tick(now)
        g = self.grant
        held = HeldLease(g.generation, g.until, g.taken + g.kept, returned, kept)
        self.grant = scheduler.lease_tokens(now, LEASE_S, held, wants, **kwargs)
        return self.grant


# Steps at a fake time: ("lease", process, returned, kept, wants), ("acquire", ...) or
# ("tick", ...). What each gives: the grant, or the decision's kind; and the bucket after.
STEPS: list[tuple[float, str, int, int, int, int]] = [
    (0.0, "lease", 0, 0, 0, 8),  # 20 in the bucket: 8 taken
    (0.0, "lease", 1, 0, 0, 30),  # 12 left: all 12 taken (no more than there are)
    (0.0, "acquire", 0, 0, 0, 0),  # none left: it waits
    (0.05, "lease", 1, 3, 5, 5),  # someone waits: 3 go back, 5 kept, none taken
    (0.1, "tick", 0, 0, 0, 0),  # 8 + 5 out: the bucket refills to 7 at most
    (0.9, "tick", 0, 0, 0, 0),  # the leases lapsed: 11.5, the waiter is admitted
    (0.95, "lease", 0, 0, 0, 4),  # process 0's lease lapsed: nothing counted, 4 new
    (1.0, "lease", 2, 0, 0, 6),
    (1.05, "lease", 0, 2, 0, 2),  # 2 back, 2 new
    (1.1, "lease", 2, 0, 6, 0),  # keeps its 6, nothing new
    (1.2, "acquire", 0, 0, 0, 0),
    (1.7, "lease", 2, 6, 0, 2),  # its lease lapsed at 1.3: none of the 6 back
    (1.8, "lease", 0, 1, 1, 0),  # process 0's lapsed too: nothing
    (2.5, "lease", 1, 0, 0, 100),
]


def run(scheduler: Scheduler | LuaScheduler) -> list[tuple[Any, float]]:
    processes = [Process() for _ in range(3)]
    seen: list[tuple[Any, float]] = []
    for i, (at, kind, who, returned, kept, wants) in enumerate(STEPS):
        if kind == "lease":
            got: Any = processes[who].lease(scheduler, at, returned, kept, wants)
            got = got._replace(until=round(got.until, 9))
        elif kind == "tick":
            scheduler.tick(at)
            got = scheduler.waiting
        else:
            decision, _ = scheduler.acquire(at, Request(f"r{i}", "acme"))
            scheduler.tick(at)
            got = type(decision).__name__
        seen.append((got, round(tokens(scheduler), 9)))
    return seen


def test_python_and_lua_lease_alike_on_one_clock(lua: Any) -> None:
    python = run(Scheduler(RATE, POLICY, 0.0))
    assert python == run(lua())
    taken = [got.taken if isinstance(got, LeaseGrant) else got for got, _ in python]
    assert taken[:4] == [8, 12, "Enqueue", 0]
    assert python[3] == (LeaseGrant(0, 5, 2, 0.25), 3.0)  # no refill: 20 out at 0.0-0.05
    assert python[4] == (1, 3.5)  # refilled, at most to the room: 20 - 8 - 5
    assert python[5] == (0, 10.5)  # lapsed at 0.25: 11.5, less the waiter's token
    assert python[11][0].kept == 0  # a lapsed lease keeps nothing


def test_a_queued_request_blocks_new_leases_but_tokens_still_go_back(lua: Any) -> None:
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        process = Process()
        assert process.lease(scheduler, 0.0, 0, 0, 20).taken == 20
        decision, _ = scheduler.acquire(0.0, Request("w", "acme"))
        assert isinstance(decision, Enqueue)
        assert process.lease(scheduler, 0.01, 15, 0, 5) == LeaseGrant()  # someone waits
        # ... but the 15 went back: the waiter goes at the next tick
        assert tokens(scheduler) == pytest.approx(15.0)  # (no refill: 20 out until then)
        scheduler.tick(0.01)
        assert scheduler.waiting == 0
        assert process.lease(scheduler, 0.02, 0, 0, 3).taken == 3  # nobody waits any more
        assert tokens(scheduler) == pytest.approx(11.1)  # (its 5 spent: room again)


@pytest.mark.parametrize(
    "limits",
    [
        Limits(rate=10.0, burst=20.0, concurrency=5),
        Limits(rate=10.0, burst=20.0, tenant_rate=1.0, tenant_burst=2.0),
        Limits(rate=None, burst=20.0, concurrency=5),
    ],
    ids=["concurrency", "tenant-cap", "no-rate"],
)
def test_no_lease_where_each_request_must_be_decided_in_redis(lua: Any, limits: Limits) -> None:
    for scheduler in (Scheduler(limits, POLICY, 0.0), lua(limits)):
        assert Process().lease(scheduler, 0.0, 0, 0, 5) == LeaseGrant()
        decision, _ = scheduler.acquire(0.0, Request("a", "acme"))
        assert isinstance(decision, Admit)


def test_tokens_given_back_fill_the_bucket_to_its_burst_at_most(lua: Any) -> None:
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        process = Process()
        assert process.lease(scheduler, 0.0, 0, 0, 5).taken == 5
        # 15 + 5 back (at most what it counted out: not 10), and 20 of it leased
        assert process.lease(scheduler, 0.0, 10, 0, 25).taken == 20


def test_the_bucket_refills_only_to_its_burst_less_what_leases_hold(lua: Any) -> None:
    """Spent or not, a lease's tokens count until it expires or is renewed: the bucket
    beside it refills to the burst less them, so its tokens and the leases' together
    never exceed one burst."""
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        a, b = Process(), Process()
        assert a.lease(scheduler, 0.0, 0, 0, 6).taken == 6
        assert b.lease(scheduler, 0.0, 0, 0, 4).taken == 4
        scheduler.tick(0.19)
        assert tokens(scheduler) == pytest.approx(10.0)  # 10 + 1.9, at most 20 - 10
        assert b.lease(scheduler, 0.19, 0, 0, 0) == LeaseGrant()  # b's 4 spent: room again
        scheduler.tick(0.21)
        assert tokens(scheduler) == pytest.approx(10.2)  # ... a's 6 lapsed at 0.2: refills
        scheduler.tick(2.0)
        assert tokens(scheduler) == pytest.approx(20.0)


def test_the_refill_over_a_lease_s_expiry_stops_at_the_room_until_then(lua: Any) -> None:
    """A lease of 10 from the full bucket at 0 (T = 0.2 s): the bucket stands at its room,
    10, until the lease expires; the process may spend its 10 just before then. The first
    call after the expiry comes 0.2 s later: the bucket holds its room plus 0.2 s of
    refill, 12, so the window from just before the expiry admits 10 + 12 = rate x 0.2 s +
    burst, as the plain bucket. (Refilled in one step from 0 to 0.4 s, as before, it held
    10 + 4 = 14: 24 in that window, 2 over; Python and Lua alike.)"""
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        process = Process()
        assert process.lease(scheduler, 0.0, 0, 0, 10).taken == 10
        scheduler.tick(LEASE_S + 0.2)
        assert tokens(scheduler) == pytest.approx(12.0)
        scheduler.tick(2.0)
        assert tokens(scheduler) == pytest.approx(20.0)


def test_a_crashed_process_s_lease_stops_counting_when_it_lapses(lua: Any) -> None:
    """Renewals move leases from generation to generation; the one a process left there
    when it crashed leaves the count when its generation is retired and expires."""
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        live, crashed = Process(), Process()
        crashed.lease(scheduler, 0.0, 0, 0, 5)
        at = 0.0
        while at < 3.0:
            live.lease(scheduler, at, 0, 0, 1)  # spends each lease at once, renews
            at = round(at + 0.15, 9)
        scheduler.tick(at)
        assert tokens(scheduler) == pytest.approx(20.0 - 1.0)  # only the live lease's


def test_unspent_tokens_of_another_epoch_do_not_go_back(lua: Any) -> None:
    scheduler = lua()
    process = Process()
    assert process.lease(scheduler, 0.0, 0, 0, 20).taken == 20
    grant = process.grant
    assert process.lease(scheduler, 0.0, 20, 0, 0, epoch="not-this-state") == LeaseGrant()
    assert tokens(scheduler) == 0.0
    process.grant = grant
    assert process.lease(scheduler, 0.0, 20, 0, 0) == LeaseGrant()  # its own epoch: back
    assert tokens(scheduler) == 20.0


# --- the process's pool, on a fake clock ---------------------------------------------------------

T = 0.1


def granted_pool(tokens: int, at: float = 0.0) -> RatePool:
    pool = RatePool(T)
    pool.seen(at, 1)
    pool.renewal(at, 1, 100.0)
    pool.granted(at, tokens, "e1")
    return pool


def test_the_pool_admits_while_a_token_is_there_nothing_waits_and_the_lease_lasts() -> None:
    pool = granted_pool(3)
    assert pool.take(0.01, 1, queue_empty=True)
    assert not pool.take(0.01, 1, queue_empty=False)  # this process has a waiter: Redis
    assert not pool.take(0.01, 5, queue_empty=True)  # more than is left: Redis
    assert pool.take(0.02, 2, queue_empty=True)
    assert not pool.take(0.03, 1, queue_empty=True)  # spent
    assert (pool.tokens, pool.local_admissions) == (0, 2)


def test_an_expired_lease_admits_nothing_and_its_tokens_lapse() -> None:
    pool = granted_pool(5)
    assert pool.take(T - 1e-9, 1, queue_empty=True)
    assert not pool.take(T, 1, queue_empty=True)  # T after the call was sent
    assert (pool.tokens, pool.lapsed) == (0, 4)
    assert pool.renewal(T, 1, 100.0, final=True) == (0, "e1", 0)  # lapsed: none back
    pool = granted_pool(5)
    assert pool.renewal(T, 1, 100.0, final=True) == (0, "e1", 0)  # (no request in between)
    assert pool.lapsed == 5


def test_a_renewal_keeps_admitting_tops_up_and_gives_back_the_excess() -> None:
    pool = granted_pool(8)
    assert not pool.due(0.0)  # full and young
    for _ in range(5):
        assert pool.take(0.01, 1, queue_empty=True)
    assert not pool.due(0.01)  # 3 of 8 left: above a quarter
    assert pool.take(0.01, 1, queue_empty=True)
    assert pool.due(0.01)  # 2 of 8: a quarter
    # 7 requests in the first T: 70/s, a lease of 7: the 2 kept, 5 more wanted
    assert pool.renewal(0.01, 1, 100.0) == (0, "e1", 5)
    assert not pool.due(0.01)  # one renewal at a time
    assert pool.take(0.011, 1, queue_empty=True)  # the pool admits while the call is out
    pool.granted(0.01, 5, "e1")
    assert pool.tokens == 6
    assert pool.expires_at == pytest.approx(0.01 + T)  # all of it, from the call
    pool.take(0.02, 1, queue_empty=True)
    assert not pool.due(0.01 + T * 0.74)
    assert pool.due(0.01 + T * 0.75)  # old: three quarters of its life gone
    # 9 requests in the T since 0: 90/s, a lease of 9: the 5 left kept, 4 more wanted
    assert pool.renewal(0.1, 1, 100.0) == (0, "e1", 4)


@pytest.mark.parametrize("spent_while_out", [0, 1])
def test_tokens_spent_while_a_renewal_is_out_do_not_shrink_the_lease(spent_while_out: int) -> None:
    """The lease's size is what Redis granted for it (taken plus kept), whatever the pool
    spent while the call was out: the next renewal is due at the same point (a quarter of
    it left) as without that spending (flake62: one token spent, size 3 of 4, the next
    renewal due only once the pool was empty)."""
    pool = RatePool(T)
    for _ in range(4):
        pool.seen(0.0, 1)
    assert pool.renewal(0.0, 1, 8.0) == (0, "", 4)  # a share of 4 (half a burst of 8)
    pool.granted(0.0, 4, "e1")
    for _ in range(3):
        assert pool.take(0.01, 1, queue_empty=True)
    assert pool.due(0.01)  # 1 of 4: a quarter
    assert pool.renewal(0.01, 1, 8.0) == (0, "e1", 3)  # 1 kept, 3 more
    for _ in range(spent_while_out):
        assert pool.take(0.011, 1, queue_empty=True)  # the kept token, while the call is out
    pool.granted(0.01, 3, "e1")
    assert (pool.tokens, pool.size, pool.counted) == (4 - spent_while_out, 4, 4)
    while not pool.due(0.02):
        assert pool.take(0.02, 1, queue_empty=True)  # (fails once the pool is empty)
    assert pool.tokens == 1  # due once down to a quarter of 4, as without the spending


def test_a_renewal_gives_back_what_is_over_the_next_lease_s_size() -> None:
    pool = granted_pool(8)
    assert pool.take(0.09, 1, queue_empty=True)
    assert pool.due(0.09)  # old
    # 2 requests in the first T: 20/s, a lease of 2: 2 kept, the 5 over it go back
    assert pool.renewal(0.09, 1, 100.0) == (5, "e1", 0)
    assert (pool.tokens, pool.returned) == (2, 5)


def test_kept_tokens_lapse_when_redis_no_longer_counted_them() -> None:
    """The last lease had expired in Redis before the renewal arrived: Redis answers
    that none of the kept tokens count any more, and they lapse here too."""
    pool = granted_pool(8)
    pool.take(0.05, 1, queue_empty=True)
    pool.take(0.06, 1, queue_empty=True)
    pool.renewal(0.08, 1, 100.0)
    assert pool.held.kept == pool.tokens > 0
    kept = pool.tokens
    pool.granted(0.08, 2, "e1", kept=0, generation=3, until=1.0)
    assert (pool.tokens, pool.lapsed, pool.size) == (2, kept, 2)  # (the lapsed not in it)
    assert (pool.generation, pool.until, pool.counted) == (3, 1.0, 2)
    pool.seen(0.1, 1)
    pool.renewal(0.1, 1, 100.0)
    assert pool.held[:3] == (3, 1.0, 2)  # what Redis counted out is what it is told


def drive_pool(pool: RatePool, per_s: float, seconds: float, start: float = 0.0) -> int:
    """Requests at `per_s` into `pool`, renewals granted in full at once: the lease calls
    made (not skipped)."""
    calls = 0
    n = int(per_s * seconds)
    for i in range(n):
        now = start + i / per_s
        pool.take(now, 1, queue_empty=True)
        if pool.due(now):
            returned, _, wants = pool.renewal(now, 1, 1000.0)
            if not returned and not wants:
                pool.skip(now)
                continue
            calls += 1
            pool.granted(now, wants, "e1")
    return calls


def test_auto_makes_no_lease_call_for_a_process_admitting_a_handful_a_second() -> None:
    pool = RatePool(AUTO_LEASE_S, auto=True)
    assert drive_pool(pool, 5.0, 10.0) == 0
    assert (pool.calls, pool.local_admissions, pool.leased) == (0, 0, 0)
    # Half AUTO_MIN_TOKENS / T (40/s): still none (its rate over one to two T, rounded
    # up, may reach the threshold near it).
    assert drive_pool(pool, 20.0, 5.0, start=10.0) == 0


def test_auto_leases_once_the_process_s_rate_fills_a_worthwhile_lease() -> None:
    pool = RatePool(AUTO_LEASE_S, auto=True)
    calls = drive_pool(pool, 500.0, 2.0)
    assert pool.local_admissions > 0.9 * 1000
    assert calls < 1000 / AUTO_MIN_TOKENS
    assert pool.size >= AUTO_MIN_TOKENS
    # Slowing to a handful a second: what it holds goes back, then no more calls.
    later = drive_pool(pool, 5.0, 5.0, start=2.0)
    assert later <= 2
    assert pool.tokens == 0
    assert drive_pool(pool, 5.0, 5.0, start=7.0) == 0


def test_kept_tokens_of_another_epoch_lapse_with_it() -> None:
    pool = granted_pool(8)
    pool.seen(0.01, 1)
    pool.renewal(0.01, 1, 100.0)
    pool.granted(0.01, 3, "e2")  # the state was made anew meanwhile
    assert (pool.tokens, pool.epoch, pool.lapsed, pool.size) == (3, "e2", pool.lapsed, 3)
    assert pool.lapsed > 0


def test_a_process_that_stops_gives_back_every_unspent_token() -> None:
    pool = granted_pool(8)
    pool.take(0.01, 1, queue_empty=True)
    assert pool.renewal(0.02, 1, 100.0, final=True) == (7, "e1", 0)
    assert pool.tokens == 0


def test_no_renewal_without_requests_and_none_soon_after_one_that_got_nothing() -> None:
    pool = granted_pool(4)
    pool.renewal(0.0, 1, 100.0)
    pool.granted(0.0, 0, "e1")  # someone waits: nothing leased
    assert not pool.due(0.2)  # no request since
    pool.seen(0.2, 1)
    assert pool.due(0.2)
    pool.renewal(0.2, 1, 100.0)
    pool.granted(0.2, 0, "e1")
    pool.seen(0.21, 1)
    assert not pool.due(0.2 + T * 0.49)  # requests go to Redis one by one meanwhile
    assert pool.due(0.2 + T * 0.5)


def test_a_renewal_short_of_what_it_asked_is_not_followed_by_another_soon() -> None:
    pool = RatePool(T)
    for i in range(100):  # 100/s: it asks for 10
        pool.seen(i / 100, 1)
    assert pool.renewal(1.0, 1, 100.0)[2] == 10
    pool.granted(1.0, 2, "e1")  # the bucket ran dry: 2 of them
    assert pool.take(1.01, 1, queue_empty=True)
    pool.take(1.01, 1, queue_empty=True)
    assert not pool.due(1.0 + T * 0.49)  # empty, but a saturated budget: not yet
    assert pool.due(1.0 + T * 0.5)


def test_a_lease_is_the_process_s_rate_times_t_within_its_share_of_the_burst() -> None:
    pool = RatePool(T)
    for i in range(200):  # 200/s for a second
        pool.seen(i / 200, 1)
    assert pool.wants(1.0, 1, 100.0) == 20  # 200/s x 0.1 s
    assert pool.wants(1.0, 4, 100.0) == 12  # share floor(100 / 2 / 4)
    assert pool.wants(1.0, 8, 100.0) == 6
    assert pool.wants(1.0, 200, 100.0) == 0  # a share below one token: no lease
    assert pool.wants(5.0, 1, 100.0) == 1  # idle since: the rate decays to nothing
    assert RatePool(T).wants(0.0, 1, 100.0) == 0  # no request seen: no lease


def test_an_old_lease_with_tokens_and_no_request_since_gives_them_back() -> None:
    pool = granted_pool(6)
    assert not pool.due(pool.old_at - 1e-9)
    assert pool.due(pool.old_at)  # no request since the grant: give back, want none
    assert pool.renewal(pool.old_at, 1, 100.0) == (6, "e1", 0)
    pool.granted(pool.old_at, 0, "e1")
    pool.seen(0.08, 1)
    assert pool.due(0.08)  # a give-back is no failed renewal: no pause after it


def test_a_share_below_one_token_asks_for_nothing_and_not_again_soon() -> None:
    pool = RatePool(T)
    pool.seen(0.0, 1)
    assert pool.due(0.0)
    assert pool.renewal(0.0, 200, 100.0) == (0, "", 0)  # 100 / 2 / 200 processes
    pool.skip(0.0)  # (the backend makes no call)
    pool.seen(0.01, 1)
    assert not pool.due(0.01)
    assert pool.due(T * RETRY_SHARE)


def test_a_dropped_pool_admits_nothing() -> None:
    pool = granted_pool(5)
    pool.drop()
    assert not pool.take(0.01, 1, queue_empty=True)
    assert (pool.tokens, pool.lapsed, pool.epoch) == (0, 5, "")


def test_someone_waits_the_pool_admits_nothing_and_gives_every_token_back_at_once() -> None:
    """Told that someone waits (another process's request, in Redis): no admission from
    the pool, a renewal due at once (young and full as the lease is) that gives back every
    unspent token and wants none, whatever this process's rate; then the pool follows
    its usual rules (a request asks for a lease again, not before RETRY_SHARE of T: a
    budget at its edge does not lease and give back in turn)."""
    pool = granted_pool(8)
    assert pool.take(0.01, 1, queue_empty=True)
    assert not pool.due(0.01)  # 7 of 8, young
    pool.waits()
    assert not pool.take(0.011, 1, queue_empty=True)
    assert pool.tokens == 7
    assert pool.due(0.011)
    assert pool.renewal(0.011, 1, 100.0) == (7, "e1", 0)
    assert (pool.tokens, pool.returned, pool.yielding) == (0, 7, False)
    pool.granted(0.011, 0, "e1")
    assert not pool.take(0.02, 1, queue_empty=True)  # empty
    assert not pool.due(0.011 + T * RETRY_SHARE - 1e-9)
    assert pool.due(0.011 + T * RETRY_SHARE)  # a request since: a lease asked for again
    assert pool.renewal(0.011 + T * RETRY_SHARE, 1, 100.0)[2] > 0


def test_told_while_a_renewal_is_out_the_pool_gives_back_what_that_renewal_brings() -> None:
    """The message crosses a renewal: nothing is admitted meanwhile, and once the renewal
    is answered (with tokens taken before the request queued), a renewal giving them all
    back is due at once."""
    pool = granted_pool(8)
    for _ in range(6):
        assert pool.take(0.01, 1, queue_empty=True)
    assert pool.due(0.01)
    returned, _, wanted = pool.renewal(0.01, 1, 100.0)
    assert (returned, wanted) == (0, 5)  # 2 kept, 5 more
    pool.waits()
    assert not pool.due(0.012)  # (one renewal at a time)
    assert not pool.take(0.012, 1, queue_empty=True)
    pool.granted(0.01, 5, "e1")
    assert pool.tokens == 7
    assert not pool.take(0.013, 1, queue_empty=True)
    assert pool.due(0.013)
    assert pool.renewal(0.013, 1, 100.0) == (7, "e1", 0)


def test_told_with_nothing_in_the_pool_no_call_is_due() -> None:
    """An empty pool (spent, lapsed or dropped) has nothing to give back: no renewal is
    due for the message alone, and a dropped pool forgets it."""
    pool = granted_pool(1)
    assert pool.take(0.01, 1, queue_empty=True)
    pool.renewal(0.01, 1, 100.0)
    pool.granted(0.01, 0, "e1")  # (a renewal that got nothing)
    pool.waits()
    assert not pool.due(0.012)
    pool.drop()
    assert not pool.yielding


# --- exactness: several processes' pools on one budget, on a fake clock ------------------------

FLEET = Limits(rate=100.0, burst=20.0)
#: Nothing queues: what cannot go at once is rejected (so leases are never blocked).
NO_QUEUE = Policy(
    max_wait_s={"critical": 5.0, "high": 5.0, "normal": 5.0, "low": 5.0},
    queue_limit=0,
    tenant_queue_limit=0,
)
PROCESSES = 4
STEP_S = 0.001
DURATION_S = 3.0


def arrivals(seed: int, per_s: float) -> list[list[bool]]:
    """Per process, per millisecond: does a request arrive (Bernoulli, `per_s` each)?"""
    rng = random.Random(seed)
    steps = int(DURATION_S / STEP_S)
    return [[rng.random() < per_s * STEP_S for _ in range(steps)] for _ in range(PROCESSES)]


def drive(lua: LuaScheduler, plan: list[list[bool]], leases: bool) -> tuple[list[float], list[int]]:
    """The processes' requests through their pools (if `leases`) and the scripts: the
    admission times, and the tokens outstanding in unexpired leases at each step."""
    pools = [RatePool(T) for _ in range(PROCESSES)]
    admitted: list[float] = []
    outstanding: list[int] = []
    n = 0
    for step in range(len(plan[0])):
        now = step * STEP_S
        outstanding.append(sum(p.tokens for p in pools if now < p.expires_at))
        for i, pool in enumerate(pools):
            if plan[i][step]:
                n += 1
                if leases and pool.take(now, 1, queue_empty=True):
                    admitted.append(now)
                else:
                    decision, _ = lua.acquire(now, Request(f"p{i}.{n}", f"t{n % 7}"))
                    if isinstance(decision, Admit):
                        admitted.append(now)
            if leases and pool.due(now):  # (after a request, or the backend's timer)
                _, epoch, wants = pool.renewal(now, PROCESSES, FLEET.burst)
                grant = lua.lease_tokens(now, T, pool.held, wants, epoch=epoch)
                pool.granted(
                    now,
                    grant.taken,
                    lua.lease.epoch,
                    kept=grant.kept,
                    generation=grant.generation,
                    until=grant.until,
                )
    return admitted, outstanding


@pytest.fixture
def fleet(redis_server_session: RedisServer, functions: bool) -> Iterator[Any]:
    client = redis_server_session.client()
    yield lambda: LuaScheduler(client, FLEET, NO_QUEUE, 0.0, functions=functions)
    client.close()


@pytest.mark.parametrize("per_s", [20.0, 50.0, 200.0], ids=["light", "at-rate", "flood"])
def test_leases_never_admit_more_than_the_bucket_and_about_as_much(
    fleet: Any, per_s: float
) -> None:
    """In any window [a, b]: at most rate x (b - a) + burst, as the plain bucket (the
    leases hold at most half a burst at once: each is within its share of it). And as
    much as without leases, less the tokens leases can hold idle (processes x k <= half
    the burst)."""
    plan = arrivals(7, per_s)
    on, outstanding = drive(fleet(), plan, leases=True)
    off, _ = drive(fleet(), plan, leases=False)
    rate, burst = FLEET.rate or 0.0, FLEET.burst
    assert max(outstanding) <= burst / 2
    for i, start in enumerate(on):
        for j in range(i, len(on)):
            allowed = rate * (on[j] - start) + burst  # (leases included: exact)
            assert j - i + 1 <= allowed + 1e-6, (start, on[j], j - i + 1, allowed)
    assert len(on) <= rate * DURATION_S + burst
    assert len(off) - burst / 2 <= len(on) <= len(off) + burst / 2


def surge(seed: int) -> list[list[bool]]:
    """Light load (20/s a process) for the first second, while the bucket is full and the
    pools hold leases; then a flood (500/s a process)."""
    rng = random.Random(seed)
    steps = int(DURATION_S / STEP_S)
    return [
        [rng.random() < (20.0 if s * STEP_S < 1.0 else 500.0) * STEP_S for s in range(steps)]
        for _ in range(PROCESSES)
    ]


def most_in_a_window(admitted: list[float], rate: float) -> tuple[float, float, int, float]:
    """The window [a, b] whose admissions most exceed rate x (b - a): (a, b, n, excess)."""
    worst = (0.0, 0.0, 0, -float("inf"))
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            excess = j - i + 1 - rate * (admitted[j] - start)
            if excess > worst[3]:
                worst = (start, admitted[j], j - i + 1, excess)
    return worst


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_leases_no_window_admits_more_than_the_bucket_would(fleet: Any, seed: int) -> None:
    """The exact bound, leases included: in any window [a, b] the fleet admits at most
    rate x (b - a) + burst, as the plain bucket would. A surge after a light second is
    where leases held tokens while the bucket refilled to its burst beside them."""
    on, _ = drive(fleet(), surge(seed), leases=True)
    start, end, n, excess = most_in_a_window(on, FLEET.rate or 0.0)
    assert excess <= FLEET.burst + 1e-6, (start, end, n, excess)


# --- lease admissions charged to their tenants --------------------------------------------------


def fairness(
    scheduler: Scheduler | LuaScheduler, tenants: tuple[str, ...]
) -> tuple[dict[str, float], float, float]:
    """The tenants' finish tags, the virtual clock and the open window's cost."""
    if isinstance(scheduler, LuaScheduler):
        return scheduler.fairness(tenants)
    tags = {name: t.finish for name, t in scheduler._tenants.items() if name in tenants}
    return tags, scheduler._vtime, float(scheduler._window.cost)


WEIGHTED = Limits(rate=10.0, burst=20.0, weights={"gold": 2.0})
CHARGED = ("acme", "gold", "idle", "new")


def charge_run(scheduler: Scheduler | LuaScheduler) -> list[Any]:
    """Charges of a tenant at the clock, a weighted one, one far behind it (its credit
    bounded) and one never seen (made as an acquire makes it), then a lease as usual."""
    process = Process()
    seen: list[Any] = []
    scheduler.acquire(0.0, Request("i", "idle"))
    for i in range(30):  # the clock moves on while "idle" stays behind, past its credit
        scheduler.acquire(0.5 + i * 0.1, Request(f"a{i}", "acme"))
    seen.append(fairness(scheduler, CHARGED))
    process.lease(scheduler, 3.5, 0, 0, 12)
    charges = [LeaseCharge("acme", 5, 1), LeaseCharge("gold", 3, 2), LeaseCharge("idle", 2, 1),
               LeaseCharge("new", 1, 1)]  # fmt: skip
    seen.append(process.lease(scheduler, 3.6, 0, 0, 4, charges=charges))
    seen.append(fairness(scheduler, CHARGED))
    seen.append(round(tokens(scheduler), 9))
    return seen


def test_python_and_lua_charge_lease_admissions_alike(lua: Any) -> None:
    python = charge_run(Scheduler(WEIGHTED, POLICY, 0.0))
    assert python == charge_run(lua(WEIGHTED))
    before, after = python[0], python[2]
    assert set(after[0]) == set(CHARGED)  # "gold" and "new" made
    assert after[0]["acme"] == before[0]["acme"] + 5
    assert after[0]["idle"] > before[0]["idle"] + 2  # its credit bounded first
    assert after[2] > before[2]  # the window counts them


KNOWN = ("acme", "gold", "idle")
KNOWN_CHARGES = [LeaseCharge("acme", 5, 1), LeaseCharge("gold", 3, 2), LeaseCharge("idle", 2, 1)]


def known_history(scheduler: Scheduler | LuaScheduler) -> Process:
    """charge_run's tenants, all known before the renewal: one at the clock, a weighted
    one and one far behind it (its credit bounded); then a lease as usual, and a tick at
    the renewal's time (as the backend's acquires between leases make)."""
    scheduler.acquire(0.0, Request("i", "idle"))
    scheduler.acquire(0.0, Request("g", "gold"))
    for i in range(30):
        scheduler.acquire(0.5 + i * 0.1, Request(f"a{i}", "acme"))
    process = Process()
    process.lease(scheduler, 3.5, 0, 0, 12)
    scheduler.tick(3.6)
    return process


def commands_of(client: Any, call: Any) -> tuple[Any, dict[str, int]]:
    """`call()`'s result and the commands Redis ran for it (INFO commandstats)."""
    client.config_resetstat()
    result = call()
    stats = client.info("commandstats")
    skip = ("fcall", "evalsha", "config|resetstat", "info")
    counts = {k[len("cmdstat_") :]: int(v["calls"]) for k, v in stats.items()}
    return result, {k: n for k, n in counts.items() if k not in skip}


def known_renewal(scheduler: Scheduler | LuaScheduler, process: Process) -> LeaseGrant:
    g = process.grant
    held = HeldLease(g.generation, g.until, g.taken + g.kept, 0, 0)
    return scheduler.lease_tokens(3.6, LEASE_S, held, 4, KNOWN_CHARGES)


def test_python_and_lua_charge_known_tenants_alike_by_the_lean_path(lua: Any) -> None:
    """A renewal charging tenants all known (the lean charge, fast.lua's
    call.lean_charges): Lua's tags, clock, window and lease are Python's, and Redis read
    the state's hot fields once and each tenant once, as a call without charges plus a
    read and a write per tenant (its field of P:T: an HGET and an HSET; the full call
    reads the state's cold fields too, and asks whether live weights exist)."""
    python = Scheduler(WEIGHTED, POLICY, 0.0)
    grant = known_renewal(python, known_history(python))
    expected = [grant, fairness(python, KNOWN), round(tokens(python), 9)]
    scheduler = lua(WEIGHTED)
    process = known_history(scheduler)
    grant, commands = commands_of(scheduler._client, lambda: known_renewal(scheduler, process))
    assert [grant, fairness(scheduler, KNOWN), round(tokens(scheduler), 9)] == expected
    assert scheduler.lease.charged == len(KNOWN_CHARGES)
    # (by EVALSHA nothing outlives a call: the live limits are read too, P:cfg's HMGET,
    # and whether any live weight is set is asked)
    state_reads = 1 if scheduler._functions else 2
    assert commands.get("hmget") == state_reads
    assert commands.get("hget") == len(KNOWN)
    assert commands.get("hset") == 1 + len(KNOWN)
    if scheduler._functions:
        assert "exists" not in commands


def tenant_state(scheduler: LuaScheduler, name: str) -> dict[str, str]:
    """Tenant `name`'s field of P:T, taken apart."""
    text = scheduler._client.hget(scheduler._keys.tenant_hash, tenant_digest(name))
    assert text is not None
    return protocol.tenant_state(text)


def budget_state(scheduler: LuaScheduler) -> dict[str, Any]:
    """Everything a budget keeps in Redis after the renewal but the tenants' TTL refresh
    times (`xp`, by which the full call is forced): the state's hash, each tenant's, the
    idle list with its last-use scores."""
    client, keys = scheduler._client, scheduler._keys
    tenants = {name: tenant_state(scheduler, name) for name in KNOWN}
    for state in tenants.values():
        del state["xp"]
    idle = client.zrange(keys.tenants, 0, -1, withscores=True)
    return {"state": client.hgetall(keys.state), "tenants": tenants, "idle": idle}


def test_a_lean_charge_leaves_the_state_the_full_call_leaves(lua: Any) -> None:
    """The same history and the same renewal on two budgets, one forced to the full call
    (a charged tenant due for its TTL refresh): the same reply, the same state, tenants
    (tags, weights: one reweighed by the renewal) and idle list; the lean one ran fewer
    commands. (A call's work is bounded by Redis's clock too: on a loaded machine a
    renewal may charge fewer than it was sent, the rest left for the next one; the pair
    is run again then, at most five times.)"""
    for _ in range(5):
        seen = []
        for forced in (False, True):
            scheduler = lua(WEIGHTED)
            process = known_history(scheduler)
            if forced:  # its queue's TTL refresh due (xp '': 0)
                state = tenant_state(scheduler, "idle")
                text = SEP.join(state[f] if f != "xp" else "" for f in TENANT_FIELDS)
                scheduler._client.hset(
                    scheduler._keys.tenant_hash,
                    tenant_digest("idle"),
                    text + SEP + state["name"],
                )
            # the renewal's charges carry gold's weight as the process has it now (a redeploy)
            scheduler._limits = Limits(rate=10.0, burst=20.0, weights={"gold": 3.0})
            grant, commands = commands_of(
                scheduler._client,
                lambda: known_renewal(scheduler, process),  # noqa: B023
            )
            seen.append((grant, scheduler.lease, budget_state(scheduler), sum(commands.values())))
        if all(reply.charged == len(KNOWN_CHARGES) for _, reply, _, _ in seen):
            break
    (lean, lean_reply, lean_state, lean_n), (full, full_reply, full_state, full_n) = seen
    assert lean_reply.charged == len(KNOWN_CHARGES)
    assert (lean, lean_reply) == (full, full_reply)
    assert lean_state == full_state
    assert lean_state["tenants"]["gold"]["w"] == "3"
    assert lean_n < full_n


def test_a_charge_moves_the_tag_and_clock_as_admissions_one_by_one(lua: Any) -> None:
    """The same admissions, one by one through acquire, or from a lease and charged at the
    renewal: the same tags, clock and window (tenants within their credit)."""

    def run(scheduler: Scheduler | LuaScheduler, leased: bool) -> Any:
        scheduler.acquire(0.0, Request("h0", "heavy"))
        scheduler.acquire(0.0, Request("l0", "light"))
        process = Process()
        if leased:
            assert process.lease(scheduler, 0.0, 0, 0, 14).taken == 14
        order = ["heavy"] * 6 + ["light"] + ["heavy"] * 6 + ["light"]
        for i, name in enumerate(order):
            if not leased:
                decision, _ = scheduler.acquire(0.01 + i * 0.001, Request(f"x{i}", name))
                assert isinstance(decision, Admit)
        if leased:
            charges = [LeaseCharge("heavy", 12, 1), LeaseCharge("light", 2, 1)]
            process.lease(scheduler, 0.05, 0, 0, 0, charges=charges)
        else:
            scheduler.tick(0.05)
        return fairness(scheduler, ("heavy", "light"))

    for make in (lambda: Scheduler(RATE, POLICY, 0.0), lua):
        unleased, leased = run(make(), False), run(make(), True)
        assert leased == unleased
        assert leased[0]["heavy"] == leased[0]["light"] + 9  # 12 - 2, less its head start


def contention(scheduler: Scheduler | LuaScheduler, leased: bool) -> tuple[Any, list[str]]:
    """Two tenants while the budget is light: "heavy" takes 16 of the 18 admissions,
    from a lease (`leased`) or from Redis one by one; then contention starts (the bucket
    empty, each queues six requests) and the budget goes by the fair queueing: the tags
    before it, and the order of the grants."""
    scheduler.acquire(0.0, Request("h0", "heavy"))
    scheduler.acquire(0.0, Request("l0", "light"))
    process, pool = Process(), RatePool(LEASE_S)
    if leased:
        pool.seen(0.0, 18)
        pool.renewal(0.0, 1, 80.0)
        grant = process.lease(scheduler, 0.0, 0, 0, 18)
        pool.granted(0.0, grant.taken, "e", generation=grant.generation, until=grant.until)
    for i, name in enumerate(["heavy"] * 8 + ["light"] + ["heavy"] * 8 + ["light"]):
        now = 0.01 + i * 0.001
        if not (leased and pool.take(now, 1, True, name)):
            decision, _ = scheduler.acquire(now, Request(f"x{i}", name))
            assert isinstance(decision, Admit)
    if leased:  # the renewal: nothing left to give back, the charges sent
        pool.renewal(0.05, 1, 80.0, final=True)
        process.lease(scheduler, 0.05, 0, 0, 0, charges=pool.sending)
    scheduler.tick(0.05)
    tags = fairness(scheduler, ("heavy", "light"))
    granted: list[str] = []
    at = 0.06
    for i in range(6):
        for name in ("heavy", "light"):
            decision, events = scheduler.acquire(at, Request(f"{name}.{i}", name))
            granted += [e.id.split(".")[0] for e in events if hasattr(e, "waited_s")]
            if isinstance(decision, Admit):
                granted.append(name)
    while at < 5.0:
        at = round(at + 0.05, 9)
        events = scheduler.tick(at)
        granted += [e.id.split(".")[0] for e in events if hasattr(e, "waited_s")]
    return tags, granted


def test_a_tenant_heavy_on_leases_gets_no_more_than_its_share_once_contention_starts(
    lua: Any,
) -> None:
    """The tenant that took most of the lease-admitted traffic is behind the other once the
    budget is contended, exactly as if its admissions had gone to Redis one by one: the
    same tags, the same grants (the light tenant's queued requests go first)."""
    for make in (lambda: Scheduler(RATE, POLICY, 0.0), lua):
        unleased, leased = contention(make(), False), contention(make(), True)
        assert leased[0] == unleased[0]
        assert leased[1] == unleased[1]
        granted = leased[1]
        # "light" is 14 behind: its six queued requests go before "heavy"'s first
        assert granted[:6] == ["light"] * 6, granted
        assert granted.count("heavy") == 6, granted


def test_the_pool_records_charges_per_tenant_within_a_bound() -> None:
    pool = granted_pool(MAX_CHARGED + 10)
    for i in range(MAX_CHARGED):
        assert pool.take(0.01, 1, queue_empty=True, tenant=f"t{i}")
    assert pool.take(0.01, 2, queue_empty=True, tenant="t0")  # recorded: more on it
    assert not pool.take(0.01, 1, queue_empty=True, tenant="other")  # full: to Redis
    pool.renewal(0.02, 1, 1000.0)
    assert len(pool.sending) == MAX_CHARGED
    assert pool.sending[0] == LeaseCharge("t0", 3, 2)
    assert pool.take(0.03, 1, queue_empty=True, tenant="t1")  # during the call
    pool.granted(0.02, 0, "e1", charged=10)  # Redis took 10: the rest sent again
    assert pool.pending
    pool.renewal(0.04, 1, 1000.0)
    assert len(pool.sending) == MAX_CHARGED - 10 + 1  # the rest, and the one since
    assert pool.sending[0] == LeaseCharge("t1", 1, 1)
    pool.granted(0.04, 0, "e1")
    assert not pool.pending
    assert pool.take(0.05, 1, queue_empty=True, tenant="other")


def test_charges_of_another_state_are_dropped() -> None:
    pool = granted_pool(5)
    pool.take(0.01, 1, queue_empty=True, tenant="a")
    pool.renewal(0.02, 1, 100.0)
    pool.take(0.03, 1, queue_empty=True, tenant="b")
    pool.granted(0.02, 3, "e2")  # a state made anew
    assert not pool.pending


def test_charges_outlast_a_fault_and_a_refused_renewal_but_not_one_that_may_have_run() -> None:
    """A Redis fault drops the lease, not what is left to charge: it goes, with its epoch,
    with the first renewal once Redis is back (charged there if the state is the same),
    and so does a failed renewal's if it was refused unsent; one that may have run (a
    timeout) is not sent again. A new state drops them (`granted`, as before)."""
    pool = granted_pool(10)
    pool.take(0.01, 1, queue_empty=True, tenant="a")
    pool.renewal(0.02, 1, 100.0)  # (carries a)
    pool.take(0.03, 2, queue_empty=True, tenant="b")
    pool.fault()  # (another call failed first: the renewal is still out)
    assert (pool.tokens, pool.epoch, pool.pending) == (0, "e1", True)
    assert not pool.take(0.04, 1, queue_empty=True, tenant="c")  # no lease: to Redis
    pool.failed(unsent=True)  # (refused: never ran)
    assert pool.renewal(1.0, 1, 100.0)[1] == "e1"
    assert pool.sending == [LeaseCharge("b", 2, 2), LeaseCharge("a", 1, 1)]
    pool.failed(unsent=False)  # (timed out: it may run yet)
    pool.fault()
    assert not pool.pending
    pool = granted_pool(10)
    pool.take(0.01, 1, queue_empty=True, tenant="a")
    pool.fault()
    pool.granted(1.0, 3, "e2")  # Redis back empty: a state made anew
    assert not pool.pending


def test_redis_charges_within_its_work_bound_and_says_how_many(lua: Any) -> None:
    """A renewal of many new tenants: Redis charges as many as a batch call's work bound
    allows (each made counts as an acquire's), and the caller sends the rest again."""
    scheduler = lua()
    process = Process()
    process.lease(scheduler, 0.0, 0, 0, 10)
    charges = [LeaseCharge(f"n{i}", 1, 1) for i in range(MAX_CHARGED)]
    process.lease(scheduler, 0.01, 0, 0, 0, charges=charges)
    charged = scheduler.lease.charged
    assert 2 <= charged < MAX_CHARGED
    tags, _, _ = scheduler.fairness([c.tenant for c in charges])
    assert len(tags) == charged
    process.lease(scheduler, 0.02, 0, 0, 0, charges=charges[charged:])
    assert charged + scheduler.lease.charged <= MAX_CHARGED


def test_charges_respect_max_tenants(lua: Any) -> None:
    policy = Policy(max_wait_s=POLICY.max_wait_s, max_tenants=5)
    for scheduler in (Scheduler(RATE, policy, 0.0), lua(RATE, policy)):
        process = Process()
        process.lease(scheduler, 0.0, 0, 0, 10)
        charges = [LeaseCharge(f"m{i}", 1, 1) for i in range(8)]
        process.lease(scheduler, 0.01, 0, 0, 0, charges=charges)
        assert scheduler.snapshot().tenants <= 5


def test_a_charged_tenant_in_line_goes_back_in_line_by_its_new_tag(lua: Any) -> None:
    """Requests of a tenant queued (from another process) while a lease's admissions of it
    are charged: it is put back in line by its new tag, behind the other tenant."""
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        process = Process()
        assert process.lease(scheduler, 0.0, 0, 0, 20).taken == 20
        for name in ("a", "b"):
            decision, _ = scheduler.acquire(0.0, Request(f"{name}1", name))
            assert isinstance(decision, Enqueue)
        process.lease(scheduler, 0.01, 0, 0, 0, charges=[LeaseCharge("a", 10, 1)])
        granted: list[str] = []
        at = 0.01
        while len(granted) < 2 and at < 3.0:
            at = round(at + 0.05, 9)
            granted += [e.id for e in scheduler.tick(at) if hasattr(e, "waited_s")]
        assert granted == ["b1", "a1"]


def test_a_renewal_without_charges_leases_nothing_while_a_sweep_is_due(
    redis_server_session: RedisServer, functions: bool
) -> None:
    """README, "Leases of rate tokens": a lease only while "the state has no chore due".
    ratelease.lua's renewal without charges runs no idle sweep (its lean call does not load
    the state whole), so while one is due it takes none and the caller's next acquire, a
    full call, sweeps; Scheduler.lease_tokens alike (it leased on: a twin of another rule).
    No tick between (the parity test above ticks before each lease)."""
    client = redis_server_session.client()
    lua = LuaScheduler(client, RATE, POLICY, 0.0, functions=functions)
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua):
        assert isinstance(scheduler.acquire(0.0, Request("r0", "acme"))[0], Admit)  # swept at 0
        first = scheduler.lease_tokens(0.5, 2.0, HeldLease(), 4)
        assert first.taken == 4
        held = HeldLease(first.generation, first.until, 4, returned=4)
        late = scheduler.lease_tokens(1.5, LEASE_S, held, 4)  # the sweep due at 1.0
        assert late == LeaseGrant()
        assert tokens(scheduler) == pytest.approx(20.0)  # (the 4 went back: full)
        assert isinstance(scheduler.acquire(1.5, Request("r1", "acme"))[0], Admit)  # sweeps
        assert scheduler.lease_tokens(1.6, LEASE_S, HeldLease(), 4).taken == 4
    client.close()


def test_a_charging_renewal_leases_while_a_ttl_refresh_is_due(
    redis_server_session: RedisServer, functions: bool
) -> None:
    """A renewal with charges goes by the full call when a TTL refresh is due (fast.lua's
    lean charges give up), and that call's save makes the refresh: nothing is left due, so
    it leases, as Scheduler.lease_tokens (no TTLs) does. It took none before (ratelease.lua
    asked for the refresh before its save). T = 4 s: a refresh due every 1 s."""
    client = redis_server_session.client()
    lua = LuaScheduler(client, RATE, POLICY, 0.0, functions=functions, key_ttl_s=4.0)
    charges = [LeaseCharge("acme", 1, 1)]
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua):
        assert isinstance(scheduler.acquire(0.0, Request("r0", "acme"))[0], Admit)
        first = scheduler.lease_tokens(0.2, LEASE_S, HeldLease(), 4)
        assert first.taken == 4
        held = HeldLease(first.generation, first.until, 4, returned=3)
        # (at 1.5 the refresh (due at 1.0) and the sweep (at 1.0) are both due)
        grant = scheduler.lease_tokens(1.5, LEASE_S, held, 4, charges)
        assert grant.taken == 4
        assert tokens(scheduler) == pytest.approx(16.0)
    assert client.pttl(lua._keys.state) > 3000  # (refreshed by that call: T)
    client.close()
