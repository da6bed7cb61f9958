"""Leases of rate tokens (``THROTTLE_RATE_LEASE``): a process takes k tokens out of the
shared bucket in one call and admits the next k requests without asking Redis.

- `Scheduler.lease_tokens` and ``ratelease.lua`` (core.lua's ``lease_tokens``) on one fake
  clock: the same tokens taken and given back, the same bucket after.
- Nobody waiting is required to lease: a queued request blocks new leases (it would be
  overtaken), but unspent tokens still go back.
- The process's pool (``ratepool.py``) on a fake clock: admit while a token is there,
  nothing waits in this process and the lease is unexpired; renew early; sized by the
  process's recent rate x T, within its share of the burst.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.scheduler import Admit, Enqueue, Limits, Policy, Request, Scheduler

RATE = Limits(rate=10.0, burst=20.0)
POLICY = Policy(max_wait_s={"critical": 5.0, "high": 5.0, "normal": 5.0, "low": 5.0})


@pytest.fixture
def lua(redis_server_session: RedisServer, functions: bool) -> Iterator[Any]:
    """A LuaScheduler factory on the session's server, by FCALL or by EVALSHA."""
    client = redis_server_session.client()
    yield lambda limits=RATE: LuaScheduler(client, limits, POLICY, 0.0, functions=functions)
    client.close()


def tokens(scheduler: Scheduler | LuaScheduler) -> float:
    snapshot = scheduler.snapshot()
    assert snapshot.tokens is not None
    return snapshot.tokens


# Steps at a fake time: ("lease", returned, wants) or ("acquire", tenant). What each
# gives: the tokens taken, or the decision's kind.
STEPS: list[tuple[float, str, int, int]] = [
    (0.0, "lease", 0, 8),  # 20 in the bucket: 8 taken
    (0.0, "lease", 0, 30),  # 12 left: all 12 taken (no more than there are)
    (0.0, "acquire", 0, 0),  # none left: it waits
    (0.05, "lease", 3, 5),  # someone waits: 3 go back, none taken
    (0.3, "acquire", 0, 0),  # admitted in order
    (0.35, "lease", 0, 4),
    (1.0, "lease", 25, 2),  # back at most to the burst
    (1.2, "lease", 1, 0),  # only give back
    (2.5, "lease", 0, 100),
]


def run(scheduler: Scheduler | LuaScheduler) -> list[tuple[Any, float]]:
    seen: list[tuple[Any, float]] = []
    for i, (at, kind, returned, wants) in enumerate(STEPS):
        if kind == "lease":
            got: Any = scheduler.lease_tokens(at, returned, wants)
        else:
            decision, _ = scheduler.acquire(at, Request(f"r{i}", "acme"))
            scheduler.tick(at)
            got = type(decision).__name__
        seen.append((got, round(tokens(scheduler), 9)))
    return seen


def test_python_and_lua_lease_alike_on_one_clock(lua: Any) -> None:
    python = run(Scheduler(RATE, POLICY, 0.0))
    assert python == run(lua())
    taken = [got for got, _ in python]
    assert taken[:4] == [8, 12, "Enqueue", 0]


def test_a_queued_request_blocks_new_leases_but_tokens_still_go_back(lua: Any) -> None:
    for scheduler in (Scheduler(RATE, POLICY, 0.0), lua()):
        assert scheduler.lease_tokens(0.0, 0, 20) == 20
        decision, _ = scheduler.acquire(0.0, Request("w", "acme"))
        assert isinstance(decision, Enqueue)
        assert scheduler.lease_tokens(0.01, 15, 5) == 0  # someone waits: no lease
        # ... but the 15 went back (and 0.1 s refilled): the waiter goes at the next tick
        assert tokens(scheduler) == pytest.approx(15.1)
        scheduler.tick(0.01)
        assert scheduler.waiting == 0
        assert scheduler.lease_tokens(0.02, 0, 3) == 3  # nobody waits any more
        assert tokens(scheduler) == pytest.approx(11.2)


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
        assert scheduler.lease_tokens(0.0, 0, 5) == 0
        decision, _ = scheduler.acquire(0.0, Request("a", "acme"))
        assert isinstance(decision, Admit)


def test_unspent_tokens_of_another_epoch_do_not_go_back(lua: Any) -> None:
    scheduler = lua()
    assert scheduler.lease_tokens(0.0, 0, 20) == 20
    assert scheduler.lease_tokens(0.0, 20, 0, epoch="not-this-state") == 0
    assert tokens(scheduler) == 0.0
    assert scheduler.lease_tokens(0.0, 20, 0) == 0  # its own epoch: back
    assert tokens(scheduler) == 20.0
