"""Scripts and function libraries lost between their load and their call.

A restart, a failover or `SCRIPT FLUSH`/`FUNCTION FLUSH` makes the next call answer
NOSCRIPT or "Function not found": nothing ran, so `Scripts` loads the code again and
repeats the call. A storm of them can take the library away again between the load and
the call; the call rides out several in a row (CI once saw a call meet three during
tests/test_backend_contract.py's flushes), and a server that never keeps it (a proxy
that sends the load elsewhere) fails the call after a bounded number of loads.

Real Redis: the client below runs every command on the server and flushes scripts and
functions right after a load, a given number of times.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ResponseError

from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import scripts
from throttle_mw.backends.redis.admin import Budget

pytestmark = pytest.mark.anyio

#: Loads that the server forgets at once, in a row, that one call still rides out.
RIDDEN_OUT = 4


class ForgetsAfterLoad(redis.asyncio.Redis):
    """A real Redis that forgets its scripts and functions right after each of the first
    `forgets` loads, as a flush or failover landing between a load and its call does."""

    forgets = 0
    loads = 0

    async def function_load(self, *args: Any, **kwargs: Any) -> Any:
        loaded = await super().function_load(*args, **kwargs)
        await self._forget()
        return loaded

    async def script_load(self, *args: Any, **kwargs: Any) -> Any:
        loaded = await super().script_load(*args, **kwargs)
        await self._forget()
        return loaded

    async def _forget(self) -> None:
        self.loads += 1
        if self.loads <= self.forgets:
            await self.script_flush()
            with contextlib.suppress(ResponseError):  # Redis 6.2 has no functions
                await self.function_flush()


@contextlib.asynccontextmanager
async def forgetting(server: RedisServer, forgets: int) -> AsyncIterator[ForgetsAfterLoad]:
    client = ForgetsAfterLoad(host="127.0.0.1", port=server.port)
    client.forgets = forgets
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_call_rides_out_the_library_lost_after_each_of_several_loads(
    clean_redis_server: RedisServer,
) -> None:
    async with forgetting(clean_redis_server, RIDDEN_OUT) as client:
        budget = Budget(client, "reload")
        await budget.set({"rate": "0.5"}, {})
        assert client.loads == RIDDEN_OUT + 1
        assert (await budget.live_limits())["rate"] == 0.5


async def test_a_server_that_never_keeps_the_library_fails_the_call_after_a_few_loads(
    clean_redis_server: RedisServer,
) -> None:
    async with forgetting(clean_redis_server, 10**6) as client:
        budget = Budget(client, "reload")
        with pytest.raises(ResponseError):
            await budget.set({"rate": "0.5"}, {})
        assert 0 < client.loads <= scripts._ATTEMPTS
        assert await budget.live_limits() == {}  # nothing ran
