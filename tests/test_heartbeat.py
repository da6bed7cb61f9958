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
    # A lease TTL of 0.6 s: a beat every 0.2 s.
    settings = Settings.from_env(
        {}, redis_url=clean_redis_server.url, key_prefix="hb", concurrency="1", lease_ttl_s=0.6
    )
    backend = RedisBackend(settings)
    caplog.set_level(logging.ERROR, logger="throttle_mw.redis")
    await backend.start()
    try:
        held = await backend.acquire(Request("a", "acme"))
        assert isinstance(held, Admitted)
        for _ in range(100):  # bounded: 10 s at most
            if len(calls) >= 4:
                break
            await asyncio.sleep(0.1)
        assert len(calls) >= 4, "the heartbeat stopped after the error"
        assert "the heartbeat failed" in caplog.text
        # The lease outlived several TTLs and still holds the one slot: it was renewed.
        waiting = await backend.acquire(Request("b", "acme"))
        assert isinstance(waiting, Waiting)
        await backend.cancel(waiting)
    finally:
        backend.release("a")
        await backend.stop()
