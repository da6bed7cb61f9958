"""The load generator's HTTP client: one aiohttp session, kept alive, no pool limit.

An open-loop generator is only honest while it keeps its schedule: latency is
measured from when a request was due, so a client that falls behind inflates
every figure. On this project's 2-core CI machine httpx cost 2.7 ms of CPU per
request and fell 0.7 s behind at 200 requests a second; aiohttp (C-accelerated
parser) cost 1.0 ms and kept within 9 ms at p99. So the load generator uses
aiohttp, while the project's tests and examples use httpx.
"""

from __future__ import annotations

from typing import Final

import aiohttp

#: Below uvicorn's 5 s keep-alive: reusing a connection the server is closing
#: would fail a request through no fault of the server.
KEEPALIVE_EXPIRY_S: Final = 2.0
USER_AGENT: Final = "throttle_mw-loadtest"


def new_session() -> aiohttp.ClientSession:
    """A session for one run: as many connections as requests in flight need."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_EXPIRY_S)
    return aiohttp.ClientSession(
        connector=connector,
        # Timeouts are the engine's (per request); proxies must not reroute a load test.
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        headers={"user-agent": USER_AGENT},
        auto_decompress=False,
    )
