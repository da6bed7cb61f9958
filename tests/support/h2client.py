"""A small HTTP/2 client (prior knowledge, cleartext) that can reset one stream.

httpx speaks HTTP/2 but never sends RST_STREAM when a request is abandoned:
it just forgets the stream, so the server would not learn that the client
left. Tests of "a client gives up on one request while its other requests on
the same connection go on" need the reset itself, so they drive the `h2`
state machine directly over an asyncio connection.

It also reads responses after a graceful GOAWAY, which h2 (and so httpx)
cannot: see `_GracefulConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from hyperframe.frame import Frame, GoAwayFrame


class _GracefulConnection(h2.connection.H2Connection):
    """An h2 connection that lets the streams a graceful GOAWAY names finish.

    h2 closes the connection on any GOAWAY (python-hyper/h2#1181), but RFC 9113
    section 6.8 lets streams up to its last stream id complete, and that is how
    granian (hyper) begins a graceful shutdown: GOAWAY first, responses after.
    """

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Any]]:
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == h2.errors.ErrorCodes.NO_ERROR:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return frames, events


@dataclass
class Stream:
    """One request's response as it arrives."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    reset_by_server: bool = False
    got_data: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class H2Client:
    """One HTTP/2 connection to ``host:port``; ``async with`` opens and closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._conn = _GracefulConnection(h2.config.H2Configuration(client_side=True))
        self._streams: dict[int, Stream] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._conn.initiate_connection()
        await self._flush()
        self._pump = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def get(self, path: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send a GET for `path` (with `headers` besides the pseudo-headers); returns its
        stream id at once (see `response`)."""
        stream_id = self._conn.get_next_available_stream_id()
        self._streams[stream_id] = Stream()
        headers = [
            (":method", "GET"),
            (":path", path),
            (":scheme", "http"),
            (":authority", f"{self.host}:{self.port}"),
            *headers,
        ]
        self._conn.send_headers(stream_id, headers, end_stream=True)
        await self._flush()
        return stream_id

    async def reset(self, stream_id: int) -> None:
        """RST_STREAM (CANCEL): the client gives up on this request; the connection stays."""
        self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await self._flush()

    def stream(self, stream_id: int) -> Stream:
        return self._streams[stream_id]

    async def response(self, stream_id: int, timeout_s: float = 30.0) -> Stream:
        """Wait until the stream has ended (its whole response, or a reset by the server)."""
        stream = self._streams[stream_id]
        await asyncio.wait_for(stream.ended.wait(), timeout_s)
        return stream

    async def first_data(self, stream_id: int, timeout_s: float = 30.0) -> Stream:
        stream = self._streams[stream_id]
        await asyncio.wait_for(stream.got_data.wait(), timeout_s)
        return stream

    async def _flush(self) -> None:
        assert self._writer is not None
        self._writer.write(self._conn.data_to_send())
        await self._writer.drain()

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                for event in self._conn.receive_data(data):
                    self._handle(event)
                await self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            for stream in self._streams.values():
                stream.ended.set()

    def _handle(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            for name, value in event.headers or ():
                key = name.decode() if isinstance(name, bytes) else name
                text = value.decode() if isinstance(value, bytes) else value
                if key == ":status":
                    stream.status = int(text)
                else:
                    stream.headers[key] = text
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length and event.stream_id:
                # Give the window back at once: the test reads everything it is sent.
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self._conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            if stream is not None:
                stream.body += event.data or b""
                stream.got_data.set()
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended.set()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset_by_server = True
            stream.ended.set()
