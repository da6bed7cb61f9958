"""A soak: mixed load over four processes and one Redis, with faults at random.

    python bench/soak.py --duration 600 --seed 1 --fault-rate 3 --chart soak.png

Starts its own redis-server and four uvicorn processes of ``tests.apps.story``
(each its own process, 127.0.0.1 only, on free ports) that share one budget
(default: a concurrency of 8 and a rate of 70/s; ``--concurrency auto`` learns
it) in front of a fleet-wide capacity of 8 slots x 100 ms (``--slots`` per
process). For ``--duration`` seconds it sends the open-loop mix of
`bench.soakload` (tenants under and over their share, churning tenants, every
priority, sheddable routes, uploads, streams, clients that leave early) and
injects the faults of `bench.soakfaults` from a seeded RNG (``--fault-rate``
per minute): Redis killed and restarted empty, frozen, its scripts flushed, a
worker killed and restarted. Every second it samples the RSS of every process
and Redis' key count.

When the load stops it waits for the fleet to settle (``--settle-timeout``),
then checks: no 500 (nor any status but 2xx and refusals with Retry-After), no
client error other than the planned ones (quitters, a killed worker's
clients), no lease, waiter or queue entry left in Redis (by the keys and by
``throttle-mw status --json``), every process holding nothing and running
nothing, and RSS and key count flat (growth from the first window after
warm-up to the last within ``--rss-growth-mb`` and ``--keys-growth``). It
prints the report (counts, faults, the curves as min/median/max per
``--window`` and their slopes), writes ``--json`` and ``--chart`` if given,
and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import redis

from bench.soakfaults import Injector, Sampler
from bench.soakload import ROUTE_PRIORITIES, load
from bench.soakreport import CLASSES, Curve, classify, curves, print_report, write_chart
from demo_app.loadtest.engine import Progress, Record, run
from tests.support.redis_server import RedisServer
from tests.support.servers import REPO_ROOT, AppServer, child_env
from throttle_mw.backends.redis import protocol

__all__ = ["main", "parse_args", "print_report", "soak"]

APP = "tests.apps.story:app"
PREFIX = "soak"
WORKERS = 4
#: No fault starts this close to the end of the load: each is over before the load stops.
QUIET_END_S = 8.0


@dataclass(frozen=True)
class Run:
    """One scenario's records; `started_s`: when its clock started, in the soak's time."""

    records: list[Record]
    started_s: float
    quitter: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fault-rate", type=float, default=3.0, help="faults per minute (3)")
    p.add_argument("--concurrency", default="8", help="THROTTLE_CONCURRENCY: a number or auto")
    p.add_argument("--rate", default="70", help="THROTTLE_RATE, or 'none' (70)")
    p.add_argument("--slots", type=int, default=2, help="app slots per process (2)")
    p.add_argument("--lease-ttl", type=float, default=10.0, help="THROTTLE_LEASE_TTL (10)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every load rate")
    p.add_argument("--window", type=float, default=60.0, help="curve window, seconds (60)")
    p.add_argument("--settle-timeout", type=float, default=None, help="default: lease TTL + 30")
    p.add_argument("--rss-growth-mb", type=float, default=20.0)
    p.add_argument("--keys-growth", type=float, default=1.5, help="last window / first (x1.5)")
    p.add_argument("--json", type=Path, default=None, help="write the whole result here")
    p.add_argument("--chart", type=Path, default=None, help="write a PNG of the curves here")
    return p.parse_args(argv)


def app_env(redis_url: str, args: argparse.Namespace) -> dict[str, str]:
    env = {
        "STORY_SLOTS": str(args.slots),
        "THROTTLE_REDIS_URL": redis_url,
        "THROTTLE_KEY_PREFIX": PREFIX,
        "THROTTLE_CONCURRENCY": args.concurrency,
        "THROTTLE_ROUTE_PRIORITIES": ROUTE_PRIORITIES,
        "THROTTLE_LEASE_TTL": f"{args.lease_ttl:g}",
        "THROTTLE_TENANT_IDLE": "20",
        # Generous for a shared 2-core machine: a slow reply must not look like an outage.
        "THROTTLE_REDIS_TIMEOUT": "0.5",
        "THROTTLE_FAILURE_MODE": "local",
    }
    if args.rate != "none":
        env["THROTTLE_RATE"] = args.rate
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = soak(args, " ".join(["python bench/soak.py", *(argv or sys.argv[1:])]))
    print_report(result, result.pop("_curves"), args.window)
    samples, faults = result.pop("_samples"), result.pop("_faults")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = {**result, "samples": [s.as_dict() for s in samples]}
        args.json.write_text(json.dumps(body, indent=1, default=str))
    if args.chart is not None:
        write_chart(samples, faults, args.chart)
        print(f"chart: {args.chart}")
    return 0 if all(ok for ok, _ in result["checks"].values()) else 1


def soak(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the whole soak; the result (see `main`), with the raw samples and faults."""
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer())
        env = app_env(server.url, args)
        workers = [
            stack.enter_context(AppServer(APP, env=env, health_path="/_running"))
            for _ in range(WORKERS)
        ]
        t0 = time.monotonic()
        runs, injector, sampler, settle = asyncio.run(_drive(server, workers, args, t0))
        cli = _cli_status(env)
        tracebacks = [w.log().count("Traceback") for w in workers]
    faults = injector.faults
    classes: Counter[str] = Counter(dict.fromkeys(CLASSES, 0))
    statuses: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    errors = []
    for one in runs:
        for record in one.records:
            kind = classify(record, one.quitter, faults, one.started_s)
            classes[kind] += 1
            statuses[str(record.status or record.error or "?").split(":")[0]] += 1
            routes[record.route] += 1
            if kind in ("bad_status", "error"):
                errors.append(
                    f"{one.started_s + record.sent_s:.1f} s {record.tenant} {record.route}"
                    f" -> {record.status} {record.error or ''} ({record.target})"
                )
    out_curves = curves(sampler.samples, args.window)
    checks = _checks(args, classes, settle, cli, out_curves, tracebacks)
    budget = {k: v for k, v in app_env("", args).items() if k.startswith(("THROTTLE_", "STORY_"))}
    budget.pop("THROTTLE_REDIS_URL")
    return {
        "command": command,
        "cpu": _cpu(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - settle["t_s"])),
        "duration_s": args.duration,
        "seed": args.seed,
        "budget": budget,
        "classes": dict(classes),
        "statuses": dict(statuses),
        "routes": dict(routes),
        "errors": errors,
        "faults": [vars(f) for f in faults],
        "settle": settle,
        "cli_status": cli,
        "tracebacks": tracebacks,
        "curves": [vars(c) for c in out_curves],
        "checks": checks,
        "_curves": out_curves,
        "_samples": sampler.samples,
        "_faults": faults,
    }


