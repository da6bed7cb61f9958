"""The learned limit against a capacity that halves midway: no throttle, static, auto.

    python bench/learned.py --rounds 3

The overload story (A 10/s and B 30/s evenly, C 150/s Poisson; open loop,
latency from when a request was due) against ``tests.apps.story``'s ``/work``:
8 slots x 100 ms +-50 % (80 requests/s), whose slots halve at 16 s of 32 (its
store slowed down: ``POST /_slots?n=4``). Three variants of the same app, one
uvicorn worker pinned to the server CPU, the load (`bench.learnedload`) pinned
to the other:

- ``none``: ``THROTTLE_ENABLED=false``, the app alone;
- ``static``: ``THROTTLE_CONCURRENCY=8``, the true initial capacity (right
  before the drop, twice too high after it);
- ``auto``: ``THROTTLE_CONCURRENCY=auto``, learned from latency.

Rounds interleave the variants (none, static, auto, none, ...; the same seed
for each variant of a round) and the summary quotes medians over rounds. The
figures (`bench.learnedscore`): time to converge, the limit over time (a PNG,
`bench.learnedchart`), goodput over capacity before and after the drop, A's and
B's served fraction and p99, A's p50 after the drop. Issue 10's targets:
``auto`` within 10 % of ``static``'s goodput before the drop, and a lower A p50
than ``static`` after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.learnedchart import write_chart
from bench.learnedreport import print_trial, table, target_lines
from bench.learnedscore import Story, summarize, targets, trial_figures
from bench.record import new_record, save_record
from bench.server import ROOT, ServerError, serve, taskset
from bench.signals import sigterm_as_interrupt

RESULTS_DIR = ROOT / "bench" / "results"
APP = "tests.apps.story:app"
READY_PATH, READY_BODY = "/hello", b"hello"
VARIANTS = ("none", "static", "auto")
_LOAD_OVERRUN_S = 60.0


def variant_env(variant: str, args: argparse.Namespace) -> dict[str, str]:
    """The server's environment: the app's capacity, then the variant's throttle."""
    env = {
        "STORY_SLOTS": str(args.slots),
        "STORY_WORK_MS": f"{args.work_ms:g}",
        "STORY_JITTER": f"{args.jitter:g}",
    }
    if variant == "none":
        env["THROTTLE_ENABLED"] = "false"
    elif variant == "static":
        env["THROTTLE_CONCURRENCY"] = str(args.slots)
    elif variant == "auto":
        env["THROTTLE_CONCURRENCY"] = "auto"
    else:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return env


