"""One uvicorn worker serving one variant, pinned to a CPU, always cleaned up.

Every variant runs under exactly the same uvicorn command line (`UVICORN_ARGS`),
so differences come from the app alone. The server runs in its own session
and process group; leaving the context manager (normally, on an error or on
Ctrl-C) stops the whole group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .variants import VARIANT_ENV

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
HOST_HEX = "0100007F"  # HOST as /proc/net/tcp writes it

#: Identical for every variant; recorded in the results.
UVICORN_ARGS: tuple[str, ...] = (
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--lifespan",
    "on",
    "--no-access-log",
    "--log-level",
    "warning",
    "--timeout-keep-alive",
    "30",
)

#: The server's environment never inherits these from the caller's shell.
_SCRUBBED = ("THROTTLE_", "BENCH_")
_START_TIMEOUT_S = 30.0
_STOP_GRACE_S = 10.0
_PORT_ATTEMPTS = 5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Server:
    url: str
    #: The uvicorn process (``taskset`` execs it, so it is the process we started).
    pid: int

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the server has used so far; None if unknown."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class ServerError(RuntimeError):
    """The server did not start or did not answer the hello-world request."""


def taskset(cpus: str | None) -> list[str]:
    """The command prefix pinning a process to `cpus` (a ``taskset -c`` list)."""
    return ["taskset", "-c", cpus] if cpus is not None else []


def uvicorn_command(port: int, app: str = "bench.apps:make_app", factory: bool = True) -> list[str]:
    """The uvicorn command line every benchmark serves with (a prefix such as `taskset` or
    valgrind goes before it): `app` on HOST:`port`, with `UVICORN_ARGS`."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        *(["--factory"] if factory else []),
        "--app-dir",
        str(ROOT),
        "--host",
        HOST,
        "--port",
        str(port),
        *UVICORN_ARGS,
    ]


def server_env(variant: str, env: Mapping[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    return {**clean, **env, VARIANT_ENV: variant}


@contextmanager
def serve(
    variant: str,
    env: Mapping[str, str],
    *,
    cpus: str | None,
    log_path: Path,
    expect_body: bytes,
    path: str = "/",
    app: str = "bench.apps:make_app",
    factory: bool = True,
) -> Iterator[Server]:
    """Serve `variant` with `env` on a free port; yield it once it answers 200.

    `app` is what uvicorn serves (a factory unless `factory` is false): by default the
    variants' builder. A port taken in between (another process raced us for it) is
    retried on another.
    """
    for attempt in range(_PORT_ATTEMPTS):
        port = _free_port()
        command = [*taskset(cpus), *uvicorn_command(port, app, factory)]
        with log_path.open("wb") as log:  # one attempt per log: its text decides a retry
            process = subprocess.Popen(
                command,
                env=server_env(variant, env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            started = _wait_ready(process, port, path, expect_body, log_path)
            if not started:
                if attempt + 1 < _PORT_ATTEMPTS:
                    continue
                raise ServerError(f"no free port after {_PORT_ATTEMPTS} attempts")
            yield Server(f"http://{HOST}:{port}{path}", process.pid)
            return
        finally:
            _stop(process)


def _wait_ready(
    process: subprocess.Popen[bytes], port: int, path: str, body: bytes, log_path: Path
) -> bool:
    """True once the app answers 200 with `body`; False if the port was taken."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = _tail(log_path)
            if "address already in use" in text.lower():
                return False
            raise ServerError(f"uvicorn exited with {process.returncode}:\n{text}")
        connection = http.client.HTTPConnection(HOST, port, timeout=2.0)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            got = response.read()
        except OSError:
            time.sleep(0.05)
            continue
        finally:
            connection.close()
        if not _listens(process.pid, port):
            # Someone else's server answered on this port (we lost the race for it).
            return False
        if response.status != 200 or got != body:
            raise ServerError(
                f"GET {path} answered {response.status} {got[:200]!r}, expected 200 {body!r}"
            )
        return True
    raise ServerError(f"uvicorn did not answer within {_START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the listening socket on `port` (Linux; True elsewhere)."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return True
    wanted = f"{HOST_HEX}:{port:04X}"
    inodes = {
        f"socket:[{fields[9]}]"
        for fields in (line.split() for line in table)
        if fields[1] == wanted and fields[3] == "0A"  # 0A: LISTEN
    }
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, _STOP_GRACE_S)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    """A bindable port below the ephemeral range (so the load's own sockets never take it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        return port
    raise ServerError("no free port found")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return "(no server log)"
