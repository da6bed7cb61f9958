"""Someone starts waiting: the pools out of the bucket come back within a round trip.

Two RedisBackend processes in one test loop, on one budget, on a real Redis. Process A
holds a pool (a lease of rate tokens, or kept concurrency slots) and admits from it
without calling Redis; process B's request queues in Redis (the budget's waiting count
goes from 0 to 1). The script tells A on its grant list (store.lua's
call.signal_waiting): A admits nothing more from its pool, gives it back at once, and B's
request is admitted from it, well within a fraction of the pool's T (which is seconds
here), not when A next hears from Redis; on one server and on a Redis Cluster. A process
without a pool is not told.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any, NamedTuple

import pytest
import redis
import redis.asyncio

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisCluster, RedisServer
from throttle_mw.backends import Admitted
from throttle_mw.backends.base import Waiting
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.keys import Keys
from throttle_mw.backends.redis.scripts import LEASE_ANCHOR, SIGNAL_BATCH, SIGNAL_GAP_S
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Admit, Enqueue, Granted, Limits, Policy, Request
from throttle_mw.settings import Settings

#: The reaction's bound: a few round trips on a loaded machine, far below T.
PROMPT_S = 0.3
#: T of the pools: a reaction that waited for it would miss PROMPT_S by far.
T_S = 5.0
_prefixes = itertools.count()


class Target(NamedTuple):
    """Where the budget lives: one server, or a 3-master cluster (the grant lists and P:pl
    share the budget's hash tag: the script's pushes stay in its slot)."""

    url: str
    cluster: bool

    def client(self) -> Any:
        if self.cluster:
            return redis.asyncio.RedisCluster.from_url(self.url)
        return redis.asyncio.Redis.from_url(self.url)


@pytest.fixture(params=[pytest.param(k, marks=pytest.mark.redis) for k in ("redis", "cluster")])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("clean_redis_server")
        return Target(server.url, False)
    cluster: RedisCluster = request.getfixturevalue("clean_redis_cluster")
    return Target(cluster.url, True)


def settings(url: str | Target, prefix: str, **overrides: Any) -> Settings:
    cluster = isinstance(url, Target) and url.cluster
    values: dict[str, Any] = {
        "redis_url": url.url if isinstance(url, Target) else url,
        "redis_cluster": cluster,
        "key_prefix": prefix,
        # Generous, for a loaded machine; nothing here freezes Redis, so no check is bounded
        # by it.
        "redis_timeout_s": 3.0,
        "failure_mode": "closed",
        **overrides,
    }
    return Settings.from_env({}, **values)


async def pool_holders(client: Any, prefix: str) -> list[Any]:
    """P:pl's members: the processes that may hold a pool."""
    return list(await client.zrange(Keys(prefix).pools, 0, -1))


@pytest.mark.anyio
async def test_a_lease_goes_back_at_once_when_another_process_s_request_waits(
    target: Target,
) -> None:
    """A rate of 0.5/s: a token comes every 2 s. A holds a lease of T = 5 s; B drains the
    bucket and its next request waits. Within PROMPT_S: A admits nothing from its lease
    any more, its tokens are back in Redis and B's request is admitted from them."""
    prefix = f"ws{next(_prefixes)}"
    url = target
    limits = {"rate": 0.5, "burst": 20.0}
    a = RedisBackend(settings(url, prefix, rate_lease_s=T_S, **limits))
    b = RedisBackend(settings(url, prefix, rate_lease_s=0, **limits))
    client = target.client()
    loop = asyncio.get_running_loop()
    await a.start()
    await b.start()
    try:
        pool = a.rate_lease
        assert pool is not None
        # Tenant beta is admitted once, first: the fleet's admissions of acme move the
        # virtual clock past its tag, so it has banked credit (README, "The reserve"): its
        # request that waits below needs one token, not the reserve kept for the others.
        assert isinstance(await b.acquire(Request("b-first", "beta")), Admitted)
        for n in range(8):  # A's requests: its rate fills a lease (renewed in the background)
            assert isinstance(await a.acquire(Request(f"a{n}", "acme")), Admitted)
            await asyncio.sleep(0.02)
        for _ in range(50):
            if pool.tokens >= 2 and not pool.renewing:
                break
            await asyncio.sleep(0.01)
        assert pool.tokens >= 2, "A holds a lease"
        assert a.process.encode() in await pool_holders(client, prefix)
        local = pool.local_admissions
        assert isinstance(await a.acquire(Request("a-local", "acme")), Admitted)
        assert pool.local_admissions == local + 1, "A admits from its lease"
        held = pool.tokens
        returned = pool.returned

        for n in range(40):  # B drains the bucket (acme's next one is turned away)
            if not isinstance(await b.acquire(Request(f"b{n}", "acme")), Admitted):
                break
        outcome = await b.acquire(Request("b-wait", "beta"))
        assert isinstance(outcome, Waiting), "B's request waits in Redis"
        queued = loop.time()
        result = await asyncio.wait_for(outcome.future, PROMPT_S)
        admitted_after = loop.time() - queued
        assert isinstance(result, Admitted), result
        assert admitted_after < PROMPT_S
        # A gave everything back, and admits nothing locally while someone waits.
        assert pool.tokens == 0
        assert pool.returned >= returned + held
        local = pool.local_admissions
        after = await a.acquire(Request("a-after", "acme"))
        assert pool.local_admissions == local, "nothing from the pool once someone waited"
        if isinstance(after, Waiting):
            await a.cancel(after)
    finally:
        await b.stop()
        await a.stop()
        await client.aclose()


