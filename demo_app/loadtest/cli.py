"""The command line: ``python -m demo_app.loadtest --scenario seed --target URL``.

Runs a scenario open-loop against one or more SurveyTool processes, shows a
progress line on stderr while it runs (on a terminal, or with
``--progress``), then prints the report table; ``--report`` and ``--chart``
save it. Exit status: 0 after a completed run, 1 when no request reached any
target, 2 for bad arguments or a bad scenario, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from demo_app.loadtest import scenario as scenarios
from demo_app.loadtest.engine import Scenario, ScenarioError, check_targets, run
from demo_app.loadtest.progress import ProgressLine
from demo_app.loadtest.report import Report, format_report, format_side_by_side, summarize

DEFAULT_TARGET = "http://127.0.0.1:8000"

_T = TypeVar("_T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app.loadtest",
        description="Open-loop load test for the SurveyTool demo: requests are sent when "
        "they are due, whatever the server does, and latency counts from that moment.",
    )
    builtins = ", ".join(scenarios.builtin_names())
    parser.add_argument(
        "--scenario", default="seed", help=f"a built-in name ({builtins}) or a JSON file"
    )
    parser.add_argument(
        "--target",
        action="append",
        metavar="URL",
        help=f"base URL of a server; repeat for several, used round-robin ({DEFAULT_TARGET})",
    )
    parser.add_argument("--duration", type=float, metavar="S", help="override duration_s")
    parser.add_argument("--warmup", type=float, metavar="S", help="override warmup_s")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument(
        "--rate-scale", type=float, default=1.0, metavar="F", help="multiply every rate by F"
    )
    parser.add_argument("--report", type=Path, metavar="PATH.json", help="write the report")
    parser.add_argument("--chart", type=Path, metavar="PATH.png", help="draw a chart (matplotlib)")
    parser.add_argument(
        "--compare", type=Path, metavar="PATH.json", help="show a saved report side by side"
    )
    parser.add_argument("--label", default="", help="a name for this run in reports")
    parser.add_argument(
        "--progress", action="store_true", help="show progress even if stderr is not a terminal"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets: list[str] = args.target or [DEFAULT_TARGET]
    try:
        scenario = scenario_from_args(args)
        baseline = _baseline(args.compare) if args.compare else None
        check_targets(targets)
        draw = _chart_writer() if args.chart else None
    except (ScenarioError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(_banner(scenario, targets), file=sys.stderr)
    _raise_open_files_limit()
    tty = sys.stderr.isatty()
    display = (
        ProgressLine(sys.stderr, tty=tty) if not args.quiet and (args.progress or tty) else None
    )
    try:
        records = _run_fast(run(scenario, targets, on_progress=display))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if display is not None:
            display.close()
    report = summarize(records, scenario, label=args.label)
    if args.report:
        args.report.write_text(report.to_json(), encoding="utf-8")
    if draw is not None:
        draw(records, scenario, args.chart, title=_chart_title(report))
    if not args.quiet:
        print(format_report(report) if baseline is None else format_side_by_side(baseline, report))
    if records and all(r.status == 0 for r in records):
        print(
            f"error: no request reached {', '.join(targets)}: {records[0].error}", file=sys.stderr
        )
        return 1
    return 0


def _banner(scenario: Scenario, targets: Sequence[str]) -> str:
    expected = sum(
        rate * (end - start)
        for load in scenario.tenants
        for start, end, rate in load.segments(scenario.duration_s)
    )
    line = (
        f"{scenario.name}: {len(scenario.tenants)} tenants, about {expected:.0f} requests "
        f"over {scenario.duration_s:g} s to {', '.join(targets)}"
    )
    return f"{line}\n{scenario.description}" if scenario.description else line


def _run_fast(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop when installed (uvicorn[standard] brings it): it takes about a
    fifth off the client's CPU per request, and the client must keep up with the plan."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    loaded = scenarios.load(args.scenario)
    warmup_s = args.warmup
    if args.duration is not None and warmup_s is None and loaded.warmup_s >= args.duration:
        # A short run keeps a steady window: the warm-up shrinks to a fifth of it.
        warmup_s = args.duration / 5
        print(
            f"note: the {loaded.warmup_s:g} s warm-up does not fit in {args.duration:g} s; "
            f"using {warmup_s:g} s (set it with --warmup)",
            file=sys.stderr,
        )
    return scenarios.with_overrides(
        loaded,
        duration_s=args.duration,
        warmup_s=warmup_s,
        seed=args.seed,
        rate_scale=args.rate_scale,
    )


def _baseline(path: Path) -> Report:
    try:
        return Report.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a saved loadtest report ({exc!r})") from exc


def _chart_writer() -> Callable[..., None]:
    """Imported only when asked (matplotlib is heavy), but before the run, to fail fast."""
    try:
        from demo_app.loadtest.chart import write_chart
    except ImportError as exc:
        message = f"--chart needs matplotlib ({exc}): pip install 'throttle_mw[demo]'"
        raise ValueError(message) from exc
    return write_chart


def _chart_title(report: Report) -> str:
    return f"scenario {report.scenario}" + (f": {report.label}" if report.label else "")


def _raise_open_files_limit() -> None:
    """~1,000 requests in flight hold ~1,000 sockets; many systems allow 1,024 files."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        # If refused, keep the old limit: a run that needs more shows connect errors.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
