"""One budget for a fleet: uvicorn processes sharing one Redis, over real sockets.

The story of docs/design.md (A 10/s, B 30/s, C 150/s against 80/s) runs open-loop
through four processes in one run with two routings, one after the other:
round-robin, then each tenant pinned to its own processes. Admissions are
counted on the server side, by the wall-clock time at which the app got each
request (every process on this machine shares that clock); waits are measured
from the moment a request was due. The app is cheap on purpose: what is under
test is the shared budget, not a backend's capacity. (Two fleets at once, one
per routing, would halve the run time but double the load on a shared 2-core
machine, and the load generator's own lag then shows up in the p99.)

Also here: priority across processes, a thousand client cancellations that
leave nothing behind in Redis, and a flood of tenant ids that cannot grow Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import re
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from demo_app.loadtest.engine import Phase, Record, Route, Scenario, TenantLoad, run
from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer, start_all, wait_until
from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.scripts import ENCODING_ANCHOR

pytestmark = pytest.mark.e2e

APP = "tests.apps.fleet_probe:app"
WORK = Route("work", "GET", "/work", "normal")


def fleet_env(redis_url: str, prefix: str, **settings: str) -> dict[str, str]:
    env = {
        "THROTTLE_REDIS_URL": redis_url,
        "THROTTLE_KEY_PREFIX": prefix,
        # Generous for a shared 2-core machine: a slow reply must not look like an outage.
        "THROTTLE_REDIS_TIMEOUT": "1",
    }
    env.update({f"THROTTLE_{k.upper()}": v for k, v in settings.items()})
    return env


@contextlib.contextmanager
def fleet(size: int, env: dict[str, str]) -> Iterator[list[AppServer]]:
    """`size` uvicorn processes of the probe app, all on the budget `env` names."""
    servers = [AppServer(APP, env=env, health_path="/healthz") for _ in range(size)]
    try:
        start_all(servers)
        yield servers
    finally:
        for server in servers:
            server.close()


def probe(server: AppServer, since: int = 0) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/_probe", params={"since": since}, timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def admissions(servers: Sequence[AppServer]) -> list[tuple[float, str, str, str]]:
    """The fleet's admissions: (wall-clock time, tenant, priority, outcome), in time order."""
    return sorted(tuple(a) for s in servers for a in probe(s)["admissions"])


def windows(times: Sequence[float], lo: float, hi: float, width: float) -> list[int]:
    """Counts in every window [t, t + width) with t stepping by 0.1 s through [lo, hi - width]."""
    counts = []
    steps = round((hi - width - lo) / 0.1)
    for i in range(steps + 1):
        start = lo + i * 0.1
        counts.append(sum(1 for t in times if start <= t < start + width))
    return counts


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def client_for(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=5)


# --- the story --------------------------------------------------------------------------------

#: Rate budget of the story; a burst of 16 (0.2 s of rate) is 4% of a 5 s window, so a
#: full bucket inside a window still keeps the fleet within 5%, and its reserve (8 tokens,
#: half the burst) lets A's and B's Poisson bursts in at once while C floods. A maximum
#: wait of 2 s keeps C's queue (and the drain after the load) short.
RATE, BURST = 80, 16
STORY = {"rate": str(RATE), "burst": str(BURST), "max_wait": "2"}
#: One run, two routings: round-robin first, then each tenant pinned to its processes.
#: Each phase is measured after a warm-up of its own (C's queue builds up to its maximum
#: wait; the first phase also starts the fleet's measuring windows).
PHASE_S, WARMUP_S = 15.0, 2.0
ROUND_ROBIN = (WARMUP_S, PHASE_S)
PINNED = (PHASE_S + WARMUP_S, 2 * PHASE_S)
RATES = {"A": 10.0, "B": 30.0, "C": 150.0}


def story(tenants: str, *, pinned: bool) -> Scenario:
    """The story's traffic for `tenants`, in the first phase or (`pinned`) the second."""
    off = Phase(PHASE_S, 2 * PHASE_S, 0.0) if not pinned else Phase(0.0, PHASE_S, 0.0)
    loads = tuple(TenantLoad(t, RATES[t], ((1.0, WORK),), phases=(off,)) for t in tenants)
    return Scenario("story", 2 * PHASE_S, 8 if pinned else 7, loads, timeout_s=10.0)


