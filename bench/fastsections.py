"""Where an unbatched admission's instructions go, by section of the fast path (callgrind).

    python bench/fastsections.py --scenario rate --n 200

`bench/redisinstr.py`'s ``rate`` and ``concurrency`` scenarios (one request at a time
through `RedisBackend`: an acquire by fast.lua's fast_acquire and, with a lease, its
release by release.lua's lean_release), measured as `bench/scriptsections.py` measures
a saturated call: the library loaded with a marker (an APPEND) at each anchor of
SECTIONS, Redis under ``valgrind --tool=callgrind --toggle-collect=fcallCommand
--dump-before=appendCommand``, one profile per stretch between two markers. Each row is
named by the marker that opens it, a marker's own cost taken off; ``(entry)`` runs from
the start of an FCALL to its first marker (FCALL's own work, the arguments made Lua
strings), ``(reply)`` from the last marker of a call to the first of the next (the
reply made and sent, the next FCALL's entry). Rows are instructions per admission.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio

from bench.rediscost import settings
from bench.scriptsections import MARKS, marked_scripts, marks_and_totals, profiled_redis
from throttle_mw.backends.base import Admitted
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.scheduler import Request

#: (script, the text a marker goes before, the section it opens). Anchors must be unique.
SECTIONS: list[tuple[str, str, str]] = [
    ("batch", "local ops\n", "mark"),
    ("batch", "local ops\n", "batch: split"),
    ("batch", "local try = single and", "batch: left_waiting"),
    ("batch", "init(ARGV[2], ARGV[1], ARGV[3], light)\n", "init"),
    ("store", "    local t = redis.call('TIME')\n", "init: TIME"),
    ("store", "    local s, us = tonum(t[1]), t[2] + 0\n", "init: after TIME"),
    ("batch", "    line = fast_acquire(op, ARGV[4])\n", "fast_acquire: call"),
    ("fast", "  local id, h, _, tail = call.split_acquire(op, call.lasting)\n", "split_acquire"),
    ("fast", "  local weight = tail.weight\n  if not call.load", "load_acquire_state"),
    ("store", "  if not v[1] then return false end\n  loaded = K.state_memo", "state: its fields"),
    ("fast", "  load_limits_stamped(limits, false)\n  if not quiet", "limits, quiet"),
    ("fast", "  local memo = limits_memo\n  if not (memo.no_weights", "weight"),
    (
        "fast",
        "  local f0, w0, cap0, cap_at0, st, xp, wt, capt, rest = call.read_head",
        "tenant: HGET",
    ),
    ("fast", "  if f0 == nil then return give_up() end\n", "tenant: checks"),
    ("fast", "  local t = FAST_T\n", "tenant: table"),
    ("fast", "  refill()\n  local cost = clamp", "refill"),
    ("fast", "  local cost = clamp(tail.cost)\n  if not fits_at_once", "clamp, fits_at_once"),
    ("fast", "  t.dirty = true  -- (touch", "take"),
    ("fast", "  t.f0 = f0; t.w0 = w0;", "reply line"),
    ("batch", "      local procs = live_processes(false)\n      call.save", "live_processes"),
    ("batch", "      call.save_acquire(FAST_T)\n", "save_acquire: now_score"),
    ("store", "  if redis.call('ZADD', K.tenants, seen, t.h) > 0 then", "save: ZADD"),
    ("store", "  -- The packed numbers fast.lua can change (call.HOT_PACKED", "save: packed texts"),
    ("store", "  local inflight_changed = s.inflight ~= call.inflight0\n", "save: HSET P:s"),
    ("store", "  if t.dirty then  -- (its field of P:T", "save: HSET tenant"),
    ("store", "  if next(born) ~= nil then\n    call.expire_keys(born)", "save: TTLs"),
    ("store", "  local ids = recent[proc]  -- (its only", "save: LPUSH recent"),
    ("batch", "      return call.finish_admitted(line, procs)", "finish"),
    # take's lease (concurrency)
    ("store", "  anchor_leases()\n  local expiry = now + POL.lease_ttl", "take: put_lease"),
    ("store", "  redis.call('ZADD', K.leases, num(expiry), id)\n", "take: ZADD lease"),
    ("store", "  if cost ~= 1 then\n    if S.lk <= 0 then born.lease_costs", "take: after ZADD"),
    # release.lua and lean_release
    ("release", "start(ARGV[2], ARGV[1])\n", "release: start"),
    ("release", "local id = ARGV[6]\n", "release: left_waiting"),
    ("fast", "  local vals = redis.call('HMGET', K.state, unpack(HOT", "lean: HMGET"),
    ("fast", "  local packed = unpack_state(vals[1])\n", "lean: checks"),
    ("fast", "  if redis.call('ZREM', K.leases, id) == 1 then\n", "lean: ZREM lease"),
    ("fast", "    redis.call('HSET', K.state, 'inflight',", "lean: HSET inflight"),
    ("release", "  if done then return REPLY.released end\n", "release: return"),
]


async def _drive(url: str, scenario: str, n: int) -> None:
    limits = {"rate": 1e6, "burst": 1e6} if scenario == "rate" else {"concurrency": 100_000}
    backend = RedisBackend(settings(url, f"s{scenario}", **limits))
    await backend.start()
    for task in (backend._renewer, backend._learning_task):  # (no calls of their own)
        if task is not None:
            task.cancel()
    client = redis.asyncio.Redis.from_url(url)
    assert backend._batcher is not None
    ids = itertools.count()
    for i in range(200 + n):
        rid = f"r{next(ids)}"
        if i >= 200:
            await client.append(MARKS, "|(acquire)")
        outcome = await backend.acquire(Request(rid, f"t{i % 8}"))
        if not isinstance(outcome, Admitted):
            raise RuntimeError(f"not admitted: {outcome!r}")
        if outcome.lease:
            backend._leases.pop(rid, None)
            await backend._batcher.submit(protocol.release_op(rid))
    await client.append(MARKS, "|(end)")
    await client.aclose()
    await backend.stop()


def _profile(scenario: str, n: int, out: Path) -> tuple[list[str], list[int]]:
    with profiled_redis(out) as client:
        port = client.connection_pool.connection_kwargs["port"]
        asyncio.run(_drive(f"redis://127.0.0.1:{port}/0", scenario, n))
        return marks_and_totals(client, out)


def run(scenario: str, n: int, out: Path) -> dict[str, float]:
    with marked_scripts(SECTIONS):
        marks, totals = _profile(scenario, n, out)
    # One admission: from one client marker to the next. Only admissions all by the fast
    # path are summed (the acquire's `finish`, a release's `release: return`): under
    # valgrind a call takes milliseconds, so the periodic full calls (a recount, a window
    # roll: once a second or so) come far more often per admission than at full speed.
    groups: list[list[tuple[str, int]]] = []
    for section, instructions in zip(marks, totals, strict=True):
        if section.startswith("("):
            if groups:
                groups[-1].append(("(end)", instructions))
            groups.append([])
        elif groups:
            groups[-1].append((section, instructions))
    groups = [g for g in groups[:-1] if g]
    want = {"finish"} if scenario == "rate" else {"finish", "release: return"}
    fast = [g for g in groups if want <= {s for s, _ in g}]
    sums: dict[str, float] = collections.defaultdict(float)
    marker_runs = [n for g in fast for (s, _), (_, n) in itertools.pairwise(g) if s == "mark"]
    marker = sum(marker_runs) / len(marker_runs)
    for g in fast:
        previous = "(start)"
        for section, instructions in g:
            if previous == "(start)":
                name = "(entry)"
            elif section == "(end)" or section in ("mark", "release: start"):
                name = "(reply)"
            else:
                name = previous
            if name != "mark":
                # (every stretch but an FCALL's first ends at a marker: its cost taken off)
                sums[name] += instructions - (marker if name != "(entry)" else 0)
            previous = section
    result = {"marker": marker, "admissions": len(fast), "others": len(groups) - len(fast)}
    for name, total in sums.items():
        result[name] = total / len(fast)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=("rate", "concurrency"), default="rate")
    parser.add_argument("--n", type=int, default=200, help="admissions measured")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastsections") as tmp:
        rows = run(args.scenario, args.n, Path(tmp))
    print(
        f"{args.scenario}: {rows.pop('admissions'):.0f} admissions by the fast path "
        f"({rows.pop('others'):.0f} others left out), a marker {rows.pop('marker') / 1000:.1f} k"
    )
    total = 0.0
    for name, value in rows.items():
        total += value
        print(f"  {name:28s} {value / 1000:8.1f} k")
    print(f"  {'(all, in FCALL)':28s} {total / 1000:8.1f} k")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
