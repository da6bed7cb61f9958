"""Peer libraries, each set up as its documentation shows for per-tenant limits.

Every peer limits per tenant (the ``X-Tenant-ID`` header, else the client
address) at ``BENCH_PEER_RATE`` requests per second: by default far above what
one worker serves (limits never reached, for throughput); the overload story
sets a fair share. Each runs with in-memory storage and with its Redis storage
(``BENCH_REDIS_URL``, from the ``redis`` service).

- slowapi 0.1.x (on ``limits``): ``Limiter(key_func=..., storage_uri=...)``,
  ``@limiter.limit("N/second")`` on the endpoint, ``app.state.limiter`` and the
  ``RateLimitExceeded`` handler, as its quick start shows. Default strategy
  (fixed window). Its checks are synchronous: with Redis, every request blocks
  the event loop for a round trip (that is the library, not the set-up).
- fastapi-limiter 0.2.x (on pyrate-limiter 4): ``Depends(RateLimiter(limiter=
  Limiter(...), identifier=...))``. Its README's ``Limiter(Rate(...))`` keeps
  one bucket for every key (pyrate-limiter's ``SingleBucketFactory`` ignores
  the item name), so the identifier alone does not make per-tenant limits; the
  bucket factory per name from pyrate-limiter's README ("Custom routing with
  BucketFactory") does, with ``InMemoryBucket`` or ``RedisBucket`` buckets.
  FastAPI only: compare it with ``bare-fastapi``.
- asgi-ratelimit 0.10: ``RateLimitMiddleware(app, authenticate, backend,
  {r"^/": [Rule(second=N)]})`` with ``MemoryBackend`` or ``RedisBackend``, the
  ``authenticate`` coroutine returning ``(tenant, "default")``.

The peers' modules are imported inside the builders (the registry loads
without them) and marked for mypy so that it passes with or without the
``bench`` extra installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Scope

from .endpoints import fastapi_app, starlette_app, tenant_of
from .variants import variant

PEER_RATE_ENV = "BENCH_PEER_RATE"
REDIS_URL_ENV = "BENCH_REDIS_URL"
#: Per tenant and second: never reached by one worker.
NEVER = "1000000"
_PEER_ENV = {PEER_RATE_ENV: NEVER}


def peer_rate(env: Mapping[str, str]) -> int:
    return int(env.get(PEER_RATE_ENV) or NEVER)


def _redis_url(env: Mapping[str, str]) -> str:
    url = env.get(REDIS_URL_ENV)
    if not url:
        raise RuntimeError(f"{REDIS_URL_ENV} is not set: the variant needs the redis service")
    return url


def _client_host(client: Any) -> str | None:
    return str(client[0]) if client else None


# --- slowapi -----------------------------------------------------------------------------


def slowapi_tenant(request: Request) -> str:
    return tenant_of(request.headers, _client_host(request.client))


def _slowapi(env: Mapping[str, str], storage_uri: str) -> ASGIApp:
    from slowapi import Limiter, _rate_limit_exceeded_handler  # type: ignore[import-not-found,unused-ignore]
    from slowapi.errors import RateLimitExceeded  # type: ignore[import-not-found,unused-ignore]

    limiter = Limiter(key_func=slowapi_tenant, storage_uri=storage_uri)
    app = starlette_app(env, wrap=limiter.limit(f"{peer_rate(env)}/second"))
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type,unused-ignore]
    return app


@variant(
    "slowapi-memory",
    "peer: slowapi, per-tenant limit, in-memory storage",
    env=_PEER_ENV,
    requires=("slowapi",),
)
def slowapi_memory(env: Mapping[str, str]) -> ASGIApp:
    return _slowapi(env, "memory://")


@variant(
    "slowapi-redis",
    "peer: slowapi, per-tenant limit, Redis storage",
    env=_PEER_ENV,
    services=("redis",),
    requires=("slowapi", "redis"),
)
def slowapi_redis(env: Mapping[str, str]) -> ASGIApp:
    return _slowapi(env, _redis_url(env))


# --- fastapi-limiter ---------------------------------------------------------------------


async def fastapi_limiter_tenant(request: Any) -> str:
    return tenant_of(request.headers, _client_host(request.client))


def _per_tenant_factory(rate: int, redis: Any | None) -> Any:
    """pyrate-limiter's per-name bucket factory: one bucket per tenant key."""
    from pyrate_limiter import (  # type: ignore[import-not-found,unused-ignore]
        BucketFactory,
        Duration,
        InMemoryBucket,
        MonotonicClock,
        Rate,
        RateItem,
        RedisBucket,
        WallClock,
    )

    rates = [Rate(rate, Duration.SECOND)]
    # The clock each kind of bucket's own now() reads (and leaks by): wall-clock
    # milliseconds for Redis buckets (shared across hosts), monotonic in memory.
    clock = WallClock() if redis is not None else MonotonicClock()

    class PerTenantBuckets(BucketFactory):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:
            self.buckets: dict[str, Any] = {}

        def wrap_item(self, name: str, weight: int = 1) -> Any:
            return RateItem(name, clock.now(), weight=weight)

        def get(self, item: Any) -> Any:
            bucket = self.buckets.get(item.name)
            if bucket is not None:
                return bucket
            if redis is None:
                bucket = self.buckets[item.name] = self.create(InMemoryBucket, rates)
                return bucket
            return self._redis_bucket(item.name)

        async def _redis_bucket(self, name: str) -> Any:
            assert redis is not None
            bucket = await RedisBucket.init(rates, redis, f"bench:{name}")
            self.schedule_leak(bucket)
            return self.buckets.setdefault(name, bucket)

    return PerTenantBuckets()


