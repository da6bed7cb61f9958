"""A TCP proxy between the app and Redis that delays, cuts calls in half and drops replies.

It runs its own event loop in a thread, so a test (sync or async) drives it
with plain method calls. Faults are armed one at a time and fire on the next
matching call: a client-to-server chunk that contains a marker (b"FCALL", b"EVALSHA",
b"BLPOP"). Redis clients send one command per write and wait for its reply
on that connection, so "the next chunk" is one call:

- `cut_next(marker)`: forward only the first half of that call's bytes, then
  close both sides: Redis never sees a whole command, so nothing runs;
- `drop_next_reply(marker)`: forward the call, then swallow the reply and close
  both sides: the command ran in Redis, its caller never learns how;
- `latency_s`: every chunk, both ways, waits this long first.

Loopback only; every connection is closed when the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class TcpProxy:
    """Listens on 127.0.0.1:`port` and forwards to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.latency_s = 0.0
        self.counts = ProxyCounts()
        self._cuts: list[bytes] = []
        self._drops: list[bytes] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

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

    def drop_next_reply(self, marker: bytes) -> None:
        with self._lock:
            self._drops.append(marker)

    def armed(self) -> int:
        """Faults armed that have not fired yet."""
        with self._lock:
            return len(self._cuts) + len(self._drops)

    # --- the proxy's own loop ---------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)

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

    def _take(self, faults: list[bytes], chunk: bytes) -> bool:
        with self._lock:
            for i, marker in enumerate(faults):
                if marker in chunk:
                    del faults[i]
                    return True
        return False

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            client_w.close()
            return
        self.counts.connections += 1
        self._writers.update((client_w, server_w))
        drop_reply = asyncio.Event()
        dead = asyncio.Event()

        def kill() -> None:
            dead.set()
            for writer in (client_w, server_w):
                writer.close()

        async def upstream() -> None:
            while not dead.is_set():
                chunk = await client_r.read(65536)
                if not chunk:
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if self._take(self._cuts, chunk):
                    self.counts.cuts += 1
                    server_w.write(chunk[: len(chunk) // 2])
                    with contextlib.suppress(OSError):
                        await server_w.drain()
                    kill()
                    return
                if self._take(self._drops, chunk):
                    drop_reply.set()
                server_w.write(chunk)
                await server_w.drain()

        async def downstream() -> None:
            while not dead.is_set():
                chunk = await server_r.read(65536)
                if not chunk:
                    break
                if drop_reply.is_set():
                    self.counts.drops += 1
                    kill()
                    return
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                client_w.write(chunk)
                await client_w.drain()

        # Either side ending (or failing) ends both.
        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kill()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._writers.difference_update((client_w, server_w))
