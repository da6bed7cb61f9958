"""The Redis work of one script call, counted in commands (Redis's INFO commandstats).

Counts, not time: they are the same on a loaded machine as on an idle one, so these
tests cannot flake. The scripts run on a fake clock (LuaScheduler), in a real redis-server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Limits, Policy, Request

#: Commands sent by the test's own plumbing, not run by a script.
_PLUMBING = {"fcall", "evalsha", "eval", "info", "config|resetstat", "lrange", "function|load"}


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in _PLUMBING
    }


def saturated_tick_commands(client: redis.Redis, tenants: int) -> dict[str, float]:
    """Commands per tick, by command, of a saturated budget (50/s) with `tenants`
    tenants waiting (300 requests or more in all), all for longer than the idle time."""
    each = max(3, 300 // tenants)
    policy = Policy(
        dict.fromkeys(PRIORITIES, 900.0),
        queue_limit=2 * each * tenants,
        tenant_queue_limit=2 * each,
        tenant_idle_s=60.0,
        max_tenants=tenants // 2,  # fewer than wait: waiting ones are kept all the same
    )
    scheduler = LuaScheduler(client, Limits(rate=50.0, burst=5.0), policy, now=0.0)
    for i in range(each * tenants):
        scheduler.acquire(0.0, Request(f"r{i}", f"t{i % tenants}"))
    assert scheduler.waiting >= each * tenants - 10
    now = 100.0  # past the idle time: every tenant was last seen long ago
    for _ in range(60):  # a second of ticks first: whatever is due once a period is done
        now += 0.02
        scheduler.tick(now)
    client.config_resetstat()
    ticks = 100
    for _ in range(ticks):
        now += 0.02
        scheduler.tick(now)
    assert scheduler.waiting >= 100  # saturated all along
    return {name: calls / ticks for name, calls in commands(client).items()}


def test_a_saturated_budgets_script_work_does_not_grow_with_waiting_tenants(
    client: redis.Redis,
) -> None:
    """No step reads every waiting tenant (the idle sweep, the max-tenants bound, more
    tenants waiting than max_tenants): a call's commands are the same for 10 and 1,000."""
    few = saturated_tick_commands(client, 10)
    client.flushall()
    many = saturated_tick_commands(client, 1000)
    # Each tenant's keys get their TTL pushed out once per quarter idle time, when a call
    # loads it: with many tenants, nearly every tick loads one due (two PEXPIREs).
    refreshes = many.pop("pexpire", 0.0) - few.pop("pexpire", 0.0)
    assert refreshes <= 2.5, refreshes
    assert sum(many.values()) <= sum(few.values()) + 0.5, (
        sorted(few.items()),
        sorted(many.items()),
    )
    # One admission per tick: a few dozen commands, not hundreds.
    assert sum(many.values()) < 40, many
