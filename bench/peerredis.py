"""The peers' own Redis limiting code, one admission at a time, no HTTP.

For `bench/rediscost.py` and `bench/redisinstr.py` (scenario ``peers``): what each
peer of `bench/peers.py`, set up as there, sends Redis for one request, so Redis's
cost per admission can be set against throttle_mw's in the same run on the same
machine. Each limit is per tenant and never reached (``peers.NEVER`` per second).

- ``slowapi``: its ``Limiter`` with Redis storage and its default strategy (fixed
  window); per request ``limiter.limiter.hit(limit, key, scope)``, as slowapi's
  ``__evaluate_limits`` calls it. slowapi uses limits' *synchronous* storage (the
  call blocks the event loop, as it does in slowapi): one EVALSHA of limits'
  ``incr_expire`` script. limits' async storage sends the same script.
- ``fastapi-limiter``: its ``RateLimiter`` on the per-tenant pyrate-limiter
  ``RedisBucket`` factory of `bench/peers.py`; per request
  ``try_acquire_async(key, blocking=False)`` as ``RateLimiter.__call__`` does: one
  EVALSHA of pyrate-limiter's ``PUT_ITEM`` script (ZCOUNT, ZADD), plus its
  leaker's ZREMRANGEBYSCORE every 10 s.
- ``asgi-ratelimit``: its ``RedisBackend.retry_after(path, user, rule)`` as its
  middleware calls it: TTL of the user's block key, then one EVALSHA of its script.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from .peers import NEVER, _per_tenant_factory

#: One admission of a tenant through a peer's Redis code; raises if refused.
Admit = Callable[[str], Awaitable[None]]
PEERS = ("slowapi", "fastapi-limiter", "asgi-ratelimit")


@asynccontextmanager
async def slowapi(url: str) -> AsyncIterator[Admit]:
    from limits import parse  # type: ignore[import-not-found,unused-ignore]
    from slowapi import Limiter  # type: ignore[import-not-found,unused-ignore]

    limiter = Limiter(key_func=lambda: "", storage_uri=url)
    limit = parse(f"{NEVER}/second")

    async def admit(tenant: str) -> None:
        if not limiter.limiter.hit(limit, tenant, "bench.endpoints.hello"):
            raise RuntimeError("slowapi: not admitted")

    yield admit
    storage: Any = limiter._storage  # limits' RedisStorage; its redis-py client:
    storage.storage.close()


@asynccontextmanager
async def fastapi_limiter(url: str) -> AsyncIterator[Admit]:
    from fastapi_limiter.depends import RateLimiter  # type: ignore[import-not-found,unused-ignore]
    from pyrate_limiter import Limiter  # type: ignore[import-not-found,unused-ignore]
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    dependency = RateLimiter(limiter=Limiter(_per_tenant_factory(int(NEVER), redis)))

    async def admit(tenant: str) -> None:
        key = f"{tenant}:0:0"  # RateLimiter.__call__: identifier, route, dependency
        if not await dependency.limiter.try_acquire_async(key, blocking=dependency.blocking):
            raise RuntimeError("fastapi-limiter: not admitted")

    yield admit
    dependency.limiter.close()
    await redis.aclose()


@asynccontextmanager
async def asgi_ratelimit(url: str) -> AsyncIterator[Admit]:
    from ratelimit import Rule  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from ratelimit.backends.redis import RedisBackend  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from redis.asyncio import StrictRedis

    client = StrictRedis.from_url(url)
    backend = RedisBackend(client)
    rule = Rule(second=int(NEVER))

    async def admit(tenant: str) -> None:
        if await backend.retry_after("/", tenant, rule) != 0:
            raise RuntimeError("asgi-ratelimit: not admitted")

    yield admit
    await client.aclose()


def peer(name: str, url: str) -> Any:
    """The async context manager giving `name`'s `Admit` against `url`."""
    return {
        "slowapi": slowapi,
        "fastapi-limiter": fastapi_limiter,
        "asgi-ratelimit": asgi_ratelimit,
    }[name](url)
