"""The soak's verdict on what the clients saw, its curves and its printed report.

Every response is sorted into one class (`classify`):

- ``served``: 2xx;
- ``throttled``: 429 or 503 with ``Retry-After`` (the throttle's honest refusals);
- ``quit``: a quitter's request that its client gave up on, as planned;
- ``worker_down``: no response from a worker while it was killed (and for 2 s
  after its restart: pooled connections to the dead process fail once);
- ``bad_status``: any other status: a 500, a 503 without ``Retry-After``, a 408;
- ``error``: no response otherwise (a reset, a timeout of a patient client).

The soak passes with no ``bad_status`` and no ``error``. Curves: each sampled
series as min / median / max per window (a minute by default) and a least-squares
slope per minute over the samples after the first window (the warm-up).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.soakfaults import Fault, Sample
from demo_app.loadtest.engine import Record

#: After a worker is back, its clients' pooled connections to the dead process fail once.
WORKER_GRACE_S = 2.0
CLASSES = ("served", "throttled", "quit", "worker_down", "bad_status", "error")


def classify(record: Record, quitter: bool, faults: Sequence[Fault], started_s: float) -> str:
    """The class of one record (see the module doc). `started_s`: when the record's run
    started its clock, in the soak's time, so the record's times compare with the faults'."""
    if record.status:
        if 200 <= record.status < 300:
            return "served"
        if record.status in (429, 503) and record.retry_after:
            return "throttled"
        return "bad_status"
    if quitter and record.error == "timeout":
        return "quit"
    sent, done = started_s + record.sent_s, started_s + record.done_s
    for fault in faults:
        if (
            fault.kind == "worker_kill"
            and fault.target == record.target
            and sent <= fault.end_s + WORKER_GRACE_S
            and done >= fault.at_s
        ):
            return "worker_down"
    return "error"


@dataclass(frozen=True)
class Curve:
    """One sampled series: per window (start_s, min, median, max), the slope per minute."""

    name: str
    unit: str
    windows: list[tuple[float, float, float, float]]
    slope_per_min: float | None

    @property
    def first(self) -> float | None:
        """The median of the first window after the warm-up (the second), else the first."""
        usable = self.windows[1:] or self.windows
        return usable[0][2] if usable else None

    @property
    def last(self) -> float | None:
        return self.windows[-1][2] if self.windows else None


def curve(name: str, unit: str, points: Sequence[tuple[float, float]], window_s: float) -> Curve:
    """`points` (t_s, value) as a `Curve` of `window_s` windows."""
    by_window: dict[int, list[float]] = {}
    for t, v in points:
        by_window.setdefault(int(t // window_s), []).append(v)
    windows = [
        (i * window_s, min(vs), statistics.median(vs), max(vs))
        for i, vs in sorted(by_window.items())
    ]
    steady = [(t, v) for t, v in points if t >= window_s]
    return Curve(name, unit, windows, _slope(steady))


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    ts = [t / 60.0 for t, _ in points]
    vs = [v for _, v in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / var


def curves(samples: Sequence[Sample], window_s: float, min_share: float = 0.5) -> list[Curve]:
    """RSS of every worker process (each pid its own series; only those that lived at least
    `min_share` of the run), of Redis and of the load generator; Redis' key count and
    used memory."""
    out: list[Curve] = []
    span = samples[-1].t_s - samples[0].t_s if samples else 0.0
    series: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for s in samples:
        for index, (pid, rss) in enumerate(s.workers):
            if rss is not None:
                series.setdefault((index, pid), []).append((s.t_s, rss / 1024))
    for (index, pid), points in sorted(series.items()):
        if points[-1][0] - points[0][0] >= min_share * span:
            out.append(curve(f"worker {index} (pid {pid}) RSS", "MB", points, window_s))
    out.append(curve("redis-server RSS", "MB", _points(samples, "redis_rss_kib", 1024), window_s))
    out.append(curve("load generator RSS", "MB", _points(samples, "load_rss_kib", 1024), window_s))
    out.append(curve("Redis keys (DBSIZE)", "keys", _points(samples, "keys", 1), window_s))
    out.append(curve("Redis used_memory", "MB", _points(samples, "redis_used_kib", 1024), window_s))
    return out


def _points(samples: Iterable[Sample], attr: str, divisor: float) -> list[tuple[float, float]]:
    out = []
    for s in samples:
        value = getattr(s, attr)
        if value is not None:
            out.append((s.t_s, value / divisor))
    return out


def print_report(result: Mapping[str, Any], out_curves: Sequence[Curve], window_s: float) -> None:
    print(f"\n== soak: {result['command']}")
    print(f"   {result['cpu']}; {result['duration_s']:g} s of load, seed {result['seed']}")
    print(f"   budget: {result['budget']}")
    print("\nresponses by class:", _pairs(result["classes"]))
    print("responses by status:", _pairs(result["statuses"]))
    print("requests by route:", _pairs(result["routes"]))
    if result["errors"]:
        print("unexpected errors (first 10):")
        for line in result["errors"][:10]:
            print("  ", line)
    faults = result["faults"]
    print(f"\nfaults injected: {len(faults)} ({_pairs(Counter(f['kind'] for f in faults))})")
    for f in faults:
        print(f"  {f['at_s']:7.1f} s  {f['kind']:<13} {f['detail']} (over at {f['end_s']:.1f} s)")
    print(f"\ncurves (min / median / max per {window_s:g} s window; slope after the first):")
    for c in out_curves:
        cells = "  ".join(f"{lo:.1f}/{mid:.1f}/{hi:.1f}" for _, lo, mid, hi in c.windows)
        slope = "-" if c.slope_per_min is None else f"{c.slope_per_min:+.2f} {c.unit}/min"
        print(f"  {c.name:<28} slope {slope:<16} {cells}")
    settle = result["settle"]
    print(
        f"\nafter the load: settled={settle['settled']} after {settle['after_s']:.1f} s;"
        f" left in Redis: {settle['redis']}; per process: {settle['processes']}"
    )
    print("checks:")
    for name, (ok, why) in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {why}")


def _pairs(counts: Mapping[Any, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))


def write_chart(samples: Sequence[Sample], faults: Sequence[Fault], path: Path) -> None:
    """RSS per process and Redis' key count over time, faults marked; a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for index in range(len(samples[0].workers) if samples else 0):
        pts = [(s.t_s, s.workers[index][1]) for s in samples]
        top.plot(
            [t for t, v in pts],
            [None if v is None else v / 1024 for _, v in pts],
            linewidth=1,
            label=f"worker {index}",
        )
    top.plot(
        [s.t_s for s in samples],
        [None if s.redis_rss_kib is None else s.redis_rss_kib / 1024 for s in samples],
        color="black",
        linewidth=1,
        label="redis-server",
    )
    top.set_ylabel("RSS (MB)")
    top.set_ylim(bottom=0)
    bottom.plot([s.t_s for s in samples], [s.keys for s in samples], color="C3", label="Redis keys")
    bottom.set_ylabel("keys (DBSIZE)")
    bottom.set_xlabel("seconds since the soak started")
    colors = {"redis_kill": "C3", "redis_freeze": "C0", "script_flush": "C2", "worker_kill": "C1"}
    for f in faults:
        for axes in (top, bottom):
            axes.axvspan(f.at_s, max(f.end_s, f.at_s + 0.3), color=colors[f.kind], alpha=0.25)
    for axes in (top, bottom):
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right", fontsize="small")
    figure.suptitle(
        "soak: RSS and Redis keys; faults shaded (red kill, blue freeze, "
        "green script flush, orange worker kill)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
