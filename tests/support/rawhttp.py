"""Hostile HTTP/1.1 clients on raw sockets: a trickling upload and a reader that stalls.

HTTP client libraries send a body as fast as they can and read whatever comes;
these clients do neither, on purpose: one sends its body a little at a time,
the other reads a response's headers and then stops reading, with a small
receive buffer so that the server's sends soon meet back-pressure. Loopback only.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

from tests.support.ports import HOST


@dataclass
class RawResponse:
    """A response read off the socket; `status` 0 if none came (the connection dropped)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Seconds from the first byte sent to the end of the response (or the drop).
    elapsed_s: float = 0.0
    #: Body bytes sent before the response arrived or the connection dropped.
    sent: int = 0
    error: str | None = None


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    response = RawResponse(status=int(lines[0].split()[1]))
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            seen = response.headers.get(key)  # a repeated field: values joined, as RFC 9110
            response.headers[key] = value.strip() if seen is None else f"{seen}, {value.strip()}"
    length = response.headers.get("content-length")
    if length is not None:
        response.body = await reader.readexactly(int(length))
    return response


def _request_head(method: str, path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def trickle_upload(
    port: int,
    path: str,
    body: bytes,
    *,
    bytes_per_s: float,
    chunk: int = 1024,
    tenant: str = "slow",
    timeout_s: float = 120.0,
) -> RawResponse:
    """POST `body` with a Content-Length, `chunk` bytes at a time at about `bytes_per_s`.

    Reads the response while still sending, so a 408 sent mid-upload is seen
    (not lost to a reset), and stops sending once a response has come.
    """
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    headers = {
        "X-Tenant-ID": tenant,
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(body)),
    }
    writer.write(_request_head("POST", path, port, headers))
    answer = asyncio.create_task(read_response(reader))
    sent = 0
    try:
        async with asyncio.timeout(timeout_s):
            while sent < len(body) and not answer.done():
                writer.write(body[sent : sent + chunk])
                await writer.drain()
                sent += min(chunk, len(body) - sent)
                if sent < len(body):
                    await asyncio.wait({answer}, timeout=chunk / bytes_per_s)
            response = await answer
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        answer.cancel()
        response = RawResponse(error=f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
    response.elapsed_s = time.monotonic() - started
    response.sent = sent
    return response


class StalledReader:
    """GETs `path`, reads the status line and headers, then reads nothing more until closed.

    Its receive buffer is small, so once the kernel's buffers between it and
    the server are full, the server's sends wait (uvicorn pauses writing).
    """

    def __init__(self, port: int, path: str, *, tenant: str = "stall") -> None:
        self.port = port
        self.path = path
        self.tenant = tenant
        self.status = 0
        self._sock: socket.socket | None = None

    def open(self, timeout_s: float = 10.0) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: window
        sock.settimeout(timeout_s)
        sock.connect((HOST, self.port))
        self._sock = sock
        sock.sendall(_request_head("GET", self.path, self.port, {"X-Tenant-ID": self.tenant}))
        head = b""
        while b"\r\n\r\n" not in head:
            part = sock.recv(1)  # byte by byte: nothing of the body is read
            if not part:
                raise ConnectionError("closed before the headers")
            head += part
        self.status = int(head.split(b" ", 2)[1])
        return self.status

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def burst(port: int, paths_and_tenants: list[tuple[str, str]]) -> list[RawResponse]:
    """GET every (path, tenant) at once: all connections are opened first, then every
    request is written in one pass of the event loop, then the responses are read."""
    streams = await asyncio.gather(
        *(asyncio.open_connection(HOST, port) for _ in paths_and_tenants)
    )
    started = time.monotonic()
    for (path, tenant), (_, writer) in zip(paths_and_tenants, streams, strict=True):
        writer.write(_request_head("GET", path, port, {"X-Tenant-ID": tenant}))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RawResponse:
        try:
            response = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError) as exc:
            response = RawResponse(error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
        response.elapsed_s = time.monotonic() - started
        return response

    return list(await asyncio.gather(*(answer(r, w) for r, w in streams)))
