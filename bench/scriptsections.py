"""Where a saturated call's instructions go, by section of the scripts (callgrind).

    python bench/scriptsections.py --tenants 1000 --rounds 40

The saturated scenario of `bench/scriptinstructions.py` (a budget of 50/s, N tenants
waiting, a tick every 20 ms that admits one, then that tenant's acquire that queues),
with the library loaded with markers: at each anchor of SECTIONS, a line
``redis.call('APPEND', <key>, '|<name>')`` (only in the measured rounds). Redis runs under
``valgrind --tool=callgrind --toggle-collect=fcallCommand --dump-before=appendCommand``:
one profile per stretch between two markers, so each section's instructions are read off
its profile, whatever Redis's binary has of symbols (Debian's is stripped: its Lua has no
names in a profile). A marker's own cost (two markers in a row, ``mark``) is taken off
each section. Each row is named by the marker that opens it; ``(reply)`` runs from the
last marker of one call to the first of the next: the reply, FCALL's own work and the
arguments made Lua strings.

The markers are only in the text loaded for this run (scripts._part patched in this
process); nothing in the package changes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.scriptinstructions import _free_port, saturated_policy
from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import redis_server_binary
from throttle_mw.backends.redis import scripts
from throttle_mw.scheduler import Granted, Limits, Request

MARKS = "scriptsections:marks"
#: The clock of the first measured round (the bench's own clock: the marks are off before).
MARK_FROM = 101.5

#: (script, the text a marker goes before, the section it opens). Anchors must be unique.
SECTIONS: list[tuple[str, str, str]] = [
    ("batch", "local ops\n", "mark"),
    ("batch", "local ops\n", "split"),
    ("batch", "init(ARGV[2], ARGV[1], ARGV[3], light)\n", "init: tables"),
    ("store", "  L, POL = nil, nil\n  limits_memo = nil\n", "init: clock, key names"),
    ("store", "  more = false\n  held_back = 0\n  loaded = nil\nend", "init: the rest"),
    ("batch", "if single then\n  local op = text", "one operation"),
    ("batch", "load_state(ARGV[5], ARGV[4])\n", "load_state"),
    ("batch", "hold_back()\ncall.recall_line()", "recall_line"),
    ("batch", "local joined = call.heartbeat()\n", "heartbeat"),
    ("batch", "refill(true)", "expiries"),
    ("batch", "local results = {nil}", "operation"),
    (
        "core",
        "  local t = tenant(h, name, weight)\n  if cost ~= 1 then cost = clamp(cost) end\n",
        "acquire: tenant",
    ),
    (
        "core",
        "  if cost ~= 1 then cost = clamp(cost) end\n  if fits_at_once(t, cost)",
        "acquire: fits",
    ),
    ("core", "  local deadline = now + max_wait\n", "acquire: make_room, r"),
    ("core", "  push(t, r)\n  if dispatch(id)", "acquire: push"),
    ("core", "  if dispatch(id) then return", "acquire: dispatch"),
    ("core", "  local wait, reason = estimate(t, rank, r)\n  if wait", "acquire: estimate"),
    ("core", "  return {kind = 'queue', deadline = deadline,", "acquire: reply line"),
    ("core", "      unlink(t, r)\n      deactivate(t)", "tick: unlink"),
    ("core", "      deactivate(t)  -- back in line", "tick: deactivate"),
    ("core", "      take(t, r.id, r.cost, r.proc)\n", "tick: take"),
    ("core", "        emit_granted(r.proc, r.id, now - r.enq,", "tick: grant"),
    ("core", "    local top = redis.call('ZRANGE', K.active, '0', '0')\n", "tick: next in line"),
    (
        "store",
        "  local text = redis.call('HGET', K.tenant_hash, h)\n  local v",
        "load_tenant: HGET",
    ),
    ("store", "  if text then v = {string.match(", "load_tenant: its tables"),
    ("core", "    local r = head_of(t)\n", "tick: its head waiter"),
    ("core", "    elseif not fits(r.cost, t.f >= S.v) then\n", "tick: fits"),
    ("batch", "forget_idle()\n", "forget_idle"),
    ("batch", "local due = next_due()\n", "next_due"),
    ("batch", "local procs = live_processes(joined)\n", "live_processes"),
    ("store", "  local args, n = call.state_args, 0\n  S.inflight", "save"),
    ("store", "  local changed\n  if loaded ~= nil and not hot then", "save: packed"),
    ("store", "  if changed then n = 2 end\n  n = call.save_plain(", "save: plain"),
    ("store", "  if M.stamped and M.raw ~= nil and loaded ~= nil and S.waiting", "save: HSET"),
    ("store", "  for _, t in pairs(T) do\n    if t.dirty and not t.deleted", "save: tenants"),
    ("store", "  local expiring = born\n  if refresh then", "save: TTLs"),
    ("store", "  call.push_recent()\n  for p, msgs in pairs(out_events)", "save: recent"),
    ("store", "  for p, msgs in pairs(out_events) do\n    local key", "save: grants"),
    ("batch", "call.keep_line()\n", "keep_line"),
    ("batch", "call.keep_state()\n", "keep_state"),
    ("batch", "if #results > 1 then", "finish"),
]


def marked_part(
    original: Callable[[str], str], sections: list[tuple[str, str, str]] | None = None
) -> Callable[[str], str]:
    """scripts._part with the markers of `sections` (SECTIONS) in its text."""

    def part(name: str) -> str:
        text = original(name)
        for script, anchor, section in sections or SECTIONS:
            if script != name:
                continue
            if text.count(anchor) != 1:
                raise SystemExit(f"{name}.lua: anchor not found once: {anchor!r}")
            mark = f"redis.call('APPEND', '{MARKS}', '|{section}')"
            line = f"if now and now >= {MARK_FROM} then {mark} end\n"
            text = text.replace(anchor, line + anchor, 1)
        return text

    return part


@contextlib.contextmanager
def marked_scripts(sections: list[tuple[str, str, str]] | None = None) -> Iterator[None]:
    """The scripts this process loads carry the markers of `sections` (SECTIONS) meanwhile."""
    original = scripts._part
    scripts._part = marked_part(original, sections)  # type: ignore[assignment]
    scripts.source.cache_clear()
    scripts.library.cache_clear()
    try:
        yield
    finally:
        scripts._part = original
        scripts.source.cache_clear()
        scripts.library.cache_clear()


@contextlib.contextmanager
def profiled_redis(out: Path) -> Iterator[redis.Redis]:
    """A redis-server on a free port under callgrind, one profile (`out`/cg.N) per stretch
    between two markers (an APPEND), counting only inside FCALL; a client of it."""
    port = _free_port()
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=fcallCommand",
            "--dump-before=appendCommand",
            f"--callgrind-out-file={out / 'cg'}",
            str(redis_server_binary()),
            *("--port", str(port), "--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=600)
    try:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield client
    finally:
        server.terminate()
        server.wait(60)


def marks_and_totals(client: redis.Redis, out: Path) -> tuple[list[str], list[int]]:
    """The marks in the order made, and each one's profile's instructions (dump k: what
    ran since the mark before it)."""
    raw = client.get(MARKS)
    marks = (raw.decode() if isinstance(raw, bytes) else "").split("|")[1:]
    return marks, _totals(out)[-len(marks) :]


def _totals(out: Path) -> list[int]:
    totals = []
    for dump in sorted(out.glob("cg.*"), key=lambda p: int(p.suffix[1:])):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                totals.append(int(line.split()[1]))
                break
    return totals


def run(tenants: int, rounds: int, out: Path) -> dict[str, dict[str, float]]:
    with marked_scripts():
        marks, totals = _profile(tenants, rounds, out)
    return _sections(marks, totals)


def _profile(tenants: int, rounds: int, out: Path) -> tuple[list[str], list[int]]:
    """The marks in the order made, and each dump's instructions (one per mark)."""
    with profiled_redis(out) as client:
        policy = saturated_policy(tenants)
        sched = LuaScheduler(client, Limits(rate=50.0, burst=5.0), policy, now=0.0)
        ids = iter(range(10**9))
        for i in range(tenants):
            sched.acquire(0.0, Request(f"sat{i}-{next(ids)}", f"sat{i}"))
        now = 100.0
        measured = 0
        while measured < rounds:  # (a second of ticks first, as the bench's)
            now += 0.02
            counted = now >= MARK_FROM + 0.03  # (the first marker goes by the last call's clock)
            if counted:
                measured += 1
                client.append(MARKS, "|(tick)")
            for event in sched.tick(now):
                if isinstance(event, Granted):
                    tenant = event.id.rsplit("-", 1)[0]
                    if counted:
                        client.append(MARKS, "|(acquire)")
                    sched.acquire(now, Request(f"{tenant}-{next(ids)}", tenant))
        client.append(MARKS, "|(end)")
        return marks_and_totals(client, out)


