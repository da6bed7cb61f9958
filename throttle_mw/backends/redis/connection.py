"""Connecting to Redis: one pooled client for script calls, one connection for grants.

Both have explicit socket timeouts and no blind retries: a call that fails is
the failure mode's business (``recovery.py``), not redis-py's. The pool is
bounded and waits `THROTTLE_REDIS_TIMEOUT` for a free connection rather than
failing at once; the grant listener's connection blocks in BLPOP for up to
`BLOCK_S`, so its timeout is that much longer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ...settings import Settings
from .grants import BLOCK_S

#: Connections in the pool for script calls (a batch call at a time needs one; heartbeats,
#: snapshots and the tools' calls share the rest).
POOL_SIZE = 16


class Clients(NamedTuple):
    #: For script calls.
    calls: Any
    #: The grant listener's own connection (BLPOP).
    grants: Any


def connect(settings: Settings) -> Clients:
    """The clients for `settings`; nothing is sent until the first call."""
    url = settings.redis_url
    assert url is not None
    timeout = settings.redis_timeout_s
    no_retry = Retry(NoBackoff(), 0)
    if settings.redis_cluster:
        return Clients(
            RedisCluster.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=no_retry,
                max_connections=POOL_SIZE,
            ),
            RedisCluster.from_url(
                url,
                socket_timeout=BLOCK_S + timeout + 1.0,
                socket_connect_timeout=timeout,
                retry=no_retry,
            ),
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=timeout,  # a full pool waits this long rather than failing at once
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=no_retry,
    )
    return Clients(
        Redis.from_pool(pool),  # owns the pool: aclose() disconnects it
        Redis.from_url(
            url,
            socket_timeout=BLOCK_S + timeout + 1.0,
            socket_connect_timeout=timeout,
            retry=no_retry,
            single_connection_client=True,
        ),
    )


async def initialize(clients: Clients) -> None:
    """Redis Cluster: learn the slot map now, not in the first request (a few round trips)."""
    for client in clients:
        await client.initialize()
