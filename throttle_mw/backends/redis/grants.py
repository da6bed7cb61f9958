"""Deliver grants to the requests waiting in this process.

Whichever process frees capacity, the script that dispatches pushes a message
onto the waiting process's list (``P:g:<process>``). One dedicated connection
per process reads it with BLPOP, so a waiter resumes within a round trip of the
grant, with no polling. After a connection failure the listener reconnects and
tells the backend, which re-submits its waiters (idempotently), so no waiter
depends on a message that a Redis restart or the dropped connection may have
lost. Its own connection failing is not Redis failing: the backend checks Redis
on the call path's connections before it opens the breaker (``recovery.py``,
`_listener_lost`). A connection left half-open by a partition (no answer, no reset)
is noticed at its socket timeout; when Redis answers on the call path again before
that, the backend has the listener reconnect at once (`kick`). So it does when a reply
on the call path comes while the BLPOP in flight is overdue (out longer than `BLOCK_S`
and a Redis timeout: Redis answers BLPOP at `BLOCK_S`), as when a middlebox dropped this
one connection while the others work (`sent_at`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

logger = logging.getLogger("throttle_mw.redis")

#: BLPOP blocks at most this long, so a dead connection is noticed in time.
BLOCK_S = 1.0


class GrantListener:
    def __init__(
        self,
        client: Any,
        key: str,
        on_message: Callable[[str], None],
        on_reconnect: Callable[[], None],
        on_failure: Callable[[BaseException], None],
        *,
        endpoint: str = "Redis",
    ) -> None:
        self._client = client
        #: Which Redis, for the logs (no credentials: see settings.redis_endpoint).
        self._endpoint = endpoint
        self._key = key
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._on_failure = on_failure
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: The BLPOP in flight; whether `kick` cancelled it.
        self._call: asyncio.Future[Any] | None = None
        self._kicked = False
        self._why = ""
        #: When (time.monotonic) the BLPOP in flight was sent; 0.0: none out.
        self.sent_at = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="throttle-grants")

    async def stop(self) -> None:
        # A flag as well as cancel(): on Python 3.11 a cancel that lands as a Redis reply
        # arrives is swallowed (asyncio.wait_for inside redis-py), and the loop would go on.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def kick(self, why: str = "Redis is back") -> bool:
        """Redis answers on the call path again after an outage: drop the BLPOP in flight,
        if any, and its connection (redis-py closes a connection whose read is cancelled),
        and reconnect now. It went out before Redis answered again, so it may be on a
        connection a partition left half-open (no answer, no reset), noticed only at its
        socket timeout, while grants go unheard. The reconnect re-submits the waiters
        (`on_reconnect`), as after any lost connection, so a grant popped as the call was
        dropped is not lost. Whether one was in flight. (`why`: for the log.)"""
        call = self._call
        if call is None or call.done():
            return False
        self._kicked = True
        self._why = why
        call.cancel()
        return True

    def _deliver(self, message: bytes | str) -> None:
        self._on_message(message.decode() if isinstance(message, bytes) else message)

    async def _run(self) -> None:
        backoff = 0.05
        failed = False
        while not self._closing:
            try:
                self.sent_at = time.monotonic()
                self._call = call = asyncio.ensure_future(
                    self._client.blpop([self._key], timeout=BLOCK_S)
                )
                try:
                    item = await call
                finally:
                    self._call = None
                    self.sent_at = 0.0
                self._kicked = False  # (a cancel that came as it was answered: not taken)
                if failed:
                    failed = False
                    self._on_reconnect()
                backoff = 0.05
                if item is None:
                    continue
                # Deliver at once; only then take whatever queued up behind it, in one go.
                self._deliver(item[1])
                for message in await self._client.lpop(self._key, 256) or ():
                    self._deliver(message)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._kicked or self._closing or (task is not None and task.cancelling()):
                    raise
                # `kick`: reconnect now (then `on_reconnect`).
                self._kicked = False
                logger.info(
                    "throttle_mw: the grant listener reconnects to Redis at %s (%s)",
                    self._endpoint,
                    self._why,
                )
                failed = True
            except (RedisError, OSError) as exc:
                if not failed:
                    logger.warning(
                        "throttle_mw: grant listener lost Redis at %s (%s)",
                        self._endpoint,
                        type(exc).__name__,
                    )
                failed = True
                self._on_failure(exc)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            except Exception:
                logger.exception("throttle_mw: grant listener failed")
                await asyncio.sleep(0.5)