@pytest.mark.anyio
async def test_kept_slots_go_back_at_once_when_another_process_s_request_waits(
    target: Target,
) -> None:
    """A concurrency of 4: A keeps 2 idle slots (T = 5 s), B runs 2 and its next request
    waits: A is told at once, gives both slots back, and B's waiter runs on one of them
    within PROMPT_S (not T later, not when A next calls Redis); B's next request is
    admitted at once on the other."""
    prefix = f"ws{next(_prefixes)}"
    url = target
    a = RedisBackend(settings(url, prefix, concurrency=4, keep_slots_s=T_S))
    b = RedisBackend(settings(url, prefix, concurrency=4, keep_slots_s=0.0))
    client = target.client()
    loop = asyncio.get_running_loop()
    await a.start()
    try:
        slots = a.kept_slots
        assert slots is not None
        for _ in range(50):  # A's heartbeat registers it as one that may keep slots
            if a.process.encode() in await pool_holders(client, prefix):
                break
            await asyncio.sleep(0.01)
        assert a.process.encode() in await pool_holders(client, prefix)
        held = []
        for n in range(2):
            outcome = await a.acquire(Request(f"a{n}", "acme"))
            assert isinstance(outcome, Admitted)
            held.append(outcome.request_id)
        for rid in held:
            a.release(rid)
        assert len(slots) == 2, "A keeps its two slots (its cap: half of 4, alone)"
        await b.start()
        running = []
        for n in range(2):
            outcome = await b.acquire(Request(f"b{n}", "beta"))
            assert isinstance(outcome, Admitted)
            running.append(outcome.request_id)
        waiting = await b.acquire(Request("b-wait", "beta"))
        assert isinstance(waiting, Waiting), "B's request waits in Redis: A's slots are held"
        queued = loop.time()
        result = await asyncio.wait_for(waiting.future, PROMPT_S)
        assert isinstance(result, Admitted)
        assert loop.time() - queued < PROMPT_S
        assert len(slots) == 0
        assert slots.returned == 2
        # A takes no kept slot now (someone waited: none until a reply says nobody does).
        assert slots.take(loop.time(), 1, True, len(a._leases)) is None
        nxt = await b.acquire(Request("b-next", "beta"))
        assert isinstance(nxt, Admitted), "the other slot A gave back"
        for rid in [*running, "b-wait", "b-next"]:
            b.release(rid)
        await a.stop()  # (it leaves P:pl: nobody tells a process that is gone)
        assert a.process.encode() not in await pool_holders(client, prefix)
    finally:
        await b.stop()
        await a.stop()
        await client.aclose()


@pytest.mark.anyio
async def test_nobody_is_told_when_no_pool_can_be_out(clean_redis_server: RedisServer) -> None:
    """A rate budget without leases, a concurrency budget whose processes keep no slots:
    a request that waits puts nothing on any grant list but its own grant (no process is
    in P:pl)."""
    url = clean_redis_server.url
    client = redis.asyncio.Redis.from_url(url)
    for limits in ({"rate": 0.5, "burst": 1.0}, {"concurrency": 1}):
        prefix = f"ws{next(_prefixes)}"
        a = RedisBackend(settings(url, prefix, rate_lease_s=0, keep_slots_s=0.0, **limits))
        b = RedisBackend(settings(url, prefix, rate_lease_s=0, keep_slots_s=0.0, **limits))
        await a.start()
        await b.start()
        try:
            first = await a.acquire(Request("a0", "acme"))
            assert isinstance(first, Admitted)
            waiting = await b.acquire(Request("b0", "beta"))
            assert isinstance(waiting, Waiting)
            assert await pool_holders(client, prefix) == []
            for backend in (a, b):
                assert await client.llen(Keys(prefix).grants(backend.process)) == 0
            await b.cancel(waiting)
            a.release("a0")
        finally:
            await b.stop()
            await a.stop()
    await client.aclose()


