"""The circuit breaker's pause grows once per failed probe, not once per failing caller.

The breaker's rules on a fake clock (its time moves only when the test says), then one
check through RedisBackend on a real, stopped redis-server: many requests failing at
once open the breaker for its first pause, not its longest.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.backends.redis.breaker import Breaker
from throttle_mw.backends.redis.fallback import UNAVAILABLE
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_failures_open_it_for_the_first_pause_only() -> None:
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    for _ in range(50):  # fifty requests in flight when Redis went away, failing together
        breaker.failure()
    assert breaker.failures == 50
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe, after the first pause
    assert not breaker.allow()  # only one


def test_each_failed_probe_doubles_the_pause_up_to_the_ceiling() -> None:
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure()
    pauses = []
    for _ in range(6):
        start = clock.now
        while not breaker.allow():
            clock.now = round(clock.now + 0.05, 6)
        pauses.append(round(clock.now - start, 6))
        breaker.failure()  # the probe failed
        for _ in range(10):
            breaker.failure()  # late callers of the same episode: no longer pause
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_late_failure_while_the_probe_is_out_counts_once() -> None:
    """A caller that failed after the pause ended is as good as a failed probe; the probe's
    own failure, arriving next, is the same episode."""
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure()
    clock.now += 0.1
    assert breaker.allow()
    breaker.failure()  # a straggler: the pause doubles to 0.2
    breaker.failure()  # the probe: same episode
    clock.now += 0.2
    assert breaker.allow()


def test_success_closes_it_and_the_next_episode_starts_from_the_first_pause() -> None:
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure()
    for _ in range(3):
        clock.now += 1.0
        assert breaker.allow()
        breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open
    for _ in range(20):
        breaker.failure()
    clock.now += 0.1
    assert breaker.allow()


@pytest.mark.anyio
async def test_many_requests_failing_at_once_leave_the_first_pause(
    redis_server: RedisServer,
) -> None:
    settings = Settings.from_env(
        {},
        redis_url=redis_server.url,
        key_prefix="brk",
        redis_timeout_s=1.0,
        concurrency="8",
        failure_mode="closed",
    )
    backend = RedisBackend(settings)
    await backend.start()
    try:
        redis_server.stop()
        clock = Clock()
        backend._breaker = breaker = Breaker(clock=clock)
        outcomes = await asyncio.gather(
            *(backend.acquire(Request(f"r{n}", "acme")) for n in range(40))
        )
        assert outcomes == [UNAVAILABLE] * 40
        assert breaker.failures >= 2  # several callers failed in the one episode
        clock.now += 0.1
        assert breaker.allow()  # probed after the first pause, not after the longest
    finally:
        await backend.stop()
