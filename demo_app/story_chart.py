"""One PNG of the story per tenant: the throttle off on the left, on on the right.

The load generator's own charts (one per run) draw latency per priority
label, which mixes tenants: C's queued submissions and A's instant ones share
the "critical" line. The story is told per tenant, so this chart draws each
tenant's served rate (solid) against what it offered (dotted), and its
latency from the due time (p50 solid, p99 dashed, 1 s bins by due time; only
full answers count: 2xx and not degraded, since a cached answer's few
milliseconds say nothing about waiting; a second whose requests all timed
out or were refused is a gap), with the same
scales on both sides so the two runs compare at a glance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from demo_app.loadtest.engine import Record
from demo_app.loadtest.report import percentile
from demo_app.story import Phase


def write_story_chart(off: Phase, on: Phase, path: str | Path) -> None:
    """Draw both runs' tenants side by side into the PNG file `path`."""
    figure = Figure(figsize=(13, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True, sharey="row")
    tenants = [t.tenant for t in on.scenario.tenants]
    end_s = max([on.scenario.duration_s, *(r.done_s for p in (off, on) for r in p.records)])
    bins = max(1, math.ceil(end_s))
    for column, phase in enumerate((off, on)):
        top, bottom = axes[0][column], axes[1][column]
        for index, tenant in enumerate(tenants):
            mine = [r for r in phase.records if r.tenant == tenant]
            _rates(top, mine, bins, f"C{index}")
            _latency(bottom, mine, bins, f"C{index}")
        top.set_title(f"{phase.report.label}: served (solid) and offered (dotted) per tenant")
        bottom.set_title(f"{phase.report.label}: latency of full answers from due time")
        bottom.set_yscale("log")
        bottom.set_xlabel("seconds since start")
        for ax in (top, bottom):
            ax.axvspan(0, phase.scenario.warmup_s, color="0.92", zorder=0)
            ax.axvline(phase.scenario.duration_s, color="0.4", linewidth=1, linestyle=":")
            ax.grid(True, alpha=0.3)
            ax.set_xlim(0, bins)
    axes[0][0].set_ylabel("requests / s")
    axes[1][0].set_ylabel("ms (log)")
    handles = [Line2D([], [], color=f"C{i}", linewidth=2, label=t) for i, t in enumerate(tenants)]
    handles += [
        Line2D([], [], color="0.3", linestyle="-", label="served / p50"),
        Line2D([], [], color="0.3", linestyle=":", label="offered"),
        Line2D([], [], color="0.3", linestyle="--", label="p99"),
    ]
    axes[0][1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.suptitle("SurveyTool story: the same load with the throttle off and on")
    figure.savefig(path, format="png")


def _rates(axes: Axes, records: Sequence[Record], bins: int, color: str) -> None:
    served, offered = [0] * bins, [0] * bins
    for r in records:
        offered[min(int(r.due_s), bins - 1)] += 1
        if 200 <= r.status < 300:
            served[min(int(r.done_s), bins - 1)] += 1
    xs = [b + 0.5 for b in range(bins)]
    axes.plot(xs, served, color=color, linewidth=1.8)
    axes.plot(xs, offered, color=color, linewidth=1, linestyle=":")


def _latency(axes: Axes, records: Sequence[Record], bins: int, color: str) -> None:
    per_bin: list[list[float]] = [[] for _ in range(bins)]
    for r in records:
        if 200 <= r.status < 300 and not r.degraded:
            per_bin[min(int(r.due_s), bins - 1)].append(r.latency_ms)
    p50, p99 = [], []
    for values in per_bin:
        values.sort()
        p50.append(_nan(percentile(values, 50)))
        p99.append(_nan(percentile(values, 99)))
    xs = [b + 0.5 for b in range(bins)]
    axes.plot(xs, p50, color=color, linewidth=1.8)
    axes.plot(xs, p99, color=color, linewidth=1, linestyle="--")


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
