"""How far one budget goes: admissions per second per Redis core, from 1, 4 and 16 processes.

    python bench/ceiling.py --json bench/results/ceiling.json

One private redis-server (pinned to ``--redis-cpus``, default CPU 1) holds ONE
budget; 1, 4 and 16 worker processes (pinned to ``--worker-cpus``, default CPU
0) each run their own `RedisBackend` against it, as uvicorn workers and
replicas of one app would, without HTTP (the app's side is the throughput
benchmark's business; this one is about Redis). Every cell of the grid
(mode x processes x load) runs for ``--duration`` seconds after a common start:

- modes: ``rate`` (``THROTTLE_RATE`` never reached, the default settings: for a
  rate alone, leases of rate tokens, ``THROTTLE_RATE_LEASE=auto``, so a busy
  process admits most requests from its lease), ``rate-exact`` (the same with
  ``THROTTLE_RATE_LEASE=0``: each admission is one acquire; ``rate`` before
  leases were the default; not in the default ``--modes``) and ``concurrency``
  (``THROTTLE_CONCURRENCY`` never reached: an acquire and a release per
  admission, kept slots off: ``THROTTLE_KEEP_SLOTS=0``);
- loads: ``light``, one request in flight per process (a fleet of many
  processes with a few requests each: every admission is a script call of its
  own, nothing to batch) and ``heavy``, ``--heavy-inflight`` (32) requests in
  flight per process, closed loop (the backend batches what is concurrent).

Reported per cell, from Redis's own counters (``INFO cpu``, ``INFO
commandstats``, ``INFO stats``) sampled right before and after the run:
admissions per second reached; Redis CPU seconds used (``used_cpu_user`` +
``used_cpu_sys``) and its share of the run (how busy the Redis core was);
Redis CPU microseconds per admission and its inverse, **admissions per second
per Redis core** (what one fully busy Redis core would sustain at that cost
per admission: the ceiling of one budget); script calls, commands and round
trips per admission. On a 2-core machine the workers share one core, so the
light cells with many processes are limited by the workers (Redis is not
busy): read the per-core figure, which does not depend on that.

``--story`` adds the fleet run: 16 processes (``--story-processes``) share the
story's offered load (tenants A 10/s, B 30/s, C 150/s, Poisson, open loop, each
process sending 1/16 of every tenant's rate) against one rate budget
(``--story-rate``, 76.8/s, burst 8, the story's tuning), waiting up to the
default maximum wait; reports the fleet's admissions per second over the steady
window against the budget (target: within 2 %), and per tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import new_record, save_record
from bench.server import ROOT, taskset

RESULTS_DIR = ROOT / "bench" / "results"
PREFIX = "ceiling"
NEVER_RATE = 1_000_000.0
NEVER_CONCURRENCY = 100_000
TENANTS = 8  # the tenants a cell's requests are spread over
_SCRIPT_COMMANDS = ("evalsha", "eval", "fcall", "evalsha_ro", "eval_ro", "fcall_ro")
#: Workers share one core: a starved worker must not read a slow reply as Redis lost.
REDIS_TIMEOUT_S = 2.0


# --- the worker process -------------------------------------------------------------------


async def _closed_loop(backend: Any, inflight: int, deadline: float, tag: str) -> dict[str, Any]:
    """`inflight` loops of acquire (and release when leased) until `deadline`."""
    from throttle_mw.backends.base import Admitted, Waiting
    from throttle_mw.scheduler import Request

    counter = iter(range(1 << 62))
    admitted = 0
    other = 0

    async def loop(k: int) -> None:
        nonlocal admitted, other
        tenant = f"t{k % TENANTS}"
        while time.monotonic() < deadline:
            request = Request(f"{tag}.{next(counter)}", tenant)
            outcome = backend.decide_now(request)
            if outcome is None:
                outcome = await backend.acquire(request)
            if isinstance(outcome, Waiting):
                outcome = await outcome.future
            if isinstance(outcome, Admitted):
                admitted += 1
                if outcome.lease:
                    backend.release(request.id)
            else:
                other += 1

    await asyncio.gather(*(loop(k) for k in range(inflight)))
    return {"admitted": admitted, "other": other}


async def _story(
    backend: Any, rates: Mapping[str, float], start: float, deadline: float, seed: int
) -> dict[str, Any]:
    """Open-loop Poisson arrivals per tenant; records when each request was admitted."""
    from throttle_mw.backends.base import Admitted, Waiting
    from throttle_mw.scheduler import Request

    rng = random.Random(seed)
    admissions: dict[str, list[float]] = {t: [] for t in rates}
    rejected: dict[str, int] = dict.fromkeys(rates, 0)
    tasks: set[asyncio.Task[None]] = set()
    counter = iter(range(1 << 62))
    loop = asyncio.get_running_loop()

    async def one(tenant: str) -> None:
        request = Request(f"s{seed}.{next(counter)}", tenant)
        outcome = backend.decide_now(request)
        if outcome is None:
            outcome = await backend.acquire(request)
        if isinstance(outcome, Waiting):
            try:
                outcome = await asyncio.wait_for(
                    asyncio.shield(outcome.future), max(0.0, outcome.deadline - loop.time())
                )
            except TimeoutError:
                outcome = await backend.cancel(outcome)
        if isinstance(outcome, Admitted):
            admissions[tenant].append(time.monotonic() - start)
            if outcome.lease:
                backend.release(request.id)
        else:
            rejected[tenant] += 1

    async def arrivals(tenant: str, rate: float) -> None:
        due = start
        while True:
            due += rng.expovariate(rate)
            if due >= deadline:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = loop.create_task(one(tenant))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await asyncio.gather(*(arrivals(t, r) for t, r in rates.items() if r > 0))
    if tasks:
        await asyncio.wait(tasks, timeout=15.0)
    return {"admissions": admissions, "rejected": rejected}


class _Failures(logging.Handler):
    """Counts the backend's warnings: Redis unavailable, its failure mode deciding."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _worker(spec: Mapping[str, Any]) -> None:
    from throttle_mw.backends.redis import RedisBackend
    from throttle_mw.settings import Settings

    failures = _Failures()
    logging.getLogger("throttle_mw").addHandler(failures)
    settings = Settings.from_env(
        {},
        redis_url=spec["redis_url"],
        key_prefix=PREFIX,
        redis_timeout_s=REDIS_TIMEOUT_S,
        **spec["limits"],
    )
    backend = RedisBackend(settings)
    await backend.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    start = float((await reader.readline()).decode().split()[1])
    deadline = start + spec["duration"]
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    try:
        if spec["kind"] == "story":
            result = await _story(backend, spec["rates"], start, deadline, spec["seed"])
        else:
            result = await _closed_loop(backend, spec["inflight"], deadline, f"w{spec['seed']}")
    finally:
        await backend.stop()
    result["failures"] = failures.count
    print("result " + json.dumps(result), flush=True)


