"""Request bodies read ahead, so that a slot is held by the app's work, not a client's upload.

A request with a body reads it ahead before asking for budget (`read_ahead`: up
to `THROTTLE_BODY_BUFFER` bytes, within `THROTTLE_RECEIVE_TIMEOUT`, which the
caller enforces): a slow upload waits outside the budget. While a request is
queued, a background reader watches ``receive`` for a disconnect (`watch`).
Whatever was read is replayed to the app in order, byte for byte.

With ``THROTTLE_CANCEL_ON_DISCONNECT``, it goes on watching while the app
runs (`follow`), but only once the whole body has been read (read ahead, or
by the app itself): ``receive`` may have one consumer only (hypercorn's is a
queue), so the message it reads, the disconnect, is kept and handed to the
app's own ``receive`` calls too.

Every byte buffered here counts against one `BodyBuffers` per middleware (the
process's total, `THROTTLE_BODY_BUFFER_TOTAL`). When that is full, reading
pauses, so clients wait on TCP back-pressure, until the app consumes what is
buffered; a read that already started may add one more network read (at most
64 KiB in uvicorn) beyond it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from starlette.types import Message, Receive

from .hold import ClientHold


class BodyBuffers:
    """The bytes of request bodies buffered in one process at once, bounded in total."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        #: The most ever buffered at once (for operators and the slow-client tests).
        self.peak_bytes = 0
        self._freed: asyncio.Event | None = None

    def take(self, size: int) -> None:
        self.used_bytes += size
        if self.used_bytes > self.peak_bytes:
            self.peak_bytes = self.used_bytes

    def give(self, size: int) -> None:
        self.used_bytes -= size
        freed = self._freed
        if freed is not None and self.used_bytes < self.limit_bytes:
            self._freed = None
            freed.set()

    async def room(self) -> None:
        """Return once there is room for more (at once, unless the total is reached)."""
        while self.used_bytes >= self.limit_bytes:
            if self._freed is None:
                self._freed = asyncio.Event()
            await self._freed.wait()


class RequestBody:
    """One request's ``receive``: what was read ahead first, then the server's own."""

    def __init__(self, receive: Receive, buffers: BodyBuffers, limit_bytes: int) -> None:
        self._receive = receive
        self._buffers = buffers
        self._limit = limit_bytes
        self._chunks: deque[bytes] = deque()
        self._held = 0  # bytes in _chunks, counted in _buffers
        #: The body's last message has been read (from the server).
        self.complete = False
        self._replayed_end = False  # the app has been given the body's last message
        self._gone: Message | None = None  # the http.disconnect read ahead
        self.disconnected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        #: Set once admitted if the body is only partly read: times the app's reads of the rest.
        self.hold: ClientHold | None = None
        #: Called when the client leaves while the app runs (`follow`).
        self._on_gone: Callable[[], None] | None = None
        #: Set when the reader keeps a message (`follow`: the app waits for that, not for
        #: the reader's end, which may be the client leaving).
        self._kept: asyncio.Future[None] | None = None

    @property
    def partial(self) -> bool:
        """Read up to the buffer's limit, with more of the body still to come."""
        return not self.complete and self._gone is None

    async def read_ahead(self) -> None:
        """Read until the body is complete, the buffer is full or the client leaves.

        The caller bounds the time; a read cancelled by its timeout loses nothing
        that matters, as the request is then answered with a 408.
        """
        while not self.complete and self._gone is None and self._held < self._limit:
            await self._buffers.room()
            self._keep(await self._receive())

    def watch(self) -> None:
        """While queued: read on in the background to notice a disconnect.

        Never past the body's buffer (though always one message, so a request
        without a body is watched even with a buffer of 0): a partly read body
        is not watched.
        """
        if self._reader is None and (self.complete or self._may_read()):
            self._reader = asyncio.create_task(self._watch())

    def _may_read(self) -> bool:
        return self._held == 0 or self._held < self._limit

    async def _watch(self) -> None:
        # Once admitted (`admit`), only a followed body, once complete, is read on.
        while self._gone is None and (
            not self._stopping or (self.complete and self._on_gone is not None)
        ):
            if not self.complete:
                if not self._may_read():
                    return
                await self._buffers.room()
            self._keep(await self._receive())

    def follow(self, on_gone: Callable[[], None], *, bodyless: bool = False) -> None:
        """While the app runs: call `on_gone` when the client leaves.

        Watched in the background once the body is complete: at once if it was
        read ahead whole or none is announced (`bodyless`: its one empty message
        is read and kept for the app), else from the app's read of its last
        chunk. Until then the app's own reads notice a disconnect.
        """
        self._on_gone = on_gone
        reader = self._reader
        if self._gone is not None:
            on_gone()
        elif reader is not None and not reader.done():
            pass  # the queue's reader, still reading: it reads on past the body's end (`_watch`)
        elif self.complete or (bodyless and not self._held):
            self._reader = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while self._gone is None:
            self._keep(await self._receive())
            if not self.complete:
                return  # a body after all: the app reads it (and its end starts the watch)

    def _followed(self, message: Message) -> None:
        """A message the app read from the server itself, while followed."""
        if message["type"] != "http.request":
            self._keep(message)
        elif not message.get("more_body", False):
            self.complete = self._replayed_end = True
            self._reader = asyncio.create_task(self._follow())

    def _keep(self, message: Message) -> None:
        kept = self._kept
        if kept is not None and not kept.done():
            kept.set_result(None)
        if message["type"] != "http.request":
            self._gone = message
            self.disconnected.set()
            if self._on_gone is not None:
                self._on_gone()
            return
        chunk = message.get("body", b"")
        if chunk:
            self._chunks.append(chunk)
            self._held += len(chunk)
            self._buffers.take(len(chunk))
        if not message.get("more_body", False):
            self.complete = True

    def admit(self) -> None:
        """Stop reading ahead after the current read; the app now reads through `receive`."""
        self._stopping = True

    async def receive(self) -> Message:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._held -= len(chunk)
                self._buffers.give(len(chunk))
                more = bool(self._chunks) or not self.complete
                self._replayed_end = not more
                return {"type": "http.request", "body": chunk, "more_body": more}
            if self.complete and not self._replayed_end:
                self._replayed_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self._gone is not None:
                return self._gone
            reader = self._reader
            if reader is None:
                break
            if not reader.done():
                if self._on_gone is not None:
                    # Followed, the reader reads on to the disconnect: wait for its next
                    # message only (a message is kept, so a cancelled wait loses nothing).
                    await self._next_kept(reader)
                    continue
                # Shielded: if the app cancels this read, the reader's message stays
                # buffered for the app's next call instead of being lost.
                await asyncio.shield(reader)
            self._reader = None
            reader.result()  # propagate a failure of the server's receive
        if self.complete or self.hold is None:
            message = await self._receive()
        else:
            # The rest of a body beyond the buffer: waiting for it is waiting on the client.
            message = await self.hold.wait(self._receive())
            if message["type"] != "http.request" or not message.get("more_body", False):
                self.complete = True
        if self._on_gone is not None:
            self._followed(message)
        return message

    async def _next_kept(self, reader: asyncio.Task[None]) -> None:
        """Return once the reader keeps a message or ends."""
        kept = self._kept
        if kept is None or kept.done():
            kept = self._kept = asyncio.get_running_loop().create_future()
        await asyncio.wait((kept, reader), return_when=asyncio.FIRST_COMPLETED)

    def close(self) -> None:
        """The request is done: give back what is still buffered; stop the reader."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._reader = None
        if self._held:
            self._buffers.give(self._held)
            self._held = 0
        self._chunks.clear()
