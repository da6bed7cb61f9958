"""The heartbeat outlives an error it does not expect.

A heartbeat that stopped for good would let the process's leases lapse while its
requests still run, so the fleet would admit on top of them. An error that is not a
Redis or socket failure (a reply this version cannot read, a bug) is logged and the
next beat goes out as usual.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.support.redis_server import RedisServer
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings


@pytest.mark.anyio
async def test_the_heartbeat_goes_on_after_an_unexpected_error(
    clean_redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    decode = protocol.decode_renew
    calls: list[int] = []

    def failing_once(raw: object) -> protocol.Renewed:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a reply this version cannot read")
        return decode(raw)

    monkeypatch.setattr(protocol, "decode_renew", failing_once)
    # A lease TTL of 1.5 s: a beat every 0.5 s, and a beat may come a second late (a
    # loaded machine: the process or Redis off its core) before the lease lapses. (It was
    # 0.6 s, a beat every 0.2 s: 0.4 s late lapsed it.)
    ttl_s = 1.5
    settings = Settings.from_env(
        {}, redis_url=clean_redis_server.url, key_prefix="hb", concurrency="1", lease_ttl_s=ttl_s
    )
    backend = RedisBackend(settings)
    caplog.set_level(logging.ERROR, logger="throttle_mw.redis")
    loop = asyncio.get_running_loop()
    await backend.start()
    try:
        held = await backend.acquire(Request("a", "acme"))
        assert isinstance(held, Admitted)
        acquired = loop.time()
        # Four beats (the first one's reply failed) and the lease held past 1.5 TTLs, when
        # it would have lapsed without a renewal after that error.
        deadline = acquired + 20.0
        while len(calls) < 4 or loop.time() < acquired + 1.5 * ttl_s:
            assert loop.time() < deadline, f"the heartbeat stopped after the error: {calls}"
            await asyncio.sleep(0.05)
        assert "the heartbeat failed" in caplog.text
        # The lease outlived its TTL and still holds the one slot: it was renewed.
        waiting = await backend.acquire(Request("b", "acme"))
        assert isinstance(waiting, Waiting)
        await backend.cancel(waiting)
    finally:
        backend.release("a")
        await backend.stop()
