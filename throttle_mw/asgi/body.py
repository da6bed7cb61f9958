"""Watch a queued request's ``receive`` for a disconnect without losing its body.

While a request waits for budget, a background reader consumes ``receive`` so
that a client going away is noticed at once. Whatever it reads is kept and
replayed to the app, in order and byte for byte. Once the request is admitted
the reader stops after its current read; it is never cancelled mid-read, so
no message can be lost between it and the app.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.types import Message, Receive

#: Body bytes read ahead while queued; past this the reader stops (and the
#: client's upload waits on TCP back-pressure until the request is admitted).
BUFFER_LIMIT = 256 * 1024


class QueuedReceive:
    def __init__(self, receive: Receive, limit: int = BUFFER_LIMIT) -> None:
        self._receive = receive
        self._limit = limit
        self._buffer: deque[Message] = deque()
        self._buffered = 0
        self._stopping = False
        self.disconnected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while not self._stopping and self._buffered < self._limit:
            message = await self._receive()
            self._buffer.append(message)
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return
            self._buffered += len(message.get("body", b""))

    def admit(self) -> None:
        """Stop reading ahead; the app now reads through `receive`."""
        self._stopping = True

    async def receive(self) -> Message:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            reader = self._reader
            if reader is None:
                return await self._receive()
            if not reader.done():
                # Shielded: if the app cancels this read, the reader's message stays
                # buffered for the app's next call instead of being lost.
                await asyncio.shield(reader)
            self._reader = None
            reader.result()  # propagate a failure of the server's receive

    def close(self) -> None:
        """The response is done: a read still pending can only be a disconnect."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._reader = None
