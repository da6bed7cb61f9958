"""Redis trouble and process trouble, under load, through real servers and a real Redis.

A worker killed with its slots held, Redis down for 5 s in each failure mode,
scripts flushed and Redis restarted mid-run, a worker shut down gracefully with
requests queued. Times are wall-clock times on this machine (the servers log
their admissions with them), measured from the moment the test acted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from demo_app.loadtest.engine import Record, Scenario, TenantLoad, run
from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer, wait_until
from tests.test_fleet_redis import WORK, admissions, client_for, fleet, fleet_env, probe

pytestmark = pytest.mark.e2e


def load(rate: float, duration_s: float, seed: int = 1) -> Scenario:
    tenants = (TenantLoad("acme", rate, ((1.0, WORK),)),)
    return Scenario("faults", duration_s, seed, tenants, timeout_s=15.0)


def failures(records: Sequence[Record]) -> list[Record]:
    """Anything but a success or a throttle rejection with Retry-After: errors, 500s, resets."""
    return [
        r
        for r in records
        if not (200 <= r.status < 300 or (r.status in (429, 503) and r.retry_after))
    ]


# --- a crashed worker -------------------------------------------------------------------------


def test_a_killed_worker_gives_its_slots_back_within_the_lease_ttl(
    clean_redis_server: RedisServer,
) -> None:
    """Both slots held in a process that is killed, requests queued in it and in another.

    The killed process's leases expire at most a lease TTL after its last renewal;
    its queued requests must not take the freed slots (they would hold them for
    another TTL): the survivor's do.
    """
    ttl = 2.0
    env = fleet_env(
        clean_redis_server.url, "crash", concurrency="2", lease_ttl=str(ttl), max_wait="10"
    )
    state = client_for(clean_redis_server.url)

    def waiting(n: int) -> bool:
        return int(float(state.hget("{crash}:s", "waiting") or 0)) == n

    async def scenario(victim: AppServer, survivor: AppServer) -> tuple[float, list[int]]:
        async with httpx.AsyncClient(timeout=15, headers={"x-tenant-id": "acme"}) as client:
            holders = [asyncio.create_task(client.get(f"{victim.url}/hold")) for _ in range(2)]
            assert await asyncio.to_thread(
                wait_until, lambda: probe(victim)["running"] == 2, timeout_s=5
            )
            # Queued behind the held slots: first in the victim (they die with it) ...
            doomed = [asyncio.create_task(client.get(f"{victim.url}/work")) for _ in range(2)]
            assert await asyncio.to_thread(wait_until, lambda: waiting(2), timeout_s=5)
            # ... then in the survivor.
            queued = [
                asyncio.create_task(client.get(f"{survivor.url}/work?ms=100")) for _ in range(2)
            ]
            assert await asyncio.to_thread(wait_until, lambda: waiting(4), timeout_s=5)
            killed_at = time.time()
            victim.kill()
            results = await asyncio.gather(*queued)
            await asyncio.gather(*holders, *doomed, return_exceptions=True)  # cut off
            return killed_at, [r.status_code for r in results]

    with fleet(2, env) as (victim, survivor):
        killed_at, statuses = asyncio.run(scenario(victim, survivor))
        back = [t - killed_at for t, *_ in admissions([survivor])]
        in_flight_after = int(float(state.hget("{crash}:s", "inflight") or 0))
        queue_after = waiting(0)
    state.close()
    print(f"slots back after kill -9: the survivor's waiters admitted at {back} s")
    assert statuses == [200, 200]
    assert max(back) <= ttl + 0.5, back  # renewals are ttl/3 apart: expiry is within ttl
    assert in_flight_after == 0
    assert queue_after  # the dead process's queued requests were dropped, not granted


# --- Redis down, once per failure mode --------------------------------------------------------

PASSWORD = "s3cret-pa55word"
RATE = 20
OFFERED = 40.0
DOWN_AT, DOWN_S, END_S = 3.0, 5.0, 11.0


@dataclass
class Outage:
    """What happened around one Redis outage; times are wall-clock."""

    t0: float
    down: float
    up: float
    #: Seconds from Redis' return until each budget decided in Redis again.
    back: dict[str, float]
    records: dict[str, list[Record]]
    #: Problem documents answered while Redis was down (closed mode).
    problems: list[dict[str, Any]]


def test_redis_down_for_five_seconds_in_each_failure_mode(redis_binary: Path) -> None:
    """`open` admits, `closed` answers 503 with Retry-After, `local` keeps this process's share.

    Three budgets in one Redis (with a password), loaded at once: one process in
    `open` and in `closed` mode, two in `local` mode, of which only the first is
    loaded (so its share, half the budget, shows). Redis is stopped for 5 s,
    then started again on the same port, empty.
    """
    prefixes = {"open": "fo-open", "closed": "fo-closed", "local": "fo-local"}
    with RedisServer(password=PASSWORD, binary=redis_binary) as server:
        state = client_for(server.url)

        def env(mode: str) -> dict[str, str]:
            return fleet_env(
                server.url,
                prefixes[mode],
                rate=str(RATE),
                burst="4",
                max_wait="2",  # short queues: the load drains soon after it stops
                failure_mode=mode,
            )

        async def scenario(targets: dict[str, AppServer]) -> Outage:
            t0 = time.time()
            runs = {
                mode: asyncio.create_task(run(load(OFFERED, END_S, seed), [s.url]))
                for seed, (mode, s) in enumerate(targets.items())
            }
            await asyncio.sleep(DOWN_AT)
            await asyncio.to_thread(server.stop)
            down = time.time()
            await asyncio.sleep(DOWN_S - (time.time() - down))
            problems = await outage_bodies(targets["closed"].url)
            await asyncio.to_thread(server.start)
            up = time.time()
            back = await asyncio.to_thread(recovery, state, prefixes, up)
            records = {mode: await task for mode, task in runs.items()}
            return Outage(t0, down, up, back, records, problems)

        with (
            fleet(1, env("open")) as [open_],
            fleet(1, env("closed")) as [closed],
            fleet(2, env("local")) as [local, idle],
        ):
            targets = {"open": open_, "closed": closed, "local": local}
            out = asyncio.run(scenario(targets))
            logs = {mode: admissions([s]) for mode, s in targets.items()}
            texts = [s.log() for s in (open_, closed, local, idle)]
        state.close()

    def rate(mode: str, lo: float, hi: float) -> float:
        return sum(1 for t, *_ in logs[mode] if lo <= t < hi) / (hi - lo)

    during = {m: rate(m, out.down + 0.5, out.up) for m in prefixes}
    after = {m: rate(m, out.up + 2.0, out.t0 + END_S) for m in prefixes}
    print(
        f"admitted/s while Redis was down: {during}; after it was back: {after};"
        f" shared budget back after {out.back} s"
    )
    for mode in prefixes:
        assert not failures(out.records[mode]), failures(out.records[mode])[:5]
        assert out.back[mode] <= 2.0, out.back
    assert during["open"] >= 0.9 * OFFERED  # admits everything
    assert during["closed"] == 0.0
    refused = [r for r in out.records["closed"] if out.down + 0.5 <= out.t0 + r.due_s < out.up]
    assert refused
    assert all(r.status == 503 and r.retry_after for r in refused)
    assert 0.7 * RATE / 2 <= during["local"] <= 1.3 * RATE / 2  # its half of the budget
    for mode in prefixes:
        assert 0.8 * RATE <= after[mode] <= 1.1 * RATE, after  # one shared budget again
    # Nothing internal reaches a client: no password, address, keys or Redis text. The
    # logs name which Redis failed (scheme, host, port, db), and nothing else of it.
    endpoint = f"redis://127.0.0.1:{server.port}/0"
    secrets = [PASSWORD, "fo-", "Connection refused", "Error 111"]
    assert out.problems
    assert all(p["status"] == 503 for p in out.problems)
    for text in (json.dumps(p) for p in out.problems):
        assert not [s for s in [*secrets, f":{server.port}", "redis://"] if s in text], text
    for text in texts:
        assert not [s for s in secrets if s in text], text[-2000:]
        assert "Traceback" not in text, text[-2000:]
        assert f"Redis at {endpoint} unavailable" in text, text[-2000:]


async def outage_bodies(url: str) -> list[dict[str, Any]]:
    """Problem documents the closed-mode server answers while Redis is down."""
    async with httpx.AsyncClient(timeout=5, headers={"x-tenant-id": "acme"}) as client:
        replies = [await client.get(f"{url}/work") for _ in range(3)]
    assert all(r.headers["content-type"].startswith("application/problem+json") for r in replies)
    return [r.json() for r in replies]


def recovery(state: redis.Redis, prefixes: dict[str, str], up: float) -> dict[str, float]:
    """Seconds from Redis' return until each budget decides in Redis again (its state exists)."""
    back: dict[str, float] = {}
    deadline = up + 10.0
    while len(back) < len(prefixes) and time.time() < deadline:
        for mode, prefix in prefixes.items():
            if mode not in back and state.exists("{" + prefix + "}:s"):
                back[mode] = time.time() - up
        time.sleep(0.02)
    return {mode: back.get(mode, float("inf")) for mode in prefixes}


