"""Fleet-wide live stats: every replica publishes its counters to Redis, the page adds them up.

Once a second each replica writes its per-tenant rates to a hash of its own
with a short TTL and notes itself in a sorted set of replicas (scored by the
time it last published), so a replica that dies drops out within the TTL.
Whoever serves the page reads the replicas seen recently and merges their
rates. Redis trouble never fails a request: publishing retries next second,
and the page falls back to this process's own counters.

The keys live under ``surveytool:<THROTTLE_KEY_PREFIX>:live:``, apart from the
throttle's own keys; the rates of at most `MAX_TENANTS` tenants per replica
are published, so a flood of tenant ids cannot grow Redis either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .stats import LiveCounters, TenantRates

logger = logging.getLogger("demo_app.publish")

#: Tenants (plus the rest folded) each replica publishes.
MAX_TENANTS: Final = 50
#: Replicas read at most, newest first.
MAX_REPLICAS: Final = 64


class FleetStats:
    """Publish this replica's counters; collect every live replica's."""

    def __init__(
        self,
        counters: LiveCounters,
        redis_url: str,
        *,
        namespace: str,
        replica: str,
        interval_s: float = 1.0,
        ttl_s: int = 5,
    ) -> None:
        self._counters = counters
        self._url = redis_url
        self._replicas_key = f"{namespace}:replicas"
        self._prefix = f"{namespace}:replica:"
        self._replica = replica
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._warned_at = -float("inf")

    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(
            self._url, socket_timeout=0.5, socket_connect_timeout=0.5, decode_responses=True
        )
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="surveytool-publish")

    async def stop(self) -> None:
        """Stop publishing and remove this replica's keys."""
        task, self._task = self._task, None
        if task is not None:
            # redis-py can swallow a cancel that lands while it sets up a connection (seen
            # on Python 3.11: the loop then went on publishing, and this await never
            # returned): the loop checks the flag, and the cancel is sent again until the
            # task has ended.
            self._stopping = True
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.delete(self._prefix + self._replica)
                pipe.zrem(self._replicas_key, self._replica)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._warn("could not remove this replica's live stats", exc)
        finally:
            await client.aclose()

    async def collect(self) -> list[list[TenantRates]] | None:
        """Every live replica's rates (one list per replica); None if Redis cannot answer."""
        client = self._client
        if client is None:
            return None
        try:
            names = await client.zrevrangebyscore(
                self._replicas_key,
                "+inf",
                time.time() - self._ttl_s,
                start=0,
                num=MAX_REPLICAS,
            )
            async with client.pipeline(transaction=False) as pipe:
                for name in names:
                    replica = name.decode() if isinstance(name, bytes) else str(name)
                    pipe.hget(self._prefix + replica, "rates")
                found = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._warn("could not read the fleet's live stats", exc)
            return None
        groups = []
        for raw in found:
            if raw is None:
                continue  # expired between the two reads
            try:
                groups.append([TenantRates.from_json(item) for item in json.loads(raw)])
            except (ValueError, KeyError, TypeError):
                continue  # another version's format: skip, never fail the page
        return groups

    async def publish_once(self) -> None:
        client = self._client
        if client is None:
            return
        rates = json.dumps([r.to_json() for r in self._counters.rates(limit=MAX_TENANTS)])
        now = time.time()
        key = self._prefix + self._replica
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"rates": rates, "at": f"{now:.3f}"})
            pipe.expire(key, self._ttl_s)
            pipe.zadd(self._replicas_key, {self._replica: now})
            pipe.zremrangebyscore(self._replicas_key, "-inf", now - 10 * self._ttl_s)
            pipe.expire(self._replicas_key, 10 * self._ttl_s)
            await pipe.execute()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.publish_once()
            except (RedisError, OSError) as exc:
                self._warn("could not publish live stats", exc)
            await asyncio.sleep(self._interval_s)

    def _warn(self, what: str, exc: BaseException) -> None:
        # At most once a minute: a dead Redis must not flood the log either.
        now = time.monotonic()
        if now - self._warned_at >= 60.0:
            self._warned_at = now
            logger.warning("%s (%s); showing this process's figures", what, type(exc).__name__)
