"""How long an admitted request's slot may wait on its client: `THROTTLE_CLIENT_HOLD`.

A concurrency slot stands for the app's work. Time the app spends blocked on
the client is not work: a ``send`` held up by back-pressure (a client that
reads slowly or not at all; servers such as uvicorn make ``send`` wait while
their write buffer is full) or a ``receive`` waiting for the part of a body
beyond the read-ahead buffer. That time is counted, and once it adds up to the
allowance the slot is given back, even in the middle of a blocked ``send``.
The response goes on outside the budget, at the pace the client reads: the
app is paused by back-pressure most of that time, so its remaining work is
small and bounded by the client's bandwidth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Message, Send

T = TypeVar("T")


class ClientHold:
    """One admitted request's allowance for waiting on its client."""

    __slots__ = ("_left_s", "_release", "released")

    def __init__(self, allowance_s: float, release: Callable[[], None]) -> None:
        self._left_s = allowance_s
        self._release = release
        #: The slot has been given back (the allowance ran out, or the response ended).
        self.released = False

    def give_back(self) -> None:
        """Release the slot now; later calls do nothing."""
        if not self.released:
            self.released = True
            self._release()

    async def send(self, send: Send, message: Message) -> None:
        await self.wait(send(message))

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await something the client holds up, counting the time against the allowance."""
        if self.released:
            return await awaitable
        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = loop.call_at(started + self._left_s, self.give_back)
        try:
            return await awaitable
        finally:
            timer.cancel()
            self._left_s -= loop.time() - started