# --- scripts flushed, Redis restarted ---------------------------------------------------------


def test_script_flush_and_a_restart_mid_run_reach_no_client(redis_server: RedisServer) -> None:
    """SCRIPT FLUSH, then a restart on the same port (all data gone), under queueing load."""
    # Below the budget, so every request is served; its bursts queue for a moment.
    env = fleet_env(redis_server.url, "blip", rate="30", burst="3", max_wait="3")
    state = client_for(redis_server.url)

    async def scenario(servers: Sequence[AppServer]) -> tuple[list[Record], float, int]:
        t0 = time.time()
        task = asyncio.create_task(run(load(24.0, 5.0), [s.url for s in servers]))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(redis_server.flush_scripts)
        await asyncio.sleep(1.5)
        down = time.time() - t0
        await asyncio.to_thread(redis_server.restart)
        up = time.time()
        back = await asyncio.to_thread(recovery, state, {"blip": "blip"}, up)
        records = await task
        across = sum(1 for r in records if r.sent_s < down < r.done_s)
        return records, back["blip"], across

    with fleet(2, env) as servers:
        records, back, across = asyncio.run(scenario(servers))
        texts = [s.log() for s in servers]
    state.close()
    statuses = {s: sum(1 for r in records if r.status == s) for s in {r.status for r in records}}
    print(
        f"statuses {statuses}; {across} requests in flight when Redis went down;"
        f" budget back {back:.2f} s after the restart"
    )
    assert across > 0
    assert statuses == {200: len(records)}, failures(records)[:5]
    assert back <= 2.0
    assert not [t for t in texts if "Traceback" in t], texts


