"""HTTP clients for the load generator: many small httpx pools, filled lowest first.

httpcore matches every queued request against every connection of its pool
on each request event, so one pool holding ~1,000 in-flight connections costs
tens of milliseconds of CPU per request, and the client, not the server,
becomes the bottleneck (measured: 28 ms per request with one pool at 1,000 in
flight, under 3 ms with pools of a few connections, on a slow 2-core box). So
each request goes to the first client with fewer than ``per_client`` in
flight: at low load they all share the first client and reuse its
connections; under a deep server queue they spread over as many clients as
it takes.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final

import httpx

#: Below uvicorn's 5 s keep-alive: reusing a connection the server is closing
#: would fail a request through no fault of the server.
KEEPALIVE_EXPIRY_S: Final = 2.0
USER_AGENT: Final = "throttle_mw-loadtest"


class ClientPool:
    """Hands out httpx clients; call ``release`` once per ``acquire``, ``aclose`` at the end.

    With ``client`` given, every request uses it (and ``aclose`` leaves it
    open): the caller owns its limits. Otherwise clients are created as load
    needs them, up to ``max_clients``; past that, the least busy one is used.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        client: httpx.AsyncClient | None = None,
        per_client: int = 8,
        max_clients: int = 512,
    ) -> None:
        self.timeout_s = timeout_s
        self.per_client = per_client if client is None else 2**62
        self.max_clients = max_clients if client is None else 1
        self.owned = client is None
        self.clients: list[httpx.AsyncClient] = [] if client is None else [client]
        self.in_flight: list[int] = [] if client is None else [0]
        self._tls: ssl.SSLContext | None = None
        if client is None:
            self._add()  # now, not on the clock: the first one builds the TLS context

    def acquire(self) -> tuple[int, httpx.AsyncClient]:
        """The client for the next request, and its index for ``release``."""
        index = next((i for i, n in enumerate(self.in_flight) if n < self.per_client), -1)
        if index < 0:
            if len(self.clients) < self.max_clients:
                index = self._add()
            else:
                index = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        return index, self.clients[index]

    def release(self, index: int) -> None:
        self.in_flight[index] -= 1

    async def aclose(self) -> None:
        if self.owned:
            await asyncio.gather(*(c.aclose() for c in self.clients), return_exceptions=True)

    def _add(self) -> int:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # ~0.1 s each: build one, share it
        limits = httpx.Limits(
            # Enough for any burst a client can be handed; requests never queue in the pool.
            max_connections=4 * self.per_client,
            max_keepalive_connections=self.per_client,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self.clients.append(
            # trust_env=False: proxy variables must not reroute a load test.
            httpx.AsyncClient(
                limits=limits, timeout=self.timeout_s, verify=self._tls, trust_env=False
            )
        )
        self.in_flight.append(0)
        return len(self.clients) - 1