def _fastapi_limiter(env: Mapping[str, str], redis_url: str | None) -> ASGIApp:
    from fastapi import Depends
    from fastapi_limiter.depends import RateLimiter  # type: ignore[import-not-found,unused-ignore]
    from pyrate_limiter import Limiter  # type: ignore[import-not-found,unused-ignore]

    redis = None
    if redis_url is not None:
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url)
    factory = _per_tenant_factory(peer_rate(env), redis)
    limiter = RateLimiter(limiter=Limiter(factory), identifier=fastapi_limiter_tenant)
    app: ASGIApp = fastapi_app(env, [Depends(limiter)])
    return app


@variant(
    "fastapi-limiter-memory",
    "peer: fastapi-limiter (FastAPI), per-tenant limit, in-memory buckets",
    env=_PEER_ENV,
    requires=("fastapi", "fastapi_limiter"),
    baseline="bare-fastapi",
)
def fastapi_limiter_memory(env: Mapping[str, str]) -> ASGIApp:
    return _fastapi_limiter(env, None)


@variant(
    "fastapi-limiter-redis",
    "peer: fastapi-limiter (FastAPI), per-tenant limit, Redis buckets",
    env=_PEER_ENV,
    services=("redis",),
    requires=("fastapi", "fastapi_limiter", "redis"),
    baseline="bare-fastapi",
)
def fastapi_limiter_redis(env: Mapping[str, str]) -> ASGIApp:
    return _fastapi_limiter(env, _redis_url(env))


# --- asgi-ratelimit ----------------------------------------------------------------------


async def asgi_ratelimit_tenant(scope: Scope) -> tuple[str, str]:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    return tenant_of(headers, _client_host(scope.get("client"))), "default"


def _asgi_ratelimit(env: Mapping[str, str], redis_url: str | None) -> ASGIApp:
    from ratelimit import RateLimitMiddleware, Rule  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from ratelimit.backends.simple import MemoryBackend  # type: ignore[import-untyped,import-not-found,unused-ignore]

    backend: Any
    if redis_url is None:
        backend = MemoryBackend()  # type: ignore[no-untyped-call,unused-ignore]
    else:
        from ratelimit.backends.redis import RedisBackend  # type: ignore[import-untyped,import-not-found,unused-ignore]
        from redis.asyncio import StrictRedis

        backend = RedisBackend(StrictRedis.from_url(redis_url))
    app = starlette_app(env)
    app.add_middleware(
        RateLimitMiddleware,
        authenticate=asgi_ratelimit_tenant,
        backend=backend,
        config={r"^/": [Rule(second=peer_rate(env))]},
    )
    return app


@variant(
    "asgi-ratelimit-memory",
    "peer: asgi-ratelimit, per-tenant limit, in-memory backend",
    env=_PEER_ENV,
    requires=("ratelimit",),
)
def asgi_ratelimit_memory(env: Mapping[str, str]) -> ASGIApp:
    return _asgi_ratelimit(env, None)


@variant(
    "asgi-ratelimit-redis",
    "peer: asgi-ratelimit, per-tenant limit, Redis backend",
    env=_PEER_ENV,
    services=("redis",),
    requires=("ratelimit", "redis"),
)
def asgi_ratelimit_redis(env: Mapping[str, str]) -> ASGIApp:
    return _asgi_ratelimit(env, _redis_url(env))