async def drive(servers: Sequence[AppServer]) -> list[Record]:
    """Round-robin over all four, then A to the 1st, B to the 2nd, C to the 3rd and 4th."""
    urls = [s.url for s in servers]
    parts = await asyncio.gather(
        run(story("ABC", pinned=False), urls),
        run(story("A", pinned=True), urls[:1]),
        run(story("B", pinned=True), urls[1:2]),
        run(story("C", pinned=True), urls[2:]),
    )
    return [r for part in parts for r in part]


@dataclass
class StoryResult:
    name: str
    windows_5s: list[int]
    rates: dict[str, float]
    served: dict[str, float]
    p99_wait_ms: dict[str, float]
    rejected_c: list[Record]

    def summary(self) -> str:
        return (
            f"{self.name}: fleet admissions per 5 s window {min(self.windows_5s)}.."
            f"{max(self.windows_5s)} (budget {RATE * 5}); admitted/s "
            + ", ".join(f"{t} {r:.1f}" for t, r in self.rates.items())
            + "; served "
            + ", ".join(f"{t} {f:.1%}" for t, f in self.served.items())
            + "; p99 added wait "
            + ", ".join(f"{t} {w:.1f} ms" for t, w in self.p99_wait_ms.items())
        )


def measure(
    name: str,
    window: tuple[float, float],
    log: Sequence[tuple[float, str]],
    records: Sequence[Record],
) -> StoryResult:
    lo, hi = window
    steady = [t for t, _ in log if lo <= t < hi]
    rates = {
        tenant: sum(1 for t, who in log if who == tenant and lo <= t < hi) / (hi - lo)
        for tenant in "ABC"
    }
    served, waits = {}, {}
    for tenant in "AB":
        mine = [r for r in records if r.tenant == tenant and lo <= r.due_s < hi]
        ok = [r for r in mine if 200 <= r.status < 300]
        served[tenant] = len(ok) / len(mine)
        # From when it was due to its response, less the app's own (tiny) work time.
        waits[tenant] = p99([r.latency_ms - (r.app_ms or 0.0) for r in ok])
    rejected_c = [
        r for r in records if r.tenant == "C" and lo <= r.due_s < hi and not 200 <= r.status < 300
    ]
    return StoryResult(name, windows(steady, lo, hi, 5.0), rates, served, waits, rejected_c)


def test_story_one_budget_for_four_processes(clean_redis_server: RedisServer) -> None:
    with fleet(4, fleet_env(clean_redis_server.url, "story", **STORY)) as servers:
        t0 = time.time()  # the runs start now; their due times count from here too
        # Freeze this (large, long-lived) test process's heap for the run: a full
        # collection of pytest's objects would stall sending and count as latency.
        gc.collect()
        gc.freeze()
        try:
            records = asyncio.run(drive(servers))
        finally:
            gc.unfreeze()
        log = [(t - t0, tenant) for t, tenant, *_ in admissions(servers)]
    results = [
        measure("round-robin", ROUND_ROBIN, log, records),
        measure("pinned", PINNED, log, records),
    ]
    report = "\n".join(r.summary() for r in results)
    print(report)
    for result in results:
        assert all(0.95 * RATE * 5 <= n <= 1.05 * RATE * 5 for n in result.windows_5s), report
        for tenant in "AB":
            assert result.served[tenant] >= 0.99, report
            assert result.p99_wait_ms[tenant] <= 50.0, report
        assert 36.0 <= result.rates["C"] <= 44.0, report
        # What C cannot get is turned away at once, with an honest Retry-After.
        assert result.rejected_c, report
        assert all(r.status in (429, 503) and r.retry_after for r in result.rejected_c), report
        assert statistics.median(r.latency_ms for r in result.rejected_c) < 100.0, report


# --- priority across processes ----------------------------------------------------------------


