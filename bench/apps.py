"""The app under test, and the builders of every benchmark variant.

Every variant serves the same hello-world route so that differences come
from what wraps it. The uvicorn subprocess runs
``uvicorn --factory bench.apps:make_app`` with ``BENCH_VARIANT`` set.

Adding a variant (e.g. a peer library): write a builder taking the server's
environment, decorate it with `variant` giving the environment it is
configured with, the services it needs (``services=("redis",)``, see
`bench.services`) and the modules it imports (``requires=("slowapi",)``), and
import those modules inside the builder so the registry loads without them.
Peers that need a FastAPI app or per-route decorators build their own app
around `hello` with the same path and body. Names: ``<library>-<storage>``,
e.g. ``slowapi-memory``, ``slowapi-redis``, ``redis-rate``, ``redis-concurrency``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from throttle_mw import ThrottleMiddleware

from .variants import VARIANT_ENV, get_variant, variant

HELLO_PATH = "/"
HELLO_BODY = b"Hello, world!"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(HELLO_BODY)


def hello_app(middleware: Sequence[Middleware] = ()) -> Starlette:
    """The bare hello-world app, optionally wrapped in `middleware`."""
    return Starlette(routes=[Route(HELLO_PATH, hello)], middleware=list(middleware))


@variant("bare", "Starlette hello-world, nothing in front of it")
def bare(env: Mapping[str, str]) -> ASGIApp:
    return hello_app()


# Limits far above anything one worker can serve: every request takes the fast path.
@variant(
    "memory",
    "the same app in ThrottleMiddleware, in-memory backend, limits never reached",
    env={"THROTTLE_RATE": "1000000", "THROTTLE_CONCURRENCY": "100000"},
)
def throttle_memory(env: Mapping[str, str]) -> ASGIApp:
    # As the README sets it up, with no keyword arguments: the middleware reads
    # THROTTLE_* as a deployed app would.
    app = hello_app()
    app.add_middleware(ThrottleMiddleware)
    return app


# Controls, to tell the cost of a middleware layer from the cost of throttling.


class Passthrough:
    """A pure ASGI middleware that does nothing: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@variant("passthrough", "control: the same app in a pure ASGI middleware that does nothing")
def passthrough(env: Mapping[str, str]) -> ASGIApp:
    app = hello_app()
    app.add_middleware(Passthrough)
    return app


@variant(
    "disabled",
    "control: the same app in ThrottleMiddleware with THROTTLE_ENABLED=false",
    env={"THROTTLE_ENABLED": "false"},
)
def throttle_disabled(env: Mapping[str, str]) -> ASGIApp:
    return throttle_memory(env)


def make_app(name: str | None = None) -> ASGIApp:
    """Build variant `name`, by default the one ``BENCH_VARIANT`` names."""
    name = name or os.environ.get(VARIANT_ENV)
    if not name:
        raise RuntimeError(f"set {VARIANT_ENV} to the benchmark variant to serve")
    return get_variant(name).build(os.environ)
