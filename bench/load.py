"""Load drivers: closed-loop generators that keep N keep-alive connections busy.

`WrkDriver` runs Debian's ``wrk`` (native, far from saturating before one
uvicorn worker does); `PythonDriver` runs `bench.pyload` in a subprocess, the
fallback when wrk is missing (it saturates sooner: its numbers are not
comparable with wrk's). Both run pinned with ``taskset``, and every result
says which generator produced it.

A trial counts only if every response was a 200 and no socket failed; see
`LoadResult.problems`. (wrk counts non-2xx/3xx responses; the server's
readiness check has already seen the route answer 200 with the expected body.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from .server import ROOT, taskset

WRK_INSTALL = "apt-get install -y wrk"
WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
GeneratorChoice = Literal["auto", "wrk", "python"]
#: Past its duration, a load run is killed after this long.
_OVERRUN_S = 60


@dataclass(frozen=True)
class LoadSpec:
    url: str
    connections: int
    duration_s: int
    headers: tuple[tuple[str, str], ...] = ()
    #: CPUs to pin the generator to (a ``taskset -c`` list), or None.
    cpus: str | None = None


@dataclass(frozen=True)
class LoadResult:
    generator: str
    requests: int
    duration_s: float
    #: Responses other than 200 (wrk: other than 2xx/3xx).
    bad_status: int
    #: Connect, read and write errors and timeouts.
    socket_errors: int
    #: ``p50``, ``p90``, ``p99``, ``max`` in milliseconds.
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def problems(self) -> list[str]:
        """Why this run does not count (empty: it does)."""
        found = []
        if self.requests <= 0:
            found.append("no request completed")
        if self.bad_status:
            found.append(f"{self.bad_status} responses were not 200")
        if self.socket_errors:
            found.append(f"{self.socket_errors} socket errors or timeouts")
        return found


class LoadError(RuntimeError):
    """The generator failed to run or to report."""


class LoadDriver(Protocol):
    #: Recorded with every result, e.g. ``wrk`` or ``python``.
    name: str

    def version(self) -> str: ...

    def run(self, spec: LoadSpec) -> LoadResult: ...


class WrkDriver:
    name = "wrk"

    def __init__(self, executable: str, threads: int = 1) -> None:
        self.executable = executable
        self.threads = threads

    def version(self) -> str:
        out = subprocess.run(
            [self.executable, "--version"], capture_output=True, text=True, check=False
        )
        lines = (out.stdout or out.stderr).splitlines()
        return lines[0].strip() if lines else "unknown"

    def run(self, spec: LoadSpec) -> LoadResult:
        command = [
            *taskset(spec.cpus),
            self.executable,
            "-t",
            str(min(self.threads, spec.connections)),
            "-c",
            str(spec.connections),
            "-d",
            f"{spec.duration_s}s",
            "--timeout",
            "5s",
            "-s",
            str(WRK_SCRIPT),
        ]
        for name, value in spec.headers:
            command += ["-H", f"{name}: {value}"]
        command.append(spec.url)
        report = _report(command, spec, "BENCH_JSON ")
        return LoadResult(
            generator=self.name,
            requests=int(report["requests"]),
            duration_s=report["duration_us"] / 1e6,
            bad_status=int(report["status"]),
            socket_errors=int(
                report["connect"] + report["read"] + report["write"] + report["timeout"]
            ),
            latency_ms={p: report[f"{p}_us"] / 1000 for p in ("p50", "p90", "p99", "max")},
        )


class PythonDriver:
    """`bench.pyload` in its own process: asyncio (uvloop if present), raw sockets."""

    name = "python"

    def version(self) -> str:
        return f"bench.pyload on Python {sys.version.split()[0]}"

    def run(self, spec: LoadSpec) -> LoadResult:
        command = [
            *taskset(spec.cpus),
            sys.executable,
            "-m",
            "bench.pyload",
            spec.url,
            "--connections",
            str(spec.connections),
            "--duration",
            str(spec.duration_s),
        ]
        for name, value in spec.headers:
            command += ["--header", f"{name}: {value}"]
        report = _report(command, spec, "BENCH_JSON ")
        return LoadResult(
            generator=self.name,
            requests=int(report["requests"]),
            duration_s=float(report["duration_s"]),
            bad_status=int(report["bad_status"]),
            socket_errors=int(report["socket_errors"]),
            latency_ms={p: float(report[f"{p}_ms"]) for p in ("p50", "p90", "p99", "max")},
        )


def pick_driver(choice: GeneratorChoice, wrk_threads: int = 1) -> tuple[LoadDriver, str | None]:
    """The driver to use, and a warning to print (e.g. wrk missing, falling back)."""
    wrk = shutil.which("wrk")
    if choice == "python":
        return PythonDriver(), None
    if wrk is not None:
        return WrkDriver(wrk, wrk_threads), None
    if choice == "wrk":
        raise LoadError(f"wrk is not installed; install it with: {WRK_INSTALL}")
    return PythonDriver(), (
        f"wrk is not installed (install it with: {WRK_INSTALL}); using the Python "
        "generator, which saturates sooner: its numbers are not comparable with wrk's"
    )


def _report(command: list[str], spec: LoadSpec, marker: str) -> dict[str, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env=env,
            timeout=spec.duration_s + _OVERRUN_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"{command[0]} ran past its duration and was killed") from exc
    for line in out.stdout.splitlines():
        if line.startswith(marker):
            report: dict[str, float] = json.loads(line[len(marker) :])
            return report
    raise LoadError(
        f"{' '.join(command)} exited with {out.returncode} without a report:\n"
        f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
    )
