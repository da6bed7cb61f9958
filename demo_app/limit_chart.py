"""A PNG of the concurrency limit in force against the store's true capacity.

Top: the limit in force with the throttle on (learned or set), sampled from
the app's stats every half second, against the store's slots (black steps)
and the band [c, 1.5c] where a learned limit settles (shaded). Bottom: the
requests waiting inside the store, the throttle off beside on: where the
throttle keeps the queue (its own, where A and B go first) or leaves it (the
store's, first come first served). Matplotlib's object API with the Agg
canvas, as the other charts.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from demo_app.story import BAND, Phase, Story


def write_limit_chart(off: Phase, on: Phase, story: Story, path: str | Path) -> None:
    """Draw the on phase's limit against the slots, and both phases' store queues."""
    figure = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    end_s = max([on.scenario.duration_s, *(s.t_s for s in (*off.samples, *on.samples))])
    if on.samples:
        xs = [s.t_s for s in on.samples]
        slots = [s.slots for s in on.samples]
        top.fill_between(
            xs,
            [BAND[0] * n for n in slots],
            [BAND[1] * n for n in slots],
            step="post",
            color="0.88",
            label="[c, 1.5c]",
        )
        top.step(xs, slots, where="post", color="black", linewidth=2, label="store slots (c)")
        limits = [math.nan if s.limit is None else s.limit for s in on.samples]
        top.step(xs, limits, where="post", color="C0", linewidth=1.8, label="limit in force")
    top.set_ylim(bottom=0)
    top.set_ylabel("requests in flight")
    kind = "learned (THROTTLE_CONCURRENCY=auto)" if story.budget == "auto" else "set"
    top.set_title(f"the concurrency limit in force, {kind}, against the store's true capacity")
    top.legend(loc="upper right", fontsize="small")
    for index, phase in enumerate((off, on)):
        bottom.step(
            [s.t_s for s in phase.samples],
            [s.waiting for s in phase.samples],
            where="post",
            color=f"C{index + 1}",
            linewidth=1.5,
            label=phase.report.label,
        )
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_ylabel("waiting in the store")
    bottom.set_xlabel("seconds since the load started")
    bottom.set_title("requests waiting for a store slot (inside the app, behind the throttle)")
    bottom.legend(loc="upper left", fontsize="small")
    drop = story.drop_at(on.scenario)
    for axes in (top, bottom):
        axes.axvspan(0, on.scenario.warmup_s, color="0.95", zorder=0)
        if drop is not None:
            axes.axvline(drop, color="0.4", linewidth=1, linestyle=":")
        axes.grid(True, alpha=0.3)
        axes.set_xlim(0, end_s)
    figure.suptitle("SurveyTool: the limit in force against the store's capacity")
    figure.savefig(path, format="png")
