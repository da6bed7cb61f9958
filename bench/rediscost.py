"""Redis CPU per admission, measured by Redis itself, with `RedisBackend` driven directly.

    python bench/rediscost.py --json bench/results/rediscost.json

One private redis-server (no persistence, pinned to ``--redis-cpu``); the driver is
this process, on the other CPU, calling `RedisBackend.acquire` / `release` as the
middleware does (no HTTP: what is measured is Redis's side). Per scenario, from
deltas of Redis's own counters over the measured stretch:

- ``cpu_us``: ``INFO cpu`` used_cpu_sys + used_cpu_user per admission: everything
  Redis spent (script, commands, sockets, the backend's heartbeats and grant reads);
- ``usec_per_call``: ``INFO commandstats`` of FCALL/EVALSHA: Redis's time inside
  one script call; ``calls``: script calls per admission;
- ``slow``: SLOWLOG entries over 1 ms (``slowlog-log-slower-than 1000``) and the
  longest, in microseconds; with ``--every-call``, every command is logged (SLOWLOG
  at 0 us) and ``slow`` counts the script calls over 1 ms, with the script calls'
  durations at the 50th, 90th and 99th percentiles (``call_us_p50`` ...): how long
  a call takes, not only how many crossed 1 ms. In ``churn`` and ``queue-256`` each
  batch call is also paired with its work, the operations it took (its reply: those not
  answered "deferred") out of those sent: ``taken_p50`` / ``taken_max`` over all calls,
  and ``slow_calls``, each call over 1 ms as [microseconds, taken, sent], so a call slow
  for its work shows apart from one slow with a usual amount of it (Redis off its core).
  ``--redis-fifo`` runs redis-server at real-time priority (SCHED_FIFO; root): no
  other process on the machine takes its CPU from it mid-call, as a Redis with a core
  of its own would have it; what is still over 1 ms then is the call's own doing.

Scenarios:

- ``rate`` / ``concurrency``: one request at a time (unbatched: one script call per
  acquire and, with concurrency, one per release): ``rate`` runs with the default
  settings, which for a rate alone lease rate tokens (``THROTTLE_RATE_LEASE`` unset:
  ``auto``; ``local``: the share admitted from the lease), and ``rate-exact`` with
  ``THROTTLE_RATE_LEASE=0`` (one script call per acquire: what ``rate`` measured before
  leases were the default); ``concurrency`` runs with kept slots off,
  ``THROTTLE_KEEP_SLOTS=0``, so it measures the scripts' per-request path;
  ``concurrency`` with ``--held`` other leases in flight all along; and
  ``concurrency-default``: the same loop with the default settings (kept slots at their
  default T: most admissions make no call). Every other scenario runs without leases of
  rate tokens unless it says so;
- ``rate-batched`` / ``concurrency-batched``: 64 requests at once in one process;
- ``saturated-N``: a budget of 50/s with N tenants waiting (N in ``--tenants``):
  each tenant's request, once granted, is replaced by another of the same tenant;
- ``churn``: a new tenant id per request, 512 at once, within the budget;
- ``queue-256``: 256 acquires of distinct tenants queueing at once on an empty bucket;
- ``stop``: ``backend.stop()`` with ``--stop-waiters`` requests waiting (seconds);
- ``lease``: ``rate-paced`` and ``rate-lease``: ``--lease-procs`` backends (processes of
  a fleet, each with its own connections) on one rate budget, each sending one request
  at a time at ``--lease-pace`` per second (unbatched), without and with leases of rate
  tokens (``THROTTLE_RATE_LEASE=--lease-s``), and ``rate-auto`` with
  ``THROTTLE_RATE_LEASE=auto``; ``quiet-paced`` and ``quiet-auto``: the same at
  ``--quiet-pace`` per second (a process too quiet for ``auto`` to lease) for
  ``--quiet-s`` seconds; ``local``: the share admitted from the pools; the heartbeats'
  calls are counted in all;
- ``slots``: ``concurrency-paced`` and ``concurrency-kept``: ``--slots-procs`` backends
  on one concurrency budget of ``--slots-limit``, each with two requests at a time
  (each holds its slot ``--slots-hold`` seconds, then the next comes after the pace's
  gap) at ``--slots-pace`` per second per process, without and with kept slots
  (``THROTTLE_KEEP_SLOTS=--keep-s``; ``default``: the setting unset); ``local``: the
  share admitted from kept slots; ``--slots-limit auto``: a learned limit (at its
  initial value: no app here to learn from; with ``--slots-learn`` each request is timed
  and counted in flight as the middleware does, so the limit learns from them, for at
  least ``--slots-warm-s`` of warm-up; ``learned``: the limit in force at the end and the
  last step's reason; ``learned_path``: each limit it took over the measured run, in
  order); the processes start spread evenly over a period (``--slots-together``: all at
  once, as before ``conc4``; it did not move the figures); ``--slots-min``: a learned
  limit's floor, ``THROTTLE_CONCURRENCY_MIN`` (it starts there); ``slots-kept``:
  ``concurrency-kept`` alone; ``--by-command``: each command's calls and Redis
  microseconds per admission (``INFO commandstats``);
- ``floor``: the harness's floor, one call at a time from redis-py as the backend calls:
  ``floor-ping`` (PING) and ``floor-nop`` (FCALL of a function that does nothing, with
  the arguments of a rate admission's call): what a round trip costs Redis whatever the
  script does (the socket, the event loop, the kernel), to set against ``rate``;
  ``floor-cmds-16`` / ``floor-cmds-28``: FCALL of a function that runs 16 / 28 commands
  of the kinds a saturated call runs, with its numbers formatted and read back, and no
  scheduler around them (``usec_per_call`` against ``saturated-*``'s);
- ``busy``: the machine's own floor for item 4's "no call over 1 ms": ``--n`` calls of a
  function whose work is fixed (Lua making strings and tables, as the scheduler does),
  sized to last as long as a churn call (``--busy-us``, some 500 us: calls are bounded
  there, ``TUNING.WORK_US``); ``slow`` counts those over 1 ms, which no scheduler rule
  can have caused (with ``--redis-fifo``, nor another process on Redis's CPU);
- ``peers``: each peer library's own Redis limiting code (`bench/peerredis.py`), one
  admission at a time as ``rate``; ``commands``: Redis commands per admission (all of
  them, not only scripts); ``vs_rate`` / ``vs_concurrency``: ``rate``'s and
  ``concurrency``'s ``cpu_us`` over the peer's, when they ran in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench import peerredis
from throttle_mw.backends.base import Admitted, Waiting
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.scheduler import Request
from throttle_mw.scheduler.limit import Sample
from throttle_mw.settings import Settings

_SCRIPT_COMMANDS = ("fcall", "evalsha", "eval")
#: SLOWLOG entries kept with ``--every-call`` (a churn run of 80,000 admissions logs some
#: 320,000: the 200,000 kept before lost a third of its calls).
_LOGGED = 2_000_000
_ids = itertools.count()


def _rid() -> str:
    return f"b{next(_ids)}"


#: Lone releases (release.lua's calls) by how they went, with ``--release-paths``: "lean"
#: (fast.lua's lean_release: the one-line reply) or "full" (batch.lua in the same call).
RELEASES: collections.Counter[str] = collections.Counter()


def count_release_paths() -> None:
    """Count each lone release's path in `RELEASES` (``--release-paths``): the backend's
    script call wrapped, its reply read."""
    plain = RedisBackend._call

    async def call(self: RedisBackend, ops: Sequence[Any], retry: bool) -> list[str]:
        reply = await plain(self, ops, retry)
        if protocol.lone_release(ops) is not None:
            RELEASES["lean" if len(reply) == 1 else "full"] += 1
        return reply

    RedisBackend._call = call  # type: ignore[method-assign]


class Counters:
    """Redis's own counters, sampled before and after a measured stretch."""

    #: Log every command (``--every-call``), not only those over 1 ms.
    every_call = False
    #: Also count each command apart (``--by-command``): its calls and Redis's us.
    by_command = False

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        #: The script calls' durations by percentile (``--every-call``).
        self.percentiles: dict[str, Any] = {}
        #: Each batch call's [taken, sent] in order (``--every-call``; `track_calls`).
        self.calls: list[list[int]] | None = None

    def sample(self) -> dict[str, float]:
        info = self.client.info("all")
        calls = usec = commands = 0.0
        for name in _SCRIPT_COMMANDS:
            stat = info.get(f"cmdstat_{name}")
            if stat:
                calls += float(stat["calls"])
                usec += float(stat["usec"])
        each: dict[str, float] = {}
        for key, stat in info.items():  # every command, the harness's INFO included
            if key.startswith("cmdstat_"):
                commands += float(stat["calls"])
                if self.by_command:
                    each[f"{key[8:]}:calls"] = float(stat["calls"])
                    each[f"{key[8:]}:usec"] = float(stat["usec"])
        return {
            "cpu_s": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            "calls": calls,
            "usec": usec,
            "commands": commands,
            **each,
        }

    def reset_slowlog(self) -> None:
        every = self.every_call
        self.client.config_set("slowlog-log-slower-than", 0 if every else 1000)
        # (Every command: Redis 7 logs those a script runs too, some 4 an admission.)
        self.client.config_set("slowlog-max-len", _LOGGED if every else 10_000)
        self.client.slowlog_reset()
        if self.calls is not None:
            self.calls.clear()

    def slow(self) -> tuple[int, int]:
        if not self.every_call:
            entries = self.client.slowlog_get(10_000)
            return len(entries), max((int(e["duration"]) for e in entries), default=0)
        entries = self.client.slowlog_get(_LOGGED)
        durations = sorted(
            int(e["duration"])
            for e in entries
            if bytes(e["command"]).split(b" ", 1)[0].lower().decode() in _SCRIPT_COMMANDS
        )
        if self.calls:
            self._pair(entries)
        if durations:
            for p in (50, 90, 99):
                index = min(len(durations) - 1, len(durations) * p // 100)
                self.percentiles[f"call_us_p{p}"] = durations[index]
        return sum(1 for d in durations if d > 1000), max(durations, default=0)

    def _pair(self, entries: list[dict[str, Any]]) -> None:
        """Each batch FCALL's duration with the work its reply tells (`track_calls`): the
        backend's batch calls are one at a time, in the order the slowlog numbers them."""
        assert self.calls is not None
        batch = [
            int(e["duration"])
            for e in sorted(entries, key=lambda e: int(e["id"]))
            if _is_batch_call(bytes(e["command"]))
        ]
        if len(batch) != len(self.calls):  # (calls cut off the log: nothing to pair)
            self.percentiles["paired"] = f"{len(batch)} logged, {len(self.calls)} made"
            return
        self.percentiles["paired"] = len(batch)
        taken = sorted(t for t, _ in self.calls)
        self.percentiles["taken_p50"] = taken[len(taken) // 2]
        self.percentiles["taken_max"] = taken[-1]
        self.percentiles["slow_calls"] = [
            [d, t, n] for d, (t, n) in zip(batch, self.calls, strict=True) if d > 1000
        ]


def _is_batch_call(command: bytes) -> bool:
    words = command.split(b" ", 2)
    return len(words) > 1 and words[0].lower() == b"fcall" and words[1].endswith(b"_batch")


def track_calls(backend: RedisBackend, counters: Counters) -> None:
    """Record each batch call's operations taken and sent into ``counters.calls``."""
    if not counters.every_call or backend._batcher is None:
        return
    from throttle_mw.backends.redis.protocol import DEFERRED

    calls: list[list[int]] = []
    counters.calls = calls
    batcher = backend._batcher
    inner = backend._call  # (the batcher's, and the backend's own calls of one operation)

    async def call(ops: Any, retry: bool) -> list[str]:
        results = await inner(ops, retry)
        taken = sum(1 for r in results[: len(ops)] if r != DEFERRED)
        calls.append([taken, len(ops)])
        return results

    batcher._call = call
    backend._call = call  # type: ignore[method-assign]


#: ``rate_lease_s`` left unset (`settings`): the library's default, leases of rate tokens
#: (``auto``) for a rate alone.
DEFAULT = object()


def settings(url: str, prefix: str, **overrides: Any) -> Settings:
    """The scenarios' settings. Every scenario measures the exact per-request path (no
    leases of rate tokens, ``rate_lease_s`` = 0) unless it names its own ``rate_lease_s``;
    `DEFAULT` leaves it unset (for a rate alone: ``auto``)."""
    base: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": prefix,
        "failure_mode": "closed",
        "redis_timeout_s": 5.0,
        "rate_lease_s": 0.0,
    }
    base.update(overrides)
    if base["rate_lease_s"] is DEFAULT:
        del base["rate_lease_s"]
    return Settings.from_env({}, **base)


async def admit_one(backend: RedisBackend, tenant: str) -> None:
    """One request, start to finish: acquire, wait if queued, release its lease."""
    rid = _rid()
    outcome = await backend.acquire(Request(rid, tenant))
    if isinstance(outcome, Waiting):
        outcome = await outcome.future
    if isinstance(outcome, Admitted) and outcome.lease:
        backend.release(rid)
        # Let the release go out in its own call (a real next request arrives later).
        for _ in range(3):
            await asyncio.sleep(0)
    elif not isinstance(outcome, Admitted):
        raise RuntimeError(f"not admitted: {outcome!r}")


async def measure(
    counters: Counters, admitted: Callable[[], int], work: Awaitable[None]
) -> dict[str, Any]:
    counters.reset_slowlog()
    released0 = RELEASES.copy()
    before, n0, t0 = counters.sample(), admitted(), time.perf_counter()
    await work
    after, n1, t1 = counters.sample(), admitted(), time.perf_counter()
    released = RELEASES - released0
    paths = {f"releases_{k}": released[k] for k in ("lean", "full")} if RELEASES else {}
    n = max(1, n1 - n0)
    calls = after["calls"] - before["calls"]
    slow, longest = counters.slow()
    each = {
        key: round((after[key] - before.get(key, 0.0)) / n, 4)
        for key in after
        if ":" in key and after[key] != before.get(key, 0.0)
    }
    # (Per admission: each command's calls, and Redis's microseconds inside it.)
    by_command = {"by_command": each} if each else {}
    return {
        "admissions": n1 - n0,
        "seconds": round(t1 - t0, 2),
        "cpu_us": round(1e6 * (after["cpu_s"] - before["cpu_s"]) / n, 1),
        "calls": round(calls / n, 3),
        # Less the first sample's INFO, counted once it has run.
        "commands": round((after["commands"] - before["commands"] - 1) / n, 3),
        "usec_per_call": round((after["usec"] - before["usec"]) / max(1.0, calls), 1),
        "slow": slow,
        "longest_us": longest,
        **counters.percentiles,
        **by_command,
        **paths,
    }


async def unbatched(
    url: str,
    mode: str,
    n: int,
    held: int,
    lease: object = DEFAULT,
    keep_s: float | None = 0.0,
) -> dict[str, Any]:
    """One request at a time: with a rate, leases `lease` (`DEFAULT`: unset, the default);
    with concurrency, kept slots `keep_s` (None: unset, the default; 0: off, each
    admission an acquire and a release in Redis)."""
    limits: dict[str, Any] = (
        {"rate": 1e6, "burst": 1e6} if mode == "rate" else {"concurrency": 100_000}
    )
    if mode != "rate" and keep_s is not None:
        limits["keep_slots_s"] = keep_s
    prefix = f"u{mode}" if lease is DEFAULT else f"u{mode}{lease}"
    backend = RedisBackend(settings(url, f"{prefix}{keep_s}", rate_lease_s=lease, **limits))
    await backend.start()
    for i in range(held if mode == "concurrency" else 0):
        await backend.acquire(Request(_rid(), f"holder{i % 16}"))  # kept in flight
    done = 0

    async def loop() -> None:
        nonlocal done
        for i in range(n):
            await admit_one(backend, f"t{i % 8}")
            done += 1

    for i in range(200):  # warm up: scripts loaded, keys made
        await admit_one(backend, f"t{i % 8}")
    pool = backend.rate_lease
    local0 = pool.local_admissions if pool is not None else 0
    result = await measure(Counters(redis.Redis.from_url(url)), lambda: done, loop())
    if pool is not None:  # the share admitted from leases of rate tokens
        result["local"] = round((pool.local_admissions - local0) / max(1, n), 3)
    await backend.stop()
    return result


def _paced_fleet(
    url: str, prefix: str, procs: int, pace: float, lease_s: object
) -> tuple[list[RedisBackend], Callable[[int], Awaitable[None]], Callable[[], int]]:
    """`procs` backends on one budget of 1e6/s (burst 1e6: nobody ever waits) and a run
    of `n` admissions each, one at a time at `pace` per second each (a slot missed is not
    made up for later); the third: admissions so far."""
    backends = [
        RedisBackend(settings(url, prefix, rate=1e6, burst=1e6, rate_lease_s=lease_s))
        for _ in range(procs)
    ]
    done = 0

    async def one(backend: RedisBackend, n: int) -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        at = loop.time()
        for i in range(n):
            await admit_one(backend, f"t{i % 8}")
            done += 1
            at = max(at + 1.0 / pace, loop.time())
            await asyncio.sleep(at - loop.time())

    async def run(n: int) -> None:
        await asyncio.gather(*(one(b, n) for b in backends))

    return backends, run, lambda: done


def _held_fleet(
    url: str,
    prefix: str,
    procs: int,
    pace: float,
    hold_s: float,
    limit: int | str,
    keep_s: float | None,
    learn: bool = False,
    together: bool = False,
    minimum: int | None = None,
) -> tuple[list[RedisBackend], Callable[[int], Awaitable[None]], Callable[[], int]]:
    """`procs` backends on one concurrency budget of `limit` (or ``auto``) and a run of
    `n` admissions each, two requests at a time per process, each holding its slot
    `hold_s` seconds, at `pace` per second per process in all (a slot missed is not made
    up for later); kept slots `keep_s` (None: the setting unset); `learn`: each request
    is timed and counted in flight as the middleware does (a learned limit learns from
    them); the third: admissions so far. Process p starts p / `procs` of its period
    (1 / `pace`) after process 0, so the fleet's requests come evenly spread, as
    independent processes' do; `together`: every process at the same instant (their
    requests fire at once, `procs` at a time: before `conc4`, the only way); `minimum`:
    a learned limit's floor (``THROTTLE_CONCURRENCY_MIN``; it starts there if above 4)."""
    keep: dict[str, Any] = {} if keep_s is None else {"keep_slots_s": keep_s}
    if minimum is not None:
        keep["concurrency_min"] = minimum
    backends = [
        RedisBackend(settings(url, prefix, concurrency=limit, **keep)) for _ in range(procs)
    ]
    done = 0

    async def one(backend: RedisBackend, n: int, w: int, p: int) -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        at = loop.time() + w / pace
        if not together:
            at += p / (procs * pace)
            await asyncio.sleep(at - loop.time())
        for i in range(n):
            rid = _rid()
            outcome = await backend.acquire(Request(rid, f"t{(2 * i + w) % 8}"))
            queued = False  # the middleware's `Sample.waited`
            if isinstance(outcome, Waiting):
                queued = True
                outcome = await outcome.future
            if not isinstance(outcome, Admitted):
                raise RuntimeError(f"not admitted: {outcome!r}")
            if learn:  # as the middleware brackets a learning request
                began = time.perf_counter()
                running = backend.flight.admit(began)
            await asyncio.sleep(hold_s)
            if learn:
                ended = time.perf_counter()
                backend.flight.finish(ended)
                backend.observe(Sample(ended - began, False, running, queued))
            if outcome.lease:
                backend.release(rid)
            done += 1
            at = max(at + 2.0 / pace, loop.time())
            await asyncio.sleep(at - loop.time())

    async def run(n: int) -> None:
        await asyncio.gather(
            *(one(b, n // 2, w, p) for p, b in enumerate(backends) for w in range(2))
        )

    return backends, run, lambda: done


async def held(
    url: str,
    n: int,
    procs: int,
    pace: float,
    hold_s: float,
    limit: int | str,
    keep_s: float | None,
    learn: bool = False,
    warm_s: float = 0.0,
    together: bool = False,
    minimum: int | None = None,
) -> dict[str, Any]:
    """The ``slots`` scenario: see the module docstring."""
    prefix = f"slots{keep_s}{'l' if learn else ''}{'t' if together else ''}{minimum or ''}"
    backends, run, admitted = _held_fleet(
        url, prefix, procs, pace, hold_s, limit, keep_s, learn, together, minimum
    )
    for backend in backends:
        await backend.start()
    # Warm up: the library loaded, tenants made, pools filled (a learned limit: learning).
    await run(max(50, n // 10, int(warm_s * pace * procs)))
    local0 = sum(b.kept_slots.local_admissions for b in backends if b.kept_slots is not None)
    n0 = admitted()
    seen: list[int] = []  # the learned limit in force, every 0.25 s of the measured run

    async def watch() -> None:
        while True:
            state = backends[0].learned
            if state is not None and (not seen or seen[-1] != state.in_force):
                seen.append(state.in_force)
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch()) if limit == "auto" else None
    result = await measure(Counters(redis.Redis.from_url(url)), admitted, run(n))
    if watcher is not None:
        watcher.cancel()
        result["learned_path"] = seen  # each value it took, in order
    pools = [b.kept_slots for b in backends if b.kept_slots is not None]
    if pools:
        local = sum(p.local_admissions for p in pools) - local0
        result["local"] = round(local / max(1, admitted() - n0), 3)
    if limit == "auto":  # the learned limit in force at the end, and why
        state = backends[0].learned
        result["learned"] = None if state is None else [state.in_force, state.reason]
    for backend in backends:
        await backend.stop()
    return result


async def paced(url: str, n: int, procs: int, pace: float, lease_s: float | str) -> dict[str, Any]:
    """The ``lease`` scenario: see the module docstring."""
    prefix = f"lease{lease_s}p{pace}"
    backends, run, admitted = _paced_fleet(url, prefix, procs, pace, lease_s)
    for backend in backends:
        await backend.start()
    await run(max(50, n // 10))  # warm up: the library loaded, tenants made, leases sized
    result = await measure(Counters(redis.Redis.from_url(url)), admitted, run(n))
    pools = [b.rate_lease for b in backends if b.rate_lease is not None]
    if pools:
        local = sum(p.local_admissions for p in pools)
        result["local"] = round(local / max(1, sum(p.requests for p in pools)), 3)
        result["lease_calls"] = sum(p.calls for p in pools)
    for backend in backends:
        await backend.stop()
    return result


async def batched(url: str, mode: str, n: int, width: int) -> dict[str, Any]:
    limits = {"rate": 1e6, "burst": 1e6} if mode == "rate" else {"concurrency": 100_000}
    backend = RedisBackend(settings(url, f"b{mode}", **limits))
    await backend.start()
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        for _ in range(n // width):
            await admit_one(backend, f"t{w % 8}")
            done += 1

    async def run() -> None:
        await asyncio.gather(*(worker(w) for w in range(width)))

    await run()  # warm up
    result = await measure(Counters(redis.Redis.from_url(url)), lambda: done, run())
    await backend.stop()
    return result


async def saturated(url: str, tenants: int, seconds: float) -> dict[str, Any]:
    backend = RedisBackend(
        settings(
            url,
            f"s{tenants}",
            rate=50.0,
            burst=5.0,
            max_wait_s={"critical": 900, "high": 900, "normal": 900, "low": 900},
            queue_limit=max(1000, 2 * tenants),
            tenant_queue_limit=10,
            max_tenants=max(10_000, 2 * tenants),
        )
    )
    await backend.start()
    done = 0
    stop = asyncio.Event()

    async def tenant(i: int) -> None:
        nonlocal done
        while not stop.is_set():
            await admit_one(backend, f"sat{i}")
            done += 1

    tasks = [asyncio.create_task(tenant(i)) for i in range(tenants)]
    await asyncio.sleep(3.0)  # everyone queued; the budget saturated
    result = await measure(
        Counters(redis.Redis.from_url(url)), lambda: done, asyncio.sleep(seconds)
    )
    stop.set()
    for task in tasks:  # before stop(): a task's next acquire would start it again
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await backend.stop()
    return result


async def churn(url: str, n: int, width: int) -> dict[str, Any]:
    backend = RedisBackend(settings(url, "churn", rate=1e6, burst=1e6))
    await backend.start()
    done = 0
    fresh = itertools.count()

    async def worker() -> None:
        nonlocal done
        for _ in range(n // width):
            await admit_one(backend, f"new{next(fresh)}")
            done += 1

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(width)))

    await run()  # warm up: the tenant set fills to its bound
    counters = Counters(redis.Redis.from_url(url))
    track_calls(backend, counters)
    result = await measure(counters, lambda: done, run())
    await backend.stop()
    return result


async def queue_at_once(url: str, width: int, rounds: int) -> dict[str, Any]:
    backend = RedisBackend(
        settings(url, "q256", rate=100.0, burst=1.0, queue_limit=10_000, max_tenants=100_000)
    )
    await backend.start()
    counters = Counters(redis.Redis.from_url(url))
    track_calls(backend, counters)
    queued = 0

    async def one(i: int) -> None:
        nonlocal queued
        rid = _rid()
        outcome = await backend.acquire(Request(rid, f"q{i}"))
        if isinstance(outcome, Waiting):
            queued += 1
            await backend.cancel(outcome)

    async def run() -> None:
        for r in range(rounds):
            await asyncio.gather(*(one(r * width + i) for i in range(width)))

    result = await measure(counters, lambda: queued, run())
    await backend.stop()
    return result


async def stop_with_waiters(url: str, waiters: int) -> dict[str, Any]:
    backend = RedisBackend(
        settings(
            url,
            "stop",
            rate=100.0,
            burst=1.0,
            queue_limit=2 * waiters,
            tenant_queue_limit=waiters,
            max_tenants=2 * waiters,
            max_wait_s={"critical": 900, "high": 900, "normal": 900, "low": 900},
        )
    )
    await backend.start()
    outcomes = await asyncio.gather(
        *(backend.acquire(Request(_rid(), f"w{i % 1000}")) for i in range(waiters))
    )
    counters = Counters(redis.Redis.from_url(url))
    counters.reset_slowlog()
    before = counters.sample()
    started = time.perf_counter()
    await backend.stop()
    elapsed = time.perf_counter() - started
    after = counters.sample()
    slow, longest = counters.slow()
    return {
        "waiting": sum(isinstance(o, Waiting) for o in outcomes),
        "stop_s": round(elapsed, 3),
        "calls": after["calls"] - before["calls"],
        "usec_per_call": round(
            (after["usec"] - before["usec"]) / max(1.0, after["calls"] - before["calls"]), 1
        ),
        "cpu_ms": round(1000 * (after["cpu_s"] - before["cpu_s"]), 1),
        "slow": slow,
        "longest_us": longest,
        **counters.percentiles,
    }


#: A function library for the ``floor`` scenario: one function that does nothing, and one
#: that runs ARGV[1] commands of the kinds a saturated call runs (a waiter's ZADD at a
#: 17-digit score, a queue's head, a tenant's HSET of three 17-digit numbers and its
#: 12-field HMGET read into a table) on keys named as the budget's are, with no more Lua
#: around them than that: what the commands cost by themselves, against a saturated
#: call's whole (issue 14, item 3).
NOP_LIBRARY = """#!lua name=throttle_nop
redis.register_function('throttle_nop', function() return 1 end)
redis.register_function('throttle_cmds', function(keys, args)
  local fmt, n, p = string.format, tonumber(args[1]), keys[1]
  local now = 1733500000.123456 + tonumber(args[2])
  for i = 1, n do
    local h = fmt('%016x', i * 2654435761 % 4294967296)
    local kind = i % 4
    if kind == 0 then
      redis.call('ZADD', p .. ':q:' .. h, fmt('%.17g', now + i / 7), 'w' .. i)
    elseif kind == 1 then
      local head = redis.call('ZRANGE', p .. ':q:' .. h, 0, 0, 'WITHSCORES')
      if head[2] then now = now + tonumber(head[2]) * 0 end
    elseif kind == 2 then
      redis.call('HSET', p .. ':t:' .. h, 'f', fmt('%.17g', now / 3), 'cap',
        fmt('%.17g', now / 5), 'cap_at', fmt('%.17g', now))
    else
      local v = redis.call('HMGET', p .. ':t:' .. h, 'f', 'cap', 'cap_at', 'w', 'st',
        'name', 'xp', 'a', 'b', 'c', 'd', 'e')
      local t = {f = tonumber(v[1]) or 0, cap = tonumber(v[2]) or 0,
        cap_at = tonumber(v[3]) or 0, w = tonumber(v[4]) or 1, name = v[6]}
      now = now + t.f * 0
    end
  end
  return 1
end)
redis.register_function('throttle_busy', function(keys, args)
  local parts = {}
  for i = 1, tonumber(args[1]) do
    parts[i % 64 + 1] = {string.format('%.17g', i / 7), tostring(i)}
  end
  return #parts
end)
"""

#: The command counts the ``floor`` scenario's ``cmds-<n>`` runs: a saturated tick's 16
#: and a tick with its acquire's 28 (tests/test_redis_cost.py pins 18 and 12, each with
#: the test's own ``DEL``).
FLOOR_COMMANDS = (16, 28)


async def floor(url: str, n: int) -> dict[str, dict[str, Any]]:
    """PING, FCALL of a do-nothing function with a rate admission's arguments, and of
    one that runs a saturated call's commands with the least Lua (`NOP_LIBRARY`)."""
    import redis.asyncio

    from throttle_mw.backends.redis import protocol

    backend = RedisBackend(settings(url, "floor", rate=1e6, burst=1e6))
    op = protocol.acquire_op("b0", protocol.acquire_tail(Request("b0", "t0"), 1.0, 5.0))
    args = protocol.call_args(backend._static, "", [op], "")
    client = redis.asyncio.Redis.from_url(url)
    await client.function_load(NOP_LIBRARY, replace=True)
    counters = Counters(redis.Redis.from_url(url))
    done = 0

    async def loop(call: Callable[[], Awaitable[Any]]) -> None:
        nonlocal done
        for _ in range(n):
            await call()
            done += 1

    def nop() -> Awaitable[Any]:
        return client.fcall("throttle_nop", 1, backend._keys.state, *args)

    def commands(count: int) -> Callable[[], Awaitable[Any]]:
        return lambda: client.fcall("throttle_cmds", 1, "{floor}", count, done % 50)

    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [("ping", client.ping), ("nop", nop)]
    calls += [(f"cmds-{count}", commands(count)) for count in FLOOR_COMMANDS]
    out = {}
    for name, call in calls:
        for _ in range(200):
            await call()
        out[name] = await measure(counters, lambda: done, loop(call))
    await client.function_delete("throttle_nop")
    await client.aclose()
    return out


async def busy(url: str, n: int, target_us: float) -> dict[str, Any]:
    """`n` calls of fixed work lasting some `target_us` (sized on calls before): how
    many a machine stretches past 1 ms, whatever the work is."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    await client.function_load(NOP_LIBRARY, replace=True)
    counters = Counters(redis.Redis.from_url(url))
    size, done = 1000, 0

    async def loop(calls: int) -> None:
        nonlocal done
        for _ in range(calls):
            await client.fcall("throttle_busy", 0, size)
            done += 1

    for _ in range(2):  # twice: the first calls run cold
        sized = await measure(counters, lambda: done, loop(200))
        size = max(1, round(size * target_us / sized["usec_per_call"]))
    out = {"size": size, **await measure(counters, lambda: done, loop(n))}
    await client.function_delete("throttle_nop")
    await client.aclose()
    return out


async def peer(url: str, name: str, n: int, counters: Counters) -> dict[str, Any]:
    """One peer's Redis limiting code, one admission at a time (`bench/peerredis.py`)."""
    async with peerredis.peer(name, url) as admit:
        done = 0

        async def loop() -> None:
            nonlocal done
            for i in range(n):
                await admit(f"t{i % 8}")
                done += 1

        for i in range(200):  # warm up: scripts loaded, keys made
            await admit(f"t{i % 8}")
        return await measure(counters, lambda: done, loop())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


async def main_async(args: argparse.Namespace, url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = set(args.scenarios.split(","))

    async def run(name: str, coro: Awaitable[dict[str, Any]]) -> None:
        out[name] = await coro
        print(f"{name:22} {json.dumps(out[name])}", flush=True)

    if "floor" in wanted:
        for name, figures in (await floor(url, args.n)).items():
            out[f"floor-{name}"] = figures
            print(f"{'floor-' + name:22} {json.dumps(figures)}", flush=True)
    if "busy" in wanted:
        await run("busy", busy(url, args.n, args.busy_us))
    if "rate" in wanted:
        # The default settings (for a rate alone, leases of rate tokens: auto), and the
        # exact per-request path (THROTTLE_RATE_LEASE=0; `rate` before leases were default).
        await run("rate", unbatched(url, "rate", args.n, 0))
        await run("rate-exact", unbatched(url, "rate", args.n, 0, 0.0))
    if "concurrency" in wanted:
        await run("concurrency", unbatched(url, "concurrency", args.n, 0))
        await run(f"concurrency-held{args.held}", unbatched(url, "concurrency", args.n, args.held))
        await run("concurrency-default", unbatched(url, "concurrency", args.n, 0, keep_s=None))
    if "peers" in wanted:
        for name in peerredis.PEERS:
            figures = await peer(url, name, args.n, Counters(redis.Redis.from_url(url)))
            for ours in ("rate", "concurrency"):
                if ours in out:
                    figures[f"vs_{ours}"] = round(
                        out[ours]["cpu_us"] / max(0.1, figures["cpu_us"]), 2
                    )
            out[name] = figures
            print(f"{name:22} {json.dumps(figures)}", flush=True)
    if "lease" in wanted:
        per = max(1, args.n // args.lease_procs)
        fleet = (args.lease_procs, args.lease_pace)
        await run("rate-paced", paced(url, per, *fleet, 0.0))
        await run("rate-lease", paced(url, per, *fleet, args.lease_s))
        await run("rate-auto", paced(url, per, *fleet, "auto"))
        for name in ("rate-lease", "rate-auto"):
            out[name]["vs_paced"] = round(
                out["rate-paced"]["cpu_us"] / max(0.1, out[name]["cpu_us"]), 1
            )
        quiet = (args.lease_procs, args.quiet_pace)
        per_quiet = max(1, int(args.quiet_pace * args.quiet_s))
        await run("quiet-paced", paced(url, per_quiet, *quiet, 0.0))
        await run("quiet-auto", paced(url, per_quiet, *quiet, "auto"))
    if "slots" in wanted or "slots-kept" in wanted:
        per = max(2, args.n // args.slots_procs)
        slots = (args.slots_procs, args.slots_pace, args.slots_hold, args.slots_limit)
        learn = (args.slots_learn, args.slots_warm_s, args.slots_together, args.slots_min)
        if "slots" in wanted:
            await run("concurrency-paced", held(url, per, *slots, 0.0, *learn))
        await run("concurrency-kept", held(url, per, *slots, args.keep_s, *learn))
        if "slots" in wanted:
            out["concurrency-kept"]["vs_paced"] = round(
                out["concurrency-paced"]["cpu_us"] / max(0.1, out["concurrency-kept"]["cpu_us"]),
                1,
            )
    if "batched" in wanted:
        await run("rate-batched", batched(url, "rate", 8 * args.n, 64))
        await run("concurrency-batched", batched(url, "concurrency", 8 * args.n, 64))
    if "saturated" in wanted:
        for tenants in args.tenants:
            await run(f"saturated-{tenants}", saturated(url, tenants, args.seconds))
    if "churn" in wanted:
        await run("churn", churn(url, 4 * args.n, 512))
    if "queue" in wanted:
        await run("queue-256", queue_at_once(url, 256, 10))
    if "stop" in wanted:
        await run(f"stop-{args.stop_waiters}", stop_with_waiters(url, args.stop_waiters))
    return out


def _limit(raw: str) -> int | str:
    return "auto" if raw == "auto" else int(raw)


def _keep(raw: str) -> float | None:
    return None if raw == "default" else float(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="admissions per unbatched run")
    parser.add_argument("--held", type=int, default=120, help="leases in flight meanwhile")
    parser.add_argument("--tenants", type=int, nargs="+", default=[10, 1000, 10_000])
    parser.add_argument("--seconds", type=float, default=5.0, help="saturated: measured")
    parser.add_argument("--stop-waiters", type=int, default=20_000)
    parser.add_argument(
        "--scenarios", default="rate,concurrency,batched,saturated,churn,queue,stop"
    )
    parser.add_argument("--lease-procs", type=int, default=4, help="lease: processes")
    parser.add_argument(
        "--quiet-pace", type=float, default=10.0, help="lease: quiet-*'s requests/s per process"
    )
    parser.add_argument(
        "--quiet-s", type=float, default=4.0, help="lease: quiet-*'s measured seconds"
    )
    parser.add_argument(
        "--lease-pace", type=float, default=500.0, help="lease: requests/s per process"
    )
    parser.add_argument("--lease-s", type=float, default=0.1, help="lease: THROTTLE_RATE_LEASE")
    parser.add_argument("--slots-procs", type=int, default=4, help="slots: processes")
    parser.add_argument(
        "--slots-pace", type=float, default=500.0, help="slots: requests/s per process"
    )
    parser.add_argument(
        "--slots-hold", type=float, default=0.001, help="slots: seconds each holds its slot"
    )
    parser.add_argument(
        "--slots-limit",
        type=_limit,
        default=16,
        help="slots: THROTTLE_CONCURRENCY (a number, or auto)",
    )
    parser.add_argument(
        "--slots-learn",
        action="store_true",
        help="slots: time each request and count it in flight, as the middleware does",
    )
    parser.add_argument(
        "--slots-min",
        type=int,
        default=None,
        help="slots: THROTTLE_CONCURRENCY_MIN for --slots-limit auto (where it starts)",
    )
    parser.add_argument(
        "--slots-together",
        action="store_true",
        help="slots: start every process at the same instant (default: spread evenly)",
    )
    parser.add_argument(
        "--slots-warm-s",
        type=float,
        default=0.0,
        help="slots: seconds of warm-up at least (a learned limit's time to learn)",
    )
    parser.add_argument(
        "--keep-s",
        type=_keep,
        default=1.0,
        help="slots: THROTTLE_KEEP_SLOTS (seconds, or default: unset)",
    )
    parser.add_argument("--redis-cpu", default="1", help="taskset CPU list for redis-server")
    parser.add_argument(
        "--busy-us", type=float, default=500.0, help="busy: how long each call's fixed work lasts"
    )
    parser.add_argument(
        "--redis-fifo",
        action="store_true",
        help="run redis-server SCHED_FIFO (root): no other process preempts it mid-call",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--every-call",
        action="store_true",
        help="log every command (SLOWLOG at 0 us): the script calls' duration percentiles",
    )
    parser.add_argument(
        "--by-command",
        action="store_true",
        help="also each command's calls and Redis us per admission (INFO commandstats)",
    )
    parser.add_argument(
        "--release-paths",
        action="store_true",
        help="also count lone releases by path: lean (one-line reply) or full (batch.lua)",
    )
    args = parser.parse_args(argv)
    if args.release_paths:
        count_release_paths()
    Counters.every_call = args.every_call
    Counters.by_command = args.by_command
    return run_on_own_redis(args, main_async, "scenarios")


def real_time(pid: int) -> None:
    """Every thread of `pid` to SCHED_FIFO at the lowest real-time priority: on a shared
    machine nothing else preempts it, as on a Redis host with a core of its own."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        raise SystemExit("--redis-fifo needs root (or CAP_SYS_NICE)") from None


def run_on_own_redis(
    args: argparse.Namespace,
    main_async: Callable[[argparse.Namespace, str], Coroutine[Any, Any, Any]],
    key: str,
) -> int:
    """Run `main_async(args, url)` against a redis-server of its own (pinned to
    ``args.redis_cpu``); its figures also go to ``args.json``, under `key`."""
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        if args.redis_cpu:
            os.system(f"taskset -a -p -c {args.redis_cpu} {server.pid} >/dev/null")
        fifo = getattr(args, "redis_fifo", False)
        if fifo:
            real_time(server.pid)
        print(f"# {cpu_model()}; redis {server.binary}{' SCHED_FIFO' if fifo else ''}", flush=True)
        out = asyncio.run(main_async(args, server.url))
    finally:
        server.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_model(), key: out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
