"""``Server-Timing: app;dur=<ms>``: the endpoint's own service time, on every response.

Installed inside the throttle, so the figure excludes the time a request
waited for budget; a load generator gets the added wait as latency minus this.
Pure ASGI (no ``BaseHTTPMiddleware``): it only appends a header to the
response start.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServerTiming:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                dur_ms = (time.perf_counter() - started) * 1000.0
                timing = f"app;dur={dur_ms:.1f}".encode("ascii")
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"server-timing", timing)],
                }
            await send(message)

        await self.app(scope, receive, send_timed)
