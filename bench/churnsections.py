"""Where a churn call's instructions go, by section of the scripts (callgrind).

    python bench/churnsections.py --width 32 --calls 6

`bench/scriptinstructions.py`'s ``churn`` scenario (a new tenant per request, calls of
``--width`` acquires admitted at once, the tenant set at its bound, max_tenants 1,000:
each new tenant drops the least recent one), measured as `bench/scriptsections.py`
measures a saturated call: the library loaded with a marker (an APPEND) at each anchor
of SECTIONS, Redis under callgrind, one profile per stretch between two markers, a
marker's own cost taken off. Rows are instructions per admission, named by the marker
that opens them; ``(reply, entry)`` runs from the last marker of one call to the first
of the next. The work bound's clock (WORK_US) is raised for the run in this process:
the markers' dumps are slow, and the clock would stop a call after a few operations.
Garbage collection lands where memory is allocated.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scriptinstructions import _request
from bench.scriptsections import MARK_FROM, MARKS, marked_scripts, marks_and_totals, profiled_redis
from tests.support.lua_scheduler import LuaScheduler
from throttle_mw.backends.redis import protocol, scripts
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Limits, Policy

#: (script, the text a marker goes before, the section it opens). Anchors must be unique.
SECTIONS: list[tuple[str, str, str]] = [
    ("batch", "local ops\n", "mark"),
    ("batch", "local ops\n", "split"),
    ("batch", "init(ARGV[2], ARGV[1], ARGV[3], light)\n", "init"),
    ("batch", "load_state(ARGV[5], ARGV[4])\n", "load_state"),
    ("batch", "local joined = call.heartbeat()\n", "heartbeat"),
    ("batch", "refill(true)", "expiries"),
    ("batch", "local results = {nil}", "before the loop"),
    ("batch", "  local line = nil\n  if not over then line = do_acquire(op)", "op: loop top"),
    (
        "fast",
        "  local id, h, name, tail = string.match(op, call.ACQUIRE_PATTERN)",
        "op: split_acquire",
    ),
    ("fast", "  local weight = tail.weight\n  if not M.no_weights", "op: live_weight"),
    (
        "core",
        "  refill()\n  if S.waiting > 0 then dispatch(nil) end\n  local t = tenant(",
        "op: refill",
    ),
    (
        "core",
        "  local t = tenant(h, name, weight)\n  if cost ~= 1 then cost = clamp(cost) end\n",
        "op: tenant",
    ),
    ("store", "  local text = redis.call('HGET', K.tenant_hash, h)\n  local v", "load_tenant"),
    ("store", "  if text then v = {string.match(", "load_tenant: its table"),
    ("store", "    fresh = true\n    local made = M.made", "load_tenant: made list"),
    ("store", "  T[h] = t\n  return t\nend\n\n-- The weight", "load_tenant: T[h]"),
    ("core", "  touch(t)\n  return t\nend", "op: touch"),
    ("core", "  if cost ~= 1 then cost = clamp(cost) end\n  if fits_at_once(t, cost)", "op: fits"),
    ("core", "  take(t, id, cost, proc)\n  return call.ADMITTED", "op: take, reply line"),
    ("fast", "  call.save_made()  -- (store.lua", "check: save_made"),
    ("fast", "  local taken = i - 1\n  local units = taken", "check: clock"),
    ("store", "  local loaded = t.loaded\n  local c = t.c  -- (its costs", "save_tenant: Lua"),
    (
        "store",
        "    if text ~= t.tx then\n      t.tx = text\n      local tw = M.tw",
        "save_tenant: put",
    ),
    (
        "store",
        "  if refresh then\n    if t.n > 0 and t.q1 == nil then redis.call('PEXPIRE'",
        "save_tenant: after",
    ),
    (
        "store",
        "  if redis.call('HSET', K.tenant_hash, TUNING.ENCODING_ANCHOR, '', unpack(tw))",
        "tenants: HSET",
    ),
    ("batch", "forget_idle()\n", "forget_idle"),
    ("store", "  local drop = nil\n  if pending ~= nil then", "idle list: its lists"),
    ("store", "  if #add > 0 then\n    local members", "idle list: ZADD"),
    ("core", "  local due = now >= S.fi\n", "drops: sweep, excess read"),
    ("core", "  if due then call.sweep_strays(listed) end", "drops: strays"),
    ("core", "  local excess = listed - POL.max_tenants\n", "drops: excess"),
    ("core", "  if #stale > 0 then call.drop_idle_tenants(stale, ranked) end\nend", "drops: call"),
    ("store", "  local gone = hs\n  if unknown ~= hs", "drops: digests"),
    ("store", "  if #gone > 0 then redis.call('HDEL'", "drops: HDEL"),
    ("store", "  redis.call('ZREMRANGEBYRANK', K.tenants", "drops: ZREMRANGEBYRANK"),
    ("batch", "local due = next_due()\n", "next_due"),
    ("batch", "local procs = live_processes(joined)\n", "live_processes"),
    ("store", "  local args, n = call.state_args, 0\n  S.inflight", "save"),
    ("store", "  for _, t in pairs(T) do\n    if t.dirty and not t.deleted", "save: tenants"),
    ("store", "  local expiring = born\n  if refresh then", "save: TTLs"),
    ("store", "  call.push_recent()\n  for p, msgs in pairs(out_events)", "save: recent"),
    ("batch", "call.keep_line()\n", "keep_line"),
    ("batch", "if #results > 1 then", "finish"),
]


def _profile(width: int, calls: int, out: Path) -> tuple[list[str], list[int]]:
    """The marks in the order made, and each dump's instructions (one per mark)."""
    with profiled_redis(out) as client:
        policy = Policy(dict.fromkeys(PRIORITIES, 30.0), max_tenants=1000)
        sched = LuaScheduler(client, Limits(rate=1e6, burst=1e6), policy, now=0.0)
        fresh = itertools.count()
        clock = {"now": MARK_FROM - 0.005 * (1000 // width + 20)}  # the set fills first

        def call() -> None:
            clock["now"] += 0.005
            reqs = [_request(f"new{next(fresh)}") for _ in range(width)]
            ops = [protocol.acquire_op(r.id, protocol.acquire_tail(r, 1.0, 30.0)) for r in reqs]
            sched._call(clock["now"], ops)

        while clock["now"] < MARK_FROM - 0.004:
            call()
        client.append(MARKS, "|(call)")
        for _ in range(calls):
            call()
            client.append(MARKS, "|(call)")
        return marks_and_totals(client, out)


def sections(marks: list[str], totals: list[int], admissions: int) -> dict[str, float]:
    """Instructions per admission by section, a marker's own cost taken off."""
    sums: dict[str, int] = collections.defaultdict(int)
    counts: dict[str, int] = collections.defaultdict(int)
    previous = None
    for section, instructions in zip(marks, totals, strict=True):
        if previous is not None:
            name = "(reply, entry)" if previous.startswith("(") else previous
            sums[name] += instructions
            counts[name] += 1
        previous = section
    marker = sums.pop("mark") / counts.pop("mark")
    return {name: (v - marker * counts[name]) / admissions for name, v in sums.items()}


def run(width: int, calls: int, out: Path) -> dict[str, float]:
    tuning = scripts.SHARED["TUNING"]
    assert isinstance(tuning, dict)
    work_us = tuning["WORK_US"]
    tuning["WORK_US"] = 1_000_000_000
    try:
        with marked_scripts(SECTIONS):
            marks, totals = _profile(width, calls, out)
    finally:
        tuning["WORK_US"] = work_us
    return sections(marks, totals, width * calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=32, help="new tenants a call")
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="churnsections") as tmp:
        result = run(args.width, args.calls, Path(tmp))
    print(f"per admission, calls of {args.width} new tenants:")
    for name, value in result.items():
        print(f"  {name:32s} {value / 1000:8.2f} k")
    print(f"  {'(all)':32s} {sum(result.values()) / 1000:8.2f} k")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
