"""The learned-limit benchmark's figures: one trial's, and the medians over rounds.

A trial is the records of one run (`bench.learnedload`: tenant, due, done,
status per request) and its samples of the limit in force and the app's true
slots. Windows: *before* is [warm-up, drop), once the start-up's learning had
time; *after* is [drop + settle, end), once the drop's had time. Served
fractions and latencies (from when a request was due) are of the requests due
in a window; goodput is 2xx completions per second in it, over the capacity of
the app then. Convergence is read off the samples: the first time the limit
enters [c, 1.5c] (c: the true slots) and stays there until the window ends.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench import stats

#: The band the limit should settle in, as multiples of the true slots (issue 10).
BAND = (1.0, 1.5)


@dataclass(frozen=True)
class Story:
    """What a run was: its length, when the slots dropped, and the app's capacity."""

    duration_s: float
    drop_at_s: float
    slots: int
    slots_after: int
    work_s: float
    warmup_s: float
    settle_s: float

    @property
    def before(self) -> tuple[float, float]:
        return (self.warmup_s, self.drop_at_s)

    @property
    def after(self) -> tuple[float, float]:
        return (self.drop_at_s + self.settle_s, self.duration_s)

    def capacity(self, slots: int) -> float:
        return slots / self.work_s


def _due(
    records: Sequence[Mapping[str, Any]], window: tuple[float, float], tenant: str
) -> list[Mapping[str, Any]]:
    return [r for r in records if r["tenant"] == tenant and window[0] <= r["due_s"] < window[1]]


def _ok(record: Mapping[str, Any]) -> bool:
    return 200 <= int(record["status"]) < 300


def served_fraction(
    records: Sequence[Mapping[str, Any]], window: tuple[float, float], tenant: str
) -> float | None:
    mine = _due(records, window, tenant)
    return sum(1 for r in mine if _ok(r)) / len(mine) if mine else None


def latency_ms(
    records: Sequence[Mapping[str, Any]], window: tuple[float, float], tenant: str, q: float
) -> float | None:
    """The nearest-rank q-quantile of the served requests' latency from due."""
    served = [(r["done_s"] - r["due_s"]) * 1000.0 for r in _due(records, window, tenant) if _ok(r)]
    return stats.percentile(served, q)


def goodput(records: Sequence[Mapping[str, Any]], window: tuple[float, float]) -> float:
    """2xx completions per second inside the window."""
    done = [r for r in records if _ok(r) and window[0] <= r["done_s"] < window[1]]
    return len(done) / (window[1] - window[0])


def converged_at(
    samples: Sequence[Mapping[str, Any]], window: tuple[float, float], slots: int
) -> float | None:
    """Seconds from the window's start until the limit entered [c, 1.5c] for good.

    None: it was never in the band at the window's end (or nothing was sampled, as with
    no throttle)."""
    low, high = BAND[0] * slots, BAND[1] * slots
    inside = [s for s in samples if window[0] <= s["t_s"] < window[1]]
    if not inside or any(s["limit"] is None for s in inside):
        return None
    entered: float | None = None
    for s in inside:
        if not low <= s["limit"] <= high:
            entered = None
        elif entered is None:
            entered = s["t_s"]
    return None if entered is None else entered - window[0]


def limit_stats(
    samples: Sequence[Mapping[str, Any]], window: tuple[float, float]
) -> dict[str, float | None]:
    """Median and coefficient of variation of the limit in force over a window."""
    values = [
        float(s["limit"])
        for s in samples
        if window[0] <= s["t_s"] < window[1] and s["limit"] is not None
    ]
    if not values:
        return {"median": None, "cv": None}
    mean = statistics.fmean(values)
    cv = statistics.pstdev(values) / mean if mean else None
    return {"median": statistics.median(values), "cv": cv}


def trial_figures(
    records: Sequence[Mapping[str, Any]], samples: Sequence[Mapping[str, Any]], story: Story
) -> dict[str, Any]:
    """Every figure of one run, flat (`summarize` takes medians of each)."""
    before, after = story.before, story.after
    figures: dict[str, Any] = {
        "converge_s": converged_at(samples, (0.0, story.drop_at_s), story.slots),
        "converge_after_drop_s": converged_at(
            samples, (story.drop_at_s, story.duration_s), story.slots_after
        ),
        "goodput_before": goodput(records, before) / story.capacity(story.slots),
        "goodput_after": goodput(records, after) / story.capacity(story.slots_after),
    }
    for name, window in (("before", before), ("after", after)):
        limits = limit_stats(samples, window)
        figures[f"limit_{name}"] = limits["median"]
        figures[f"limit_cv_{name}"] = limits["cv"]
        for tenant in ("A", "B", "C"):
            figures[f"{tenant}_served_{name}"] = served_fraction(records, window, tenant)
        for tenant in ("A", "B"):
            figures[f"{tenant}_p99_{name}_ms"] = latency_ms(records, window, tenant, 0.99)
        figures[f"A_p50_{name}_ms"] = latency_ms(records, window, "A", 0.5)
    # 5xx other than the throttle's 503s: the app failed.
    figures["errors_5xx"] = sum(1 for r in records if 500 <= r["status"] != 503)
    figures["no_response"] = sum(1 for r in records if int(r["status"]) == 0)
    figures["lag_p99_ms"] = stats.percentile(
        ((r["sent_s"] - r["due_s"]) * 1000.0 for r in records), 0.99
    )
    return figures


def median_of(values: Sequence[float | None], *, none_is_never: bool = False) -> float | None:
    """The median over rounds. A convergence time that never came counts as infinite
    (`none_is_never`): the median is None (never) when most rounds never converged."""
    if none_is_never:
        ordered = sorted(math.inf if v is None else v for v in values)
        if not ordered:
            return None
        middle = statistics.median(ordered)
        return None if math.isinf(middle) else middle
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(trials: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant, the median over its trials of every figure."""
    summary: dict[str, Any] = {}
    for variant in variants:
        mine = [t["figures"] for t in trials if t["variant"] == variant]
        if not mine:
            continue
        keys = list(mine[0])
        summary[variant] = {
            key: median_of([f[key] for f in mine], none_is_never=key.startswith("converge"))
            for key in keys
        }
        summary[variant]["rounds"] = len(mine)
    return summary


def targets(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Issue 10's targets: auto within 10 % of the static limit's goodput before the
    drop, and a lower A p50 than the static limit's after it."""
    auto, static = summary.get("auto"), summary.get("static")
    if auto is None or static is None:
        return {}
    goodput_ratio = auto["goodput_before"] / static["goodput_before"]
    a_auto, a_static = auto["A_p50_after_ms"], static["A_p50_after_ms"]
    return {
        "goodput_before_auto_over_static": goodput_ratio,
        "goodput_met": goodput_ratio >= 0.9,
        "A_p50_after_auto_ms": a_auto,
        "A_p50_after_static_ms": a_static,
        "A_p50_met": a_auto is not None and a_static is not None and a_auto < a_static,
    }
