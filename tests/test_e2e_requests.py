"""Real uvicorn servers over real sockets: no leaked capacity, intact bodies, bad input.

Disconnects, streaming, app failures, shutdown and hostile headers only show
their real behaviour through a server's socket handling, so these tests run
`tests/apps/story.py` under uvicorn in a separate process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from demo_app.loadtest.clients import new_session
from tests.support.servers import AppServer, run_failing_app, wait_until

pytestmark = pytest.mark.e2e

APP = "tests.apps.story:app"


def budget(server: AppServer) -> dict[str, Any]:
    return httpx.get(f"{server.url}/_budget", timeout=5.0).json()  # type: ignore[no-any-return]


def all_free(server: AppServer) -> bool:
    state = budget(server)
    return bool(state["in_flight"] == 0 and state["waiting"] == 0)


def throttle_ms(response: httpx.Response) -> float:
    entry = next(e for e in response.headers["server-timing"].split(",") if "throttle" in e)
    return float(entry.split("dur=")[1].split(";")[0])


async def hold(client: httpx.AsyncClient, url: str, seconds: float) -> httpx.Response:
    return await client.get(url, params={"s": seconds})


def test_disconnects_errors_and_streams_leak_no_capacity(
    start_app_server: Callable[..., AppServer],
) -> None:
    server = start_app_server(
        APP, env={"THROTTLE_CONCURRENCY": "4", "THROTTLE_MAX_WAIT": "10"}, health_path="/hello"
    )

    async def queued_then_gone(client: httpx.AsyncClient) -> str:
        try:
            await client.get(f"{server.url}/slow", params={"s": 0.2}, timeout=0.3)
        except httpx.TimeoutException:
            return "gone"
        return "served"

    async def stream_then_gone(client: httpx.AsyncClient) -> int:
        async with client.stream("GET", f"{server.url}/stream?chunks=100&delay=0.02") as response:
            async for _ in response.aiter_bytes():
                return response.status_code  # leave after the first chunk
        return 0

    async def stream_all(client: httpx.AsyncClient) -> bytes:
        response = await client.get(f"{server.url}/stream?chunks=10&delay=0.01")
        return response.content

    async def scenario() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=20.0) as client:
            holders = [
                asyncio.create_task(hold(client, f"{server.url}/slow", 1.0)) for _ in range(4)
            ]
            await asyncio.sleep(0.2)  # the four slots are taken: everything below queues
            gone = [asyncio.create_task(queued_then_gone(client)) for _ in range(30)]
            await asyncio.sleep(0.5)
            during = budget(server)
            streams = [asyncio.create_task(stream_then_gone(client)) for _ in range(10)]
            failures = [asyncio.create_task(client.get(f"{server.url}/boom")) for _ in range(10)]
            complete = [asyncio.create_task(stream_all(client)) for _ in range(10)]
            return {
                "holders": [r.status_code for r in await asyncio.gather(*holders)],
                "gone": await asyncio.gather(*gone),
                "during": during,
                "streams": await asyncio.gather(*streams),
                "failures": [r.status_code for r in await asyncio.gather(*failures)],
                "complete": await asyncio.gather(*complete),
            }

    result = asyncio.run(scenario())
    assert result["holders"] == [200] * 4
    assert result["gone"].count("gone") == 30  # all queued, all left
    assert result["during"]["in_flight"] == 4
    assert result["streams"] == [200] * 10
    assert result["failures"] == [500] * 10  # the app's own error, passed through
    assert all(body.count(b"chunk") == 10 for body in result["complete"])
    assert wait_until(lambda: all_free(server), timeout_s=10.0), budget(server)

    # The whole budget is free again: four slow requests are all admitted at once.
    async def four() -> list[float]:
        async with httpx.AsyncClient(timeout=10.0) as client:
            responses = await asyncio.gather(
                *(hold(client, f"{server.url}/slow", 0.3) for _ in range(4))
            )
        return [throttle_ms(r) for r in responses]

    assert max(asyncio.run(four())) < 100.0


def test_a_queued_upload_reaches_the_app_byte_for_byte(
    start_app_server: Callable[..., AppServer],
) -> None:
    server = start_app_server(APP, env={"THROTTLE_CONCURRENCY": "1"}, health_path="/hello")
    payload = os.urandom(1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]
            await asyncio.sleep(0)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            holder = asyncio.create_task(hold(client, f"{server.url}/slow", 1.0))
            await asyncio.sleep(0.2)
            upload = await client.post(f"{server.url}/upload", content=chunks())
            return upload, await holder

    upload, holder = asyncio.run(scenario())
    assert holder.status_code == 200
    assert upload.status_code == 200
    assert throttle_ms(upload) > 300.0  # it really waited in the queue
    assert upload.json() == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def test_hostile_tenant_headers_neither_fail_nor_grow_memory(
    start_app_server: Callable[..., AppServer],
) -> None:
    max_tenants = 1000
    server = start_app_server(
        APP,
        env={"THROTTLE_RATE": "1000000", "THROTTLE_MAX_TENANTS": str(max_tenants)},
        health_path="/hello",
    )

    async def flood(count: int, prefix: str) -> list[int]:
        gate = asyncio.Semaphore(32)
        async with new_session() as session:

            async def one(i: int) -> int:
                headers = {"X-Tenant-ID": f"{prefix}{i}"}
                async with gate, session.get(f"{server.url}/hello", headers=headers) as response:
                    await response.read()
                    return response.status

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    assert set(asyncio.run(flood(1000, "warm-"))) == {200}  # warm caches and allocator
    before = rss_kib(server.pid)
    assert set(asyncio.run(flood(10_000, "tenant-"))) == {200}
    after = rss_kib(server.pid)
    assert budget(server)["tenants"] <= max_tenants
    # The README's bound: ~300 bytes per remembered tenant, at most THROTTLE_MAX_TENANTS.
    assert after - before < 8 * 1024, (before, after)

    def status(headers: list[tuple[bytes, bytes]]) -> int:
        return httpx.get(f"{server.url}/hello", headers=headers, timeout=5.0).status_code

    assert status([(b"x-tenant-id", b"x" * 8192)]) == 400
    assert status([(b"x-tenant-id", "ünïcode".encode())]) == 400
    assert status([(b"x-tenant-id", b"\xff\xfe")]) == 400
    assert status([(b"x-tenant-id", b"")]) == 200  # falls back to the client address
    assert status([(b"x-tenant-id", b"a"), (b"x-tenant-id", b"b")]) == 400
    assert status([(b"x-tenant-id", b"a"), (b"x-tenant-id", b"a")]) == 200
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("THROTTLE_RATE", "eighty"),
        ("THROTTLE_CONCURRENCY", "0"),
        ("THROTTLE_MAX_WAIT", "normal=-1"),
        ("THROTTLE_FAILURE_MODE", "sometimes"),
    ],
)
def test_bad_configuration_stops_the_server_with_a_clear_message(variable: str, value: str) -> None:
    # uvicorn's default lifespan mode: the middleware fails start-up itself.
    failed = run_failing_app("tests.apps.plain:app", env={"THROTTLE_RATE": "80", variable: value})
    assert failed.returncode != 0
    assert variable in failed.output
    assert value in failed.output
    assert "expected" in failed.output


def test_graceful_shutdown_finishes_in_flight_and_turns_queued_away(
    start_app_server: Callable[..., AppServer],
) -> None:
    server = start_app_server(
        APP, env={"THROTTLE_CONCURRENCY": "1", "THROTTLE_MAX_WAIT": "20"}, health_path="/hello"
    )

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            in_flight = asyncio.create_task(hold(client, f"{server.url}/slow", 1.5))
            await asyncio.sleep(0.3)
            queued = [
                asyncio.create_task(hold(client, f"{server.url}/slow", 0.1)) for _ in range(3)
            ]
            await asyncio.sleep(0.3)
            os.kill(server.pid, signal.SIGTERM)
            return await in_flight, list(await asyncio.gather(*queued))

    finished, turned_away = asyncio.run(scenario())
    assert finished.status_code == 200
    assert [r.status_code for r in turned_away] == [503] * 3
    for response in turned_away:
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["reason"] == "shutting_down"
    assert wait_until(lambda: not server.is_running, timeout_s=15.0)
