"""What ``python -m demo_app`` prints and writes: the comparison, the verdicts, the files.

Files in the output folder:

- ``report.md``: the printed text, with the settings and the machine's load;
- ``summary.json``: the same as data (format ``surveytool.newcomer/1``): the
  settings, each claim and check with its figures, both load-test reports
  and how busy the machine was;
- ``throttle-off.json``, ``throttle-on.json``: the load generator's reports
  (``python -m demo_app.loadtest --compare`` reads them);
- ``records-throttle-off.csv``, ``records-throttle-on.csv``: every request
  (due, sent and done times in seconds since the start, status, the
  ``Server-Timing`` figures), to dig further;
- ``chart-story.png``: per tenant, served rate and latency over time, the
  throttle off beside on (`demo_app.story_chart`);
- ``chart-throttle-off.png``, ``chart-throttle-on.png``: the load generator's
  charts of each run (served rates per tenant, latency per priority label);
- ``chart-limit.png``: the concurrency limit in force over time against the
  store's true slots, and the store's own queue, off and on (`demo_app.limit_chart`).
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from demo_app import machine
from demo_app.loadtest.engine import Record, Scenario
from demo_app.loadtest.report import format_side_by_side
from demo_app.story import (
    LAG_LIMIT_MS,
    STORE_JITTER,
    Phase,
    Story,
    Verdict,
    to_json,
)

FORMAT: Final = "surveytool.newcomer/1"


@dataclass(frozen=True)
class Context:
    """How the run was made, for the report."""

    argv: Sequence[str]
    story: Story
    redis_url: str | None
    pinning: str | None
    load_before: str
    load_after: str
    usage: Mapping[str, machine.Usage | None]


def intro(story: Story, scenario: Scenario, redis_url: str | None, server: str = "uvicorn") -> str:
    rates = ", ".join(f"{t.tenant} {t.rate:g}" for t in scenario.tenants)
    total = sum(t.rate for t in scenario.tenants)
    budget = "shared through Redis" if redis_url else "in this process's memory"
    if story.budget == "static":
        against = f"a budget of {story.rate:g}/s and {story.slots} in flight ({budget})"
    else:
        against = (
            "a concurrency limit learned from the store's latency (THROTTLE_CONCURRENCY=auto, "
            f"no number set; {budget})"
        )
    drop = story.drop_at(scenario)
    slowdown = (
        ""
        if drop is None
        else f", down to {story.slots_after} slots ({story.capacity_after_per_s:g}/s) {drop:g} s in"
    )
    lines = [
        f"SurveyTool story: tenants {rates} req/s ({total:g} in all) against {against};",
        f"the store: {story.slots} slots x {story.work_ms:g} ms (+-{STORE_JITTER:.0%}) = "
        f"{story.capacity_per_s:g} responses/s{slowdown}. Each phase: {scenario.duration_s:g} s "
        f"of load, figures over {scenario.warmup_s:g}-{scenario.duration_s:g} s.",
        f"The app: {server} demo_app.app:app (its start-up objects frozen out of the garbage "
        "collector).",
    ]
    if story.rate_scale != 1:
        lines.append(
            f"SCALED: the whole story runs at {story.rate_scale:g} x its rates (budget and store "
            "capacity too); the story's own rates are A 10, B 30, C 150 against 80/s."
        )
    return "\n".join(lines)


def text(
    off: Phase, on: Phase, claims: Sequence[Verdict], health: Sequence[Verdict], context: Context
) -> str:
    lines = [format_side_by_side(off.report, on.report)]
    lines.append(
        "With the throttle off, requests wait inside the app, in the store's own queue "
        f"(up to {_queue(off)} waiting): that shows in the latency, not in 'wait p99'."
    )
    lines.append("")
    lines.append("The story (throttle on unless said otherwise):")
    lines += [v.line() for v in claims]
    lines.append("")
    lines.append("The measurement:")
    lines += [("ok    " if v.passed else "WARN  ") + f"{v.claim}: {v.figures}" for v in health]
    for label, usage in context.usage.items():
        if usage is not None:
            lines.append(f"      {label}: {usage.describe()}")
    lines.append(
        f"      load average before {context.load_before}, after {context.load_after}"
        f" ({machine.cores()} cores)"
    )
    if context.pinning:
        lines.append(f"      {context.pinning}")
    lines += [f"      {line}" for line in _advice(off, on, context)]
    passed = sum(v.passed for v in claims)
    lines.append("")
    lines.append(f"{passed} of {len(claims)} claims hold.")
    return "\n".join(lines)


def _advice(off: Phase, on: Phase, context: Context) -> list[str]:
    """What to make of a measurement that may not be trusted."""
    out = []
    usage = context.usage.get(on.report.label)
    busy = usage is not None and usage.others_cores > machine.cores() / 2
    if busy or (on.report.lag_p99_ms or 0.0) > LAG_LIMIT_MS:
        out.append(
            "A busy machine adds latency that no throttle can take away: rerun when it is "
            "quieter, or scale the story down (--rate-scale 0.5)."
        )
    lag = off.report.lag_p99_ms or 0.0
    if lag > LAG_LIMIT_MS:
        ab = [s.latency_p50_ms or 0.0 for t, s in off.report.tenants.items() if t in ("A", "B")]
        if ab and lag <= min(ab) / 10:
            out.append(
                f"With the throttle off the load generator keeps open every request waiting in "
                f"the store (up to {_queue(off)}) and fell behind by {lag:.0f} ms (p99): small "
                f"beside A's and B's latencies then (p50 {min(ab) / 1000:.1f} s and more), so "
                "that verdict stands."
            )
        else:
            out.append("With the throttle off the load generator fell behind: rerun to be sure.")
    return out


def write(
    out: Path,
    off: Phase,
    on: Phase,
    claims: Sequence[Verdict],
    health: Sequence[Verdict],
    context: Context,
    printed: str,
) -> list[Path]:
    """Write the report, the data and the charts into `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for phase in (off, on):
        path = out / f"{_slug(phase)}.json"
        path.write_text(phase.report.to_json(), encoding="utf-8")
        written.append(path)
        path = out / f"records-{_slug(phase)}.csv"
        _write_records(path, phase.records)
        written.append(path)
    data = _data(off, on, claims, health, context)
    path = out / "summary.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    written.append(path)
    path = out / "report.md"
    path.write_text(_markdown(printed, context), encoding="utf-8")
    written.append(path)
    # matplotlib is slow to import: only now, after the runs.
    from demo_app.loadtest.chart import write_chart
    from demo_app.story_chart import write_story_chart

    path = out / "chart-story.png"
    write_story_chart(off, on, path)
    written.append(path)
    for phase in (off, on):
        path = out / f"chart-{_slug(phase)}.png"
        title = f"SurveyTool story, {phase.report.label}"
        write_chart(phase.records, phase.scenario, path, title=title)
        written.append(path)
    if on.samples:
        from demo_app.limit_chart import write_limit_chart

        path = out / "chart-limit.png"
        write_limit_chart(off, on, context.story, path)
        written.append(path)
    return written


def _data(
    off: Phase, on: Phase, claims: Sequence[Verdict], health: Sequence[Verdict], context: Context
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "command": ["python", "-m", "demo_app", *context.argv],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rate_scale": context.story.rate_scale,
        "budget": "redis" if context.redis_url else "memory",
        "budget_kind": context.story.budget,
        "slowdown": context.story.slowdown,
        "settings": context.story.env(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cores": machine.cores(),
            "load_average_before": context.load_before,
            "load_average_after": context.load_after,
            "pinning": context.pinning,
        },
        "claims": to_json(claims),
        "checks": to_json(health),
        "phases": {
            phase.report.label: {
                "store_queue_max": phase.store_queue_max,
                "samples": {
                    "fields": ["t_s", "limit", "slots", "waiting"],
                    "rows": [list(sample) for sample in phase.samples],
                },
                "cpu": (u.to_json() if (u := context.usage.get(phase.report.label)) else None),
                "report": phase.report.to_dict(),
            }
            for phase in (off, on)
        },
    }


def _markdown(printed: str, context: Context) -> str:
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in context.story.env().items())
    command = " ".join(["python -m demo_app", *context.argv])
    return "\n".join(
        [
            "# SurveyTool: the story with the throttle off and on",
            "",
            f"`{command}` on {platform.platform()}, Python {platform.python_version()}, "
            f"{machine.cores()} cores, load average {context.load_before} before and "
            f"{context.load_after} after; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            "```text",
            printed,
            "```",
            "",
            "Charts: `chart-story.png` (per tenant, off beside on), `chart-throttle-off.png`, "
            "`chart-throttle-on.png`, `chart-limit.png` (the limit in force against the store's "
            "slots). Data: `summary.json`, every request in `records-*.csv`, "
            "and the load generator's reports `throttle-off.json` and `throttle-on.json`.",
            "",
            "## Settings (the throttle-off run: the same, with `THROTTLE_ENABLED=false`)",
            "",
            "| variable | value |",
            "|---|---|",
            settings,
            "",
            "Why these: see `demo_app/README.md`.",
            "",
        ]
    )


_COLUMNS: Final = (
    "tenant", "route", "due_s", "sent_s", "done_s", "status", "error",
    "throttle_ms", "app_ms", "degraded", "retry_after",
)  # fmt: skip


def _write_records(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(_COLUMNS)
        for r in records:
            writer.writerow(
                [
                    r.tenant, r.route, f"{r.due_s:.4f}", f"{r.sent_s:.4f}", f"{r.done_s:.4f}",
                    r.status, r.error or "", _num(r.throttle_ms), _num(r.app_ms),
                    int(r.degraded), r.retry_after or "",
                ]
            )  # fmt: skip


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _queue(phase: Phase) -> str:
    return "?" if phase.store_queue_max is None else str(phase.store_queue_max)


def _slug(phase: Phase) -> str:
    return phase.report.label.replace(" ", "-")
