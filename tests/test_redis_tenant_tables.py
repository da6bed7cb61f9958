"""A loaded library gives the tables of a call's new tenants to the next call's new tenants
(store.lua's call.spare_made, load_tenant): never the table of a tenant kept for the next
call, nor that of one dropped. Each test fails if that exception is left out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.keys import tenant_digest
from throttle_mw.scheduler import Limits, Policy, Request, Scheduler
from throttle_mw.settings import DEFAULT_MAX_WAIT_S

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_server_session: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server_session.client()
    if redis_version(client) < (7, 0):
        client.close()
        pytest.skip("a function library (FCALL): only it keeps tables from call to call")
    yield client
    client.close()


def _both(limits: Limits, policy: Policy, client: redis.Redis) -> tuple[Scheduler, LuaScheduler]:
    return Scheduler(limits, policy, 0.0), LuaScheduler(client, limits, policy, 0.0, functions=True)


def _call(py: Scheduler, lua: LuaScheduler, now: float, ops: Sequence[Request | str]) -> None:
    """One batch call on the Lua side (an acquire per Request, a release of each id given
    as a string), the same operations one by one in Python: the same decisions and the
    same events."""
    wire = [
        protocol.release_op(op)
        if isinstance(op, str)
        else protocol.acquire_op(
            op.id, protocol.acquire_tail(op, 1.0, DEFAULT_MAX_WAIT_S[op.priority])
        )
        for op in ops
    ]
    lines, lua_events = lua._call(now, wire)
    want: list[Any] = []
    for op, line in zip(ops, lines, strict=True):
        if isinstance(op, str):
            want += py.release(now, op)
            continue
        decision, events = py.acquire(now, op)
        assert protocol.decode_acquire(line) == decision, op
        want += events
    assert lua_events == want


def _stored(lua: LuaScheduler) -> set[str]:
    """The digests of the tenants in P:T."""
    fields = cast(list[bytes], lua._client.hkeys(lua._keys.tenant_hash))
    return {str(d, "ascii") for d in fields} & set(_DIGESTS)


def _idle(lua: LuaScheduler) -> set[str]:
    """The digests of the tenants on the idle list (P:tenants)."""
    members = cast(list[bytes], lua._client.zrange(lua._keys.tenants, 0, -1))
    return {str(d, "ascii") for d in members} & set(_DIGESTS)


_DIGESTS = {tenant_digest(f"t{i}"): f"t{i}" for i in range(40)}


# (Calls of two operations: a call of more checks its work by Redis's clock, and may defer.)
def test_a_tenant_kept_for_the_next_call_keeps_its_table(client: redis.Redis) -> None:
    """t1, new, queues first in line: keep_line keeps its table for the next call, which
    makes new tenants too; given to one of them, t1's state would be theirs."""
    py, lua = _both(Limits(rate=1.0, burst=1.0), Policy(dict(DEFAULT_MAX_WAIT_S)), client)
    _call(py, lua, 0.0, [Request("a0", "t0"), Request("b0", "t1")])  # t0 admitted, t1 waits
    _call(py, lua, 0.01, [Request("c0", "t2"), Request("d0", "t3")])  # new ones, behind t1
    for now in (1.0, 2.0, 3.0, 4.0):
        assert lua.tick(now) == py.tick(now), now
    assert _stored(lua) == {tenant_digest(t) for t in py._tenants}


def test_a_tenant_dropped_in_its_call_gives_no_table(client: redis.Redis) -> None:
    """With max_tenants 1, each call of two new tenants drops all but one at its end (the
    last call's survivor and one of its own): the dropped are marked deleted; their tables,
    given to the next call's new tenants, would make those unwritten (the one kept: in the
    idle list, not in P:T)."""
    policy = Policy(dict(DEFAULT_MAX_WAIT_S), max_tenants=1)
    py, lua = _both(Limits(rate=1000.0, burst=1000.0), policy, client)
    for n in range(8):
        reqs = [Request(f"r{2 * n + i}", f"t{2 * n + i}") for i in range(2)]
        _call(py, lua, 0.01 * n, reqs)
        assert len(_stored(lua)) == len(py._tenants) == 1, n
        assert _stored(lua) == _idle(lua), n


def test_a_tenant_granted_last_keeps_its_table(client: redis.Redis) -> None:
    """t1, new, queues and is granted in the same call (the release after it): keep_line
    keeps it as the tenant granted last, for its next acquire; a new tenant of that next
    call given its table would share it with t1, taken back into the call's tenants."""
    py, lua = _both(Limits(concurrency=1), Policy(dict(DEFAULT_MAX_WAIT_S)), client)
    _call(py, lua, 0.0, [Request("a0", "t0")])  # t0 holds the only slot
    _call(py, lua, 0.01, [Request("b0", "t1"), "a0"])  # t1 new, waits, granted by the release
    _call(py, lua, 0.02, [Request("b1", "t1"), Request("c0", "t2")])  # t1 again, t2 new
    _call(py, lua, 0.03, ["b0", Request("d0", "t3")])  # t1's second one granted
    _call(py, lua, 0.04, ["b1", "c0"])
    assert _stored(lua) == {tenant_digest(t) for t in py._tenants}
