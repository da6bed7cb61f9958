"""Redis's time per script call, back to back and paced, for one saturated scenario.

    python bench/pacedcost.py --tenants 1000,10000 --gaps 0,0.02 --ticks 150 --reps 3

`bench/scriptinstructions.py`'s saturated scenario (a budget of 50/s with N tenants
waiting, a tick that grants one, then that tenant's acquire that queues; driven by
`tests.support.lua_scheduler.LuaScheduler` on a test clock) and `bench/rediscost.py`'s
floor function (``throttle_cmds``: 16 commands of a saturated call's kinds, the least Lua
around them), on a plain redis-server pinned to ``--redis-cpu`` (no valgrind), timed by
Redis itself: ``INFO commandstats``' FCALL microseconds per call over each stretch of
``--ticks`` rounds. With a ``--gaps`` entry above 0, the driver sleeps that long after
each round (after each floor call likewise): a saturated budget of 50/s has Redis idle
some 20 ms between its calls, as `bench/rediscost.py`'s saturated scenario does, where
this bench's back-to-back rounds keep its caches warm. Medians of ``--reps`` stretches,
each stretch's figure listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.rediscost import NOP_LIBRARY
from bench.scriptinstructions import _request, saturated_policy
from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.scheduler import Granted, Limits


def _fcall_usec(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_fcall", {"calls": 0, "usec": 0})
    return int(stats["calls"]), int(stats["usec"])


def run(tenants: int, gap: float, ticks: int, reps: int, cpu: str) -> dict[str, Any]:
    """Per stretch, the saturated scenario's and the floor's microseconds per FCALL."""
    server = RedisServer(startup_timeout_s=30.0).start()
    if cpu:  # every thread of the running server, as `taskset -c` at its start would
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpu, str(server.pid)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    client = server.client()
    try:
        client.function_load(NOP_LIBRARY, replace=True)
        sched = LuaScheduler(
            client, Limits(rate=50.0, burst=5.0), saturated_policy(tenants), now=0.0
        )
        for i in range(tenants):
            sched.acquire(0.0, _request(f"sat{i}"))
        clock = {"now": 100.0}

        def one_round() -> None:
            clock["now"] += 0.02
            for event in sched.tick(clock["now"]):
                if isinstance(event, Granted):  # its tenant queues another at once
                    sched.acquire(clock["now"], _request(event.id.rsplit("-", 1)[0]))

        for _ in range(100):  # (past the start's once-a-period work, as scriptinstructions)
            one_round()
        out: dict[str, list[float]] = {"saturated": [], "floor-cmds-16": []}
        for _ in range(reps):
            n0, u0 = _fcall_usec(client)
            for _ in range(ticks):
                one_round()
                if gap:
                    time.sleep(gap)
            n1, u1 = _fcall_usec(client)
            for i in range(ticks):
                client.fcall("throttle_cmds", 1, "{floor}", 16, i % 50)
                if gap:
                    time.sleep(gap)
            n2, u2 = _fcall_usec(client)
            out["saturated"].append(round((u1 - u0) / max(1, n1 - n0), 1))
            out["floor-cmds-16"].append(round((u2 - u1) / max(1, n2 - n1), 1))
        return {name: {"median_us": statistics.median(v), "us": v} for name, v in out.items()}
    finally:
        client.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", default="1000,10000")
    parser.add_argument("--gaps", default="0,0.02", help="seconds slept after each round")
    parser.add_argument("--ticks", type=int, default=150, help="rounds per stretch")
    parser.add_argument("--reps", type=int, default=3, help="stretches per figure")
    parser.add_argument("--redis-cpu", default="1", help="taskset's CPU list ('': not pinned)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {}
    for tenants in (int(x) for x in args.tenants.split(",")):
        for gap in (float(x) for x in args.gaps.split(",")):
            name = f"saturated-{tenants}-gap-{gap:g}"
            results[name] = run(tenants, gap, args.ticks, args.reps, args.redis_cpu)
            print(f"{name:28} {json.dumps(results[name])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
