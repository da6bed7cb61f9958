"""Throughput benchmark: requests/s of each variant under one pinned uvicorn worker.

    python bench/throughput.py --variants bare,memory --rounds 5 --duration 8 \\
        --connections 64 --json bench/results/throughput.json

Variants run interleaved (one trial of each per round), each trial on a fresh
server pinned to ``--server-cpus`` with the load generator on ``--load-cpus``.
Prints every trial, then medians and the ratios against the first variant,
and writes everything (settings, versions, trials, summary) as JSON.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import LoadError, pick_driver
from bench.record import new_record, save_record
from bench.runner import (
    RunConfig,
    Trial,
    TrialFailed,
    resolve,
    run,
    settings_dict,
    summarize,
    trial_dicts,
)
from bench.server import ROOT, ServerError
from bench.signals import sigterm_as_interrupt
from bench.variants import VARIANTS

RESULTS_DIR = ROOT / "bench" / "results"
#: The goal for a throttled hello-world route, against the bare app.
TARGET_RATIO = 0.90


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/throughput.py",
        description="Requests/s of benchmark variants under one pinned uvicorn worker.",
    )
    parser.add_argument(
        "--variants",
        default="bare,memory",
        help="comma-separated; the first is the baseline of the ratios (default: bare,memory)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="trials per variant (default 5)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per trial (default 8)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="discarded seconds before each trial (default 2)"
    )
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections")
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk if installed, else the Python fallback",
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--server-cpus", default="0", help="taskset -c list for the server")
    parser.add_argument("--load-cpus", default="1", help="taskset -c list for the generator")
    parser.add_argument(
        "--service-cpus",
        help="taskset -c list for Redis (default: the generator's, see bench/services.py)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--header", action="append", default=[], help="'Name: value' sent with every request"
    )
    parser.add_argument("--name", default="throughput", help="names the default JSON path")
    parser.add_argument("--json", type=Path, help="results path (default bench/results/NAME.json)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    for flag in ("rounds", "duration", "connections", "wrk_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if any(":" not in h for h in args.header):
        parser.error("--header takes 'Name: value'")
    return args


def run_config(
    args: argparse.Namespace, names: tuple[str, ...], pins: Pins, **extra: Any
) -> RunConfig:
    """The trials' settings from the command line shared by the throughput scripts."""
    return RunConfig(
        variants=names,
        rounds=args.rounds,
        duration_s=args.duration,
        warmup_s=args.warmup,
        connections=args.connections,
        server_cpus=pins.server,
        load_cpus=pins.load,
        service_cpus=pins.services,
        **extra,
    )


def pinning(args: argparse.Namespace) -> tuple[Pins, str | None]:
    """The server's, generator's and services' CPU lists, and a warning if pinning is off."""
    if args.no_pin:
        return Pins(), "not pinned (--no-pin): server and generator share every CPU"
    if shutil.which("taskset") is None:
        return Pins(), "taskset not found (util-linux): not pinned"
    service_cpus = getattr(args, "service_cpus", None) or args.load_cpus
    allowed = os.sched_getaffinity(0)
    lists = (args.server_cpus, args.load_cpus, service_cpus)
    wanted = {int(c) for cpus in lists for c in _cpu_list(cpus)}
    if not wanted <= allowed:
        return Pins(), f"CPUs {sorted(wanted - allowed)} not available here: not pinned"
    return Pins(args.server_cpus, args.load_cpus, service_cpus), None


class Pins(NamedTuple):
    """``taskset -c`` lists; None: not pinned."""

    server: str | None = None
    load: str | None = None
    services: str | None = None


def _cpu_list(cpus: str) -> list[int]:
    found: list[int] = []
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        found += range(int(low), int(high or low) + 1)
    return found


def print_trial(trial: Trial, rounds: int) -> None:
    if trial.problems:
        print(
            f"round {trial.round}/{rounds}  {trial.variant:<22} FAILED: {'; '.join(trial.problems)}"
        )
        return
    p99 = trial.latency_ms.get("p99", float("nan"))
    trips = trial.counters_per_request.get("redis.round_trips")
    redis = "" if trips is None else f", {trips:.3f} Redis round trips/request"
    print(
        f"round {trial.round}/{rounds}  {trial.variant:<22} {trial.rps:>10,.0f} req/s"
        f"  ({trial.generator}, {trial.requests:,} requests, p99 {p99:.1f} ms{redis},"
        f" load {trial.loadavg_1m:.2f})",
        flush=True,
    )


