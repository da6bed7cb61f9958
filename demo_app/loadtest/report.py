"""Summaries of a run: per tenant, per priority label and overall; JSON and text.

How the numbers are counted (the project's rules for measuring honestly):

- Counts (sent, served, 429, 503, errors, degraded) cover the whole run.
- ``served_per_s`` counts 2xx responses by *completion* time inside the steady
  window ``[warmup_s, duration_s]``, so neither the warm-up nor the drain of
  queues after the load stops inflates or deflates it. ``offered_per_s`` counts
  requests *due* in that window.
- Latency runs from when a request was *due* to its response, over the 2xx
  responses to requests due in the steady window.
- Added wait is latency minus the app's own ``Server-Timing: app;dur``; a
  record without ``app;dur`` falls back to the throttle's ``throttle;dur``.
  ``source`` says which: ``latency_minus_app``, ``throttle_dur``, ``mixed`` or
  ``none``.

``Report.to_dict()`` keys (stable; ``format`` changes if they do)::

    format            "throttle_mw.loadtest.report/1"
    label             free text, e.g. "throttle on"
    scenario          {name, seed, duration_s, warmup_s}
    window_s          [warmup_s, duration_s]
    client_lag_ms     {p99, max}: how late the client sent (its own health)
    total             Stats
    tenants           {tenant: Stats}, in scenario order
    priorities        {label: Stats}, in order of first use

    Stats: sent, served, rejected_429, unavailable_503, errors, degraded,
           offered_per_s, served_per_s, statuses {"201": n, "0": n, ...},
           latency_ms {p50, p95, p99}, added_wait_ms {p50, p99, source},
           rejected_latency_ms {p50, p99}
    (a percentile with no data is null; "0" in statuses: no response)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from demo_app.loadtest.engine import Record, Scenario
from demo_app.loadtest.table import Row, render

FORMAT: Final = "throttle_mw.loadtest.report/1"
#: Above this p99 send lag the text report warns that the client could not keep up.
LAG_WARNING_MS: Final = 50.0


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (always an observed value); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Stats:
    """One group's figures; see the module docstring for how each is counted."""

    sent: int
    served: int
    rejected_429: int
    unavailable_503: int
    errors: int
    degraded: int
    offered_per_s: float
    served_per_s: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    wait_p50_ms: float | None
    wait_p99_ms: float | None
    wait_source: str
    rejected_p50_ms: float | None
    rejected_p99_ms: float | None
    statuses: Mapping[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "served": self.served,
            "rejected_429": self.rejected_429,
            "unavailable_503": self.unavailable_503,
            "errors": self.errors,
            "degraded": self.degraded,
            "offered_per_s": _round(self.offered_per_s),
            "served_per_s": _round(self.served_per_s),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "latency_ms": {
                "p50": _round(self.latency_p50_ms),
                "p95": _round(self.latency_p95_ms),
                "p99": _round(self.latency_p99_ms),
            },
            "added_wait_ms": {
                "p50": _round(self.wait_p50_ms),
                "p99": _round(self.wait_p99_ms),
                "source": self.wait_source,
            },
            "rejected_latency_ms": {
                "p50": _round(self.rejected_p50_ms),
                "p99": _round(self.rejected_p99_ms),
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stats:
        """The inverse of ``to_dict``."""
        latency, wait, rejected = (
            data["latency_ms"],
            data["added_wait_ms"],
            data["rejected_latency_ms"],
        )
        return cls(
            sent=data["sent"],
            served=data["served"],
            rejected_429=data["rejected_429"],
            unavailable_503=data["unavailable_503"],
            errors=data["errors"],
            degraded=data["degraded"],
            offered_per_s=data["offered_per_s"],
            served_per_s=data["served_per_s"],
            latency_p50_ms=latency["p50"],
            latency_p95_ms=latency["p95"],
            latency_p99_ms=latency["p99"],
            wait_p50_ms=wait["p50"],
            wait_p99_ms=wait["p99"],
            wait_source=wait["source"],
            rejected_p50_ms=rejected["p50"],
            rejected_p99_ms=rejected["p99"],
            statuses={int(k): v for k, v in data["statuses"].items()},
        )


@dataclass(frozen=True)
class Report:
    """A run summarised; ``summarize`` makes one."""

    label: str
    scenario: str
    seed: int
    duration_s: float
    warmup_s: float
    total: Stats
    tenants: Mapping[str, Stats]
    priorities: Mapping[str, Stats]
    lag_p99_ms: float | None
    lag_max_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data with the documented, stable keys."""
        return {
            "format": FORMAT,
            "label": self.label,
            "scenario": {
                "name": self.scenario,
                "seed": self.seed,
                "duration_s": self.duration_s,
                "warmup_s": self.warmup_s,
            },
            "window_s": [self.warmup_s, self.duration_s],
            "client_lag_ms": {"p99": _round(self.lag_p99_ms), "max": _round(self.lag_max_ms)},
            "total": self.total.to_dict(),
            "tenants": {name: s.to_dict() for name, s in self.tenants.items()},
            "priorities": {name: s.to_dict() for name, s in self.priorities.items()},
        }

    def to_json(self) -> str:
        """``to_dict()`` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """The inverse of ``to_dict``: a saved report, e.g. to compare runs."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} report (format {data.get('format')!r})")
        scenario, lag = data["scenario"], data["client_lag_ms"]
        return cls(
            label=data["label"],
            scenario=scenario["name"],
            seed=scenario["seed"],
            duration_s=scenario["duration_s"],
            warmup_s=scenario["warmup_s"],
            total=Stats.from_dict(data["total"]),
            tenants={k: Stats.from_dict(v) for k, v in data["tenants"].items()},
            priorities={k: Stats.from_dict(v) for k, v in data["priorities"].items()},
            lag_p99_ms=lag["p99"],
            lag_max_ms=lag["max"],
        )


def summarize(records: Sequence[Record], scenario: Scenario, *, label: str = "") -> Report:
    """Group ``records`` of a run of ``scenario`` by tenant and priority label."""
    window = (scenario.warmup_s, scenario.duration_s)
    tenant_order = [t.tenant for t in scenario.tenants]
    priority_order = [route.priority for t in scenario.tenants for _, route in t.mix]
    lags = sorted(r.lag_ms for r in records)
    return Report(
        label=label,
        scenario=scenario.name,
        seed=scenario.seed,
        duration_s=scenario.duration_s,
        warmup_s=scenario.warmup_s,
        total=_stats(records, window),
        tenants=_grouped(records, lambda r: r.tenant, tenant_order, window),
        priorities=_grouped(records, lambda r: r.priority, priority_order, window),
        lag_p99_ms=percentile(lags, 99),
        lag_max_ms=lags[-1] if lags else None,
    )


def _grouped(
    records: Iterable[Record],
    key: Callable[[Record], str],
    order: Sequence[str],
    window: tuple[float, float],
) -> dict[str, Stats]:
    groups: dict[str, list[Record]] = {name: [] for name in order}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return {name: _stats(rs, window) for name, rs in groups.items()}


def _stats(records: Sequence[Record], window: tuple[float, float]) -> Stats:
    start, end = window
    span = end - start
    statuses = Counter(r.status for r in records)
    served = [r for r in records if 200 <= r.status < 300]
    steady = [r for r in served if start <= r.due_s < end]
    rejected = sorted(
        r.latency_ms for r in records if r.status in (429, 503) and start <= r.due_s < end
    )
    latencies = sorted(r.latency_ms for r in steady)
    waits, source = _waits(steady)
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return Stats(
        sent=len(records),
        served=ok,
        rejected_429=statuses[429],
        unavailable_503=statuses[503],
        errors=len(records) - ok - statuses[429] - statuses[503],
        degraded=sum(r.degraded for r in records),
        offered_per_s=sum(start <= r.due_s < end for r in records) / span,
        served_per_s=sum(start <= r.done_s <= end for r in served) / span,
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        latency_p99_ms=percentile(latencies, 99),
        wait_p50_ms=percentile(waits, 50),
        wait_p99_ms=percentile(waits, 99),
        wait_source=source,
        rejected_p50_ms=percentile(rejected, 50),
        rejected_p99_ms=percentile(rejected, 99),
        statuses=dict(statuses),
    )


def _waits(records: Iterable[Record]) -> tuple[list[float], str]:
    """Added waits, sorted, and where they came from."""
    waits: list[float] = []
    sources: set[str] = set()
    for record in records:
        if record.added_wait_ms is not None:
            waits.append(record.added_wait_ms)
            sources.add("latency_minus_app")
        elif record.throttle_ms is not None:
            waits.append(record.throttle_ms)
            sources.add("throttle_dur")
    source = "none" if not sources else sources.pop() if len(sources) == 1 else "mixed"
    return sorted(waits), source


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- text ------------------------------------------------------------------

_SOURCE_SHORT: Final = {
    "latency_minus_app": "lat-app",
    "throttle_dur": "throttle",
    "mixed": "mixed",
    "none": "-",
}
_HEADERS: Final = (
    "",
    "sent",
    "2xx",
    "429",
    "503",
    "err",
    "degr",
    "offered/s",
    "served/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "wait p50",
    "wait p99",
    "wait =",
)


def format_report(report: Report) -> str:
    """The report as an aligned plain-text table, with notes on how it was counted."""
    rows: list[Row] = ["by tenant"]
    rows += [_row(f"  {name}", s) for name, s in report.tenants.items()]
    rows.append("by priority label")
    rows += [_row(f"  {name}", s) for name, s in report.priorities.items()]
    rows.append(_row("all", report.total))
    return "\n".join([_title(report), render(_HEADERS, rows), *_notes(report)])


def format_side_by_side(left: Report, right: Report) -> str:
    """Two runs of one scenario next to each other, e.g. throttle off and on."""
    headers = ["", *_PAIR_HEADERS, "|", *_PAIR_HEADERS]
    rows: list[Row] = ["by tenant"]
    for name in _union(left.tenants, right.tenants):
        rows.append(_pair(f"  {name}", left.tenants.get(name), right.tenants.get(name)))
    rows.append("by priority label")
    for name in _union(left.priorities, right.priorities):
        rows.append(_pair(f"  {name}", left.priorities.get(name), right.priorities.get(name)))
    rows.append(_pair("all", left.total, right.total))
    size = len(_PAIR_HEADERS)
    spans = [("", 1), (left.label or "left", size), ("", 1), (right.label or "right", size)]
    table = render(headers, rows, align="l" + "r" * size + "l" + "r" * size, spans=spans)
    notes = [
        "served/s: 2xx by completion time in the steady window; latency from due time;",
        "wait = latency minus the app's own time (Server-Timing), else throttle;dur.",
        *_lag_warning(left),
        *_lag_warning(right),
    ]
    return "\n".join([_title(left, with_label=False), table, *notes])


_PAIR_HEADERS: Final = ("served/s", "429", "503", "err", "p50 ms", "p99 ms", "wait p99")


def _pair(name: str, left: Stats | None, right: Stats | None) -> list[str]:
    return [name, *_pair_cells(left), "|", *_pair_cells(right)]


def _pair_cells(stats: Stats | None) -> list[str]:
    if stats is None:
        return ["-"] * len(_PAIR_HEADERS)
    return [
        f"{stats.served_per_s:.1f}",
        str(stats.rejected_429),
        str(stats.unavailable_503),
        str(stats.errors),
        _ms(stats.latency_p50_ms),
        _ms(stats.latency_p99_ms),
        _ms(stats.wait_p99_ms),
    ]


def _row(name: str, s: Stats) -> list[str]:
    return [
        name,
        str(s.sent),
        str(s.served),
        str(s.rejected_429),
        str(s.unavailable_503),
        str(s.errors),
        str(s.degraded),
        f"{s.offered_per_s:.1f}",
        f"{s.served_per_s:.1f}",
        _ms(s.latency_p50_ms),
        _ms(s.latency_p95_ms),
        _ms(s.latency_p99_ms),
        _ms(s.wait_p50_ms),
        _ms(s.wait_p99_ms),
        _SOURCE_SHORT.get(s.wait_source, s.wait_source),
    ]


def _title(report: Report, *, with_label: bool = True) -> str:
    label = f" ({report.label})" if report.label and with_label else ""
    window = f"steady window {report.warmup_s:g}-{report.duration_s:g} s"
    return f"scenario {report.scenario}{label}: {report.duration_s:g} s, {window}"


def _notes(report: Report) -> list[str]:
    return [
        "served/s: 2xx by completion time in the steady window; latency: from due time, "
        "2xx responses due in the window.",
        "wait = lat-app: latency minus Server-Timing app;dur; throttle: throttle;dur "
        "(responses without app;dur).",
        *_lag_warning(report),
    ]


def _lag_warning(report: Report) -> list[str]:
    if report.lag_p99_ms is None or report.lag_p99_ms <= LAG_WARNING_MS:
        return []
    who = f" in {report.label!r}" if report.label else ""
    return [
        f"warning: the client fell behind{who} (send lag p99 {_ms(report.lag_p99_ms)} ms, "
        f"max {_ms(report.lag_max_ms)} ms): the load it offered was burstier than planned."
    ]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def _union(first: Mapping[str, Stats], second: Mapping[str, Stats]) -> list[str]:
    return [*first, *(name for name in second if name not in first)]
