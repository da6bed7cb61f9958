"""A tenant's queue of one waiter is a field of its own text in P:T, not a key.

store.lua's enqueue keeps a tenant's only waiter in its field of P:T (keys.TENANT_FIELDS'
``q1``: the waiter's rank, one digit, then its id) and makes P:q:<h> only for its second
waiter, the first moved there at its rank's score with sequence number 0 (it came before
any other of its rank). These tests pin that layout and what depends on it: the order of
the queue across the move (first come, first served within a rank; rank first), the
field cleared by every way a waiter leaves (a grant, a cancel, an eviction, an expiry, a
process leaving), and the key's TTL when it is made. The decisions themselves are
compared with Python's in tests/test_scheduler.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.keys import RANK_SPAN, SUFFIX, TENANT_FIELDS, tenant_digest
from throttle_mw.priorities import PRIORITIES, RANK
from throttle_mw.scheduler import (
    Admit,
    Enqueue,
    Evicted,
    Granted,
    Limits,
    Policy,
    Reject,
    Request,
)


@pytest.fixture
def client(redis_server_session: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server_session.client()
    try:
        yield c
    finally:
        c.close()


def one_a_second(client: redis.Redis, **policy: int) -> LuaScheduler:
    """A budget of one admission a second (a burst of 1), its first one spent at 0; every
    priority waits up to 30 s."""
    waits = dict.fromkeys(PRIORITIES, 30.0)
    lua = LuaScheduler(client, Limits(rate=1, burst=1), Policy(waits, **policy), 0.0)
    assert isinstance(lua.acquire(0.0, Request("first", "other"))[0], Admit)
    return lua


def queue_key(lua: LuaScheduler, tenant: str) -> str:
    return lua._tag + SUFFIX["queue"] + tenant_digest(tenant)


def field(lua: LuaScheduler, client: redis.Redis, tenant: str) -> str:
    """The tenant's q1 as stored ('' when its queue is not in its field)."""
    text = client.hget(lua._tag + SUFFIX["tenant_hash"], tenant_digest(tenant))
    assert text is not None
    return protocol.tenant_state(text)["q1"]


def granted(events: list[Granted | Evicted]) -> list[str]:
    return [e.id for e in events if isinstance(e, Granted)]


def test_one_waiter_is_in_its_tenant_s_field_two_in_a_key_with_a_ttl(client: redis.Redis) -> None:
    lua = one_a_second(client)
    assert isinstance(lua.acquire(0.0, Request("a1", "a", "low"))[0], Enqueue)
    assert client.exists(queue_key(lua, "a")) == 0
    assert field(lua, client, "a") == f"{RANK['low']}a1"
    assert isinstance(lua.acquire(0.0, Request("a2", "a", "low"))[0], Enqueue)
    # The second waiter makes the key; the first is moved there, ahead of it.
    assert field(lua, client, "a") == ""
    assert client.zrange(queue_key(lua, "a"), 0, -1, withscores=True) == [
        (b"a1", RANK["low"] * RANK_SPAN),
        (b"a2", pytest.approx(RANK["low"] * RANK_SPAN, abs=1000)),
    ]
    assert client.pttl(queue_key(lua, "a")) > 0
    # Served in order; the key goes with its last member, and the next lone waiter is a field.
    assert granted(lua.tick(1.0)) == ["a1"]
    assert client.zrange(queue_key(lua, "a"), 0, -1) == [b"a2"]
    assert granted(lua.tick(2.0)) == ["a2"]
    assert client.exists(queue_key(lua, "a")) == 0
    assert field(lua, client, "a") == ""
    assert isinstance(lua.acquire(2.0, Request("a3", "a"))[0], Enqueue)
    assert field(lua, client, "a") == f"{RANK['normal']}a3"
    assert client.exists(queue_key(lua, "a")) == 0
    assert granted(lua.tick(3.0)) == ["a3"]
    assert field(lua, client, "a") == ""