def run_trial(
    variant: str, seed: int, args: argparse.Namespace, workdir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Serve the app as `variant`, run the story with its drop; the records and samples."""
    out = workdir / f"run-{variant}.json"
    server_cpus = None if args.no_pin else args.server_cpus
    load_cpus = None if args.no_pin else args.load_cpus
    with serve(
        variant,
        variant_env(variant, args),
        cpus=server_cpus,
        log_path=workdir / f"server-{variant}.log",
        expect_body=READY_BODY,
        path=READY_PATH,
        app=APP,
        factory=False,
    ) as server:
        base = server.url.removesuffix(READY_PATH)
        command = [
            *taskset(load_cpus),
            sys.executable,
            "-m",
            "bench.learnedload",
            base,
            *("--tenants", args.tenants, "--duration", str(args.duration)),
            *("--drop-at", str(args.drop_at), "--slots-after", str(args.slots_after)),
            *("--sample-every", str(args.sample_every), "--seed", str(seed)),
            *("--timeout", str(args.timeout), "--out", str(out)),
        ]
        pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        done = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": pythonpath},
            capture_output=True,
            text=True,
            check=False,
            timeout=args.duration + args.timeout + _LOAD_OVERRUN_S,
        )
    if done.returncode != 0 or not out.exists():
        raise ServerError(f"the load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    data = json.loads(out.read_text())
    records = [dict(zip(data["fields"], row, strict=True)) for row in data["records"]]
    samples = [dict(zip(data["sample_fields"], row, strict=True)) for row in data["samples"]]
    return records, samples


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/learned.py",
        description="The learned limit against a capacity that halves midway.",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tenants", default="A=10,B=30,C=150", help="TENANT=req/s,...")
    parser.add_argument("--duration", type=float, default=32.0, help="seconds of load")
    parser.add_argument("--drop-at", type=float, default=16.0, help="the slots halve then")
    parser.add_argument("--warmup", type=float, default=6.0, help="'before' starts then")
    parser.add_argument("--settle", type=float, default=10.0, help="'after' starts this after")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--slots-after", type=int, default=None, help="default: half the slots")
    parser.add_argument("--work-ms", type=float, default=100.0)
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--sample-every", type=float, default=0.25, help="seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout, seconds")
    parser.add_argument("--seed", type=int, default=1, help="round r uses seed + r - 1")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "learned.json")
    parser.add_argument("--chart", type=Path, default=None, help="default: --json as .png")
    parser.add_argument("--keep-records", action="store_true", help="also save every request")
    args = parser.parse_args(argv)
    if args.slots_after is None:
        args.slots_after = max(1, args.slots // 2)
    if not 0 <= args.warmup < args.drop_at < args.drop_at + args.settle < args.duration:
        parser.error("expected 0 <= --warmup < --drop-at < --drop-at + --settle < --duration")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.chart is None:
        args.chart = args.json.with_suffix(".png")
    return args


def story_of(args: argparse.Namespace) -> Story:
    return Story(
        duration_s=args.duration,
        drop_at_s=args.drop_at,
        slots=args.slots,
        slots_after=args.slots_after,
        work_s=args.work_ms / 1000.0,
        warmup_s=args.warmup,
        settle_s=args.settle,
    )


def run_all(args: argparse.Namespace, document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every round, variants interleaved; trials go into `document` as they finish."""
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        variant_env(name, args)  # unknown names fail before any server starts
    story = story_of(args)
    document["settings"] = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "app": APP,
        "variant_env": {name: variant_env(name, args) for name in names},
        "capacity_per_s": [story.capacity(args.slots), story.capacity(args.slots_after)],
        "windows": {"before": story.before, "after": story.after},
    }
    document["estimator_sha256"] = estimator_digest()
    document["trials"] = []
    full: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="throttle_mw-learned-") as scratch:
        for round_no in range(1, args.rounds + 1):
            for name in names:
                load = os.getloadavg()[0]
                started = time.monotonic()
                seed = args.seed + round_no - 1
                records, samples = run_trial(name, seed, args, Path(scratch))
                figures = trial_figures(records, samples, story)
                trial: dict[str, Any] = {
                    "round": round_no,
                    "variant": name,
                    "seed": seed,
                    "loadavg_1m": load,
                    "wall_s": time.monotonic() - started,
                    "figures": figures,
                    "samples": samples,
                }
                if args.keep_records:
                    trial["records"] = records
                document["trials"].append(trial)
                full.append({**trial, "records": records})
                print_trial(trial)
    document["summary"] = summarize(document["trials"], names)
    document["targets"] = targets(document["summary"])
    return full


def estimator_digest() -> str:
    """A digest of the estimator's sources (``throttle_mw/scheduler/limit``): which rule
    learned the limit, even when those files are not committed yet."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "throttle_mw" / "scheduler" / "limit").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    document = new_record("learned", argv, method=__doc__)
    status = 0
    print(
        f"learned: tenants {args.tenants} against {args.slots} slots x {args.work_ms:g} ms"
        f" +-{args.jitter:.0%}, {args.slots_after} slots from {args.drop_at:g} s of"
        f" {args.duration:g}; {args.rounds} round(s) of {args.variants}",
        flush=True,
    )
    with sigterm_as_interrupt():
        try:
            full = run_all(args, document)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (ServerError, subprocess.TimeoutExpired) as exc:
            document["error"] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            document["error"] = "interrupted"
            print("interrupted: servers and load stopped", file=sys.stderr)
            status = 130
        else:
            print(f"\nmedians over {args.rounds} round(s):\n{table(document['summary'])}")
            print(target_lines(document["targets"]))
            write_chart(full, story_of(args), args.chart)
            document["chart"] = str(args.chart)
            print(f"chart: {args.chart}")
    document["complete"] = status == 0
    save_record(document, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
