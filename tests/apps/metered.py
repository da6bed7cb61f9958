"""A throttled Starlette app with Prometheus metrics (tests/test_metrics.py, tests/test_cli.py).

Settings come from ``THROTTLE_*`` as in production. Routes: ``/`` (untagged),
``/stats`` (low, degradable: answers ``{"degraded": ...}``), ``/healthz``
(exempt), and the metrics both as a route (``/metrics``) and as a mount
(``/mounted/``), to show that both bypass the throttle.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from throttle_mw import ThrottleMiddleware, priority
from throttle_mw.metrics import ThrottleMetrics

metrics = ThrottleMetrics(registry=CollectorRegistry(), tenants=["acme"], top_tenants=3)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@priority("low", degradable=True)
async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"degraded": request.state.throttle.degraded})


@priority("exempt")
async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/stats", stats),
        Route("/healthz", healthz),
        metrics.route(),
        Mount("/mounted", metrics.asgi_app()),
    ],
    middleware=[Middleware(ThrottleMiddleware, observers=[metrics])],
)