@pytest.mark.parametrize(
    ("first", "second", "order"),
    [
        ("normal", "normal", ["w1", "w2", "w3"]),  # first come, first served
        ("low", "normal", ["w2", "w3", "w1"]),  # a more urgent one goes first
        ("critical", "low", ["w1", "w2", "w3"]),
    ],
)
def test_the_queue_keeps_its_order_when_its_first_waiter_moves_to_the_key(
    client: redis.Redis, first: str, second: str, order: list[str]
) -> None:
    lua = one_a_second(client)
    for rid, prio in (("w1", first), ("w2", second), ("w3", second)):
        assert isinstance(lua.acquire(0.0, Request(rid, "a", prio))[0], Enqueue)  # type: ignore[arg-type]
    served = []
    for second_ in (1.0, 2.0, 3.0):
        served += granted(lua.tick(second_))
    assert served == order
    assert lua.waiting == 0


def test_a_lone_waiter_cancelled_evicted_or_expired_leaves_its_field(
    client: redis.Redis,
) -> None:
    lua = one_a_second(client, tenant_queue_limit=1)
    # Cancelled.
    assert isinstance(lua.acquire(0.0, Request("c", "a"))[0], Enqueue)
    assert isinstance(lua.cancel(0.1, "c")[0], Reject)
    assert field(lua, client, "a") == ""
    # Evicted by a more urgent one of its tenant (its queue is full at one).
    assert isinstance(lua.acquire(0.1, Request("low", "a", "low"))[0], Enqueue)
    decision, events = lua.acquire(0.1, Request("urgent", "a", "critical"))
    assert isinstance(decision, Enqueue)
    assert [e.id for e in events if isinstance(e, Evicted)] == ["low"]
    assert field(lua, client, "a") == f"{RANK['critical']}urgent"
    assert client.exists(queue_key(lua, "a")) == 0
    assert granted(lua.tick(1.0)) == ["urgent"]
    assert lua.waiting == 0


def test_a_lone_waiter_past_its_deadline_is_dropped_with_its_field(client: redis.Redis) -> None:
    lua = one_a_second(client)
    assert isinstance(lua.acquire(0.0, Request("gone", "a"))[0], Enqueue)
    assert field(lua, client, "a") == f"{RANK['normal']}gone"
    events = lua.tick(3600.0)  # far past its deadline and the grace: its process is gone
    assert [e.id for e in events if isinstance(e, Evicted)] == ["gone"]
    assert lua.waiting == 0
    assert field(lua, client, "a") == ""


def test_a_process_leaving_takes_its_lone_waiters_from_their_fields(client: redis.Redis) -> None:
    lua = one_a_second(client)
    ids = ["x1", "y1", "y2"]  # x: one waiter (its field), y: two (its key)
    for rid in ids:
        assert isinstance(lua.acquire(0.0, Request(rid, rid[0]))[0], Enqueue)
    assert field(lua, client, "x") == f"{RANK['normal']}x1"
    assert client.exists(queue_key(lua, "y")) == 1
    taken = protocol.decode_left(lua.batch(0.1, [protocol.leave_op(ids)])[0])
    assert taken == len(ids)
    assert lua.waiting == 0
    assert field(lua, client, "x") == ""
    assert client.exists(queue_key(lua, "x"), queue_key(lua, "y")) == 0
    # Both queue anew, each in its field.
    assert isinstance(lua.acquire(0.2, Request("x2", "x"))[0], Enqueue)
    assert isinstance(lua.acquire(0.2, Request("y3", "y"))[0], Enqueue)
    assert granted(lua.tick(1.0)) == ["x2"]
    assert granted(lua.tick(2.0)) == ["y3"]


def test_a_rank_fits_the_one_digit_of_a_lone_waiter_s_field() -> None:
    """A tenant's lone waiter is stored as its rank's one digit, then its id (keys.py's
    TENANT_FIELDS, q1; store.lua's enqueue and load_tenant): ten priorities at most."""
    assert "q1" in TENANT_FIELDS
    assert len(PRIORITIES) <= 10