# --- graceful shutdown ------------------------------------------------------------------------


def test_graceful_shutdown_rejects_the_queue_finishes_the_rest_and_leaves_nothing(
    clean_redis_server: RedisServer,
) -> None:
    # Rate only: admissions without a lease are remembered in the process's own list.
    env = fleet_env(clean_redis_server.url, "bye", rate="1", burst="2", max_wait="10")
    state = client_for(clean_redis_server.url)

    async def scenario(
        server: AppServer, process: str
    ) -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=15, headers={"x-tenant-id": "acme"}) as client:
            running = [
                asyncio.create_task(client.get(f"{server.url}/work?ms=1500")) for _ in range(2)
            ]
            assert await asyncio.to_thread(
                wait_until, lambda: probe(server)["running"] == 2, timeout_s=5
            )
            assert state.llen(f"{{bye}}:rc:{process}") == 2  # its own keys exist ...
            queued = [asyncio.create_task(client.get(f"{server.url}/work")) for _ in range(3)]
            assert await asyncio.to_thread(
                wait_until,
                lambda: int(float(state.hget("{bye}:s", "waiting") or 0)) == 3,
                timeout_s=5,
            )
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            rejected = await asyncio.gather(*queued)
            finished = await asyncio.gather(*running)
            assert await stopping == -15  # a clean exit, not a kill after a timeout
            return rejected, finished

    with fleet(1, env) as [server]:
        assert wait_until(lambda: state.zcard("{bye}:procs") == 1, timeout_s=5)
        [process] = [p.decode() for p in cast("list[bytes]", state.zrange("{bye}:procs", 0, -1))]
        rejected, finished = asyncio.run(scenario(server, process))
        keys = sorted(k.decode() for k in state.scan_iter(match="{bye}:*"))
        log = server.log()
    state.close()
    assert [r.status_code for r in rejected] == [503, 503, 503]
    assert all(r.headers.get("retry-after") for r in rejected)
    assert [r.status_code for r in finished] == [200, 200]
    assert [k for k in keys if process in k] == [], keys  # ... and are gone
    assert not clean_redis_server.client().zscore("{bye}:procs", process)
    assert "Traceback" not in log, log