def test_critical_waiting_in_one_process_goes_before_low_waiting_in_another(
    clean_redis_server: RedisServer,
) -> None:
    env = fleet_env(clean_redis_server.url, "prio", concurrency="1", max_wait="5")
    state = client_for(clean_redis_server.url)

    def queued(rank: int) -> Callable[[], bool]:
        return lambda: int(float(state.hget("{prio}:s", f"n{rank}") or 0)) == 1

    async def scenario(one: AppServer, two: AppServer) -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers={"x-tenant-id": "acme"}) as client:
            holder = asyncio.create_task(client.get(f"{one.url}/hold"))
            assert await asyncio.to_thread(
                wait_until, lambda: probe(one)["running"] == 1, timeout_s=5
            )
            low = asyncio.create_task(client.get(f"{one.url}/low"))  # queued first ...
            assert await asyncio.to_thread(wait_until, queued(3), timeout_s=5)
            critical = asyncio.create_task(client.get(f"{two.url}/critical"))  # ... then this
            assert await asyncio.to_thread(wait_until, queued(0), timeout_s=5)
            await client.get(f"{one.url}/_unhold")
            responses = await asyncio.gather(holder, low, critical)
            return [r.status_code for r in responses]

    with fleet(2, env) as (one, two):
        assert asyncio.run(scenario(one, two)) == [200, 200, 200]
        order = [priority for _, _, priority, _ in admissions([one, two])]
    state.close()
    assert order == ["normal", "critical", "low"]


# --- cancellations ----------------------------------------------------------------------------


async def raw_get(port: int, path: str, tenant: str, give_up_s: float | None, abort: bool) -> bool:
    """GET over a raw socket; give up after `give_up_s` (FIN, or RST if `abort`).

    Returns True if the client gave up before the whole response arrived.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nhost: x\r\nx-tenant-id: {tenant}\r\nconnection: close\r\n\r\n"
    writer.write(head.encode())
    try:
        await asyncio.wait_for(reader.read(-1), give_up_s)  # until the server closes
        return False
    except TimeoutError:
        if abort:  # a reset, as from a crashed client or a proxy
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Sample:
    """Apps' running count, Redis' in-flight count read after it, and what changed meanwhile."""

    running: int
    in_redis: int
    started: int  # starts in the apps between the first read and the second
    ended: int

    @property
    def consistent(self) -> bool:
        # Grants under way when Redis was read have started by the second read (50 ms
        # later), releases under way had ended after the first: each moves one count.
        return self.running - self.ended <= self.in_redis <= self.running + self.started


async def sample_in_flight(
    servers: Sequence[AppServer], state: redis.Redis, stop: asyncio.Event, out: list[Sample]
) -> None:
    """Redis' in-flight count against the requests the apps are running, bracketed."""
    async with httpx.AsyncClient(timeout=5) as client:

        async def apps() -> list[dict[str, Any]]:
            replies = await asyncio.gather(
                *(client.get(f"{s.url}/_probe?since=1e9") for s in servers)
            )
            return [r.json() for r in replies]

        while not stop.is_set():
            before = await apps()
            raw = await asyncio.to_thread(state.hget, "{cancel}:s", "inflight")
            await asyncio.sleep(0.05)
            after = await apps()
            out.append(
                Sample(
                    sum(b["running"] for b in before),
                    int(float(raw or 0)),
                    sum(a["started"] - b["started"] for b, a in zip(before, after, strict=True)),
                    sum(a["ended"] - b["ended"] for b, a in zip(before, after, strict=True)),
                )
            )
            await asyncio.sleep(0.03)


def redis_leftovers(state: redis.Redis, prefix: str) -> dict[str, int]:
    """Leases and queue entries left in a budget."""
    tag = "{" + prefix + "}"
    s = state.hgetall(f"{tag}:s")
    return {
        "leases": state.zcard(f"{tag}:leases"),
        "lc": state.hlen(f"{tag}:lc"),
        "r": state.hlen(f"{tag}:r"),
        "dl": state.zcard(f"{tag}:dl"),
        "active": state.zcard(f"{tag}:active"),
        "qlen": state.zcard(f"{tag}:qlen"),
        "queues": len(list(state.scan_iter(match=f"{tag}:q:*"))),
        # (a tenant's lone waiter: its field q1 in P:T, no key)
        "lone": sum(1 for v in state.hvals(f"{tag}:T") if v and protocol.tenant_state(v)["q1"]),
        "inflight": int(float(s.get(b"inflight", b"0"))),
        "waiting": int(float(s.get(b"waiting", b"0"))),
    }


