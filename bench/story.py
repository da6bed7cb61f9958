"""The overload story: who gets served when 190 req/s meet a backend that serves 80.

    python bench/story.py --duration 20 --warmup 5 --json bench/results/story.json

The SurveyTool story of docs/design.md: tenant A sends 10 req/s, B 30, C 150
(Poisson arrivals, open loop, `bench.storyload` pinned to the load CPUs), to
one uvicorn worker (pinned to the server CPUs) whose route is a backend of real,
finite capacity: 8 slots, each request holding one for 100 ms +-20 % (uniform),
so 80 requests/s at most (`bench.endpoints`, ``BENCH_APP=story``). Requests that
find every slot busy wait for one. Each variant puts something different in
front of it, configured as its documentation shows for per-tenant limits:

- ``bare``: no limiter.
- ``memory``, ``redis-concurrency``: throttle_mw with ``THROTTLE_CONCURRENCY`` =
  the backend's slots (docs/design.md: a concurrency budget equal to the slots needs
  no headroom), default max waits (normal: 5 s); in memory and through Redis.
  ``memory-both``, ``redis-both``: as the README's tuning guide sets it, the
  concurrency budget = the slots plus ``THROTTLE_RATE`` = 96 % of capacity and
  ``THROTTLE_BURST`` = the slots. ``redis-rate`` (not in the default list):
  ``THROTTLE_RATE`` = 90 % of capacity.
- peers: a per-tenant rate limit of ``--peer-rate`` (default 40/s) per second,
  their default (fixed-window) algorithms. 40/s is the max-min fair share of
  the flooding tenant: with it A, B and C are admitted 10 + 30 + 40 = 80/s, the
  backend's capacity; a lower cap also cuts B, a higher one overloads the
  backend. It is the best a static per-tenant limit can do for this mix, chosen
  knowing the mix in advance (the throttle is not told it).

Scored over the steady window [warm-up, duration) (the drain of queues after
the load stops is not counted): per tenant, of the requests *due* in the
window, the fraction served (2xx), rejected (429/503) and failed (timeouts,
other errors), and p50/p99 latency of the served ones *from when they were
due*; goodput: 2xx completions per second *by completion time* in the window.
Clients give up after ``--timeout`` (10) seconds. The generator's lag (sent -
due) is recorded to show it kept up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stats
from bench.apps import HELLO_BODY, HELLO_PATH
from bench.endpoints import APP_ENV, JITTER_ENV, SLOTS_ENV, WORK_MS_ENV
from bench.peers import PEER_RATE_ENV
from bench.record import new_record, save_record
from bench.runner import resolve
from bench.server import ROOT, ServerError, serve, taskset
from bench.services import ServiceContext, running
from bench.signals import sigterm_as_interrupt
from bench.variants import Variant

RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_VARIANTS = (
    "bare",
    "memory",
    "redis-concurrency",
    "memory-both",
    "redis-both",
    "slowapi-memory",
    "slowapi-redis",
    "fastapi-limiter-memory",
    "fastapi-limiter-redis",
    "asgi-ratelimit-memory",
    "asgi-ratelimit-redis",
)
#: Variants that run as they are (no limiter); throttle_mw's get the story's budget.
_PLAIN = ("bare", "bare-fastapi", "passthrough")
_LOAD_OVERRUN_S = 60.0


def story_env(variant: Variant, args: argparse.Namespace) -> dict[str, str]:
    """The variant's environment for the story, on top of its own."""
    env = {
        APP_ENV: "story",
        SLOTS_ENV: str(args.slots),
        WORK_MS_ENV: f"{args.work_ms:g}",
        JITTER_ENV: f"{args.jitter:g}",
    }
    capacity = args.slots / (args.work_ms / 1000.0)
    if variant.name in ("memory", "redis-concurrency"):
        env.update(THROTTLE_RATE="", THROTTLE_CONCURRENCY=str(args.slots))
    elif variant.name == "redis-rate":
        env.update(THROTTLE_RATE=f"{0.9 * capacity:g}", THROTTLE_CONCURRENCY="")
    elif variant.name in ("memory-both", "redis-both"):
        # As the README's tuning guide sets it: concurrency = the slots, rate a little
        # under capacity, a burst the slots absorb at once.
        env.update(
            THROTTLE_RATE=f"{0.96 * capacity:g}",
            THROTTLE_BURST=str(args.slots),
            THROTTLE_CONCURRENCY=str(args.slots),
        )
    elif PEER_RATE_ENV in variant.env:
        env[PEER_RATE_ENV] = str(args.peer_rate)
    elif variant.name not in _PLAIN:
        raise ValueError(f"variant {variant.name!r} has no configuration for the story")
    return env


