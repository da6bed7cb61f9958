"""The smallest throttled app, configured only by THROTTLE_*, as users write it."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from throttle_mw import ThrottleMiddleware


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


app = Starlette(routes=[Route("/hello", hello)])
app.add_middleware(ThrottleMiddleware)
