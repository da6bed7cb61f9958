"""Coalesce the operations of concurrent requests into one script call.

While a call is in flight, new operations wait; when it returns, everything
that arrived meanwhile goes in the next call. An idle process therefore pays one
round trip per request, and a busy one far less than one.

The calls run in the batcher's own task, never in a request's task: cancelling
a request cannot cut a Redis reply in half. If a request stopped waiting for
its result (it was cancelled), the result is handed to `on_orphan` so the
caller can undo it (release a lease, leave a queue).

A call that gets no answer fails its operations, and those queued behind it
(they would wait for the same silence), unless Redis answered some other call
since it was sent (the breaker closed meanwhile: its `generation` moved): then
its silence is old news (a connection a partition left half-open), and its
operations go again, once, first in the next call, as retries (an acquire that
ran is answered from what ran, never done twice), and those queued behind it
go too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .protocol import DEFERRED, Op, as_retry

logger = logging.getLogger("throttle_mw.redis")

#: Sends a list of operations; returns one result per op, then the trailing fields (none
#: after release.lua's short reply: `protocol.split_reply`).
Call = Callable[[Sequence[Op], bool], Awaitable[list[str]]]

#: Operations per call at most; the script also stops taking them on once its work reaches
#: a bound (scripts.WORK_UNITS counted, scripts.WORK_US by Redis's clock) and answers the
#: rest "deferred": they go first in the next call.
MAX_BATCH = 256
#: After a call whose script deferred operations, the next carries about as many as that
#: one ran (a quarter more, at least MIN_BATCH), and twice as many again after each call
#: that ran all it was sent: the script splits and answers every operation sent, and
#: Redis reads each, so sending ten times what a call can run would cost more than the
#: running.
MIN_BATCH = 16
#: Failures that mean Redis did not answer at all (not an error reply).
UNANSWERED = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


@dataclass(eq=False)
class _Pending:
    op: Op
    #: None for fire-and-forget operations (releases): nobody awaits their result.
    future: asyncio.Future[str] | None
    on_orphan: Callable[[str], None] | None = field(default=None)
    on_failed: Callable[[BaseException], None] | None = field(default=None)
    #: Sent again once already after a call sent before the breaker last closed failed.
    again: bool = False


def _no_breaker() -> int:
    return 0


class Batcher:
    def __init__(
        self,
        call: Call,
        on_trailer: Callable[[list[str]], None],
        generation: Callable[[], int] = _no_breaker,
    ) -> None:
        self._call = call
        self._on_trailer = on_trailer
        #: The breaker's generation (`Breaker.generation`): a call's stamp as it is sent.
        self._generation = generation
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Operations in the next call at most (MIN_BATCH..MAX_BATCH, see MIN_BATCH).
        self._limit = MAX_BATCH
        #: Calls whose operations went again: sent before the breaker last closed (`_send`).
        self.resent = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="throttle-batch")

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def submit(
        self,
        op: Op,
        on_orphan: Callable[[str], None] | None = None,
        on_lost: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Future[str]:
        """`on_orphan`: the answer, if it comes once the caller is gone (its future done);
        `on_lost`: the call's failure, if it fails once the caller is gone (the operation
        may have run in Redis, or may yet: nobody else will say so)."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(RedisConnectionError("throttle_mw backend is closed"))
            return future
        self._pending.append(_Pending(op, future, on_orphan, on_lost))
        self._wake.set()
        if self._task is None:
            self.start()
        return future

    def send(self, op: Op, on_failed: Callable[[BaseException], None]) -> None:
        """Fire and forget (a release): no future to make or await; `on_failed` if the
        call fails, so the caller can clean up once Redis is back."""
        if self._closed:
            on_failed(RedisConnectionError("throttle_mw backend is closed"))
            return
        self._pending.append(_Pending(op, None, None, on_failed))
        self._wake.set()
        if self._task is None:
            self.start()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                limit = self._limit
                batch, self._pending = self._pending[:limit], self._pending[limit:]
                await self._send(batch)
            if self._closed:
                return

    async def _send(self, batch: list[_Pending]) -> None:
        ops = [p.op for p in batch]
        sent = self._generation()
        try:
            try:
                results = await self._call(ops, False)
            except RedisConnectionError:
                # The reply may have been lost after the script ran: ask again,
                # marking acquires as retries so they are answered, not redone.
                sent = self._generation()
                results = await self._call(ops, True)
        except Exception as exc:
            if isinstance(exc, UNANSWERED) and self._generation() != sent:
                # Redis answered another call since this one was sent: its silence is old
                # news. Once more, first in the next call, as retries (see the docstring);
                # an operation sent again once already fails.
                self.resent += 1
                again = [p for p in batch if not p.again]
                batch = [p for p in batch if p.again]
                for pending in again:
                    pending.op = as_retry(pending.op)
                    pending.again = True
                self._pending[:0] = again
            elif isinstance(exc, UNANSWERED):
                # Redis did not answer (down, frozen, cut off): what queued up behind this
                # call would only wait for the same silence once more. It fails now too,
                # so its callers apply the failure mode after one Redis timeout, not two.
                batch += self._pending
                self._pending = []
            for pending in batch:
                future = pending.future
                if future is None or future.done():
                    # Nobody awaits it (a release, or a caller cancelled meanwhile): it
                    # may have run in Redis, or run yet (a frozen Redis reads it when it
                    # thaws); `on_failed` records it, to clean up once Redis is back.
                    if pending.on_failed is not None:
                        pending.on_failed(exc)
                else:
                    future.set_exception(exc)
                    future.exception()  # mark retrieved: the caller may be gone
            return
        self._on_trailer(results[len(ops) :])
        deferred: list[_Pending] = []
        for pending, result in zip(batch, results, strict=False):
            if result == DEFERRED:  # the script had done its share of work: next call
                deferred.append(pending)
                continue
            future = pending.future
            if future is None:
                continue
            if not future.done():
                future.set_result(result)
            elif pending.on_orphan is not None:
                try:
                    pending.on_orphan(result)
                except Exception:
                    logger.exception("throttle_mw: undoing an abandoned operation failed")
        if deferred:
            self._pending[:0] = deferred  # first in the next call, in their order
            ran = len(batch) - len(deferred)
            self._limit = max(MIN_BATCH, ran + ran // 4 + 1)
        elif self._limit < MAX_BATCH:
            self._limit = min(MAX_BATCH, 2 * self._limit)
