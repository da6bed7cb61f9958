"""What store.lua's save writes, text by text (branch `satsave`, docs/performance.md).

- A tenant's queue TTL refresh time (its field `xp` in P:T) is a whole second when one is
  still ahead of `now` (a refresh up to a second sooner: the text a whole number's, made
  once a second, not a 17-digit one per call), the exact time otherwise (a short idle time).
- The packed numbers that count up (the window's admitted cost, the sequence, the call
  stamp `lm`) are written as their decimal texts by call.count_text (a concatenation of
  their tens' text and a digit): each call's text moves them by the same step, across the
  tens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.keys import tenant_digest
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Enqueue, Limits, Policy, Request

#: P:s's packed numbers by place (store.lua's PACKED, in its order).
WIN_COST, SEQ, LM = 5, 11, 19


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def tenant_xp(client: redis.Redis, scheduler: LuaScheduler, tenant: str) -> str:
    raw = client.hget(scheduler._keys.tenant_hash, tenant_digest(tenant))
    return protocol.tenant_state(cast(bytes, raw))["xp"]


def test_a_tenants_refresh_time_is_a_whole_second_while_one_is_ahead(
    client: redis.Redis,
) -> None:
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), tenant_idle_s=60.0)
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    assert isinstance(scheduler.acquire(100.37, Request("r1", "a"))[0], Admit)
    # now + idle / 4 = 115.37: its whole second, 115 (ahead of now), as a whole number
    assert tenant_xp(client, scheduler, "a") == "115"
    # a tenant written again before it is due keeps it
    assert isinstance(scheduler.acquire(110.9, Request("r2", "a"))[0], Admit)
    assert tenant_xp(client, scheduler, "a") == "115"
    # due (115 <= now): pushed out again, to the whole second of now + 15
    assert isinstance(scheduler.acquire(115.2, Request("r3", "a"))[0], Admit)
    assert tenant_xp(client, scheduler, "a") == "130"


def test_a_short_idle_time_keeps_the_exact_refresh_time(client: redis.Redis) -> None:
    # idle / 4 = 0.5 s: the whole second below now + 0.5 may not be ahead of now
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), tenant_idle_s=2.0)
    scheduler = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
    assert isinstance(scheduler.acquire(100.2, Request("r1", "a"))[0], Admit)
    assert float(tenant_xp(client, scheduler, "a")) == 100.2 + 0.5  # 100 is not ahead
    assert isinstance(scheduler.acquire(200.7, Request("r2", "b"))[0], Admit)
    assert tenant_xp(client, scheduler, "b") == "201"  # (200.7 + 0.5: 201 is)


def test_the_counting_numbers_texts_count_up_across_their_tens(client: redis.Redis) -> None:
    """A queued acquire moves the sequence by the same step each time, a full call the stamp
    (a loaded library's) one up, a grant the window's cost: their texts follow past 10 and
    100 (a wrong digit at a tens changes a step)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 900.0), queue_limit=1000, tenant_queue_limit=1000)
    scheduler = LuaScheduler(client, Limits(rate=50.0, burst=1.0), policy, now=0.0)
    now = 10.0
    assert isinstance(scheduler.acquire(now, Request("r0", "a"))[0], Admit)

    def packed() -> list[str]:
        return cast(bytes, client.hget(scheduler._keys.state, "nums")).decode().split("|")

    before = packed()
    seq_step = 0
    for i in range(1, 130):
        # one acquire that queues (a full call: someone waits after it), then one tick that
        # grants the oldest waiter (another full call)
        decision, _ = scheduler.acquire(now, Request(f"r{i}", "a"))
        assert isinstance(decision, Enqueue), decision
        after = packed()
        step = int(after[SEQ]) - int(before[SEQ])
        if i == 1:
            seq_step = step  # (a waiter's number, and its tenant's activation's at first)
        assert step == seq_step, (i, before[SEQ], after[SEQ])
        assert after[SEQ] == str(int(after[SEQ]))
        if before[LM] != "":  # (a loaded library's stamp; EVAL keeps none)
            assert int(after[LM]) == int(before[LM]) + 1, (before[LM], after[LM])
            assert after[LM] == str(int(after[LM]))
        before = after
        now += 0.02
        granted = scheduler.tick(now)
        assert granted, i
        after = packed()
        cost0, cost1 = float(before[WIN_COST]), float(after[WIN_COST])
        assert cost1 == cost0 + 1 or cost1 < cost0, (
            before[WIN_COST],
            after[WIN_COST],
        )  # (or rolled)
        assert after[WIN_COST] == str(int(cost1))
        if before[LM] != "":
            assert int(after[LM]) == int(before[LM]) + 1, (before[LM], after[LM])
        before = after
