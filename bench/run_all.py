"""Every benchmark, one command: the table the README quotes, in Markdown and JSON.

    python bench/run_all.py --out bench/results/

In order, each through its own command-line entry point (so any part can be
re-run alone with the same settings, see ``bench/README.md``):

1. throughput (`bench.throughput`): bare, bare-fastapi, memory, redis-rate,
   redis-concurrency and the peers, interleaved rounds, 64 connections; the
   Redis round trips per request under that load come from the same trials;
2. Redis round trips with one sequential client (`bench.roundtrips`);
3. grant latency (`bench.grant_latency`);
4. the overload story (`bench.story`).

Writes ``throughput.json``, ``roundtrips.json``, ``grant_latency.json``,
``story.json``, then ``summary.json`` and ``summary.md`` (the Markdown table,
also printed) into ``--out``. ``--quick`` shortens everything (a preliminary
look, not figures to quote). The exit status is 1 if any part failed; the
summary still shows the parts that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import grant_latency, roundtrips, story, throughput
from bench.report import markdown
from bench.server import ROOT

THROUGHPUT_VARIANTS = (
    "bare",
    "bare-fastapi",
    "memory",
    "redis-rate",
    "redis-concurrency",
    "slowapi-memory",
    "slowapi-redis",
    "fastapi-limiter-memory",
    "fastapi-limiter-redis",
    "asgi-ratelimit-memory",
    "asgi-ratelimit-redis",
)
PARTS = ("throughput", "roundtrips", "grant_latency", "story")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run_all.py",
        description="Throughput, Redis round trips, grant latency and the overload story.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="short runs: a first look only")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 5; quick 2)")
    parser.add_argument("--duration", type=int, help="throughput seconds (default 8; quick 3)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--grant-samples", type=int, help="default 500; quick 100")
    parser.add_argument("--story-duration", type=float, help="default 20; quick 10")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    args = parser.parse_args(argv)
    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    if set(parts) - set(PARTS):
        parser.error(f"--only takes a subset of {', '.join(PARTS)}")
    args.parts = parts
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.duration = args.duration or (3 if quick else 8)
    args.grant_samples = args.grant_samples or (100 if quick else 500)
    args.story_duration = args.story_duration or (10.0 if quick else 20.0)
    return args


def commands(args: argparse.Namespace) -> dict[str, tuple[Callable[[list[str]], int], list[str]]]:
    """Each part's entry point and arguments."""
    out: Path = args.out
    pins = ["--server-cpus", args.server_cpus, "--load-cpus", args.load_cpus]
    warmup = "1" if args.quick else "2"
    story_warmup = "3" if args.quick else "5"
    return {
        "throughput": (
            throughput.main,
            [
                "--variants",
                ",".join(THROUGHPUT_VARIANTS),
                "--rounds",
                str(args.rounds),
                "--duration",
                str(args.duration),
                "--warmup",
                warmup,
                "--connections",
                str(args.connections),
                *pins,
                "--json",
                str(out / "throughput.json"),
            ],
        ),
        "roundtrips": (
            roundtrips.main,
            [
                "--modes",
                "sequential",
                "--rounds",
                "1" if args.quick else "3",
                "--duration",
                "3" if args.quick else "5",
                "--warmup",
                "1",
                *pins,
                "--json",
                str(out / "roundtrips.json"),
            ],
        ),
        "grant_latency": (
            grant_latency.main,
            [
                "--samples",
                str(args.grant_samples),
                "--worker-cpus",
                args.server_cpus,
                "--service-cpus",
                args.load_cpus,
                "--json",
                str(out / "grant_latency.json"),
            ],
        ),
        "story": (
            story.main,
            [
                "--duration",
                f"{args.story_duration:g}",
                "--warmup",
                story_warmup,
                *pins,
                "--json",
                str(out / "story.json"),
            ],
        ),
    }


def load(path: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_at_start = list(os.getloadavg())
    statuses: dict[str, int] = {}
    for part, (entry, part_args) in commands(args).items():
        if part not in args.parts:
            continue
        print(f"\n=== {part}: {' '.join(part_args)}", flush=True)
        try:
            statuses[part] = entry(part_args)
        except KeyboardInterrupt:
            statuses[part] = 130
        if statuses[part] == 130:
            print("interrupted: stopping", file=sys.stderr)
            break
    documents = {part: load(args.out / f"{part}.json") for part in args.parts}
    summary = {
        "command": [sys.executable, *sys.argv] if argv is None else ["run_all", *argv],
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": list(os.getloadavg()),
        "quick": args.quick,
        "statuses": statuses,
        "parts": {p: d for p, d in documents.items() if d is not None and p in statuses},
    }
    text = markdown(summary)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(_slim(summary), indent=2) + "\n")
    print("\n" + text)
    print(f"results: {args.out}/summary.md, {args.out}/summary.json and one JSON per part")
    return 0 if all(code == 0 for code in statuses.values()) and statuses else 1


def _slim(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary without per-trial and per-request detail (that stays in each part's JSON)."""
    parts = {}
    for part, document in summary["parts"].items():
        parts[part] = {
            k: v
            for k, v in document.items()
            if k not in ("trials", "latencies_ms", "method", "rows") or part == "roundtrips"
        }
        if part == "roundtrips":
            parts[part].pop("trials", None)
    return {**summary, "parts": parts}


if __name__ == "__main__":
    sys.exit(main())