def print_summary(summary: dict[str, Any], generator: str) -> None:
    baseline = summary["baseline"]
    header = ("variant", "trials", "median req/s", "min", "max", "ratio", "paired")
    rows = [(*header, "own", "req/CPU-s", "ratio", "p50 ms", "p99 ms", "RT/req")]
    for name, entry in summary["variants"].items():
        base = name == baseline
        per_request = entry.get("median_counters_per_request", {})
        own = entry.get("own_baseline")
        rows.append(
            (
                name,
                str(entry["trials"]),
                _fmt(entry.get("median_rps"), ",.0f"),
                _fmt(entry.get("min_rps"), ",.0f"),
                _fmt(entry.get("max_rps"), ",.0f"),
                "(base)" if base else _fmt(entry.get("ratio_rps"), ".3f"),
                "" if base else _fmt(entry.get("median_paired_ratio_rps"), ".3f"),
                "" if own is None else _fmt(entry.get("ratio_rps_own"), ".3f"),
                _fmt(entry.get("median_rps_per_cpu"), ",.0f"),
                "(base)" if base else _fmt(entry.get("ratio_rps_per_cpu"), ".3f"),
                _fmt(entry.get("median_p50_ms"), ".1f"),
                _fmt(entry.get("median_p99_ms"), ".1f"),
                _fmt(per_request.get("redis.round_trips"), ".3f"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    print(
        f"\nratio: median / median of {baseline}; paired: median of the per-round ratios;"
        " own: ratio against the variant's own framework baseline (bare-fastapi);"
        " req/CPU-s: requests per CPU-second of the server;"
        " RT/req: Redis round trips per request (bench/services.py)."
        f"\nLoad generator: {generator}. Target for a throttled hello-world route:"
        f" ratio >= {TARGET_RATIO:.2f}."
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for variant in VARIANTS.values():
            services = f" [services: {', '.join(variant.services)}]" if variant.services else ""
            print(f"{variant.name:<24} {variant.summary}{services}")
        return 0
    names = tuple(n.strip() for n in args.variants.split(",") if n.strip())
    try:
        variants = {v.name: v for v in resolve(names)}
        driver, warning = pick_driver(args.generator, args.wrk_threads)
    except (KeyError, ValueError, LoadError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    pins, pin_warning = pinning(args)
    for note in (warning, pin_warning):
        if note:
            print(f"warning: {note}", file=sys.stderr)
    config = run_config(
        args,
        names,
        pins,
        headers=tuple((k.strip(), v.strip()) for k, v in (h.split(":", 1) for h in args.header)),
    )
    path: Path = args.json or RESULTS_DIR / f"{args.name}.json"
    document = new_record(
        "throughput", argv, driver, settings=settings_dict(config, variants), services={}
    )
    document["name"] = args.name
    print(
        f"{', '.join(names)}: {args.rounds} rounds x {args.duration} s (+{args.warmup} s warm-up),"
        f" {args.connections} connections, generator {driver.name},"
        f" server on CPUs {pins.server}, load on CPUs {pins.load},"
        f" services on CPUs {pins.services}",
        flush=True,
    )
    trials: list[Trial] = []
    status = 0
    with sigterm_as_interrupt():
        try:
            run(config, driver, lambda t: print_trial(t, args.rounds), trials, document["services"])
        except (TrialFailed, ServerError, LoadError) as exc:
            document["error"] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            document["error"] = "interrupted"
            print("interrupted: servers and services stopped", file=sys.stderr)
            status = 130
    summary = summarize(trials, names, {n: v.baseline for n, v in variants.items()})
    document.update(complete=status == 0, trials=trial_dicts(trials), summary=summary)
    if summary["variants"]:
        print_summary(summary, driver.name)
    save_record(document, path)
    return status


if __name__ == "__main__":
    sys.exit(main())
