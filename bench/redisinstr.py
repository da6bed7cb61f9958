"""Instructions redis-server executes per unbatched admission, counted by callgrind.

    python bench/redisinstr.py --n 300 --scenarios rate,concurrency,concurrency-held

Timing on a shared machine moves by 10-20 % between runs; the instructions a server
executes for a fixed number of admissions do not. One private redis-server runs under
``valgrind --tool=callgrind`` with collection off; `RedisBackend` is driven as in
`bench/rediscost.py` (one request at a time: an acquire and, with a lease, its release);
after a warm-up (scripts loaded, tenants made) collection is switched on for exactly
``--n`` admissions. Every scenario runs the exact per-request path (no leases of rate
tokens: ``THROTTLE_RATE_LEASE=0``, pinned by rediscost.py's ``settings``; for a rate alone
the default is ``auto``, rediscost.py's ``rate``) unless it says otherwise. Reported:
instructions per admission (Redis's whole work: sockets, parsing, the script and its
commands; the kernel's work is not counted). The profile is
left in ``--out`` (read it with ``callgrind_annotate --inclusive=yes``). Slow: valgrind
runs Redis about 50x slower. Scenario ``nop``: the floor, a function that does nothing
called with a rate admission's arguments (rediscost.py's ``floor-nop``); ``rate-paced``,
``rate-lease`` and ``rate-default``: rediscost.py's ``lease``, 4 processes at 500/s each,
without and with leases of rate tokens (T = 0.1 s), and with THROTTLE_RATE_LEASE unset
(the default: ``auto`` for a rate alone; ``--n`` a multiple of 4); ``concurrency-paced`` and
``concurrency-kept``: rediscost.py's ``slots``, 4 processes of two requests at a time
(each holding its slot 1 ms) at 500/s each on a limit of 16, without and with kept
slots (THROTTLE_KEEP_SLOTS=``--keep-s``, 1 by default; ``--n`` a multiple of 8;
``--slots-procs`` and ``--slots-limit``, ``auto`` for a learned one, as in rediscost.py);
``concurrency`` runs with kept slots off (THROTTLE_KEEP_SLOTS=0: the scripts'
per-request path), ``concurrency-default`` the same loop with the default settings (kept
slots at their default T); ``churn``: a new
tenant per request, 512 at once (``--n`` a multiple of 512); ``stop``: per waiter of
``backend.stop()`` with ``--n`` waiting, 20 a tenant; ``slowapi``, ``fastapi-limiter``,
``asgi-ratelimit`` (or ``peers``, all three): that peer library's own Redis limiting
code, one admission at a time (`bench/peerredis.py`; rediscost.py's ``peers``), with
its ratio to ``rate`` and ``concurrency`` when they ran first. The script call's
share of each profile (FCALL, or EVALSHA for the peers; ``callgrind_annotate
--inclusive=yes``) is printed too, so what a call costs outside its script shows.
``--part acquire`` or ``--part release`` counts only that call of each admission
(``concurrency``, ``concurrency-held``: the release is awaited, so collection stops once
Redis answered it; the scripts run on a clock passed in, ARGV[1], instead of TIME).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench import peerredis
from bench.rediscost import (
    DEFAULT,
    NOP_LIBRARY,
    _held_fleet,
    _keep,
    _limit,
    _paced_fleet,
    admit_one,
    cpu_model,
    settings,
)
from tests.support.ports import HOST, free_port
from tests.support.redis_server import redis_server_binary
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.scheduler import Request


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


async def _drive_nop(url: str, n: int, pid: int) -> None:
    import redis.asyncio

    from throttle_mw.backends.redis import protocol

    backend = RedisBackend(settings(url, "inop", rate=1e6, burst=1e6))
    op = protocol.acquire_op("b0", protocol.acquire_tail(Request("b0", "t0"), 1.0, 5.0))
    args = protocol.call_args(backend._static, "", [op], "")
    client = redis.asyncio.Redis.from_url(url)
    await client.function_load(NOP_LIBRARY, replace=True)
    for i in range(200 + n):
        if i == 200:
            _control(pid, "-z")
            _control(pid, "-i", "on")
        await client.fcall("throttle_nop", 1, backend._keys.state, *args)
    _control(pid, "-i", "off")
    await client.aclose()


async def _drive_stop(url: str, n: int, pid: int) -> None:
    """`backend.stop()` with `n` requests waiting, 20 a tenant (rediscost.py's ``stop``)."""
    forever = {"critical": 900, "high": 900, "normal": 900, "low": 900}
    backend = RedisBackend(
        settings(url, "istop", rate=100.0, burst=1.0, queue_limit=2 * n, max_wait_s=forever)
    )
    await backend.start()
    await asyncio.gather(
        *(backend.acquire(Request(f"w{i}", f"t{i % (n // 20)}")) for i in range(n))
    )
    _control(pid, "-z")
    _control(pid, "-i", "on")
    await backend.stop()
    _control(pid, "-i", "off")


async def _drive_churn(url: str, n: int, pid: int) -> None:
    """A new tenant per request, 512 at once (rediscost.py's ``churn``)."""
    backend = RedisBackend(settings(url, "ichurn", rate=1e6, burst=1e6))
    await backend.start()
    fresh = iter(range(10**9))

    async def rounds(count: int) -> None:
        for _ in range(count // 512):
            await asyncio.gather(*(admit_one(backend, f"new{next(fresh)}") for _ in range(512)))

    await rounds(4 * 512)  # warm up: the tenant set fills
    _control(pid, "-z")
    _control(pid, "-i", "on")
    await rounds(n)
    _control(pid, "-i", "off")
    await backend.stop()


async def _drive_peer(url: str, name: str, n: int, pid: int) -> None:
    """One peer's Redis limiting code, one admission at a time (rediscost.py's ``peers``)."""
    async with peerredis.peer(name, url) as admit:
        for i in range(200):  # warm up: scripts loaded, keys made
            await admit(f"t{i % 8}")
        _control(pid, "-z")
        _control(pid, "-i", "on")
        for i in range(n):
            await admit(f"t{i % 8}")
        _control(pid, "-i", "off")


async def _drive_paced(url: str, n: int, pid: int, lease_s: object) -> None:
    """rediscost.py's ``lease``: 4 processes on one budget, one request at a time each at
    500/s, without leases (``rate-paced``), with THROTTLE_RATE_LEASE=0.1 (``rate-lease``)
    or with the default settings (``rate-default``: rediscost.py's DEFAULT).
    What it counts moves with the pace Redis keeps under callgrind (a lease is the
    process's rate x T): the heartbeats and lease calls over n admissions."""
    prefix = "ipaceddefault" if lease_s is DEFAULT else f"ipaced{lease_s}"
    backends, run, _ = _paced_fleet(url, prefix, 4, 500.0, lease_s)
    await _count_fleet(backends, run, n, pid)


async def _drive_held(
    url: str, n: int, pid: int, keep_s: float | None, procs: int = 4, limit: int | str = 16
) -> None:
    """rediscost.py's ``slots``: 4 processes (`procs`) on one concurrency budget of 16
    (`limit`, or ``auto``), two requests at a time each holding its slot 1 ms, at 500/s
    per process, without kept slots (``concurrency-paced``) or with THROTTLE_KEEP_SLOTS=1
    (``concurrency-kept``). The heartbeats, the kept slots' releases and a learned
    limit's pushes are counted over n admissions."""
    prefix = f"iheld{keep_s}{limit}"
    backends, run, _ = _held_fleet(url, prefix, procs, 500.0, 0.001, limit, keep_s)
    await _count_fleet(backends, run, n, pid)


async def _count_fleet(
    backends: list[RedisBackend], run: Callable[[int], Awaitable[None]], n: int, pid: int
) -> None:
    """Start a fleet, warm it up (the library loaded, tenants made, leases sized or pools
    filled), count Redis's instructions over its next n admissions, stop it."""
    for backend in backends:
        await backend.start()
    await run(100)
    _control(pid, "-z")
    _control(pid, "-i", "on")
    await run(n // len(backends))
    _control(pid, "-i", "off")
    for backend in backends:
        await backend.stop()


async def _admit_part(backend: RedisBackend, tenant: str, part: str, pid: int) -> None:
    """One admission (a lease, released), counting only its `part`: the acquire or the
    release (awaited through the batcher, as `backend.release` sends it)."""
    from throttle_mw.backends.redis import protocol

    assert backend._batcher is not None
    rid = f"p{next(_PART_IDS)}"
    if part == "acquire":
        _control(pid, "-i", "on")
    outcome = await backend.acquire(Request(rid, tenant))
    if isinstance(outcome, Waiting):
        outcome = await outcome.future
    if part == "acquire":
        _control(pid, "-i", "off")
    if not (isinstance(outcome, Admitted) and outcome.lease):
        raise RuntimeError(f"not admitted with a lease: {outcome!r}")
    backend._leases.pop(rid, None)
    if part == "release":
        _control(pid, "-i", "on")
    await backend._batcher.submit(protocol.release_op(rid))
    if part == "release":
        _control(pid, "-i", "off")


_PART_IDS = itertools.count()


async def _drive(
    url: str,
    mode: str,
    n: int,
    held: int,
    pid: int,
    part: str = "both",
    keep_s: float | None = 1.0,
    fleet: tuple[int, int | str] = (4, 16),
) -> None:
    if mode in peerredis.PEERS:
        await _drive_peer(url, mode, n, pid)
        return
    if mode == "nop":
        await _drive_nop(url, n, pid)
        return
    if mode == "stop":
        await _drive_stop(url, n, pid)
        return
    if mode == "churn":
        await _drive_churn(url, n, pid)
        return
    if mode in ("rate-paced", "rate-lease", "rate-default"):
        lease = {"rate-paced": 0.0, "rate-lease": 0.1}.get(mode, DEFAULT)
        await _drive_paced(url, n, pid, lease)
        return
    if mode in ("concurrency-paced", "concurrency-kept"):
        await _drive_held(url, n, pid, keep_s if mode == "concurrency-kept" else 0.0, *fleet)
        return
    limits: dict[str, Any] = (
        {"rate": 1e6, "burst": 1e6} if mode == "rate" else {"concurrency": 100_000}
    )
    if mode == "concurrency":
        limits["keep_slots_s"] = 0.0  # the scripts' per-request path
    elif mode == "concurrency-default":
        mode = "concurrency"  # (the setting unset: kept slots at their default T)
    # A part counted alone waits for callgrind_control around each call (a second or so):
    # the scripts are given a clock of their own, a millisecond a call, so the calls find
    # what they would at full speed (no window roll, recount or TTL refresh due each call).
    now = None
    if part != "both":
        # (Key TTLs run on Redis's own clock: waits long enough that none lapses meanwhile.)
        limits["max_wait_s"] = dict.fromkeys(("critical", "high", "normal", "low"), 900)
        calls = itertools.count()
        start = time.time()

        def now() -> float:
            return start + next(calls) / 1000

    backend = RedisBackend(settings(url, f"i{mode}{held}", **limits), now=now)
    await backend.start()
    for i in range(held):
        await backend.acquire(Request(f"held{i}", f"holder{i % 16}"))  # kept in flight
    for i in range(200):  # warm up: the library loaded, tenants made
        await admit_one(backend, f"t{i % 8}")
    _control(pid, "-z")
    if part != "both":
        # Slowed down by callgrind_control, the heartbeat would renew every lease (a call
        # of its own, ZMSCORE of all held) during the counted calls: it is stopped (the
        # leases run on the clock above: none lapses meanwhile).
        for task in (backend._renewer, backend._learning_task):
            if task is not None:
                task.cancel()
        for i in range(n):
            await _admit_part(backend, f"t{i % 8}", part, pid)
        await backend.stop()
        return
    _control(pid, "-i", "on")
    for i in range(n):
        await admit_one(backend, f"t{i % 8}")
    _control(pid, "-i", "off")
    await backend.stop()


def measure(
    binary: str,
    mode: str,
    n: int,
    held: int,
    out: Path,
    part: str = "both",
    keep_s: float | None = 1.0,
    fleet: tuple[int, int | str] = (4, 16),
) -> tuple[int, int]:
    """Instructions per admission of one scenario, with its own redis-server, and of
    them, those inside the script calls (fcallCommand or evalShaCommand, inclusive)."""
    port = free_port()
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    redis_args = ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(
        [*valgrind, binary, *redis_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host=HOST, port=port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        url = f"redis://{HOST}:{port}/0"
        asyncio.run(_drive(url, mode, n, held, server.pid, part, keep_s, fleet))
    finally:
        server.terminate()
        server.wait()
    totals = re.search(r"^totals:\s*(\d+)", out.read_text(), re.M)
    assert totals is not None, out
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(out)], capture_output=True, text=True
    ).stdout
    calls = re.findall(r"^\s*([\d,]+) \(.*:(?:fcallCommand|evalShaCommand) ", annotated, re.M)
    inside = sum(int(call.replace(",", "")) for call in calls)
    return int(totals.group(1)) // n, inside // n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="admissions counted")
    parser.add_argument("--held", type=int, default=120, help="concurrency-held: in flight")
    parser.add_argument("--scenarios", default="rate,concurrency,concurrency-held")
    parser.add_argument("--redis-server", default=str(redis_server_binary()))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument(
        "--part",
        choices=("both", "acquire", "release"),
        default="both",
        help="count an admission's acquire or release only (concurrency scenarios)",
    )
    parser.add_argument(
        "--keep-s",
        type=_keep,
        default=1.0,
        help="concurrency-kept: THROTTLE_KEEP_SLOTS (seconds, or default: unset)",
    )
    parser.add_argument(
        "--slots-procs", type=int, default=4, help="concurrency-paced/-kept: processes"
    )
    parser.add_argument(
        "--slots-limit",
        type=_limit,
        default=16,
        help="concurrency-paced/-kept: THROTTLE_CONCURRENCY (a number, or auto)",
    )
    args = parser.parse_args(argv)
    scenarios = args.scenarios.replace("peers", ",".join(peerredis.PEERS)).split(",")
    leaseless = [s for s in scenarios if s not in ("concurrency", "concurrency-held")]
    if args.part != "both" and leaseless:
        parser.error(f"--part {args.part} counts a lease's calls: not for {', '.join(leaseless)}")
    print(f"# {cpu_model()}; {args.redis_server}", flush=True)
    ours: dict[str, int] = {}
    for scenario in scenarios:
        mode, held = scenario, 0
        if scenario == "concurrency-held":
            mode, held = "concurrency", args.held
        suffix = "" if args.part == "both" else f".{args.part}"
        out = args.out / f"callgrind.redis.{scenario}{suffix}"
        fleet = (args.slots_procs, args.slots_limit)
        per, inside = measure(
            args.redis_server, mode, args.n, held, out, args.part, args.keep_s, fleet
        )
        ratios = ""
        if scenario in peerredis.PEERS:
            ratios = "".join(f", {name} / this {ours[name] / per:.2f}" for name in ours)
        elif scenario in ("rate", "concurrency") and args.part == "both":
            ours[scenario] = per
        what = "admission" if args.part == "both" else args.part
        print(
            f"{scenario:18} {per:,} instructions/{what}, {inside:,} in the script call"
            f"{ratios}  ({out})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
