"""The fleet's admissions with leases of rate tokens, measured in Redis's time, on real servers.

Four backends (processes of a fleet, one event loop) drive one rate budget with leases
(`tests/support/ledger.py` stamps each admission by Redis's clock: an exact-path one at
its script call, a lease's by its lease). Over every window, the fleet admits at most what
the plain token bucket would, rate x window + burst, whichever of the times Redis counted
a lease's token out it is charged at: when the lease took it, when the last renewal kept
it, or the last moment Redis still counted it (its lease's expiry, or the renewal that
took it out of the count): a process may spend a token at any of those, so the bound
must hold for each. Loads: saturated (more offered than the rate), and light with
salvos (the bucket full beside the leases, then drained at once).
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis.asyncio

from tests.support.ledger import Ledger, max_excess, run_fleet
from tests.support.redis_server import RedisServer
from tests.test_redis_rate_lease import redis_time
from throttle_mw.backends import Admitted
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings

RATE, BURST = 600.0, 60.0
_prefixes = itertools.count()


def test_max_excess_is_the_worst_window() -> None:
    # 1 at 0, 2 at 1, 4 at 1.5: the window [1, 1.5] has 6 against 0.5 x 2 + 3 = 4 (the
    # whole run 7 against 6, the last instant 4 against 3).
    stamps = [(0.0, 1), (1.0, 2), (1.5, 4)]
    assert max_excess(stamps, 2.0, 3.0) == pytest.approx(2.0)
    assert max_excess([(0.0, 3)], 2.0, 3.0) == 0.0
    assert max_excess([], 2.0, 3.0) == -3.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("per_s", "lease_s", "salvos"),
    [(200.0, 0.05, 0), (50.0, 0.2, 4)],
    ids=["saturated", "salvos"],
)
async def test_no_window_admits_more_than_the_bucket_in_redis_time(
    clean_redis_server: RedisServer, per_s: float, lease_s: float, salvos: int
) -> None:
    ledger = await run_fleet(
        clean_redis_server.url,
        f"rb{next(_prefixes)}",
        processes=4,
        every_s=1 / per_s,
        seconds=2.0,
        rate=RATE,
        burst=BURST,
        lease_s=lease_s,
        salvos=salvos,
    )
    assert ledger.leased, "nothing admitted from a lease"
    assert ledger.exact, "nothing admitted by the exact path"
    assert not ledger.odd
    for how in ("leased", "renewed", "late"):
        excess = max_excess(ledger.stamps(how), RATE, BURST)
        assert excess <= 0.01, (how, excess, ledger.admitted)


def settings(url: str, prefix: str, lease_s: float) -> Settings:
    return Settings.from_env(
        {},
        redis_url=url,
        key_prefix=prefix,
        redis_timeout_s=10.0,
        rate=200.0,
        burst=200.0,
        rate_lease_s=lease_s,
        tenant_queue_limit=0,
    )


@pytest.mark.anyio
async def test_a_lease_spent_to_its_end_then_a_salvo_stays_within_the_bucket(
    clean_redis_server: RedisServer,
) -> None:
    """Process A (leases, T = 0.5 s) takes a lease, spends all of it and renews no more;
    the bucket stands at its room (the burst less the lease) meanwhile. Just after the
    lease expires in Redis, process B (no leases) sends more requests at once than the
    burst. Charged at the lease's expiry (A may spend its last tokens then), A's tokens
    and B's admissions together stay within the plain bucket: the bucket refilled over
    the expiry must stop at its room until then, and must have counted the lease out."""
    url, prefix = clean_redis_server.url, f"rb{next(_prefixes)}"
    a, b = RedisBackend(settings(url, prefix, 0.5)), RedisBackend(settings(url, prefix, 0.0))
    for backend in (a, b):
        await backend.start()
    await asyncio.sleep(0.3)  # the heartbeats: two processes (A's share: 50 tokens)
    ledger = Ledger()
    for backend in (a, b):
        ledger.attach(backend)
    pool = a.rate_lease
    assert pool is not None
    n = itertools.count()
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 5.0
    while not (pool.tokens >= 20 and not pool.renewing) and loop.time() < give_up:
        await a.acquire(Request(f"a{next(n)}", "t"))
        await asyncio.sleep(0.004)
    assert pool.tokens >= 20, pool.tokens
    pool.due = lambda now: False  # type: ignore[method-assign]  # no renewal: spent to its end
    while pool.tokens:
        assert isinstance(await a.acquire(Request(f"a{next(n)}", "t")), Admitted)
    client = redis.asyncio.Redis.from_url(url)
    await asyncio.sleep(max(0.0, pool.until + 0.02 - await redis_time(client)))
    assert await redis_time(client) > pool.until  # (Redis's TIME: the wall clock)
    await client.aclose()
    await asyncio.gather(*(b.acquire(Request(f"b{i}", "u")) for i in range(250)))
    for backend in (b, a):
        await backend.stop()
    ledger.settle()
    assert not ledger.odd
    for how in ("leased", "renewed", "late"):
        excess = max_excess(ledger.stamps(how), 200.0, 200.0)
        assert excess <= 0.01, (how, excess, ledger.admitted)
