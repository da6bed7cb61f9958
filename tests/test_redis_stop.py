"""A process that stops with thousands of requests waiting leaves the queue in a few calls.

`RedisBackend.stop()` sends its waiters' ids in leave operations (batch.lua's leave):
each script call takes as many as its work allows (scripts.LEAVE_US), one command per key
for all of them, and dispatches once. Counted in script calls (INFO commandstats), not
time. What it leaves behind for the other processes: no waiter, no waiting count, no
queue entry of its own; the queue room and the capacity go to the others at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio

from tests.support.lua_scheduler import LuaScheduler, redis_version
from tests.support.redis_server import RedisServer
from throttle_mw.backends import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.keys import tenant_digest
from throttle_mw.backends.redis.scripts import LEAVE_CHUNK
from throttle_mw.scheduler import Admit, Enqueue, Limits, Policy, Reject, Request
from throttle_mw.settings import DEFAULT_MAX_WAIT_S, Settings

_WAITERS = 2000
_FOREVER = {"critical": 600.0, "high": 600.0, "normal": 600.0, "low": 600.0}


def settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": "stop",
        "redis_timeout_s": 5.0,
        "concurrency": 1,
        "queue_limit": 2 * _WAITERS,
        "tenant_queue_limit": _WAITERS // 40,
        "max_wait_s": _FOREVER,
    }
    return Settings.from_env({}, **{**values, **overrides})


async def script_calls(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("fcall", "evalsha")
    )


@pytest.mark.anyio
async def test_stop_with_thousands_waiting_takes_a_few_calls_and_leaves_nothing_behind(
    clean_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis_server.url, decode_responses=True)
    other = RedisBackend(settings(clean_redis_server.url))
    leaving = RedisBackend(settings(clean_redis_server.url))
    await other.start()
    await leaving.start()
    try:
        held = await other.acquire(Request("held", "o"))  # the one slot, held all along
        assert isinstance(held, Admitted)
        queued = await other.acquire(Request("o.1", "o"))
        assert isinstance(queued, Waiting)
        # The leaving process's waiters, of 40 tenants, each queue full.
        outcomes = await asyncio.gather(
            *(leaving.acquire(Request(f"l.{i}", f"t{i % 40}")) for i in range(_WAITERS))
        )
        assert all(isinstance(o, Waiting) for o in outcomes)
        assert await client.hget("{stop}:s", "waiting") == str(_WAITERS + 1)
        full = await other.acquire(Request("o.2", "t0"))  # t0's queue is full
        assert isinstance(full, Reject)
        assert full.reason == "tenant_queue_full"

        before = await script_calls(client)
        await leaving.stop()
        calls = await script_calls(client) - before
        # A cancel each took ~1 call per 19 waiters (105 here), a leave of one chunk per
        # call would take 125; leaves take a few: 14 on a quiet machine. Each call stops
        # after LEAVE_US by Redis's clock, which runs on while a loaded machine preempts
        # Redis, so a loaded one takes more (up to 24 seen with both cores busy). The bound
        # is half of 105, with room for that and heartbeats.
        assert calls <= _WAITERS // 40, calls
        assert all(o.future.done() for o in outcomes if isinstance(o, Waiting))
        assert {o.future.result() for o in outcomes if isinstance(o, Waiting)} == {
            Reject("shutting_down", 1.0)
        }

        # Nothing of the leaving process's is left: the other's waiter only.
        assert await client.hget("{stop}:s", "waiting") == "1"
        assert await client.hkeys("{stop}:r") == ["o.1"]
        assert await client.zrange("{stop}:dl", 0, -1) == ["o.1"]
        assert await client.zrange("{stop}:qlen", 0, -1) == [tenant_digest("o")]
        for i in range(40):
            assert await client.exists(f"{{stop}}:q:{tenant_digest(f't{i}')}") == 0
            text = await client.hget("{stop}:T", tenant_digest(f"t{i}"))
            assert text is not None
            assert protocol.tenant_state(text)["n"] == "", text  # (0: its default)
        # Its queue room is the others' at once, and so is the capacity.
        again = await other.acquire(Request("o.3", "t0"))
        assert isinstance(again, Waiting)
        other.release("held")
        granted = await asyncio.wait_for(queued.future, 5.0)
        assert isinstance(granted, Admitted)
        other.release("o.1")
        assert isinstance(await asyncio.wait_for(again.future, 5.0), Admitted)
        other.release("o.3")
    finally:
        await leaving.stop()
        await other.stop()
        await client.aclose()


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_a_leave_gives_back_a_lease_granted_meanwhile_and_empties_the_queue(
    redis_server: RedisServer, functions: bool
) -> None:
    """A grant can cross the shutdown: the leave finds the id admitted, not waiting, and
    gives its lease back. The others leave the queue; the budget is as if they never came."""
    client = redis_server.client()
    if functions and redis_version(client) < (7, 0):
        client.close()
        pytest.skip("this Redis has no functions (the scripts run by EVALSHA on it)")
    try:
        limits = Limits(concurrency=1)
        lua = LuaScheduler(client, limits, Policy(DEFAULT_MAX_WAIT_S), 0.0, functions=functions)
        assert isinstance(lua.acquire(0.0, Request("r0", "a"))[0], Admit)
        for i in range(1, 40):
            assert isinstance(lua.acquire(0.0, Request(f"r{i}", f"t{i % 3}"))[0], Enqueue)
        lua.release(0.1, "r0")  # r1 is granted: its message is on its way
        assert lua.in_flight == 1
        ids = [f"r{i}" for i in range(1, 40)]
        left = ids
        while left:  # as RedisBackend.stop: a call takes what LEAVE_US (Redis's clock) allows
            taken = protocol.decode_left(lua.batch(0.2, [protocol.leave_op(left)])[0])
            assert taken >= min(len(left), LEAVE_CHUNK), (taken, left)  # a chunk at least
            left = left[taken:]
        assert (lua.in_flight, lua.waiting) == (0, 0)
        assert client.hlen(f"{lua._tag}:r") == 0
        assert client.exists(f"{lua._tag}:dl", f"{lua._tag}:qlen", f"{lua._tag}:active") == 0
        assert isinstance(lua.acquire(0.3, Request("next", "b"))[0], Admit)  # at once
    finally:
        client.close()