def score(
    records: Sequence[Mapping[str, Any]], tenants: Sequence[str], warmup_s: float, end_s: float
) -> dict[str, Any]:
    """Served fractions, latencies from due time and goodput over [warmup_s, end_s)."""
    window_s = end_s - warmup_s
    due = [r for r in records if warmup_s <= r["due_s"] < end_s]
    result: dict[str, Any] = {"window_s": window_s, "tenants": {}}
    for tenant in [*tenants, None]:
        mine = [r for r in due if tenant is None or r["tenant"] == tenant]
        served = [r for r in mine if 200 <= r["status"] < 300]
        rejected = [r for r in mine if r["status"] in (429, 503)]
        done = [
            r
            for r in records
            if (tenant is None or r["tenant"] == tenant)
            and 200 <= r["status"] < 300
            and warmup_s <= r["done_s"] < end_s
        ]
        latency = stats.summary((r["done_s"] - r["due_s"]) * 1000.0 for r in served)
        offered = len(mine)
        entry = {
            "offered": offered,
            "offered_per_s": offered / window_s,
            "served": len(served),
            "served_fraction": len(served) / offered if offered else None,
            "rejected_fraction": len(rejected) / offered if offered else None,
            "failed_fraction": (offered - len(served) - len(rejected)) / offered
            if offered
            else None,
            "served_latency_ms": latency,
            "goodput_per_s": len(done) / window_s,
        }
        if tenant is None:
            result["all"] = entry
        else:
            result["tenants"][tenant] = entry
    result["lag_ms"] = stats.summary((r["sent_s"] - r["due_s"]) * 1000.0 for r in due)
    errors: dict[str, int] = {}
    for r in due:
        if r["status"] == 0:
            key = (r["error"] or "no response").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    result["errors"] = errors
    return result