async def _drive(
    server: RedisServer, workers: list[AppServer], args: argparse.Namespace, t0: float
) -> tuple[list[Run], Injector, Sampler, dict[str, Any]]:
    sampler = Sampler(server, workers, t0)
    sampling = asyncio.create_task(sampler.run())
    rate_per_s = args.fault_rate / 60.0
    injector = Injector(server, workers, random.Random(f"{args.seed}/faults"), rate_per_s, t0)
    plan = load(args.duration, args.seed, args.scale)
    targets = [w.url for w in workers]
    scenarios = (plan.main, *plan.quitters)
    starts: list[list[float]] = [[] for _ in scenarios]

    begun = asyncio.Event()

    def started(box: list[float]) -> Callable[[Progress], None]:
        # The engine plans before it starts its clock: its first report says when it did.
        def on_progress(progress: Progress) -> None:
            if not box:
                box.append(time.monotonic() - t0 - progress.elapsed_s)
                if box is starts[0]:
                    begun.set()

        return on_progress

    async def inject() -> None:
        await begun.wait()  # faults begin with the main load
        await injector.run(until_s=starts[0][0] + args.duration - QUIET_END_S)

    runs = [
        run(s, targets, on_progress=started(box)) for s, box in zip(scenarios, starts, strict=True)
    ]
    faulting = asyncio.create_task(inject())
    results = await asyncio.gather(*runs)
    await faulting
    timeout = args.settle_timeout if args.settle_timeout is not None else args.lease_ttl + 30.0
    settle = await asyncio.to_thread(_settle, server, workers, timeout, t0)
    sampling.cancel()
    await asyncio.gather(sampling, return_exceptions=True)
    out = [
        Run(records, box[0], quitter=i > 0)
        for i, (records, box) in enumerate(zip(results, starts, strict=True))
    ]
    return out, injector, sampler, settle


