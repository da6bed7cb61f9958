"""What `bench.learned` prints: a line per trial, the medians as a Markdown table, the
targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def print_trial(trial: Mapping[str, Any]) -> None:
    f = trial["figures"]
    print(
        f"round {trial['round']} {trial['variant']:<7}"
        f" converge {_s(f['converge_s'])} / after drop {_s(f['converge_after_drop_s'])}"
        f" | goodput {_ratio(f['goodput_before'])} / {_ratio(f['goodput_after'])}"
        f" | A p50 after {_ms(f['A_p50_after_ms'])}"
        f" | A {_pct(f['A_served_before'])} B {_pct(f['B_served_before'])}"
        f" (load {trial['loadavg_1m']:.2f}, lag p99 {_ms(f['lag_p99_ms'])})",
        flush=True,
    )


#: The table's columns: (heading, figure, format).
COLUMNS = (
    ("converge", "converge_s", "s"),
    ("converge after drop", "converge_after_drop_s", "s"),
    ("limit before", "limit_before", "n"),
    ("limit after", "limit_after", "n"),
    ("goodput/cap. before", "goodput_before", "ratio"),
    ("goodput/cap. after", "goodput_after", "ratio"),
    ("A served before/after", ("A_served_before", "A_served_after"), "pct"),
    ("B served before/after", ("B_served_before", "B_served_after"), "pct"),
    ("A p99 before/after", ("A_p99_before_ms", "A_p99_after_ms"), "ms"),
    ("B p99 before/after", ("B_p99_before_ms", "B_p99_after_ms"), "ms"),
    ("A p50 before/after", ("A_p50_before_ms", "A_p50_after_ms"), "ms"),
)
_FORMATS: dict[str, Callable[[Any], str]] = {
    "s": lambda v: _s(v),
    "n": lambda v: "-" if v is None else f"{v:g}",
    "ratio": lambda v: _ratio(v),
    "pct": lambda v: _pct(v),
    "ms": lambda v: _ms(v),
}


def table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The summary as a Markdown table (medians over rounds)."""
    lines = [
        "| variant | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for variant, figures in summary.items():
        cells = []
        for _, key, kind in COLUMNS:
            keys = key if isinstance(key, tuple) else (key,)
            cells.append(" / ".join(_FORMATS[kind](figures[k]) for k in keys))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(found: Mapping[str, Any]) -> str:
    if not found:
        return ""
    return (
        f"auto's goodput before the drop: {found['goodput_before_auto_over_static']:.2f} of"
        f" static's (target >= 0.90: {'met' if found['goodput_met'] else 'not met'});"
        f" A's p50 after the drop: auto {_ms(found['A_p50_after_auto_ms'])},"
        f" static {_ms(found['A_p50_after_static_ms'])}"
        f" (target: auto lower: {'met' if found['A_p50_met'] else 'not met'})"
    )


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"