# --- the coordinator ------------------------------------------------------------------------


def _redis_sample(client: Any) -> dict[str, float]:
    info = client.info("all")
    calls = {
        key.removeprefix("cmdstat_"): value
        for key, value in info.items()
        if key.startswith("cmdstat_")
    }
    return {
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "commands": float(info["total_commands_processed"]),
        "round_trips": float(info["total_writes_processed"]),
        "script_calls": float(sum(calls[n]["calls"] for n in _SCRIPT_COMMANDS if n in calls)),
        "script_us": float(sum(calls[n]["usec"] for n in _SCRIPT_COMMANDS if n in calls)),
    }


def _run_workers(
    specs: Sequence[Mapping[str, Any]], cpus: str | None, client: Any, duration: float
) -> tuple[list[dict[str, Any]], dict[str, float], float]:
    """Start the workers, start them together, return their results and Redis's deltas."""
    procs = [
        subprocess.Popen(
            [*taskset(cpus), sys.executable, "-m", "bench.ceiling", "--worker", json.dumps(spec)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for spec in specs
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a worker did not start: {line!r}")
        start = time.monotonic() + 0.3
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"go {start!r}\n")
            proc.stdin.flush()
        time.sleep(max(0.0, start - time.monotonic()))
        before = _redis_sample(client)
        time.sleep(duration)
        after = _redis_sample(client)
        results = []
        for proc in procs:
            assert proc.stdout is not None
            out, _ = proc.communicate(timeout=duration + 60)
            found = [x for x in out.splitlines() if x.startswith("result ")]
            if not found:
                raise RuntimeError(f"a worker exited without a result (status {proc.returncode})")
            results.append(json.loads(found[0].removeprefix("result ")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    delta = {k: after[k] - before[k] for k in after}
    delta["info_samples"] = 1.0  # the `after` INFO itself is counted once in commands
    return results, delta, start


def _cell(
    mode: str, processes: int, load: str, args: argparse.Namespace, url: str, client: Any
) -> dict[str, Any]:
    # Kept slots off (THROTTLE_KEEP_SLOTS=0): this measures what one core sustains when
    # every admission calls Redis (as under contention, when kept slots go back); with the
    # default a steady closed loop runs on kept slots and makes almost no call.
    limits: dict[str, Any] = {"concurrency": NEVER_CONCURRENCY, "keep_slots_s": 0.0}
    if mode == "rate":
        limits = {"rate": NEVER_RATE}
    elif mode == "rate-exact":
        limits = {"rate": NEVER_RATE, "rate_lease_s": 0.0}
    inflight = 1 if load == "light" else args.heavy_inflight
    specs = [
        {
            "kind": "closed",
            "redis_url": url,
            "limits": limits,
            "inflight": inflight,
            "duration": args.duration,
            "seed": i,
        }
        for i in range(processes)
    ]
    client.flushall()
    results, delta, _ = _run_workers(specs, args.worker_cpus, client, args.duration)
    admitted = sum(r["admitted"] for r in results)
    per = max(admitted, 1)
    cpu_us = delta["cpu_s"] * 1e6 / per
    return {
        "mode": mode,
        "processes": processes,
        "load": load,
        "inflight_per_process": inflight,
        "admitted": admitted,
        "not_admitted": sum(r["other"] for r in results),
        # Redis calls that failed (the failure mode decided instead): the cell is void.
        "redis_failures": sum(r["failures"] for r in results),
        "admissions_per_s": admitted / args.duration,
        "redis_cpu_s": delta["cpu_s"],
        "redis_busy": delta["cpu_s"] / args.duration,
        "redis_cpu_us_per_admission": cpu_us,
        "admissions_per_redis_core_s": 1e6 / cpu_us if cpu_us > 0 else None,
        "script_calls_per_admission": delta["script_calls"] / per,
        "script_us_per_call": delta["script_us"] / max(delta["script_calls"], 1.0),
        "commands_per_admission": (delta["commands"] - 1) / per,
        "round_trips_per_admission": (delta["round_trips"] - 1) / per,
    }


def _story_run(args: argparse.Namespace, url: str, client: Any) -> dict[str, Any]:
    rates = {}
    for part in args.story_tenants.split(","):
        name, _, rate = part.partition("=")
        rates[name.strip()] = float(rate) / args.story_processes
    limits = {"rate": args.story_rate, "burst": args.story_burst}
    specs = [
        {
            "kind": "story",
            "redis_url": url,
            "limits": limits,
            "rates": rates,
            "duration": args.story_duration,
            "seed": 1000 + i,
        }
        for i in range(args.story_processes)
    ]
    client.flushall()
    results, delta, _ = _run_workers(specs, args.worker_cpus, client, args.story_duration)
    lo, hi = args.story_warmup, args.story_duration
    window = hi - lo
    per_tenant: dict[str, float] = {}
    for r in results:
        for tenant, times in r["admissions"].items():
            n = sum(1 for t in times if lo <= t < hi)
            per_tenant[tenant] = per_tenant.get(tenant, 0.0) + n / window
    total = sum(per_tenant.values())
    return {
        "processes": args.story_processes,
        "offered": args.story_tenants,
        "budget_rate": args.story_rate,
        "burst": args.story_burst,
        "window_s": [lo, hi],
        "admitted_per_s": total,
        "ratio_to_budget": total / args.story_rate,
        "within_2_percent": abs(total / args.story_rate - 1.0) <= 0.02,
        "admitted_per_s_by_tenant": per_tenant,
        "rejected_by_tenant": {
            t: sum(r["rejected"][t] for r in results) for t in results[0]["rejected"]
        },
        "redis_cpu_s": delta["cpu_s"],
        "script_calls": delta["script_calls"],
        "redis_failures": sum(r["failures"] for r in results),
    }


def _table(cells: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            "mode",
            "processes",
            "load",
            "admissions/s",
            "Redis busy",
            "Redis µs/admission",
            "admissions/s per Redis core",
            "script calls/admission",
            "µs/script call",
        )
    ]
    for c in cells:
        per_core = c["admissions_per_redis_core_s"]
        if c["redis_failures"]:
            per_core = None  # void: some admissions were the failure mode's, not Redis's
        rows.append(
            (
                c["mode"],
                str(c["processes"]),
                f"{c['load']} ({c['inflight_per_process']}/proc)",
                f"{c['admissions_per_s']:,.0f}",
                f"{c['redis_busy']:.0%}",
                f"{c['redis_cpu_us_per_admission']:.1f}",
                f"{per_core:,.0f}" if per_core else "-",
                f"{c['script_calls_per_admission']:.3f}",
                f"{c['script_us_per_call']:.1f}",
            )
        )
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="rate,concurrency")
    parser.add_argument("--processes", default="1,4,16")
    parser.add_argument("--loads", default="light,heavy")
    parser.add_argument("--heavy-inflight", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per cell")
    parser.add_argument("--worker-cpus", default="0")
    parser.add_argument("--redis-cpus", default="1")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--story", action="store_true", help="add the 16-process story run")
    parser.add_argument("--story-only", action="store_true", help="only the story run")
    parser.add_argument("--story-processes", type=int, default=16)
    parser.add_argument("--story-tenants", default="A=10,B=30,C=150")
    parser.add_argument("--story-rate", type=float, default=76.8)
    parser.add_argument("--story-burst", type=float, default=8.0)
    parser.add_argument("--story-duration", type=float, default=20.0)
    parser.add_argument("--story-warmup", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "ceiling.json")
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(_worker(json.loads(args.worker)))
        return 0
    if args.no_pin:
        args.worker_cpus = args.redis_cpus = None

    from tests.support.redis_server import RedisServer, redis_version

    record = new_record(
        "ceiling",
        None,
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )
    server = RedisServer().start()
    try:
        if args.redis_cpus is not None:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", args.redis_cpus, str(server.pid)],
                check=True,
                capture_output=True,
                timeout=10,
            )
        client = server.client(socket_timeout=30.0)
        record["redis"] = {
            "binary": str(server.binary),
            "version": ".".join(map(str, redis_version(server.binary))),
            "cpus": args.redis_cpus,
        }
        cells = []
        if not args.story_only:
            for mode in args.modes.split(","):
                for load in args.loads.split(","):
                    for n in (int(x) for x in args.processes.split(",")):
                        cell = _cell(mode, n, load, args, server.url, client)
                        cells.append(cell)
                        print(
                            f"{mode:12s} {n:3d} proc {load:6s}: {cell['admissions_per_s']:9,.0f}/s"
                            f"  Redis {cell['redis_busy']:4.0%} busy,"
                            f" {cell['redis_cpu_us_per_admission']:6.1f} µs/admission"
                            f" -> {cell['admissions_per_redis_core_s'] or 0:9,.0f}/s per core"
                            + (
                                f" VOID: {cell['redis_failures']} Redis calls failed"
                                if cell["redis_failures"]
                                else ""
                            ),
                            flush=True,
                        )
            record["cells"] = cells
            print()
            print(_table(cells))
        if args.story or args.story_only:
            story = _story_run(args, server.url, client)
            record["story"] = story
            print()
            print(
                f"story: {story['processes']} processes, budget {story['budget_rate']}/s: "
                f"admitted {story['admitted_per_s']:.2f}/s over [{args.story_warmup:g}, "
                f"{args.story_duration:g}) s = {story['ratio_to_budget']:.3f} of the budget "
                f"({'within' if story['within_2_percent'] else 'NOT within'} 2 %); by tenant "
                + ", ".join(f"{t} {r:.1f}/s" for t, r in story["admitted_per_s_by_tenant"].items())
            )
        client.close()
    finally:
        server.close()
    record["complete"] = True
    save_record(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
