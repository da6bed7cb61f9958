"""A PNG of the learned-limit benchmark: the limit against the true capacity, and A's wait.

Top: the concurrency limit in force over time, per variant and round (thin
lines; no throttle has none), against the app's true slots (black steps) and
the band [c, 1.5c] the limit should settle in (shaded). Bottom: tenant A's
median latency from due time in 1 s bins, per variant (the median over rounds
of each bin's median), log scale. Matplotlib's object API with the Agg canvas,
as `demo_app.loadtest.chart` draws (no pyplot, no display).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench import stats
from bench.learnedscore import BAND, Story

COLORS = {"none": "C3", "static": "C1", "auto": "C0"}


def write_chart(trials: Sequence[Mapping[str, Any]], story: Story, path: Path) -> None:
    """Draw `trials` (each: variant, samples, records) into the PNG file `path`."""
    figure = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _limits(top, trials, story)
    _latency(bottom, trials, story)
    for axes in (top, bottom):
        axes.axvline(story.drop_at_s, color="0.4", linewidth=1, linestyle=":")
        axes.grid(True, alpha=0.3)
        axes.set_xlim(0, story.duration_s)
    bottom.set_xlabel("seconds since the load started")
    figure.suptitle(
        f"the learned limit: {story.slots} slots x {story.work_s * 1000:g} ms,"
        f" {story.slots_after} slots from {story.drop_at_s:g} s"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def _limits(axes: Axes, trials: Sequence[Mapping[str, Any]], story: Story) -> None:
    xs = [0.0, story.drop_at_s, story.duration_s]
    slots = [story.slots, story.slots_after, story.slots_after]
    axes.step(xs, slots, where="post", color="black", linewidth=2, label="true capacity (slots)")
    axes.fill_between(
        xs,
        [BAND[0] * s for s in slots],
        [BAND[1] * s for s in slots],
        step="post",
        color="0.85",
        label="[c, 1.5c]",
    )
    labelled: set[str] = set()
    for trial in trials:
        points = [(s["t_s"], s["limit"]) for s in trial["samples"] if s["limit"] is not None]
        if not points:
            continue
        variant = trial["variant"]
        axes.step(
            [p[0] for p in points],
            [p[1] for p in points],
            where="post",
            color=COLORS.get(variant, "C2"),
            linewidth=1.2,
            alpha=0.8,
            label=None if variant in labelled else f"{variant} limit in force",
        )
        labelled.add(variant)
    axes.set_ylim(bottom=0)
    axes.set_ylabel("requests in flight")
    axes.set_title("concurrency limit in force (each round) against the app's true slots")
    axes.legend(loc="upper right", fontsize="small")


def _latency(axes: Axes, trials: Sequence[Mapping[str, Any]], story: Story) -> None:
    bins = max(1, math.ceil(story.duration_s))
    for variant in dict.fromkeys(t["variant"] for t in trials):
        per_round = [_a_p50(t["records"], bins) for t in trials if t["variant"] == variant]
        line: list[float] = []
        for b in range(bins):
            values = [v for r in per_round if (v := r[b]) is not None]
            line.append(statistics.median(values) if values else math.nan)
        axes.plot(
            [b + 0.5 for b in range(bins)],
            line,
            color=COLORS.get(variant, "C2"),
            linewidth=1.6,
            label=variant,
        )
    axes.set_yscale("log")
    axes.set_ylabel("A's p50 from due (ms)")
    axes.set_title("tenant A's median latency, 1 s bins by due time (median over rounds)")
    axes.legend(loc="upper left", fontsize="small")


def _a_p50(records: Sequence[Mapping[str, Any]], bins: int) -> list[float | None]:
    per_bin: list[list[float]] = [[] for _ in range(bins)]
    for r in records:
        if r["tenant"] == "A" and 200 <= r["status"] < 300 and r["due_s"] < bins:
            per_bin[int(r["due_s"])].append((r["done_s"] - r["due_s"]) * 1000.0)
    return [stats.percentile(values, 0.5) for values in per_bin]
