"""A PNG of a run: who got served over time, and how long each priority waited.

Top: served requests per second per tenant (2xx, 1 s bins by completion
time, solid) against what the tenant offered (requests due, dotted), so a
throttled tenant shows as a gap between its two lines. Bottom: latency from
the due time per priority label (p50 solid, p99 dashed, 1 s bins by due
time, log scale). The warm-up is shaded; the line at the end of the load
marks where the drain of queues begins.

Uses matplotlib's object API with the Agg canvas (no pyplot, so no global
backend state and no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from demo_app.loadtest.engine import Record, Scenario
from demo_app.loadtest.report import percentile

#: The line styles the legends use.
LineStyle = Literal["-", ":", "--"]


def write_chart(
    records: Sequence[Record],
    scenario: Scenario,
    path: str | Path,
    *,
    title: str = "",
    max_tenants: int = 8,
) -> None:
    """Draw ``records`` of a run of ``scenario`` into the PNG file ``path``.

    Beyond ``max_tenants`` the busiest tenants keep their own lines and the
    rest are summed into one "others" line, so the chart stays readable.
    """
    end_s = max([scenario.duration_s, *(r.done_s for r in records)])
    bins = max(1, math.ceil(end_s))
    figure = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    _rates(top, records, [t.tenant for t in scenario.tenants], bins, max_tenants)
    _latencies(bottom, records, bins)
    for axes in (top, bottom):
        if scenario.warmup_s > 0:
            axes.axvspan(0, scenario.warmup_s, color="0.9", zorder=0)
        axes.axvline(scenario.duration_s, color="0.4", linewidth=1, linestyle=":")
        axes.grid(True, alpha=0.3)
        axes.set_xlim(0, bins)
    labels = top.get_xaxis_transform()  # x in data units, y in axes fractions
    if scenario.warmup_s > 0:
        top.text(scenario.warmup_s / 2, 0.97, "warm-up", transform=labels, ha="center", va="top")
    top.text(scenario.duration_s, 0.97, " load stops", transform=labels, va="top", color="0.3")
    figure.suptitle(title or f"scenario {scenario.name}")
    figure.savefig(path, format="png")


def _rates(
    axes: Axes, records: Sequence[Record], order: Sequence[str], bins: int, max_tenants: int
) -> None:
    groups = _tenant_groups(records, order, max_tenants)
    xs = [b + 0.5 for b in range(bins)]
    colors: list[tuple[str, str]] = []
    for index, (name, members) in enumerate(groups.items()):
        served = [0] * bins
        offered = [0] * bins
        for record in members:
            offered[min(int(record.due_s), bins - 1)] += 1
            if 200 <= record.status < 300:
                served[min(int(record.done_s), bins - 1)] += 1
        color = f"C{index % 10}"
        axes.plot(xs, served, color=color, linewidth=1.8)
        axes.plot(xs, offered, color=color, linewidth=1, linestyle=":")
        colors.append((name, color))
    axes.set_ylabel("requests / s")
    axes.set_title("served (2xx, by completion time) and offered (by due time), per tenant")
    _legend(axes, colors, [("served", "-"), ("offered", ":")])


def _tenant_groups(
    records: Sequence[Record], order: Sequence[str], max_tenants: int
) -> dict[str, list[Record]]:
    """Tenants in scenario order; past ``max_tenants``, the smallest summed as "others"."""
    by_tenant: dict[str, list[Record]] = {name: [] for name in order}
    for record in records:
        by_tenant.setdefault(record.tenant, []).append(record)
    by_tenant = {name: rs for name, rs in by_tenant.items() if rs}
    if len(by_tenant) <= max_tenants:
        return by_tenant
    ranked = sorted(by_tenant, key=lambda t: len(by_tenant[t]), reverse=True)
    keep = set(ranked[: max_tenants - 1])
    groups = {name: rs for name, rs in by_tenant.items() if name in keep}
    rest = [name for name in by_tenant if name not in keep]
    groups[f"{len(rest)} others (sum)"] = [r for name in rest for r in by_tenant[name]]
    return groups


def _latencies(axes: Axes, records: Sequence[Record], bins: int) -> None:
    by_priority: dict[str, list[list[float]]] = {}
    for record in records:
        if 200 <= record.status < 300:
            per_bin = by_priority.setdefault(record.priority, [[] for _ in range(bins)])
            per_bin[min(int(record.due_s), bins - 1)].append(record.latency_ms)
    xs = [b + 0.5 for b in range(bins)]
    for index, per_bin in enumerate(by_priority.values()):
        color = f"C{index % 10}"
        p50, p99 = [], []
        for values in per_bin:
            values.sort()
            p50.append(_or_nan(percentile(values, 50)))
            p99.append(_or_nan(percentile(values, 99)))
        axes.plot(xs, p50, color=color, linewidth=1.8)
        axes.plot(xs, p99, color=color, linewidth=1, linestyle="--")
    if by_priority:
        axes.set_yscale("log")
    colors = [(name, f"C{i % 10}") for i, name in enumerate(by_priority)]
    _legend(axes, colors, [("p50", "-"), ("p99", "--")])
    axes.set_ylabel("latency from due time (ms)")
    axes.set_xlabel("seconds since start")
    axes.set_title("latency of served requests per priority label (1 s bins by due time)")


def _legend(
    axes: Axes, colors: Sequence[tuple[str, str]], styles: Sequence[tuple[str, LineStyle]]
) -> None:
    """One entry per colour, then one per line style, beside the plot (never over it)."""
    if not colors:
        return
    handles = [Line2D([], [], color=color, linewidth=2, label=name) for name, color in colors]
    handles += [Line2D([], [], color="0.3", linestyle=ls, label=label) for label, ls in styles]
    axes.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
        frameon=False,
    )


def _or_nan(value: float | None) -> float:
    """Matplotlib leaves a gap at NaN: a bin with no served request."""
    return math.nan if value is None else value
