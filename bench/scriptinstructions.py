"""Instructions per script call of redis-server, counted by callgrind (deterministic).

    python bench/scriptinstructions.py --scenarios saturated,churn,queue --tenants 10,1000,10000

One redis-server under ``valgrind --tool=callgrind --toggle-collect=<script command>``
(only the instructions run inside FCALL, or EVALSHA with ``--evalsha``), the batch
script driven on a fake clock by `tests.support.lua_scheduler.LuaScheduler`, one call
at a time. A scenario's setup is run first, then the counters are zeroed, its measured
calls made and the profile dumped (``--out``/callgrind.<scenario>.N; read it with
``callgrind_annotate``). Counts are the same from run to run, on a busy machine too:
compare two versions of the scripts by them. ``--per-call``: callgrind dumps after every
script call (``--dump-after``), so the largest single call of each scenario is reported
too (``largest``: the 1 ms a call of issue 14 is about the longest call, not the mean),
and a saturated scenario's ticks and acquires apart (``tick``, ``acquire``: each kind's
mean per call).

- ``saturated-N``: a budget of 50/s with N tenants waiting, one request each, for longer
  than the idle time: a tick every 20 ms admits one, and its tenant queues another at
  once (``--calls`` ticks, each followed by that acquire: two calls per admission);
- ``floor``: `bench/rediscost.py`'s ``floor-cmds-16`` and ``floor-cmds-28`` (16 / 28
  commands of a saturated call's kinds, the least Lua around them), FCALL only;
- ``churn``: a new tenant per request, calls of ``--width`` acquires admitted at once,
  the tenant set at its bound (max_tenants 1,000). Keep ``--width`` at 2 (WORK_CHECK):
  under valgrind a call's work check (WORK_US, by Redis's clock) defers the rest, unless
  ``--unbounded-clock``: WORK_US and LEAVE_US raised to 1e9 us in the scripts loaded
  for the run, so Redis's clock never cuts a call and wide calls count the same from
  run to run (issue 14's figure: ``--scenarios churn --width 32 --head-start 100000
  --calls 200 --unbounded-clock``, per admission = per call / 32);
- ``queue``: ``--width`` acquires of distinct tenants queueing in one call, then their
  cancels in another, on an empty bucket;
- ``edge-N``: a concurrency budget of 1 at its edge: each round an acquire queues
  (nobody waited: someone does) and the running request's release admits it, with N
  other processes registered as ones that may keep slots (``--holders``; told at each
  round's first call, store.lua's call.signal_waiting), two calls a round.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import redis_server_binary
from throttle_mw.backends.redis import protocol, scripts
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Granted, Limits, Policy, Request

_ids = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Valgrind:
    """A redis-server under callgrind, collecting only inside script calls."""

    def __init__(self, binary: Path, out: Path, evalsha: bool, per_call: bool = False) -> None:
        self.port = _free_port()
        self.out = out
        self.dir = tempfile.mkdtemp(prefix="scriptinstr")
        command = "evalShaCommand" if evalsha else "fcallCommand"
        self.profile = out / "callgrind.out"
        self.per_call = per_call
        self.last_counts: list[int] = []  # (--per-call: the last counted run's calls, in order)
        dump_after = [f"--dump-after={command}"] if per_call else []
        self.process = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--toggle-collect={command}",
                f"--callgrind-out-file={self.profile}",
                *dump_after,
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port, socket_timeout=600)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.process.pid)],
            check=True,
            capture_output=True,
            timeout=600,
        )

    def counted(self, name: str, work: Callable[[], int]) -> dict[str, Any]:
        """Instructions of the script calls `work` makes (it returns how many it made)."""
        for old in [*self.out.glob(f"callgrind.{name}*"), *self.out.glob("callgrind.out.*")]:
            old.unlink()  # (with --per-call: the setup's calls, one dump each)
        self.control("-z")
        calls = work()
        self.control("--dump=" + name)
        total, counts = 0, list[int]()
        dumps = self.out.glob("callgrind.out.*")  # (by number: .10 after .9)
        for dump in sorted(dumps, key=lambda d: int(d.suffix[1:]) if d.suffix[1:].isdigit() else 0):
            text = dump.read_text(errors="replace")
            count = 0
            for line in text.splitlines():
                if line.startswith(("summary:", "totals:")):
                    count = int(line.split()[1])
                    break
            total += count
            if not self.per_call:
                dump.rename(self.out / f"callgrind.{name}")
            elif count > 0 and count >= max(counts, default=0):  # (the largest call's kept)
                dump.rename(self.out / f"callgrind.{name}.largest")
            else:
                dump.unlink()
            if count > 0:
                counts.append(count)
        out: dict[str, Any] = {
            "calls": calls,
            "instructions": total,
            "per_call": round(total / calls),
        }
        if self.per_call:  # (the largest call, and the next four)
            out["largest"] = sorted(counts, reverse=True)[:5]
            self.last_counts = counts
        return out

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def _request(tenant: str) -> Request:
    return Request(f"{tenant}-{next(_ids)}", tenant)


def saturated_policy(tenants: int) -> Policy:
    """The saturated scenario's policy: room for every tenant to wait (also
    `bench/scriptsections.py`'s)."""
    return Policy(
        dict.fromkeys(PRIORITIES, 900.0),
        queue_limit=max(1000, 2 * tenants),
        tenant_queue_limit=10,
        tenant_idle_s=60.0,
        max_tenants=max(10_000, 2 * tenants),
    )


