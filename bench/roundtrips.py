"""Redis round trips per admitted request, counted by the redis-server.

    python bench/roundtrips.py --rounds 3 --duration 5 --json bench/results/roundtrips.json

For each Redis-backed variant (limits never reached, so every request is
admitted: a trial with any other answer fails), two modes:

- ``sequential``: one keep-alive connection, one request at a time (``wrk -c1``):
  nothing to coalesce, so this is the cost of one request on its own.
- ``loaded``: ``--connections`` (64) at once, as in the throughput benchmark:
  throttle_mw coalesces the operations of concurrent requests into one script
  call, so the figure falls below 1.

Round trips are ``total_writes_processed`` deltas (one per request/response
exchange; commands run inside scripts write nothing), minus our own INFO
samples, divided by the requests of the measured run; see `bench.services`.
Time-driven traffic is included and amortized: throttle_mw's grant listener
(one BLPOP a second per process) and lease renewal (every lease_ttl/3, at
most 5 s), pyrate-limiter's leak (every 10 s per bucket).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import LoadError, pick_driver
from bench.record import new_record, save_record
from bench.runner import RunConfig, Trial, TrialFailed, resolve, run, summarize, trial_dicts
from bench.server import ServerError
from bench.signals import sigterm_as_interrupt
from bench.throughput import RESULTS_DIR, pinning, print_trial, run_config

DEFAULT_VARIANTS = (
    "redis-rate",
    "redis-concurrency",
    "slowapi-redis",
    "fastapi-limiter-redis",
    "asgi-ratelimit-redis",
)
#: Targets for throttle_mw when uncontended (sequential).
TARGETS = {"redis-rate": 1.0, "redis-concurrency": 2.0}
MODES = ("sequential", "loaded")


def mode_config(base: RunConfig, mode: str, loaded_connections: int) -> RunConfig:
    return replace(base, connections=1 if mode == "sequential" else loaded_connections)


def rows(summary: dict[str, Any], mode: str, connections: int) -> list[dict[str, Any]]:
    """One row per variant: the medians per request of the Redis counters."""
    out = []
    for name, entry in summary["variants"].items():
        per = entry.get("median_counters_per_request", {})
        if "redis.round_trips" not in per:
            continue
        commands = {
            key.removeprefix("redis.cmd."): value
            for key, value in per.items()
            if key.startswith("redis.cmd.") and key != "redis.cmd.info" and value >= 0.0005
        }
        out.append(
            {
                "variant": name,
                "mode": mode,
                "connections": connections,
                "trials": entry["trials"],
                "median_rps": entry.get("median_rps"),
                "round_trips": per["redis.round_trips"],
                "reads": per.get("redis.reads"),
                "script_calls": per.get("redis.script_calls"),
                "commands_incl_scripts": per.get("redis.commands"),
                "redis_cpu_us": 1e6 * per["redis.cpu_s"] if "redis.cpu_s" in per else None,
                "target": TARGETS.get(name) if mode == "sequential" else None,
                "commands_per_request": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
            }
        )
    return out


def print_rows(found: Sequence[dict[str, Any]]) -> None:
    header = ("variant", "mode", "conns", "req/s", "RT/req", "reads/req", "scripts/req")
    table = [(*header, "cmds/req", "Redis CPU us/req", "target", "top-level and script commands")]
    for row in found:
        table.append(
            (
                row["variant"],
                row["mode"],
                str(row["connections"]),
                _fmt(row["median_rps"], ",.0f"),
                _fmt(row["round_trips"], ".3f"),
                _fmt(row["reads"], ".3f"),
                _fmt(row["script_calls"], ".3f"),
                _fmt(row["commands_incl_scripts"], ".2f"),
                _fmt(row["redis_cpu_us"], ".0f"),
                "" if row["target"] is None else f"<= {row['target']:g}",
                " ".join(f"{k}={v:.3f}" for k, v in list(row["commands_per_request"].items())[:6]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print()
    for r in table:
        cells = (
            cell.ljust(width) if i in (0, 1, 10) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(r, widths, strict=True))
        )
        print("  ".join(cells).rstrip())
    print(
        "\nRT/req: Redis round trips per admitted request (total_writes_processed);"
        " scripts/req: EVAL/EVALSHA calls; cmds/req: every command, those run inside"
        " scripts included. Medians over the trials."
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/roundtrips.py",
        description="Redis round trips per admitted request, sequential and under load.",
    )
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--modes", default=",".join(MODES), help="sequential,loaded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64, help="for the loaded mode")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--service-cpus")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "roundtrips.json")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    for flag in ("rounds", "duration", "connections"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    return args


def measure(
    names: Sequence[str],
    mode: str,
    base: RunConfig,
    driver: Any,
    trials: list[Trial],
) -> list[dict[str, Any]]:
    """Run `names` in `mode`; the trials go into `trials`; returns the rows."""
    config = replace(mode_config(base, mode, base.connections), variants=tuple(names))
    before = len(trials)
    run(config, driver, lambda t: print_trial(t, config.rounds), trials)
    mine = trials[before:]
    return rows(summarize(mine, names), mode, config.connections)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = tuple(n.strip() for n in args.variants.split(",") if n.strip())
    try:
        resolve(names)
        driver, warning = pick_driver(args.generator)
    except (KeyError, ValueError, LoadError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    pins, pin_warning = pinning(args)
    for note in (warning, pin_warning):
        if note:
            print(f"warning: {note}", file=sys.stderr)
    base = run_config(args, names, pins)
    document = new_record("roundtrips", argv, driver, method=__doc__)
    found: list[dict[str, Any]] = []
    trials: list[Trial] = []
    status = 0
    with sigterm_as_interrupt():
        try:
            for mode in args.modes:
                print(f"{mode}: {', '.join(names)}", flush=True)
                found += measure(names, mode, base, driver, trials)
        except (TrialFailed, ServerError, LoadError) as exc:
            document["error"] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            document["error"] = "interrupted"
            print("interrupted: servers stopped", file=sys.stderr)
            status = 130
    print_rows(found)
    document.update(complete=status == 0, rows=found, trials=trial_dicts(trials))
    save_record(document, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