def _settle(
    server: RedisServer, workers: list[AppServer], timeout_s: float, t0: float
) -> dict[str, Any]:
    """Wait until nothing is left anywhere, or `timeout_s`; what was left at the end."""
    started = time.monotonic()
    with server.client(socket_timeout=2.0) as client:
        while True:
            left = _left_in_redis(client)
            procs = [_held(w) for w in workers]
            settled = not any(left.values()) and not any(v for p in procs for v in p.values())
            if settled or time.monotonic() - started >= timeout_s:
                break
            time.sleep(0.5)
    end = time.monotonic()
    return {
        "settled": settled,
        "after_s": end - started,
        "t_s": end - t0,
        "redis": left,
        "processes": procs,
    }


def _left_in_redis(client: redis.Redis) -> dict[str, int]:
    """Leases, waiters and queue entries of the budget, by its keys."""
    tag = "{" + PREFIX + "}"
    raw: dict[bytes | str, bytes | str] = client.hgetall(f"{tag}:s")
    state = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    queued = sum(int(client.zcard(k)) for k in client.scan_iter(match=f"{tag}:q:*"))
    # (a tenant's lone waiter: its field q1 in P:T, no key)
    queued += sum(1 for v in client.hvals(f"{tag}:T") if v and protocol.tenant_state(v)["q1"])
    return {
        "in_flight": round(float(state.get("inflight", 0))),
        "waiting": round(float(state.get("waiting", 0))),
        "leases": int(client.zcard(f"{tag}:leases")),
        "waiter_records": int(client.hlen(f"{tag}:r")),
        "deadlines": int(client.zcard(f"{tag}:dl")),
        "queue_entries": queued,
    }


def _held(worker: AppServer) -> dict[str, int]:
    """What one process holds (its backend's leases, waiters) and runs (the app)."""
    try:
        held = httpx.get(f"{worker.url}/_held", timeout=5).json()
        running = httpx.get(f"{worker.url}/_running", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {"unreachable": 1}
    return {**held, "running": running["running"]}


def _cli_status(env: dict[str, str]) -> dict[str, Any]:
    """``throttle-mw status --json`` against the soak's budget, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "throttle_mw", "status", "--json"],
        env=child_env(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-500:]}
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _checks(
    args: argparse.Namespace,
    classes: Counter[str],
    settle: dict[str, Any],
    cli: dict[str, Any],
    out_curves: Sequence[Curve],
    tracebacks: Sequence[int],
) -> dict[str, tuple[bool, str]]:
    bad, errors = classes["bad_status"], classes["error"]
    checks = {
        "no 500s": (bad == 0, f"{bad} responses other than 2xx or a refusal with Retry-After"),
        "no client errors": (errors == 0, f"{errors} requests without a planned reason"),
        "no tracebacks": (not any(tracebacks), f"per process: {list(tracebacks)}"),
        "settled": (
            settle["settled"],
            f"after {settle['after_s']:.1f} s: Redis {settle['redis']}",
        ),
        "cli status": (
            cli.get("in_flight") == 0 and cli.get("waiting") == 0,
            f"in_flight {cli.get('in_flight')}, waiting {cli.get('waiting')}"
            + (f", error {cli['error']}" if "error" in cli else ""),
        ),
    }
    rss = [c for c in out_curves if c.name.startswith("worker")]
    growth = [(c.name, (c.last or 0.0) - (c.first or 0.0)) for c in rss if c.first is not None]
    worst = max((g for _, g in growth), default=0.0)
    checks["RSS flat"] = (
        bool(rss) and worst <= args.rss_growth_mb,
        f"largest growth {worst:+.1f} MB (bound {args.rss_growth_mb:g}) over {len(rss)} processes",
    )
    keys = next(c for c in out_curves if c.name.startswith("Redis keys"))
    half = keys.windows[: max(1, len(keys.windows) // 2)]
    early = max((hi for *_, hi in half), default=0.0)
    late = keys.windows[-1][3] if keys.windows else 0.0
    checks["keys flat"] = (
        late <= args.keys_growth * early + 10,
        f"last window's max {late:.0f} against {early:.0f} in the first half"
        f" (bound x{args.keys_growth:g} + 10)",
    )
    return checks


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