def saturated(vg: Valgrind, tenants: int, calls: int, evalsha: bool) -> dict[str, Any]:
    vg.client.flushall()
    policy = saturated_policy(tenants)
    sched = LuaScheduler(
        vg.client, Limits(rate=50.0, burst=5.0), policy, now=0.0, functions=not evalsha
    )
    for i in range(tenants):
        sched.acquire(0.0, _request(f"sat{i}"))
    clock = {"now": 100.0}  # past the idle time: every tenant was last seen long ago

    def tick_and_requeue() -> int:
        clock["now"] += 0.02
        made = 1
        for event in sched.tick(clock["now"]):
            if isinstance(event, Granted):  # its tenant queues another at once
                sched.acquire(clock["now"], _request(event.id.rsplit("-", 1)[0]))
                made += 1
        return made

    for _ in range(60):  # a second of ticks: whatever is due once a period is done
        tick_and_requeue()
    assert sched.waiting >= tenants - 5, sched.waiting

    def work() -> int:
        return sum(tick_and_requeue() for _ in range(calls))

    out = vg.counted(f"saturated-{tenants}", work)
    counts = vg.last_counts
    if vg.per_call and len(counts) == 2 * calls:
        # (--per-call: a tick, then its acquire, call after call: each kind's mean)
        out["tick"] = round(sum(counts[0::2]) / calls)
        out["acquire"] = round(sum(counts[1::2]) / calls)
    return out


def floor(vg: Valgrind, commands: int, calls: int) -> dict[str, Any]:
    """`bench/rediscost.py`'s floor function (its NOP_LIBRARY's ``throttle_cmds``): `commands`
    commands of a saturated call's kinds with the least Lua around them, per call."""
    from bench.rediscost import NOP_LIBRARY

    vg.client.function_load(NOP_LIBRARY, replace=True)
    for i in range(20):
        vg.client.fcall("throttle_cmds", 1, "{floor}", commands, i % 50)

    def work() -> int:
        for i in range(calls):
            vg.client.fcall("throttle_cmds", 1, "{floor}", commands, i % 50)
        return calls

    return vg.counted(f"floor-cmds-{commands}", work)


