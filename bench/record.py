"""The JSON record each benchmark writes: what ran, on what, and what it found."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.load import LoadDriver
from bench.server import ROOT

#: Packages whose versions the numbers depend on.
_VERSIONED = (
    "throttle_mw",
    "starlette",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "httpx",
    "slowapi",
    "limits",
    "fastapi-limiter",
    "pyrate-limiter",
    "asgi-ratelimit",
)


def new_record(
    name: str, argv: Sequence[str] | None, driver: LoadDriver | None = None, **fields: Any
) -> dict[str, Any]:
    """The record's head: the command as typed (or as called), when, and on what."""
    return {
        "name": name,
        "command": [sys.executable, *sys.argv] if argv is None else [name, *argv],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(driver),
        **fields,
    }


def save_record(record: dict[str, Any], path: Path) -> None:
    """Close the record (finish time, load average) and write it to `path`."""
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["environment"]["loadavg_at_end"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {path}")


def environment(driver: LoadDriver | None) -> dict[str, Any]:
    """What the numbers depend on, recorded with them."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "generator": None if driver is None else driver.name,
        "generator_version": None if driver is None else driver.version(),
        "versions": versions,
        "git": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        # Tells apart runs on different uncommitted changes to tracked files.
        "git_diff_sha256": hashlib.sha256((_git("diff", "HEAD") or "").encode()).hexdigest(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