def test_a_thousand_cancellations_leave_nothing_behind(clean_redis_server: RedisServer) -> None:
    """Client timeouts (FIN) and disconnects (RST), while queued and while running, under load.

    Four slots held 0.3-0.7 s each and ~300 requests a second, each given up after
    0.05-1 s: most wait in the queue and leave it, some are cut off while running,
    some are served or rejected before their client gives up.
    """
    env = fleet_env(
        clean_redis_server.url,
        "cancel",
        concurrency="4",
        max_wait="30",  # long queues, so that most requests wait until their client leaves
        lease_ttl="60",  # far beyond the test: a leaked lease cannot expire in time to hide
    )
    state = client_for(clean_redis_server.url)
    rng = random.Random(3)
    samples: list[Sample] = []

    async def load(servers: Sequence[AppServer]) -> int:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_in_flight(servers, state, stop, samples))
        tasks: list[asyncio.Task[bool]] = []
        cancelled = 0
        deadline = time.monotonic() + 30.0
        while cancelled < 1000 and time.monotonic() < deadline:
            for _ in range(15):  # 300 a second
                server = rng.choice(servers)
                path = f"/work?ms={rng.uniform(300, 700):.0f}&stream={rng.randrange(2)}"
                give_up, abort = rng.uniform(0.05, 1.0), rng.random() < 0.5
                tasks.append(
                    asyncio.create_task(
                        raw_get(server.port, path, f"t{rng.randrange(5)}", give_up, abort)
                    )
                )
            await asyncio.sleep(0.05)
            cancelled += sum(t.result() for t in tasks if t.done())
            tasks = [t for t in tasks if not t.done()]
        cancelled += sum(await asyncio.gather(*tasks))
        stop.set()
        await sampler
        return cancelled

    with fleet(2, env) as servers:
        cancelled = asyncio.run(load(servers))
        settled = wait_until(
            lambda: (
                all(probe(s)["running"] == 0 for s in servers)
                and not any(redis_leftovers(state, "cancel").values())
            ),
            timeout_s=2.0,
        )
        left = redis_leftovers(state, "cancel")
        ran = sum(probe(s)["ended"] for s in servers)
        cut = sum(probe(s)["cut"] for s in servers)
    state.close()
    exact = [s for s in samples if s.started == s.ended == 0]
    print(
        f"{cancelled} cancellations; {ran} requests reached the app, {cut} of them cut off"
        f" by their client; {len(samples)} in-flight"
        f" samples, {len(exact)} with nothing changing (Redis == running in all of them)"
    )
    assert cancelled >= 1000
    assert cut > 0  # some left while running, not only while queued
    assert settled, left
    assert all(s.consistent for s in samples), [s for s in samples if not s.consistent]
    assert len(exact) >= 5, samples
    assert all(s.in_redis == s.running for s in exact), exact
    assert all(0 <= s.in_redis <= 4 for s in samples), samples


# --- a flood of tenant ids --------------------------------------------------------------------

MAX_TENANTS = 500
CONNECTIONS = 200
#: Every key a budget may have; tenants appear only as digests, processes as random ids.
KEY = re.compile(
    r"\{flood\}:(?:s|cfg|w|T|tenants|procs|pl|pn|leases|lc|r|dl|active|capped|qlen"
    r"|q:[0-9a-f]{24}|(?:g|rc):[0-9a-f]{12})"
)


async def pipelined(port: int, paths_and_tenants: Sequence[tuple[str, str]]) -> list[int]:
    """Send requests on one keep-alive connection, 25 in flight at a time; their statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: list[int] = []
    buffer = b""
    try:
        for i in range(0, len(paths_and_tenants), 25):
            chunk = paths_and_tenants[i : i + 25]
            writer.write(
                b"".join(
                    f"GET {path} HTTP/1.1\r\nhost: x\r\nx-tenant-id: {tenant}\r\n\r\n".encode()
                    for path, tenant in chunk
                )
            )
            want = len(statuses) + len(chunk)
            while len(statuses) < want:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the server closed the connection"
                buffer += data
                while (end := buffer.find(b"\r\n\r\n")) >= 0:
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buffer[:end])
                    assert length is not None, buffer[:end]
                    size = end + 4 + int(length.group(1))
                    if len(buffer) < size:
                        break
                    statuses.append(int(buffer[9:12]))
                    buffer = buffer[size:]
    finally:
        writer.close()
        await writer.wait_closed()
    return statuses


def idle_tenants(state: redis.Redis) -> int:
    """The flood budget's idle list, without its anchor member (keys.IDLE_ANCHOR, +inf)."""
    count: int = state.zcount("{flood}:tenants", "-inf", "(+inf")
    return count


