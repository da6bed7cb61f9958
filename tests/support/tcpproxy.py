"""A TCP proxy between the app and Redis that delays, silences, resets and drops replies.

It runs its own event loop in a thread, so a test (sync or async) drives it
with plain method calls. Faults of one call are armed one at a time and fire on
the next matching call: a client-to-server chunk that contains a marker
(b"FCALL", b"EVALSHA", b"BLPOP", a function's name or a script's SHA). Redis
clients send one command per write and wait for its reply on that connection,
so "the next chunk" is one call:

- `cut_next(marker)`: forward only the first half of that call's bytes, then
  close both sides: Redis never sees a whole command, so nothing runs;
- `drop_next_reply(marker)`: forward the call, then swallow the reply and close
  both sides: the command ran in Redis, its caller never learns how;
  `reset=True` resets the caller's side (RST) instead of closing it.

Faults of the network, for as long as they are set:

- `latency_up_s` / `latency_down_s`: every chunk client-to-server / server-to-client
  is delivered that much later (a delay line: chunks in flight overlap, as on a
  link with that one-way delay); `latency_s` sets both;
- `blackhole`: a partition that drops packets without a RST. Every connection
  that carries a byte while it is set goes silent for good (a half-open TCP
  connection: whatever either side sends is swallowed, nothing is answered, no
  FIN, no RST); connections made meanwhile are accepted and go silent too.
  Cleared, new connections and those that stayed idle forward again;
- `reset_all()`: every open connection is reset now (RST to the client, Redis's
  side closed);
- `silence_next(marker)`: the connection that carries the next matching call goes
  silent for good from that call on, as in a blackhole, the others unharmed (one flow
  dropped by a middlebox, e.g. a NAT that lost its state).

Loopback only; every connection is closed when the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.support.ports import HOST, free_port, release_port

T = TypeVar("T")


@dataclass
class ProxyCounts:
    connections: int = 0
    cuts: int = 0
    drops: int = 0
    #: Connections that went silent in a blackhole, and connections reset.
    silenced: int = 0
    resets: int = 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0), not a FIN: the peer's next read fails at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Listens on 127.0.0.1:`port` and forwards to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.latency_up_s = 0.0
        self.latency_down_s = 0.0
        self.blackhole = False
        self.counts = ProxyCounts()
        self._cuts: list[bytes] = []
        self._drops: list[tuple[bytes, bool]] = []
        self._silences: list[bytes] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        #: Each open connection's reset: RST its client, close its Redis side.
        self._resets: set[Any] = set()

    @property
    def latency_s(self) -> float:
        return max(self.latency_up_s, self.latency_down_s)

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self.latency_up_s = self.latency_down_s = value

    @property
    def url_host_port(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        self._run(self._listen())
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        release_port(self.port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def cut_next(self, marker: bytes) -> None:
        with self._lock:
            self._cuts.append(marker)

    def drop_next_reply(self, marker: bytes, *, reset: bool = False) -> None:
        with self._lock:
            self._drops.append((marker, reset))

    def silence_next(self, marker: bytes) -> None:
        with self._lock:
            self._silences.append(marker)

    def armed(self) -> int:
        """Faults armed that have not fired yet."""
        with self._lock:
            return len(self._cuts) + len(self._drops) + len(self._silences)

    def reset_all(self) -> int:
        """Reset every open connection now; how many there were."""
        return self._run(self._reset_all())

    # --- the proxy's own loop ---------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)

    async def _reset_all(self) -> int:
        resets = list(self._resets)
        for reset in resets:
            reset()
        return len(resets)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        # The connections' pumps end too: nothing of this loop is left pending.
        pumps = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    def _take_cut(self, chunk: bytes) -> bool:
        return self._take(self._cuts, chunk)

    def _take(self, faults: list[bytes], chunk: bytes) -> bool:
        with self._lock:
            for i, marker in enumerate(faults):
                if marker in chunk:
                    del faults[i]
                    return True
        return False

    def _take_drop(self, chunk: bytes) -> bool | None:
        """None: no drop armed for `chunk`; else whether to reset."""
        with self._lock:
            for i, (marker, reset) in enumerate(self._drops):
                if marker in chunk:
                    del self._drops[i]
                    return reset
        return None

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Cancelled only by `close`: ends quietly (asyncio's stream callback would log a
        # cancelled connection task as an error).
        with contextlib.suppress(asyncio.CancelledError):
            await self._connection(client_r, client_w)

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        if self.blackhole:
            # Accepted, then silent: as a connection through a partition whose SYN got
            # through but nothing after (a client sees only its own timeout).
            self.counts.silenced += 1
            self._writers.add(client_w)
            try:
                while await client_r.read(65536):
                    pass
            finally:
                self._writers.discard(client_w)
                client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            client_w.close()
            return
        self.counts.connections += 1
        self._writers.update((client_w, server_w))
        #: The reply to drop: None (none), else whether to reset the client after.
        drop_reply: list[bool] = []
        dead = asyncio.Event()
        silent = False
        loop = asyncio.get_running_loop()

        def kill(rst: bool = False) -> None:
            dead.set()
            if rst:
                _reset(client_w)
            else:
                client_w.close()
            server_w.close()

        def reset() -> None:
            self.counts.resets += 1
            kill(rst=True)

        def silenced(chunk: bytes = b"") -> bool:
            """A blackhole is set, or was while this connection carried a byte, or this
            connection carried a call `silence_next` armed."""
            nonlocal silent
            if not silent and (self.blackhole or (chunk and self._take(self._silences, chunk))):
                silent = True
                self.counts.silenced += 1
            return silent

        async def deliver(
            line: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
        ) -> None:
            while True:
                due, chunk = await line.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        up_line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        down_line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def upstream() -> None:
            while not dead.is_set():
                chunk = await client_r.read(65536)
                if not chunk:
                    break
                if silenced(chunk):
                    continue
                if self._take_cut(chunk):
                    self.counts.cuts += 1
                    server_w.write(chunk[: len(chunk) // 2])
                    with contextlib.suppress(OSError):
                        await server_w.drain()
                    kill()
                    return
                dropping = self._take_drop(chunk)
                if dropping is not None:
                    drop_reply.append(dropping)
                up_line.put_nowait((loop.time() + self.latency_up_s, chunk))

        async def downstream() -> None:
            while not dead.is_set():
                chunk = await server_r.read(65536)
                if not chunk:
                    break
                if silenced():
                    continue
                if drop_reply:
                    self.counts.drops += 1
                    kill(rst=drop_reply[0])
                    return
                down_line.put_nowait((loop.time() + self.latency_down_s, chunk))

        self._resets.add(reset)
        # Either side ending (or failing) ends both.
        pumps = [
            asyncio.ensure_future(upstream()),
            asyncio.ensure_future(downstream()),
            asyncio.ensure_future(deliver(up_line, server_w)),
            asyncio.ensure_future(deliver(down_line, client_w)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._resets.discard(reset)
            if not dead.is_set():
                kill()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._writers.difference_update((client_w, server_w))
