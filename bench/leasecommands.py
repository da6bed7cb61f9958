"""The Redis commands one lease call (``ratelease.lua``) runs, by ``INFO commandstats``:
deterministic and untimed, a view beside callgrind's instruction counts.

    python bench/leasecommands.py

A renewal of a process whose lease admitted from 0, 8 or 64 tenants (all known: each made
by an acquire first) since its last renewal, on the test clock (``LuaScheduler``).
"""

from __future__ import annotations

from typing import Any

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer, redis_server_binary
from throttle_mw.scheduler import HeldLease, LeaseCharge, Limits, Policy, Request

LIMITS = Limits(rate=1e6, burst=1e6)
POLICY = Policy(max_wait_s={"critical": 5.0, "high": 5.0, "normal": 5.0, "low": 5.0})
UNCOUNTED = ("fcall", "evalsha", "config|resetstat", "info")


def renewal(client: Any, tenants: int) -> tuple[dict[str, int], int]:
    """The commands of one renewal charging `tenants` tenants, and the charges taken."""
    lua = LuaScheduler(client, LIMITS, POLICY, 0.0)
    names = [f"t{i}" for i in range(max(tenants, 8))]
    for i, name in enumerate(names):
        lua.acquire(0.001 * i, Request(f"r{i}", name))
    grant = lua.lease_tokens(0.1, 0.1, HeldLease(), 50)
    held = HeldLease(grant.generation, grant.until, grant.taken, 0, 0)
    lua.acquire(0.15, Request("x", "t0"))
    charges = [LeaseCharge(name, max(1, 50 // tenants), 1) for name in names[:tenants]]
    client.config_resetstat()
    lua.lease_tokens(0.16, 0.1, held, 50, charges)
    stats = client.info("commandstats")
    commands = {
        name[len("cmdstat_") :]: int(stat["calls"])
        for name, stat in stats.items()
        if name[len("cmdstat_") :] not in UNCOUNTED
    }
    return commands, lua.lease.charged


def main() -> None:
    with RedisServer(binary=redis_server_binary()) as server:
        client = server.client()
        for tenants in (0, 8, 64):
            commands, charged = renewal(client, tenants)
            detail = ", ".join(f"{name} {n}" for name, n in sorted(commands.items()))
            print(
                f"charges of {tenants} tenants ({charged} taken): "
                f"{sum(commands.values())} commands ({detail})"
            )
        client.close()


if __name__ == "__main__":
    main()
