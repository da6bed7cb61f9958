"""What the machine was doing during a run: cores, load, CPU time; and where to pin.

A load test on a small shared machine measures the machine as much as the
app: a client that cannot keep up sends in bursts, and a server that waits
for a core adds latency the throttle did not cause. So the newcomer command
pins the app and the load generator to different cores (when it can) and
reports how busy the machine was, ours and others' work apart. Linux only
for the CPU figures (``/proc``); elsewhere they are simply left out.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_STAT: Final = Path("/proc/stat")
_TICK_S: Final = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


@dataclass(frozen=True)
class Pinning:
    """Cores for the app and for the load generator, and how the app is pinned."""

    app_cpus: frozenset[int]
    loadgen_cpus: frozenset[int]
    #: ``taskset -c N`` to put before the app's command.
    prefix: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"app pinned to CPU {_cpus(self.app_cpus)}, load generator to CPU "
            f"{_cpus(self.loadgen_cpus)} (taskset)"
        )


def pinning() -> Pinning | None:
    """App on the first core we may use, load generator on the others; None when
    ``taskset`` is missing, or there is only one core."""
    taskset = shutil.which("taskset")
    if taskset is None or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    app = frozenset(allowed[:1])
    return Pinning(app, frozenset(allowed[1:]), (taskset, "-c", _cpus(app)))


def pin_self(cpus: frozenset[int]) -> frozenset[int] | None:
    """Move this process to `cpus`; returns the previous set, to restore later."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    before = frozenset(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)
    return before


def unpin_self(cpus: frozenset[int] | None) -> None:
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


@dataclass(frozen=True)
class CpuTimes:
    """Busy and total CPU seconds of the whole machine, from ``/proc/stat``."""

    busy_s: float
    total_s: float


def machine_cpu() -> CpuTimes | None:
    try:
        fields = _STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return CpuTimes((total - idle) * _TICK_S, total * _TICK_S)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (and its reaped children)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) * _TICK_S  # utime stime cutime cstime


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of process `pid` and of its live descendants.

    hypercorn and granian serve requests in worker processes under the one
    that was started, so the app's CPU is the whole tree's.
    """
    own = process_cpu_s(pid)
    if own is None:
        return None
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    return own + sum(process_cpu_s(child) or 0.0 for child in tree - {pid})


@dataclass(frozen=True)
class Usage:
    """How busy the machine was over a run, and how much of that was ours."""

    cores: int
    wall_s: float
    busy_s: float
    app_s: float
    loadgen_s: float

    @property
    def others_cores(self) -> float:
        """Cores' worth of other people's work meanwhile."""
        return max(0.0, self.busy_s - self.app_s - self.loadgen_s) / self.wall_s

    def describe(self) -> str:
        return (
            f"machine {self.busy_s / self.wall_s / self.cores * 100:.0f}% busy over "
            f"{self.wall_s:.0f} s: app {self.app_s / self.wall_s:.2f} cores, load generator "
            f"{self.loadgen_s / self.wall_s:.2f}, everything else {self.others_cores:.2f} "
            f"(of {self.cores})"
        )

    def to_json(self) -> dict[str, float]:
        return {
            "cores": self.cores,
            "wall_s": round(self.wall_s, 2),
            "busy_cores": round(self.busy_s / self.wall_s, 3),
            "app_cores": round(self.app_s / self.wall_s, 3),
            "loadgen_cores": round(self.loadgen_s / self.wall_s, 3),
            "others_cores": round(self.others_cores, 3),
        }


class Meter:
    """CPU time of the machine, the app (`app_pid` and its workers) and this process from now on."""

    def __init__(self, app_pid: int) -> None:
        self.app_pid = app_pid
        self._start = self._read()

    def _read(self) -> tuple[CpuTimes | None, float | None, float, float]:
        return machine_cpu(), tree_cpu_s(self.app_pid), time.process_time(), time.monotonic()

    def usage(self) -> Usage | None:
        """What was used since the meter was made; None where ``/proc`` is missing."""
        (cpu0, app0, own0, wall0), (cpu1, app1, own1, wall1) = self._start, self._read()
        if cpu0 is None or cpu1 is None or app0 is None or app1 is None or wall1 <= wall0:
            return None
        return Usage(cores(), wall1 - wall0, cpu1.busy_s - cpu0.busy_s, app1 - app0, own1 - own0)


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def cores() -> int:
    """The machine's cores (not only those this process may use right now)."""
    return os.cpu_count() or 1


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
