"""A closed-loop HTTP/1.1 load generator in Python: the fallback when wrk is missing.

``python -m bench.pyload URL --connections 64 --duration 8`` keeps N keep-alive
connections busy (one request in flight on each) for the duration, then prints
one line ``BENCH_JSON {...}`` like ``bench/wrk_report.lua``. It speaks just
enough HTTP for the benchmark apps: responses with a ``Content-Length``.
A failed connection is counted and reopened, as wrk does.

It saturates long before wrk does, so its absolute numbers understate the
server; its ratios between variants are still meaningful only while the
server, not this generator, is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_IO_TIMEOUT_S = 5.0


@dataclass
class Tally:
    ok: int = 0
    bad_status: int = 0
    socket_errors: int = 0
    latencies_s: list[float] = field(default_factory=list)


def build_request(url: str, headers: Sequence[tuple[str, str]]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.hostname}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    """Send one request, read its whole response; return the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ValueError("response without Content-Length")
    await reader.readexactly(length)
    return status


async def _connection(host: str, port: int, request: bytes, stop_at: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), _IO_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            tally.socket_errors += 1
            await asyncio.sleep(0.01)
            continue
        try:
            while loop.time() < stop_at:
                started = time.perf_counter()
                status = await asyncio.wait_for(_exchange(reader, writer, request), _IO_TIMEOUT_S)
                tally.latencies_s.append(time.perf_counter() - started)
                if status == 200:
                    tally.ok += 1
                else:
                    tally.bad_status += 1
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            tally.socket_errors += 1
        finally:
            writer.close()


async def drive(
    url: str, connections: int, duration_s: float, headers: Sequence[tuple[str, str]] = ()
) -> dict[str, float]:
    host, port, request = build_request(url, headers)
    tally = Tally()
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + duration_s
    await asyncio.gather(
        *(_connection(host, port, request, stop_at, tally) for _ in range(connections))
    )
    elapsed = loop.time() - started
    return report(tally, elapsed)


def report(tally: Tally, elapsed_s: float) -> dict[str, float]:
    latencies = sorted(tally.latencies_s) or [0.0]
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": tally.ok + tally.bad_status,
        "duration_s": elapsed_s,
        "bad_status": tally.bad_status,
        "socket_errors": tally.socket_errors,
        "p50_ms": cuts[49] * 1000,
        "p90_ms": cuts[89] * 1000,
        "p99_ms": cuts[98] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args(argv)
    pairs: list[tuple[str, str]] = []
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            parser.error(f"--header takes 'Name: value', not {header!r}")
        pairs.append((name.strip(), value.strip()))
    main_coro = drive(args.url, args.connections, args.duration, pairs)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main_coro)
    else:
        result = uvloop.run(main_coro)
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