def _rpush_calls(client: redis.Redis) -> int:
    """RPUSH commands the server ran so far (INFO commandstats, scripts' calls included)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_rpush", {}).get("calls", 0))


def _edge_run(client: redis.Redis, holders: int, rounds: int, step: float) -> tuple[int, str]:
    """A concurrency budget of 1 at its edge (store.lua's save, call.signal_waiting), on the
    scripts' own clock: each round, `step` seconds after the last, one request queues
    (waiting 0 -> 1) and the release of the one running admits it (1 -> 0). `holders`
    other processes keep slots (renew.lua's heartbeat flag registers them in P:pl for the
    whole run). The RPUSH commands the run made; the budget's key tag."""
    sched = _fleet(client, holders)
    running = "first"
    before = _rpush_calls(client)
    for i in range(1, rounds + 1):
        now = i * step
        nxt = Request(f"r{i}", f"edge{i % 8}")
        decision, _ = sched.acquire(now, nxt)
        assert not isinstance(decision, Granted)  # (queued: someone waits)
        sched.release(now, running)  # (admits it: nobody waits)
        running = nxt.id
    return _rpush_calls(client) - before, sched._tag


def test_a_budget_at_its_edge_tells_its_pools_at_most_once_per_gap(
    clean_redis_server: RedisServer,
) -> None:
    """Waiting 0 -> 1 -> 0 on every call pair, N processes in P:pl: the budget tells them
    at most once per TUNING.SIGNAL_GAP of its clock (plus the first), not once per
    opening: the pushes over the run, counted by the server's RPUSH calls against the same
    run without holders (the grants of the queued requests), stay within that bound, and
    the processes are told again once a gap has passed (the signal is not lost for good)."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders, rounds, step = 20, 300, 0.001  # (0.3 s of the scripts' clock: 300 openings)
    base, _ = _edge_run(client, 0, rounds, step)
    pushed, tag = _edge_run(client, holders, rounds, step)
    pushed -= base
    signals = math.floor(rounds * step / SIGNAL_GAP_S) + 1
    assert pushed <= signals * holders, (pushed, signals * holders)
    assert pushed >= 2 * holders  # (told on the run's first opening and again after a gap)
    told = [client.llen(f"{tag}:g:holder{p}") for p in range(holders)]
    assert min(told) >= 2, told
    assert max(told) <= signals, told
    client.close()


def _fleet(client: redis.Redis, holders: int) -> LuaScheduler:
    """A concurrency budget of 1 on the scripts' clock, one request running, `holders`
    processes registered as ones that may keep slots (renew.lua's keeps flag)."""
    policy = Policy(dict.fromkeys(PRIORITIES, 30.0), queue_limit=1_000)
    client.flushdb()
    sched = LuaScheduler(client, Limits(concurrency=1), policy, now=0.0)
    for p in range(holders):
        holder = sched.joined(f"holder{p}")
        args = protocol.renew_args("0.0", holder._tag, holder.process, 1e6, 1e6, [], keeps=True)
        holder._run("renew", args, client)
    assert isinstance(sched.acquire(0.0, Request("first", "edge"))[0], Admit)
    return sched


def _told(client: redis.Redis, sched: LuaScheduler, holders: int) -> list[int]:
    """How many messages each holder's grant list holds (each one `WAITS`)."""
    lists = [client.lrange(f"{sched._tag}:g:holder{p}", 0, -1) for p in range(holders)]
    assert all(protocol.is_waits(m) for told in lists for m in told)
    return [len(told) for told in lists]


def test_one_call_tells_a_batch_and_the_next_calls_the_rest(
    clean_redis_server: RedisServer,
) -> None:
    """200 processes in P:pl, someone starts waiting: the call that queues tells at most
    SIGNAL_BATCH of them (each RPUSH counted by the server), and each following call
    that leaves someone waiting the next SIGNAL_BATCH, so all 200 are told within
    ceil(200 / SIGNAL_BATCH) calls, each exactly once; calls after that tell nobody."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders = 200
    sched = _fleet(client, holders)
    calls = math.ceil(holders / SIGNAL_BATCH)
    before = _rpush_calls(client)
    decision, _ = sched.acquire(0.001, Request("w0", "edge"))
    assert isinstance(decision, Enqueue)  # (queued: someone waits)
    assert _rpush_calls(client) - before <= SIGNAL_BATCH
    assert sum(_told(client, sched, holders)) == SIGNAL_BATCH
    for i in range(1, calls):  # (more requests queue: someone still waits)
        before = _rpush_calls(client)
        assert isinstance(sched.acquire(0.001 * (i + 1), Request(f"w{i}", "edge"))[0], Enqueue)
        assert _rpush_calls(client) - before <= SIGNAL_BATCH
    assert _told(client, sched, holders) == [1] * holders
    before = _rpush_calls(client)
    for i in range(calls, calls + 5):
        sched.acquire(0.001 * (i + 1), Request(f"w{i}", "edge"))
    assert _rpush_calls(client) == before, "nobody told twice for one opening"
    client.close()


def test_at_an_edge_the_rest_is_told_by_the_next_openings(
    clean_redis_server: RedisServer,
) -> None:
    """Waiting 0 -> 1 -> 0 every 1 ms of the scripts' clock with 200 processes in P:pl:
    nobody waits between two openings, so the rest waits; each opening, within the gap
    too, tells the next SIGNAL_BATCH, all 200 told once in the first ceil(200 /
    SIGNAL_BATCH) openings; then nobody until a gap has passed, when a signal starts
    anew."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders = 200
    sched = _fleet(client, holders)
    running = "first"
    openings = math.ceil(holders / SIGNAL_BATCH)
    step = 0.001
    for i in range(1, round(SIGNAL_GAP_S / step)):  # (all within the first signal's gap)
        before = _rpush_calls(client)
        nxt = Request(f"r{i}", f"edge{i % 8}")
        assert isinstance(sched.acquire(i * step, nxt)[0], Enqueue)
        pushed = _rpush_calls(client) - before
        assert pushed <= SIGNAL_BATCH
        sched.release(i * step, running)  # (admits it: nobody waits)
        running = nxt.id
        if i == openings:
            assert _told(client, sched, holders) == [1] * holders
    assert _told(client, sched, holders) == [1] * holders
    nxt = Request("late", "edge")
    assert isinstance(sched.acquire(SIGNAL_GAP_S + 0.01, nxt)[0], Enqueue)
    assert sum(_told(client, sched, holders)) == holders + SIGNAL_BATCH
    client.close()


def test_a_process_registered_while_someone_waits_is_told(
    clean_redis_server: RedisServer,
) -> None:
    """A process whose first heartbeat (renew.lua, keeps flag) reaches Redis while
    someone already waits missed that opening's signal (it was not in P:pl yet, and may
    have kept a slot meanwhile): its registration tells it. A heartbeat of a process
    already registered, or while nobody waits, tells nothing."""
    client = redis.Redis.from_url(clean_redis_server.url)
    sched = _fleet(client, 1)

    def beat(process: str, now: float) -> None:
        holder = sched.joined(process)
        args = protocol.renew_args(repr(now), holder._tag, process, 1e6, 1e6, [], keeps=True)
        holder._run("renew", args, client)

    beat("holder2", 0.0005)  # (registered anew while nobody waits: not told)
    assert _told(client, sched, 3) == [0, 0, 0]
    assert isinstance(sched.acquire(0.001, Request("w0", "edge"))[0], Enqueue)
    assert _told(client, sched, 3) == [1, 0, 1]  # (holder1 not registered yet)
    beat("holder1", 0.002)
    assert _told(client, sched, 3) == [1, 1, 1]
    beat("holder1", 0.003)  # (registered already: told once for this opening)
    beat("holder2", 0.003)
    assert _told(client, sched, 3) == [1, 1, 1]
    client.close()


def _commands(client: redis.Redis) -> dict[str, int]:
    """Each command's calls the server ran so far (INFO commandstats, scripts' included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _round_calls(client: redis.Redis, holders: int) -> list[dict[str, int]]:
    """Someone starts waiting with `holders` processes in P:pl, and more requests queue
    until a signal's round is over: the commands each script call ran (INFO commandstats
    around it, its own INFO, FCALL/EVALSHA and the test's reads taken out), one dict a call,
    and after each call the budget's keys that hold `holders` members or more (a copy of
    P:pl would be one) besides P:pl and P:pn themselves."""
    sched = _fleet(client, holders)
    registrations = {sched._keys.pools, sched._keys.pools_names, sched._keys.procs}
    calls = []
    for i in range(math.ceil(holders / SIGNAL_BATCH) + 2):
        before = _commands(client)
        assert isinstance(sched.acquire(0.001 * (i + 1), Request(f"w{i}", "edge"))[0], Enqueue)
        after = _commands(client)
        ran = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        for own in ("info", "fcall", "evalsha", "lrange", "ltrim", "del"):
            ran.pop(own, None)  # (the test's INFO; the call itself; LuaScheduler's reads)
        calls.append(ran)
        for key in client.scan_iter(f"{sched._tag}:*"):
            if key.decode() in registrations or client.type(key) != b"zset":
                continue
            assert client.zcard(key) < holders, (key, "a copy of the registrations")
    return calls


def test_a_signal_s_calls_run_the_same_commands_whatever_the_fleet(
    clean_redis_server: RedisServer,
) -> None:
    """A signal's round over 100 and over 1,000 processes in P:pl: no call copies the
    registrations (no COPY, no key of that size made), no call pops or ranges more than
    one batch (one ZRANGEBYLEX and one ZMSCORE a call at most, their LIMIT the batch), and
    each call of the round runs the same commands at 1,000 processes as at 100: the
    work of a call is flat in the fleet's size (its RPUSHes SIGNAL_BATCH at most)."""
    client = redis.Redis.from_url(clean_redis_server.url)
    small, large = _round_calls(client, 100), _round_calls(client, 1_000)
    for calls in (small, large):
        for ran in calls:
            assert "copy" not in ran, ran
            assert "zrangestore" not in ran, ran
            assert ran.get("zpopmin", 0) == 0, ran
            assert ran.get("zrangebylex", 0) <= 1, ran
            assert ran.get("zmscore", 0) <= 1, ran
            assert ran.get("rpush", 0) <= SIGNAL_BATCH + 1, ran  # (+1: a grant)
    # The opening and the round's full calls: the same commands at 1,000 as at 100.
    full = len(small) - 3  # (100: the opening, 2 calls of 32, 1 of 4, then nothing)
    assert large[0] == small[0], (large[0], small[0])
    # (The second call makes the tenant's queue key, with its TTL: its first waiter was
    # kept in its own field of P:T, store.lua's enqueue. The calls after it are alike.)
    assert large[1] == small[1], (large[1], small[1])
    for ran in large[2:full]:
        assert ran == small[2], (ran, small[2])
    client.close()


def test_every_holder_is_told_once_while_registrations_renew(
    clean_redis_server: RedisServer,
) -> None:
    """300 processes in P:pl; after each call of the signal's round every process renews
    its registration (a heartbeat: its expiry in P:pl moves later, as in a live fleet), and
    a process that was never registered joins at the third call: the round still tells each
    of the 300 once, within ceil(300 / SIGNAL_BATCH) calls, none twice; the newcomer is
    told by its own heartbeat at once (and by the round at most once more)."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders = 300
    sched = _fleet(client, holders)
    calls = math.ceil(holders / SIGNAL_BATCH)

    def beat(process: str, now: float) -> None:
        holder = sched.joined(process)
        args = protocol.renew_args(repr(now), holder._tag, process, 1e6, 1e6 + now, [], keeps=True)
        holder._run("renew", args, client)

    for i in range(calls):
        now = 0.001 * (i + 1)
        assert isinstance(sched.acquire(now, Request(f"w{i}", "edge"))[0], Enqueue)
        for p in range(holders):
            beat(f"holder{p}", now + 0.0001)
        if i == 2:
            beat("late", now + 0.0002)
            assert client.llen(f"{sched._tag}:g:late") == 1, "told at once"
    assert _told(client, sched, holders) == [1] * holders
    for i in range(calls, calls + 3):  # (the round is over: nobody told again)
        sched.acquire(0.001 * (i + 1), Request(f"w{i}", "edge"))
    assert _told(client, sched, holders) == [1] * holders
    assert client.llen(f"{sched._tag}:g:late") <= 2
    client.close()


def test_lapsed_registrations_are_skipped_and_dropped(clean_redis_server: RedisServer) -> None:
    """100 processes in P:pl, 40 of them with a heartbeat that lapsed before anyone waits
    (a process that died): the signal's round tells the 60 live ones once each, none of the
    40, and drops the 40 from P:pl and P:pn as it meets them (the next round does not
    meet them again)."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders, dead = 100, 40
    sched = _fleet(client, holders)
    for p in range(dead):  # (their registration ends at 0.5 s of the scripts' clock)
        client.zadd(sched._keys.pools, {f"holder{p}": 0.5})
    for i in range(math.ceil(holders / SIGNAL_BATCH)):
        now = 1.0 + 0.001 * i
        assert isinstance(sched.acquire(now, Request(f"w{i}", "edge"))[0], Enqueue)
    assert _told(client, sched, holders) == [0] * dead + [1] * (holders - dead)
    assert client.zcount(sched._keys.pools, "(0", "+inf") == holders - dead  # (not its anchor)
    assert client.zcard(sched._keys.pools_names) == holders - dead
    client.close()


def test_a_heartbeat_drops_lapsed_registrations(clean_redis_server: RedisServer) -> None:
    """Processes killed without leave.lua leave their registrations in P:pl and their
    names in P:pn, lapsed: any process's heartbeat (renew.lua) drops them, SIGNAL_BATCH a
    heartbeat at most, the live ones and P:pl's anchor kept; a process whose own
    registration lapsed is registered anew by its next heartbeat, and told at once if
    someone waits."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders, dead = 10, SIGNAL_BATCH + 8
    sched = _fleet(client, holders)
    client.zadd(sched._keys.pools, {LEASE_ANCHOR: 0})
    for p in range(dead):  # (registered until 0.5 s of the scripts' clock, then killed)
        client.zadd(sched._keys.pools, {f"dead{p}": 0.5})
        client.zadd(sched._keys.pools_names, {f"dead{p}": 0})

    def beat(process: str, now: float) -> None:
        holder = sched.joined(process)
        args = protocol.renew_args(repr(now), holder._tag, process, 1e6, 1e6, [], keeps=True)
        holder._run("renew", args, client)

    beat("holder0", 1.0)
    assert client.zcard(sched._keys.pools) == 1 + holders + dead - SIGNAL_BATCH
    beat("holder1", 1.0)
    assert client.zrangebyscore(sched._keys.pools, 0, 0) == [LEASE_ANCHOR.encode()]
    assert client.zcard(sched._keys.pools) == 1 + holders
    assert client.zcard(sched._keys.pools_names) == holders
    # holder3's own registration lapsed (its heartbeats stopped), then it comes back while
    # someone waits: registered anew, so told.
    client.zadd(sched._keys.pools, {"holder3": 0.5})
    assert isinstance(sched.acquire(1.1, Request("w0", "edge"))[0], Enqueue)
    assert _told(client, sched, holders)[3] == 0
    beat("holder3", 1.2)
    assert _told(client, sched, holders)[3] == 1
    client.close()


def test_a_heartbeat_tells_its_process_even_with_more_lapsed_than_it_drops(
    clean_redis_server: RedisServer,
) -> None:
    """A process whose own registration lapsed comes back while someone waits, behind more
    than SIGNAL_BATCH older lapsed registrations (a crashed fleet): its heartbeat drops only
    SIGNAL_BATCH of them, not its own, yet it is registered anew and told at once (before
    branch carry2 its ZADD GT only moved its score: not told until its next reply or T)."""
    client = redis.Redis.from_url(clean_redis_server.url)
    holders, dead = 10, SIGNAL_BATCH + 8
    sched = _fleet(client, holders)
    for p in range(dead):  # (killed at 0.4 s of the scripts' clock)
        client.zadd(sched._keys.pools, {f"dead{p}": 0.4})
        client.zadd(sched._keys.pools_names, {f"dead{p}": 0})
    client.zadd(sched._keys.pools, {"holder3": 0.5})  # (its heartbeats stopped at 0.5 s)
    assert isinstance(sched.acquire(1.1, Request("w0", "edge"))[0], Enqueue)
    assert _told(client, sched, holders)[3] == 0
    holder = sched.joined("holder3")
    args = protocol.renew_args("1.2", holder._tag, "holder3", 1e6, 1e6, [], keeps=True)
    holder._run("renew", args, client)
    assert client.zcount(sched._keys.pools, "(0", "(1.2") == dead - SIGNAL_BATCH
    assert _told(client, sched, holders)[3] == 1
    # Its next heartbeat, registered and told already: nothing more.
    args = protocol.renew_args("1.3", holder._tag, "holder3", 1e6, 1e6, [], keeps=True)
    holder._run("renew", args, client)
    assert _told(client, sched, holders)[3] == 1
    client.close()