def _sections(marks: list[str], totals: list[int]) -> dict[str, dict[str, float]]:
    sums: dict[str, dict[str, list[int]]] = {
        "tick": collections.defaultdict(list),
        "acquire": collections.defaultdict(list),
    }
    kind, previous = "", None
    for section, instructions in zip(marks, totals, strict=True):
        if not kind and section != "(tick)":
            continue  # (marked before the first measured round)
        if previous is not None:
            if previous.startswith("("):
                name = "(entry)"
            elif section.startswith("("):
                name = "(reply)"
            else:
                name = previous
            sums[kind][name].append(instructions)
        if section in ("(tick)", "(acquire)"):
            kind = section[1:-1]
        previous = section
    result: dict[str, dict[str, float]] = {}
    for kind, rows in sums.items():
        marker = sum(rows["mark"]) / len(rows["mark"])
        calls = len(rows["mark"])
        result[kind] = {"marker": marker, "calls": calls}
        for name, counts in rows.items():
            if name != "mark":
                result[kind][name] = sum(counts) / calls - marker * len(counts) / calls
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scriptsections") as tmp:
        result = run(args.tenants, args.rounds, Path(tmp))
    for kind, rows in result.items():
        print(f"{kind}: {rows['calls']:.0f} calls, a marker {rows['marker'] / 1000:.1f} k")
        total = 0.0
        for name, value in rows.items():
            if name in ("marker", "calls"):
                continue
            total += value
            print(f"  {name:24s} {value / 1000:8.1f} k")
        print(f"  {'(all)':24s} {total / 1000:8.1f} k")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