def test_a_flood_of_tenant_ids_cannot_grow_redis(clean_redis_server: RedisServer) -> None:
    env = fleet_env(
        clean_redis_server.url,
        "flood",
        rate="100000",
        burst="100000",
        max_tenants=str(MAX_TENANTS),
        tenant_idle="1",
    )
    state = client_for(clean_redis_server.url)
    # Every character a tenant id may hold, separators included: none may reach a key.
    tenants = [f"f{i}:x/y=z@w+v.{i}-_" for i in range(10_000)]
    peak = {"tenants": 0, "keys": 0}

    async def flood(ports: Sequence[int]) -> list[int]:
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                count = await asyncio.to_thread(idle_tenants, state)
                size = await asyncio.to_thread(state.dbsize)
                peak["tenants"], peak["keys"] = max(peak["tenants"], count), max(peak["keys"], size)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        # Many connections at once, so that each script call brings many new tenants.
        jobs = [[("/work", t) for t in tenants[i::CONNECTIONS]] for i in range(CONNECTIONS)]
        results = await asyncio.gather(
            *(pipelined(ports[i % len(ports)], job) for i, job in enumerate(jobs))
        )
        stop.set()
        await watcher
        return [status for part in results for status in part]

    with fleet(2, env) as [server, other]:
        started = time.monotonic()
        statuses = asyncio.run(flood([server.port, other.port]))
        took = time.monotonic() - started
        rejected = asyncio.run(pipelined(server.port, [("/work", "{brace}"), ("/work", "a" * 65)]))
        keys = sorted(k.decode() for k in state.scan_iter(count=1000))
        # (the tenants: fields of one hash, P:T, its TTL the budget's; their queues)
        ttls = {k: state.pttl(k) for k in keys if k.startswith(("{flood}:T", "{flood}:q:"))}
        # Idle tenants go: after the idle time, a little traffic lets the scripts drop them
        # (each call drops a bounded number; with leases of rate tokens, the default here,
        # the drop comes with the renewal that charges the pool's admissions, up to T
        # later): a few rounds of it, bounded.
        time.sleep(1.5)
        rounds, after = 0, idle_tenants(state)
        while after > 1 and rounds < 40:
            rounds += 1
            asyncio.run(pipelined(server.port, [("/work", "keeper")] * 100))
            time.sleep(0.2)
            after = idle_tenants(state)
        tenants_after = set(state.hkeys("{flood}:T")) - {ENCODING_ANCHOR.encode()}
    state.close()
    print(
        f"{len(statuses)} requests in {took:.1f} s, {len(set(tenants))} tenant ids: at most"
        f" {peak['tenants']} tenants and {peak['keys']} keys in Redis;"
        f" {after} tenants after the idle time and {rounds} rounds of a little traffic"
    )
    assert statuses.count(200) == len(tenants)
    assert rejected == [400, 400]
    assert peak["tenants"] <= MAX_TENANTS, peak  # each script call ends within the limit
    assert peak["keys"] <= MAX_TENANTS + 20, peak  # + state, lists and sets of the budget
    assert all(KEY.fullmatch(k) for k in keys), [k for k in keys if not KEY.fullmatch(k)]
    # The tenants' keys expire on their own: none without a TTL (PTTL -1). A key may be
    # gone by the time its PTTL is read (-2): with leases of rate tokens (the default for
    # a rate alone) a pool's renewal after the flood charges its admissions and its call
    # drops the tenants idle by then (forget_idle), between the SCAN and the PTTL.
    assert all(ttl > 0 or ttl == -2 for ttl in ttls.values()), sorted(
        {ttl for ttl in ttls.values() if ttl <= 0}
    )
    assert after <= 1
    assert len(tenants_after) <= 1, tenants_after  # (P:T's anchor aside)
