"""Free TCP ports for test servers, reserved so that concurrent test runs do not collide.

Binding port 0 and closing the socket is racy: the kernel hands the same port to
the next caller, and outgoing connections take ports from the ephemeral range at
any time. So we pick at random *outside* the ephemeral range, check that the port
(and, for Redis Cluster, its bus port) can be bound, and hold an advisory lock
file per port for as long as this process uses it. Any other process using this
module skips ports locked by another; the locks vanish when their holder exits,
even after `kill -9` (only the empty file stays, until the port is used again).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import socket
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"

# Per user: another user's lock files could not be opened.
_LOCK_DIR = Path(tempfile.gettempdir()) / f"throttle_mw-test-ports-{os.getuid()}"
_LOWEST = 10_000
_HIGHEST = 65_535
_ATTEMPTS = 500

_reserved: dict[int, int] = {}  # port -> fd of its lock file
_lock = threading.Lock()
_random = random.Random(os.urandom(16))


def free_port(offsets: Sequence[int] = (0,)) -> int:
    """Reserve and return a port P such that P + offset is free for every offset.

    Pass `offsets=(0, 10000)` for a Redis Cluster node (client port and bus port).
    Every port in the group stays reserved by this process until `release_port(P)`.
    """
    candidates = _candidates(max(offsets))
    with _lock:
        for _ in range(_ATTEMPTS):
            port = _random.choice(candidates)
            group = [port + offset for offset in offsets]
            if any(p in _reserved for p in group):
                continue
            locked: dict[int, int] = {}
            for p in group:
                fd = _try_lock(p)
                if fd is None:
                    break
                locked[p] = fd
                if not _bindable(p):
                    break
            else:
                _reserved.update(locked)
                return port
            for p, fd in locked.items():
                _unlock(p, fd)
    raise RuntimeError(f"no free port group {tuple(offsets)} found on {HOST}")


def release_port(port: int, offsets: Sequence[int] = (0,)) -> None:
    """Give back a port group reserved by `free_port` (a no-op for unknown ports)."""
    with _lock:
        for offset in offsets:
            fd = _reserved.pop(port + offset, None)
            if fd is not None:
                _unlock(port + offset, fd)


@atexit.register
def _release_all() -> None:
    """Remove our lock files; runs after servers.py's atexit has killed the servers."""
    with _lock:
        held = list(_reserved.items())
        _reserved.clear()
    for port, fd in held:
        _unlock(port, fd)


def _candidates(max_offset: int) -> range | list[int]:
    """Ports below and above the ephemeral range, so outgoing connections never race us."""
    low, high = _ephemeral_range()
    below = range(_LOWEST, low - max_offset)
    above = range(high + 1, _HIGHEST + 1 - max_offset)
    ports = [*below, *above]
    # A machine whose ephemeral range covers nearly everything: accept the race.
    return ports if len(ports) >= 1000 else range(_LOWEST, _HIGHEST + 1 - max_offset)


def _ephemeral_range() -> tuple[int, int]:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux' default
    return low, high


def _lock_path(port: int) -> Path:
    return _LOCK_DIR / f"{port}.lock"


def _try_lock(port: int) -> int | None:
    _LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    path = _lock_path(port)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The holder unlinks the file on release: a lock on an unlinked inode is no lock.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise OSError("lock file replaced")
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(port: int, fd: int) -> None:
    # Unlink before closing, while we still hold the lock (see _try_lock).
    with contextlib.suppress(FileNotFoundError):
        _lock_path(port).unlink()
    os.close(fd)


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port with connections in TIME_WAIT counts as taken too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True