def run_variant(
    variant: Variant,
    env: Mapping[str, str],
    args: argparse.Namespace,
    server_cpus: str | None,
    load_cpus: str | None,
    workdir: Path,
) -> list[dict[str, Any]]:
    """Serve `variant`, send the story at it, return the records."""
    out = workdir / f"records-{variant.name}.json"
    with serve(
        variant.name,
        env,
        cpus=server_cpus,
        log_path=workdir / f"server-{variant.name}.log",
        expect_body=HELLO_BODY,
        path=HELLO_PATH,
    ) as server:
        command = [
            *taskset(load_cpus),
            sys.executable,
            "-m",
            "bench.storyload",
            server.url,
            "--tenants",
            args.tenants,
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--seed",
            str(args.seed),
            "--timeout",
            str(args.timeout),
            "--out",
            str(out),
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
        raise ServerError(
            f"the story's load generator failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    data = json.loads(out.read_text())
    fields = data["fields"]
    return [dict(zip(fields, row, strict=True)) for row in data["records"]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/story.py",
        description="The overload story (A 10/s, B 30/s, C 150/s against 80/s), per limiter.",
    )
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--tenants", default="A=10,B=30,C=150", help="TENANT=req/s,...")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not scored")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--work-ms", type=float, default=100.0)
    parser.add_argument("--jitter", type=float, default=0.2)
    parser.add_argument("--peer-rate", type=int, default=40, help="peers' per-tenant req/s")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--service-cpus", default=None, help="default: the load CPUs")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "story.json")
    parser.add_argument(
        "--keep-records", action="store_true", help="also write every request's record"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be at least 0 and below --duration")
    return args


def run_story(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """Run every variant in turn; results go into `document["variants"]` as they come."""
    from bench.storyload import parse_tenants

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    variants = resolve(names)
    tenants = list(parse_tenants(args.tenants))
    server_cpus = None if args.no_pin else args.server_cpus
    load_cpus = None if args.no_pin else args.load_cpus
    service_cpus = None if args.no_pin else (args.service_cpus or args.load_cpus)
    envs = {v.name: story_env(v, args) for v in variants}
    document["settings"] = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "json": str(args.json),
        "server_cpus": server_cpus,
        "load_cpus": load_cpus,
        "service_cpus": service_cpus,
        "capacity_per_s": args.slots / (args.work_ms / 1000.0),
        "variant_env": {v.name: {**v.env, **envs[v.name]} for v in variants},
    }
    document["variants"] = {}
    needed = [s for v in variants for s in v.services]
    with tempfile.TemporaryDirectory(prefix="throttle_mw-bench-") as scratch:
        workdir = Path(scratch)
        with running(needed, ServiceContext(service_cpus, workdir)) as services:
            document["services"] = services.describe()
            for variant in variants:
                services.reset()
                env = {**services.env_for(variant.services), **variant.env, **envs[variant.name]}
                load = os.getloadavg()[0]
                started = time.monotonic()
                before = services.sample(variant.services)
                records = run_variant(variant, env, args, server_cpus, load_cpus, workdir)
                after = services.sample(variant.services)
                result = score(records, tenants, args.warmup, args.duration)
                # Over the whole run (warm-up and drain too), per request sent.
                result["redis"] = _redis_figures(before, after, len(records))
                result["loadavg_1m"] = load
                result["wall_s"] = time.monotonic() - started
                if args.keep_records:
                    result["records"] = records
                document["variants"][variant.name] = result
                print_variant(variant.name, result, tenants)


def _redis_figures(
    before: Mapping[str, float], after: Mapping[str, float], requests: int
) -> dict[str, float] | None:
    if "redis.round_trips" not in after or not requests:
        return None
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return {
        "round_trips_per_request": delta["redis.round_trips"] / requests,
        "script_calls_per_request": delta["redis.script_calls"] / requests,
        "script_ms_total": delta["redis.script_us"] / 1000.0,
        "script_us_per_call": delta["redis.script_us"] / delta["redis.script_calls"]
        if delta["redis.script_calls"]
        else 0.0,
        "cpu_s": delta.get("redis.cpu_s", 0.0),
    }


def print_variant(name: str, result: Mapping[str, Any], tenants: Sequence[str]) -> None:
    parts = []
    for tenant in tenants:
        entry = result["tenants"][tenant]
        p99 = entry["served_latency_ms"]["p99"]
        served = entry["served_fraction"]
        parts.append(f"{tenant} {_pct(served)} p99 {'-' if p99 is None else f'{p99:,.0f} ms'}")
    lag = result["lag_ms"]["p99"]
    redis = result.get("redis")
    if redis is not None:
        parts.append(
            f"Redis {redis['round_trips_per_request']:.2f} RT/req,"
            f" {redis['script_us_per_call']:.0f} us/script call"
        )
    print(
        f"{name:<24} {' | '.join(parts)} | goodput {result['all']['goodput_per_s']:.1f}/s"
        f" (lag p99 {0.0 if lag is None else lag:.1f} ms, load {result['loadavg_1m']:.2f})",
        flush=True,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    document = new_record("story", argv, method=__doc__)
    status = 0
    print(
        f"story: tenants {args.tenants} against {args.slots} slots x {args.work_ms:g} ms,"
        f" {args.duration:g} s per variant ({args.warmup:g} s not scored)",
        flush=True,
    )
    with sigterm_as_interrupt():
        try:
            run_story(args, document)
        except (KeyError, ValueError) as exc:
            print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
        except (ServerError, subprocess.TimeoutExpired) as exc:
            document["error"] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            document["error"] = "interrupted"
            print("interrupted: servers, load and Redis stopped", file=sys.stderr)
            status = 130
    document["complete"] = status == 0
    save_record(document, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