def churn(
    vg: Valgrind, calls: int, width: int, evalsha: bool, head_start: int = 0
) -> dict[str, Any]:
    vg.client.flushall()
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), max_tenants=1000)
    sched = LuaScheduler(
        vg.client, Limits(rate=1e6, burst=1e6), policy, now=0.0, functions=not evalsha
    )
    fresh = itertools.count()
    state = {"now": 1.0}
    if head_start:  # the virtual clock (and so the finish tags) far from 0
        sched.acquire(0.5, Request("head-start", "head-start", cost=head_start))

    def call() -> None:
        state["now"] += 0.005
        ops = []
        for _ in range(width):
            req = _request(f"new{next(fresh)}")
            weight, max_wait = 1.0, 30.0
            ops.append(protocol.acquire_op(req.id, protocol.acquire_tail(req, weight, max_wait)))
        sched._call(state["now"], ops)

    for _ in range(1000 // width + 20):  # the tenant set fills to its bound
        call()

    def work() -> int:
        for _ in range(calls):
            call()
        return calls

    return vg.counted("churn", work)


def queue(vg: Valgrind, rounds: int, width: int, evalsha: bool) -> dict[str, Any]:
    vg.client.flushall()
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), queue_limit=10_000, max_tenants=100_000)
    sched = LuaScheduler(
        vg.client, Limits(rate=100.0, burst=1.0), policy, now=0.0, functions=not evalsha
    )
    sched.acquire(0.0, _request("drain"))  # the bucket empty
    state = {"now": 0.0, "round": 0}

    def one_round() -> int:
        state["now"] += 0.001
        r = state["round"]
        state["round"] += 1
        reqs = [_request(f"q{r * width + i}") for i in range(width)]
        ops = [protocol.acquire_op(q.id, protocol.acquire_tail(q, 1.0, 30.0)) for q in reqs]
        sched._call(state["now"], ops)
        sched._call(state["now"], [protocol.cancel_op(q.id) for q in reqs])
        return 2

    one_round()

    def work() -> int:
        return sum(one_round() for _ in range(rounds))

    return vg.counted("queue", work)


