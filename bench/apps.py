"""throttle_mw's variants and the controls; `make_app`, which the server process calls.

Every variant serves the same route (`bench.endpoints`: hello-world, or the
overload story's backend) so that differences come from what wraps it. The
uvicorn subprocess runs ``uvicorn --factory bench.apps:make_app`` with
``BENCH_VARIANT`` set. Importing this module registers every variant,
the peers' (`bench.peers`) included.

Adding a variant: write a builder taking the server's environment, decorate it
with `variant` giving the environment it is configured with, the services it
needs (``services=("redis",)``, see `bench.services`), the modules it imports
(``requires=("slowapi",)``; import them inside the builder so the registry
loads without them) and, for a FastAPI-only app, ``baseline="bare-fastapi"``.
Names: ``<library>-<storage>``, e.g. ``slowapi-redis``, ``redis-rate``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from throttle_mw import ThrottleMiddleware

from .endpoints import HELLO_BODY, HELLO_PATH, fastapi_app, starlette_app
from .variants import VARIANT_ENV, get_variant, variant

__all__ = ["HELLO_BODY", "HELLO_PATH", "make_app"]

#: Limits far above anything one worker can serve: every request takes the fast path.
NEVER_RATE = "1000000"
NEVER_CONCURRENCY = "100000"


@variant("bare", "Starlette app, nothing in front of it")
def bare(env: Mapping[str, str]) -> ASGIApp:
    return starlette_app(env)


@variant("bare-fastapi", "FastAPI app, nothing in front of it (baseline of FastAPI-only peers)")
def bare_fastapi(env: Mapping[str, str]) -> ASGIApp:
    app: ASGIApp = fastapi_app(env)
    return app


def throttled(env: Mapping[str, str]) -> ASGIApp:
    # As the README sets it up, with no keyword arguments: the middleware reads
    # THROTTLE_* (THROTTLE_REDIS_URL too) as a deployed app would.
    app = starlette_app(env)
    app.add_middleware(ThrottleMiddleware)
    return app


@variant(
    "memory",
    "the app in ThrottleMiddleware, in-memory backend, limits never reached",
    env={"THROTTLE_RATE": NEVER_RATE, "THROTTLE_CONCURRENCY": NEVER_CONCURRENCY},
)
def throttle_memory(env: Mapping[str, str]) -> ASGIApp:
    return throttled(env)


# The redis service sets THROTTLE_REDIS_URL, which selects the Redis backend.
@variant(
    "redis-rate",
    "the app in ThrottleMiddleware, Redis backend, rate budget never reached",
    env={"THROTTLE_RATE": NEVER_RATE},
    services=("redis",),
    requires=("redis",),
)
def throttle_redis_rate(env: Mapping[str, str]) -> ASGIApp:
    return throttled(env)


@variant(
    "redis-concurrency",
    "the app in ThrottleMiddleware, Redis backend, concurrency budget never reached",
    env={"THROTTLE_CONCURRENCY": NEVER_CONCURRENCY},
    services=("redis",),
    requires=("redis",),
)
def throttle_redis_concurrency(env: Mapping[str, str]) -> ASGIApp:
    return throttled(env)


@variant(
    "memory-both",
    "the app in ThrottleMiddleware, in-memory backend, rate and concurrency budgets never reached",
    env={"THROTTLE_RATE": NEVER_RATE, "THROTTLE_CONCURRENCY": NEVER_CONCURRENCY},
)
def throttle_memory_both(env: Mapping[str, str]) -> ASGIApp:
    return throttled(env)


@variant(
    "redis-both",
    "the app in ThrottleMiddleware, Redis backend, rate and concurrency budgets never reached",
    env={"THROTTLE_RATE": NEVER_RATE, "THROTTLE_CONCURRENCY": NEVER_CONCURRENCY},
    services=("redis",),
    requires=("redis",),
)
def throttle_redis_both(env: Mapping[str, str]) -> ASGIApp:
    return throttled(env)


# Controls, to tell the cost of a middleware layer from the cost of throttling.


class Passthrough:
    """A pure ASGI middleware that does nothing: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@variant("passthrough", "control: the app in a pure ASGI middleware that does nothing")
def passthrough(env: Mapping[str, str]) -> ASGIApp:
    app = starlette_app(env)
    app.add_middleware(Passthrough)
    return app


@variant(
    "disabled",
    "control: the app in ThrottleMiddleware with THROTTLE_ENABLED=false",
    env={"THROTTLE_ENABLED": "false"},
)
def throttle_disabled(env: Mapping[str, str]) -> ASGIApp:
    return throttled(env)


def make_app(name: str | None = None) -> ASGIApp:
    """Build variant `name`, by default the one ``BENCH_VARIANT`` names."""
    name = name or os.environ.get(VARIANT_ENV)
    if not name:
        raise RuntimeError(f"set {VARIANT_ENV} to the benchmark variant to serve")
    return get_variant(name).build(os.environ)


# Last, so the listing shows throttle_mw's variants first.
from . import peers  # noqa: E402, F401  (registers the peers' variants)
