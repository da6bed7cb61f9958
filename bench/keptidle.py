"""What a kept slot costs the others: idle kept slots while another process waits.

    python bench/keptidle.py --keep 0,0.05,0.1,0.25,0.5,1 --seconds 4

Two `RedisBackend`s (two processes of a fleet) on one concurrency budget of ``--limit``
in a private redis-server, both with ``THROTTLE_KEEP_SLOTS`` = each value of ``--keep``
in turn (0: off). The *keeper* runs a steady stream, two requests at a time at
``--pace`` per second, each holding its slot ``--hold`` seconds: most run on kept slots,
without a call. The *other* sends a burst of ``--limit`` requests every ``--gap``
seconds (jittered by up to a half, so bursts do not phase-lock with T), each holding its
slot ``--burst-hold`` seconds: the keeper's slots in use or kept leave it fewer than it
asks for, so part of each burst waits in Redis. Nothing tells the keeper that someone
waits but its own calls' replies (no broadcast): it learns at the latest when its
oldest kept slot is T old and goes back.

Sampled every millisecond: ``idle_while_waiting``: seconds per second of the run in
which the keeper held slots by keeping them (idle in its pool, or running its requests
admitted from the pool without Redis) while the other had a request waiting in Redis;
``slot_s``: the idle kept slots over that time, in slot-seconds per second;
``episodes``: stretches of that state, their count, median, 90th percentile and longest
(ms); the other's requests' waits from acquire to admission (ms: p50, p90, p99, max;
``queued``: the share queued in Redis, and their median wait); the keeper's admissions
and those made on kept slots. The values of ``--keep`` run interleaved, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rediscost import run_on_own_redis, settings
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.scheduler import Request

_ids = itertools.count()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_run(url: str, keep_s: float, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"idle{next(_ids)}"
    keeper, other = (
        RedisBackend(settings(url, prefix, concurrency=args.limit, keep_slots_s=keep_s))
        for _ in range(2)
    )
    await keeper.start()
    await other.start()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + args.warmup + args.seconds
    measure_from = loop.time() + args.warmup
    waits: list[tuple[float, bool]] = []
    keeper_done = 0
    rng = random.Random(args.seed)

    async def request(backend: RedisBackend, tenant: str, hold_s: float) -> tuple[float, bool]:
        rid = f"r{next(_ids)}"
        started = loop.time()
        outcome = await backend.acquire(Request(rid, tenant))
        queued = isinstance(outcome, Waiting)
        if isinstance(outcome, Waiting):
            outcome = await outcome.future
        if not isinstance(outcome, Admitted):
            raise RuntimeError(f"not admitted: {outcome!r}")
        waited = loop.time() - started
        await asyncio.sleep(hold_s)
        if outcome.lease:
            backend.release(rid)
        return waited, queued

    async def steady(w: int) -> None:
        nonlocal keeper_done
        at = loop.time() + w / args.pace
        while loop.time() < stop_at:
            await request(keeper, "a", args.hold)
            if loop.time() >= measure_from:
                keeper_done += 1
            at = max(at + 2.0 / args.pace, loop.time())
            await asyncio.sleep(at - loop.time())

    async def bursts() -> None:
        await asyncio.sleep(args.gap * rng.random())
        while loop.time() < stop_at:
            at = loop.time()
            got = await asyncio.gather(
                *(request(other, "b", args.burst_hold) for _ in range(args.limit))
            )
            if at >= measure_from:
                waits.extend(got)
            await asyncio.sleep(max(0.0, at + args.gap * (0.5 + rng.random()) - loop.time()))

    idle_s = slot_s = 0.0
    episodes: list[float] = []

    async def sampler() -> None:
        nonlocal idle_s, slot_s
        pool = keeper.kept_slots
        last = loop.time()
        began: float | None = None
        while loop.time() < stop_at:
            await asyncio.sleep(0.001)
            now = loop.time()
            idle = len(pool) if pool is not None else 0
            # Kept slots idle, or running the keeper's requests (borrowed): held by
            # keeping while the other waits.
            both = idle + len(keeper._borrowed) > 0 and bool(other._waiters)
            if now >= measure_from:
                if both:
                    idle_s += now - last
                    slot_s += idle * (now - last)
                if both and began is None:
                    began = now
                elif not both and began is not None:
                    episodes.append(now - began)
                    began = None
            last = now

    await asyncio.gather(steady(0), steady(1), bursts(), sampler())
    pool = keeper.kept_slots
    local = pool.local_admissions if pool is not None else 0
    await keeper.stop()
    await other.stop()
    ms = [1000 * w for w, _ in waits]
    queued_ms = [1000 * w for w, queued in waits if queued]
    return {
        "keep_s": keep_s,
        "idle_while_waiting": round(idle_s / args.seconds, 4),
        "slot_s": round(slot_s / args.seconds, 4),
        "episodes": len(episodes),
        "episode_ms_p50": round(1000 * _pct(episodes, 0.5), 1),
        "episode_ms_p90": round(1000 * _pct(episodes, 0.9), 1),
        "episode_ms_max": round(1000 * max(episodes, default=0.0), 1),
        "other_requests": len(ms),
        "queued": round(len(queued_ms) / max(1, len(ms)), 3),
        "queued_wait_ms_p50": round(_pct(queued_ms, 0.5), 1),
        "wait_ms_p50": round(_pct(ms, 0.5), 1),
        "wait_ms_p90": round(_pct(ms, 0.9), 1),
        "wait_ms_p99": round(_pct(ms, 0.99), 1),
        "wait_ms_max": round(max(ms, default=0.0), 1),
        "keeper_admissions": keeper_done,
        "keeper_local": local,
    }


async def main_async(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    out = []
    for round_ in range(args.rounds):
        for keep_s in args.keep:
            figures = {"round": round_, **await one_run(url, keep_s, args)}
            print(json.dumps(figures), flush=True)
            out.append(figures)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep",
        type=lambda raw: [float(x) for x in raw.split(",")],
        default=[0.0, 0.05, 0.1, 0.25, 0.5, 1.0],
        help="THROTTLE_KEEP_SLOTS values, comma-separated (0: off)",
    )
    parser.add_argument("--limit", type=int, default=8, help="THROTTLE_CONCURRENCY")
    parser.add_argument("--pace", type=float, default=500.0, help="keeper: requests/s")
    parser.add_argument("--hold", type=float, default=0.001, help="keeper: seconds held")
    parser.add_argument("--gap", type=float, default=0.3, help="other: seconds between bursts")
    parser.add_argument("--burst-hold", type=float, default=0.1, help="other: seconds held")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured, per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--redis-cpu", default="1", help="taskset CPU list for redis-server")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    return run_on_own_redis(args, main_async, "runs")


if __name__ == "__main__":
    raise SystemExit(main())