def edge(
    vg: Valgrind, rounds: int, holders: int, evalsha: bool, step: float = 0.001, warmup: int = 5
) -> dict[str, Any]:
    """A concurrency budget at its edge (a limit of 1): each round one request queues
    (waiting 0 -> 1) and the release of the one running admits it (1 -> 0), the budget of
    a saturated fleet that oscillates around nobody waiting. `holders` other processes
    may keep slots (renew.lua registers them in P:pl, where the build has it): each 0 -> 1
    tells them on their grant lists (store.lua's call.signal_waiting), at most once per
    scripts.SIGNAL_GAP_S where the build has it: `step`, the scripts' clock from one round
    to the next (1 ms: one opening in a hundred told; above the gap: every one). `warmup`
    rounds are run before the measured ones (0: the first opening, the one that starts a
    signal, is measured)."""
    vg.client.flushall()
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), queue_limit=10_000, max_tenants=100_000)
    sched = LuaScheduler(vg.client, Limits(concurrency=1), policy, now=0.0, functions=not evalsha)
    for p in range(holders):
        holder = sched.joined(f"holder{p}")
        try:
            args = protocol.renew_args("0.0", holder._tag, holder.process, 1e6, 1e6, [], keeps=True)
        except TypeError:  # (a build without P:pl: the heartbeat alone)
            args = protocol.renew_args("0.0", holder._tag, holder.process, 1e6, 1e6, [])
        if evalsha:
            holder._run("renew", args, vg.client)
        else:  # (by EVALSHA, not collected: with --per-call no dump per holder)
            holder._evalsha["renew"](keys=[holder._key], args=args, client=vg.client)
    first = _request("edge")
    sched.acquire(0.0, first)
    clock = [0.0]
    running = [first.id]

    def one_round() -> int:
        clock[0] += step
        nxt = _request(f"edge{round(clock[0] / step) % 8}")
        sched.acquire(clock[0], nxt)  # queues: someone waits
        sched.release(clock[0], running[0])  # dispatches it: nobody waits
        running[0] = nxt.id
        pipe = vg.client.pipeline(transaction=False)
        for p in range(holders):  # (the holders' lists, read as their listeners would)
            pipe.delete(f"{sched._tag}:g:holder{p}")
        pipe.execute()
        return 2

    for _ in range(warmup):
        one_round()

    def work() -> int:
        return sum(one_round() for _ in range(rounds))

    return vg.counted(f"edge-{holders}", work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="saturated,churn,queue")
    parser.add_argument("--tenants", default="10,1000,10000")
    parser.add_argument(
        "--calls",
        type=int,
        help="saturated: ticks measured (default 100); churn: calls measured (default 20)",
    )
    parser.add_argument(
        "--unbounded-clock",
        action="store_true",
        help="WORK_US and LEAVE_US raised to 1e9 us in the scripts loaded: Redis's clock "
        "never cuts a call (wide churn calls counted whole, the same from run to run)",
    )
    parser.add_argument("--width", type=int, default=2, help="churn, queue: acquires per call")
    parser.add_argument("--evalsha", action="store_true", help="EVALSHA, not FCALL")
    parser.add_argument(
        "--holders", default="0,4", help="edge: processes that may keep slots (P:pl)"
    )
    parser.add_argument(
        "--head-start",
        type=int,
        default=0,
        help="churn: one acquire of this cost first, so the finish tags are as large as "
        "a budget's that has run a while (e.g. 100000; 0: from 1, as before)",
    )
    parser.add_argument(
        "--edge-step", type=float, default=0.001, help="edge: seconds of the scripts' clock a round"
    )
    parser.add_argument(
        "--edge-warmup", type=int, default=5, help="edge: rounds before the measured ones"
    )
    parser.add_argument(
        "--per-call", action="store_true", help="a dump per script call: the largest call too"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scriptinstructions"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with unbounded_clock(args.unbounded_clock):
        out = _run(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


@contextlib.contextmanager
def unbounded_clock(wanted: bool) -> Iterator[None]:
    """WORK_US and LEAVE_US at 1e9 us in the scripts this process loads, if `wanted`
    (restored after)."""
    tuning = scripts.SHARED["TUNING"]
    assert isinstance(tuning, dict)
    saved = {name: tuning[name] for name in ("WORK_US", "LEAVE_US")}
    if wanted:
        tuning.update(dict.fromkeys(saved, 1_000_000_000))
    scripts.source.cache_clear()  # (the texts made from SHARED: made anew, now and after)
    scripts.library.cache_clear()
    try:
        yield
    finally:
        tuning.update(saved)
        scripts.source.cache_clear()
        scripts.library.cache_clear()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    vg = Valgrind(redis_server_binary(), args.out.resolve(), args.evalsha, args.per_call)
    out: dict[str, Any] = {}
    try:
        wanted = args.scenarios.split(",")
        if "saturated" in wanted:
            for n in (int(x) for x in args.tenants.split(",")):
                ticks = 100 if args.calls is None else args.calls
                out[f"saturated-{n}"] = saturated(vg, n, ticks, args.evalsha)
                print(f"saturated-{n:<8} {json.dumps(out[f'saturated-{n}'])}", flush=True)
        if "floor" in wanted:  # (FCALL only)
            for n in (16, 28):
                out[f"floor-cmds-{n}"] = floor(vg, n, 50)
                print(f"floor-cmds-{n:<5} {json.dumps(out[f'floor-cmds-{n}'])}", flush=True)
        if "churn" in wanted:
            calls = 20 if args.calls is None else args.calls
            out["churn"] = churn(vg, calls, args.width, args.evalsha, args.head_start)
            print(f"churn            {json.dumps(out['churn'])}", flush=True)
        if "queue" in wanted:
            out["queue"] = queue(vg, 20, args.width, args.evalsha)
            print(f"queue            {json.dumps(out['queue'])}", flush=True)
        if "edge" in wanted:
            for n in (int(x) for x in args.holders.split(",")):
                out[f"edge-{n}"] = edge(vg, 50, n, args.evalsha, args.edge_step, args.edge_warmup)
                print(f"edge-{n:<12} {json.dumps(out[f'edge-{n}'])}", flush=True)
    finally:
        vg.close()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
