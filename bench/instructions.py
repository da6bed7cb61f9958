"""Instructions per request inside a real uvicorn worker, counted by callgrind.

Timing on a shared machine moves by 2x from one minute to the next; the
number of instructions a server executes to answer a fixed number of requests
does not. This runs one variant's uvicorn worker (the throughput benchmark's
command line and environment: `bench.server.uvicorn_command`, `server_env`)
under ``valgrind --tool=callgrind`` with collection off, warms it up, switches
collection on with
``callgrind_control``, sends exactly ``--requests`` keep-alive requests over
``--connections`` connections (each with one request in flight), switches
collection off, and reports instructions per request. Native frames included:
the interpreter, uvloop, httptools and the kernel boundary (system calls are
counted as the instructions that issue them, not the kernel's work).

    python bench/instructions.py --variants bare,memory --requests 2000

Variants with services (``redis-rate``, ``redis-concurrency``) get their own private
redis-server, as in the throughput benchmark; Redis's own work is not counted
(``bench/redisinstr.py`` counts it).

Each variant's annotated profile is left in ``--out`` (``callgrind.<variant>``,
read with ``callgrind_annotate --inclusive=yes``). Slow: valgrind runs the
server about 50x slower, so keep ``--requests`` to a few thousand.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import make_app  # noqa: F401  (registers the variants)
from bench.server import HOST, ROOT, server_env, uvicorn_command
from bench.services import ServiceContext, running
from bench.variants import get_variant

#: As wrk sends it: no tenant header (`--header` adds some).
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _one(sock: socket.socket, buf: bytearray, request: bytes = _REQUEST) -> None:
    """Send one request and read its whole response (Content-Length framed)."""
    sock.sendall(request)
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            match = re.search(rb"(?i)content-length:\s*(\d+)", bytes(buf[:head_end]))
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {bytes(buf[:80])!r}")
            assert match is not None
            end = head_end + 4 + int(match.group(1))
            if len(buf) >= end:
                del buf[:end]
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection")
        buf += chunk


def _drive(port: int, requests: int, connections: int, request: bytes) -> None:
    """Exactly `requests` requests, spread over `connections` closed-loop connections."""
    per = [requests // connections + (i < requests % connections) for i in range(connections)]
    errors: list[BaseException] = []

    def worker(count: int) -> None:
        try:
            with socket.create_connection((HOST, port)) as sock:
                buf = bytearray()
                for _ in range(count):
                    _one(sock, buf, request)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in per]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=5) as sock:
                _one(sock, bytearray())
                return
        except (OSError, RuntimeError):
            time.sleep(0.5)
    raise RuntimeError("the server under valgrind did not answer in time")


def _control(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120
    )


def measure(
    name: str,
    requests: int,
    warmup: int,
    connections: int,
    out: Path,
    request: bytes,
    simulate: bool = False,
) -> dict[str, Any]:
    spec = get_variant(name)
    # A variant's services (a private redis-server for redis-*, `bench.services`) run
    # natively: only the worker's instructions are counted.
    with running(spec.services, ServiceContext(None, out)) as services:
        env = server_env(
            name, {**spec.env, **services.env_for(spec.services), "PYTHONHASHSEED": "0"}
        )
        return _measure(name, env, requests, warmup, connections, out, request, simulate)


def _measure(
    name: str,
    env: dict[str, str],
    requests: int,
    warmup: int,
    connections: int,
    out: Path,
    request: bytes,
    simulate: bool,
) -> dict[str, Any]:
    port = _free_port()
    profile = out / f"callgrind.{name}"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        *(["--cache-sim=yes", "--branch-sim=yes"] if simulate else []),
        f"--callgrind-out-file={profile}",
        *uvicorn_command(port),
    ]
    log = open(out / f"valgrind.{name}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _ready(port, time.monotonic() + 300)
        _drive(port, warmup, connections, request)
        _control(process.pid, "-i", "on")
        _drive(port, requests, connections, request)
        _control(process.pid, "-i", "off")
        _control(process.pid, "-d")
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    totals: dict[str, int] = {}
    for dump in out.glob(f"callgrind.{name}.*"):  # the dumps requested (`-d`)
        names: list[str] = []
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("totals:"):
                for event, value in zip(names, line.split()[1:], strict=True):
                    totals[event] = totals.get(event, 0) + int(value)
    total = totals.get("Ir", 0)
    return {
        "variant": name,
        "requests": requests,
        "instructions": total,
        "per_request": total / requests,
        # With --simulate: callgrind's cache (I1/D1/LL misses) and branch
        # (Bc/Bi mispredicted) simulation, per request.
        "events_per_request": {event: n / requests for event, n in totals.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="bare,memory")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "instructions")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--simulate", action="store_true", help="also simulate caches and branch prediction"
    )
    parser.add_argument(
        "--header", action="append", default=[], help="'Name: value' sent with every request"
    )
    args = parser.parse_args(argv)
    headers = "".join(f"{h.strip()}\r\n" for h in args.header).encode("latin-1")
    request = _REQUEST[:-2] + headers + b"\r\n"
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants.split(","):
        for old in args.out.glob(f"callgrind.{name}*"):
            old.unlink()
        result = measure(
            name, args.requests, args.warmup, args.connections, args.out, request, args.simulate
        )
        results.append(result)
        print(f"{name:24s} {result['per_request']:>12,.0f} instructions/request", flush=True)
        if args.simulate:
            events = result["events_per_request"]
            print("    per request: " + ", ".join(f"{k} {v:,.0f}" for k, v in events.items()))
    base = results[0]["per_request"]
    for result in results[1:]:
        extra = result["per_request"] - base
        print(f"{result['variant']:24s} {extra:>+12,.0f} over {results[0]['variant']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
