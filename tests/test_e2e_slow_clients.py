"""Slow clients do not hold the budget (docs/design.md, guarantee 15), on a real uvicorn server.

The slowloris case of issue 13: with a concurrency budget of 8, sixteen clients
trickle 64 KB uploads at about 1 KB/s to a route that reads its body, while
tenants A (10/s) and B (30/s) use another route. Their bodies are read ahead
outside the budget, so A and B are served as if the slow clients were not
there; the slow uploads are answered once their bodies have arrived, or with
408 once THROTTLE_RECEIVE_TIMEOUT has passed. And a reader that stalls in the
middle of a streamed response gives its slot back after THROTTLE_CLIENT_HOLD.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest

from demo_app.loadtest.engine import Record, Route, Scenario, TenantLoad, run
from tests.support.rawhttp import RawResponse, StalledReader, trickle_upload
from tests.support.servers import AppServer, wait_until

pytestmark = pytest.mark.e2e

APP = "tests.apps.story:app"
WORK = Route("work", "GET", "/work", "normal")
RECEIVE_TIMEOUT_S = 8.0
SLOW_RATE = 1024.0  # bytes per second


def tenants_ab(duration_s: float, seed: int) -> Scenario:
    return Scenario(
        "slowloris",
        duration_s,
        seed=seed,
        tenants=(
            TenantLoad("A", 10.0, ((1.0, WORK),)),
            TenantLoad("B", 30.0, ((1.0, WORK),)),
        ),
        timeout_s=15.0,
    )


def p99_ms(records: Sequence[Record], tenant: str) -> float:
    latencies = sorted(r.latency_ms for r in records if r.tenant == tenant and r.status == 200)
    assert latencies, f"nothing of {tenant} was served"
    return latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)]


def fraction_served(records: Sequence[Record], tenant: str) -> float:
    mine = [r for r in records if r.tenant == tenant]
    return sum(1 for r in mine if r.status == 200) / len(mine)


def get_json(server: AppServer, path: str) -> dict[str, Any]:
    return httpx.get(f"{server.url}{path}", timeout=5.0).json()  # type: ignore[no-any-return]


def test_slow_uploads_wait_outside_the_budget(
    start_app_server: Callable[..., AppServer],
    client_core: None,
) -> None:
    """Sixteen 64 KB uploads at 1 KB/s (and four 4 KB ones) against a budget of 8."""
    cpu = "0" if (os.cpu_count() or 1) >= 2 else None
    server = start_app_server(
        APP,
        env={
            "THROTTLE_CONCURRENCY": "8",
            "THROTTLE_RECEIVE_TIMEOUT": str(RECEIVE_TIMEOUT_S),
        },
        cpu=cpu,
        health_path="/hello",
    )
    port = server.port
    attack = os.urandom(64 * 1024)
    finishing = os.urandom(4 * 1024)  # done in 4 s: half the receive timeout

    async def sample(until: float, into: list[dict[str, Any]]) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() < until:
                body = (await client.get(f"{server.url}/_body")).json()
                budget = (await client.get(f"{server.url}/_budget")).json()
                into.append({**body, "in_flight": budget["in_flight"]})
                await asyncio.sleep(0.5)

    async def scenario() -> dict[str, Any]:
        unloaded = await run(tenants_ab(8.0, seed=3), [server.url])
        before = get_json(server, "/_body")
        slow = [
            asyncio.create_task(trickle_upload(port, "/upload", attack, bytes_per_s=SLOW_RATE))
            for _ in range(16)
        ]
        slow_ok = [
            asyncio.create_task(trickle_upload(port, "/upload", finishing, bytes_per_s=SLOW_RATE))
            for _ in range(4)
        ]
        await asyncio.sleep(2.0)  # all twenty are trickling
        samples: list[dict[str, Any]] = []
        # A and B's load from 2 s into the uploads to 5 s past their 408s (as with 15 s and 18 s).
        loaded_s = RECEIVE_TIMEOUT_S + 3.0
        sampler = asyncio.create_task(sample(time.monotonic() + loaded_s, samples))
        loaded = await run(tenants_ab(loaded_s, seed=4), [server.url])
        await sampler
        return {
            "unloaded": unloaded,
            "loaded": loaded,
            "slow": await asyncio.gather(*slow),
            "slow_ok": await asyncio.gather(*slow_ok),
            "before": before,
            "samples": samples,
        }

    result = asyncio.run(scenario())
    unloaded, loaded = result["unloaded"], result["loaded"]
    slow: list[RawResponse] = result["slow"]
    slow_ok: list[RawResponse] = result["slow_ok"]
    samples = result["samples"]
    figures = {
        "A served": fraction_served(loaded, "A"),
        "B served": fraction_served(loaded, "B"),
        "A p99 ms unloaded/loaded": (p99_ms(unloaded, "A"), p99_ms(loaded, "A")),
        "B p99 ms unloaded/loaded": (p99_ms(unloaded, "B"), p99_ms(loaded, "B")),
        "slow statuses": sorted({r.status for r in slow}),
        "slow 408 after s": (min(r.elapsed_s for r in slow), max(r.elapsed_s for r in slow)),
        "finishing served after s": [round(r.elapsed_s, 1) for r in slow_ok],
        "buffered bytes max": max(s["used"] for s in samples),
        "buffered bytes peak": max(s["peak"] for s in samples),
        "rss KiB before/max": (result["before"]["rss_kib"], max(s["rss_kib"] for s in samples)),
        "in flight max": max(s["in_flight"] for s in samples),
    }
    print(json.dumps(figures))
    assert figures["A served"] >= 0.99, figures
    assert figures["B served"] >= 0.99, figures
    for tenant in "AB":
        quiet, busy = figures[f"{tenant} p99 ms unloaded/loaded"]
        assert busy <= 2 * quiet, figures
    # The slow uploads never reached the app: each got its 408 once the timeout passed.
    for response in slow:
        assert response.status == 408, (response, server.log()[-2000:])
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["connection"] == "close"
        assert json.loads(response.body)["reason"] == "body_timeout"
        assert RECEIVE_TIMEOUT_S - 0.5 <= response.elapsed_s <= RECEIVE_TIMEOUT_S + 3.0
        assert response.sent < len(attack)
    # The ones whose bodies arrived in time were served, byte for byte.
    for response in slow_ok:
        assert response.status == 200, response
        assert json.loads(response.body) == {
            "sha256": hashlib.sha256(finishing).hexdigest(),
            "size": len(finishing),
        }
    # Memory: what the slow clients had sent, and no more, was buffered.
    assert figures["buffered bytes peak"] <= 16 * len(attack) + 4 * len(finishing)
    assert wait_until(lambda: get_json(server, "/_body")["used"] == 0, timeout_s=5.0)
    assert "Traceback" not in server.log()


def test_a_stalled_reader_gives_its_slot_back_after_the_client_hold(
    start_app_server: Callable[..., AppServer],
) -> None:
    """Two readers stall mid-stream with both slots held; a third request gets one after 1 s."""
    hold_s = 1.0
    server = start_app_server(
        APP,
        env={
            "THROTTLE_CONCURRENCY": "2",
            "THROTTLE_CLIENT_HOLD": str(hold_s),
            "THROTTLE_MAX_WAIT": "10",
        },
        health_path="/hello",
    )
    readers = [StalledReader(server.port, "/big?mb=256") for _ in range(2)]
    try:
        stalled_at = time.monotonic()
        assert [reader.open() for reader in readers] == [200, 200]

        def running() -> int:
            return int(get_json(server, "/_running")["running"])

        assert wait_until(lambda: running() == 2, timeout_s=5.0)
        # The streams run into back-pressure and stay blocked; the slots come back.
        waiter = httpx.get(f"{server.url}/hello", timeout=10.0)
        admitted_after = time.monotonic() - stalled_at
        assert waiter.status_code == 200, waiter.text
        assert admitted_after <= hold_s + 2.0, (admitted_after, waiter.headers)
        budget = get_json(server, "/_budget")
        assert budget["in_flight"] == 0, budget
        assert running() == 2  # the stalled streams are still there, outside the budget

        # The released streams hold nothing: two new requests run at once, a third waits.
        async def three() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10.0) as client:
                slow = [
                    asyncio.create_task(client.get(f"{server.url}/slow", params={"s": 1.0}))
                    for _ in range(2)
                ]
                await asyncio.sleep(0.3)
                during = get_json(server, "/_budget")
                third = await client.get(f"{server.url}/hello")
                assert during["in_flight"] == 2, during
                return [*(await asyncio.gather(*slow)), third]

        responses = asyncio.run(three())
        assert [r.status_code for r in responses] == [200, 200, 200]
        third_wait = float(responses[2].headers["server-timing"].split("dur=")[1].split(";")[0])
        assert third_wait >= 400.0  # it queued behind the two /slow ones
    finally:
        for reader in readers:
            reader.close()
    assert wait_until(lambda: get_json(server, "/_running")["running"] == 0, timeout_s=10.0)
    budget = get_json(server, "/_budget")
    assert budget["in_flight"] == 0, budget
    assert budget["waiting"] == 0, budget
    assert "Traceback" not in server.log()
