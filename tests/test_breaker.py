"""The circuit breaker's pause grows once per failed probe, not once per failing caller.

The breaker's rules on a fake clock (its time moves only when the test says), then
RedisBackend on a real redis-server, stopped: many requests failing at once open the
breaker for its first pause, not its longest, and only the backend's prober probes it,
one probe at a time, the pause doubling per failed probe.
"""

from __future__ import annotations

import asyncio
import itertools
import time

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
    assert breaker.is_open
    assert not breaker.allow()
    assert breaker.until_probe() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.until_probe() == 0.0  # the probe is due after the first pause
    assert not breaker.allow()  # and only the prober makes it


def test_each_failed_probe_doubles_the_pause_up_to_the_ceiling() -> None:
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure()
    pauses = [breaker.until_probe()]
    for _ in range(5):
        clock.now += breaker.until_probe()
        breaker.probe_failed()
        for _ in range(10):
            breaker.failure()  # late callers (sent before it opened): no longer pause
        pauses.append(round(breaker.until_probe(), 6))
    assert pauses == [pytest.approx(0.1), 0.2, 0.4, 0.8, 1.0, 1.0]
    assert breaker.probes_failed == 5


def test_success_closes_it_and_the_next_outage_starts_from_the_first_pause() -> None:
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure()
    for _ in range(4):
        clock.now += 1.0
        breaker.probe_failed()
    clock.now += 1.0
    breaker.success()
    assert not breaker.is_open
    assert breaker.allow()
    for _ in range(20):
        breaker.failure()
    assert breaker.until_probe() == pytest.approx(0.1)


def test_a_failure_of_a_call_sent_before_it_last_closed_does_not_open_it_again() -> None:
    """A heartbeat (or any call) sent before a partition healed times out after the probe
    found Redis back: old news. It must not open the breaker again (the failure mode would
    apply beside the shared budget for another pause); a call sent after the close does."""
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    before = breaker.generation  # a heartbeat goes out
    breaker.failure(breaker.generation)  # another call's timeout opens it
    clock.now += 0.1
    breaker.success()  # the probe: Redis is back
    clock.now += 0.5
    breaker.failure(before)  # the heartbeat's timeout, sent before the close
    assert breaker.closed
    assert breaker.allow()
    assert not breaker.is_open
    assert breaker.until_probe() == 0.0
    assert (breaker.failures, breaker.stale) == (2, 1)
    breaker.failure(breaker.generation)  # a call sent after the close: Redis is away again
    assert not breaker.allow()
    assert breaker.until_probe() == pytest.approx(0.1)  # the first pause: a new outage
    assert (breaker.failures, breaker.stale) == (3, 1)


def test_only_a_close_after_an_outage_makes_earlier_calls_old_news() -> None:
    """Successes while it is closed (every call's) leave the generation alone: a call sent
    before them that fails is news, and opens it; so does a failure with no stamp."""
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    sent = breaker.generation
    for _ in range(10):
        breaker.success()
    assert breaker.generation == sent
    breaker.failure(sent)
    assert breaker.is_open
    assert breaker.stale == 0
    clock.now += 0.1
    breaker.success()
    assert breaker.generation == sent + 1
    breaker.failure()  # (no stamp: taken as new)
    assert breaker.is_open
    assert breaker.until_probe() == pytest.approx(0.1)


def test_a_probe_that_fails_after_another_call_closed_it_opens_nothing() -> None:
    """The probe went out into a partition; the grant listener's reconnect found Redis back
    and closed the breaker; then the probe times out. Its failure is old news: no second
    opening, no doubled pause. A call out while it was open that fails while it is still
    open counts as before (one outage)."""
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure(breaker.generation)
    clock.now += 0.1
    probe = breaker.generation  # the prober sends its probe
    breaker.failure(probe)  # a late caller of the same outage: open, nothing new
    assert breaker.until_probe() == 0.0
    breaker.success()  # another call came back
    clock.now += 1.0
    breaker.probe_failed(probe)
    assert breaker.closed
    assert (breaker.probes_failed, breaker.stale) == (0, 1)
    breaker.failure(breaker.generation)
    assert breaker.until_probe() == pytest.approx(0.1)  # not the doubled pause
    probe = breaker.generation
    clock.now += 0.1
    breaker.probe_failed(probe)  # a probe of this outage: the pause doubles, as before
    assert breaker.probes_failed == 1
    assert breaker.until_probe() == pytest.approx(0.2)


def test_the_pause_after_a_probe_runs_from_its_send_not_its_failure() -> None:
    """A probe sent into a partition fails only at its timeout. The next probe is due the
    pause after the send: at once if the timeout was longer than the pause (the network
    may have healed while it was out), else the rest of the pause; the pause still
    doubles once per failed probe."""
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure(breaker.generation)
    clock.now += 0.1
    sent = breaker.probing()  # out into the partition
    clock.now += 1.0  # THROTTLE_REDIS_TIMEOUT later: no answer
    breaker.probe_failed(sent)
    assert breaker.is_open
    assert not breaker.allow()
    assert breaker.until_probe() == 0.0  # the pause (0.2) ran out while it was out
    sent = breaker.probing()
    clock.now += 0.05  # refused at once
    breaker.probe_failed(sent)
    assert breaker.until_probe() == pytest.approx(0.4 - 0.05)  # the rest of the pause
    clock.now += breaker.until_probe()
    sent = breaker.probing()
    clock.now += 0.5
    breaker.probe_failed(sent)
    assert breaker.until_probe() == pytest.approx(0.8 - 0.5)
    assert breaker.probes_failed == 3
    clock.now += 0.3
    sent = breaker.probing()
    clock.now += 0.01
    breaker.success()  # Redis answered: closed, and the next outage starts afresh
    breaker.failure(breaker.generation)
    assert breaker.until_probe() == pytest.approx(0.1)
    breaker.probe_failed(breaker.generation)  # no send told: the pause from the failure
    assert breaker.until_probe() == pytest.approx(0.2)


@pytest.mark.parametrize("timeout_s", [0.0, 0.05, 0.25, 0.7, 1.0, 3.0])
def test_probes_go_one_per_pause_or_per_timeout_whichever_is_longer(timeout_s: float) -> None:
    """A prober on the breaker's clock against a Redis whose every probe fails after
    `timeout_s` (0: refused): one probe out at a time, each sent the longer of the pause
    (0.1, 0.2, 0.4, 0.8, 1.0 s, doubling per failed probe) and the last one's timeout after
    the last one's send. Before: the pause after the failure, the sum of the two."""
    clock = Clock()
    breaker = Breaker(0.1, 1.0, clock=clock)
    breaker.failure(breaker.generation)
    sends: list[float] = []
    while clock.now < 130.0:
        clock.now += breaker.until_probe()
        sent = breaker.probing()
        sends.append(clock.now)
        clock.now += timeout_s
        breaker.probe_failed(sent)
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(sends)]
    pauses = [min(1.0, 0.1 * 2 ** (n + 1)) for n in range(len(gaps))]
    assert gaps == [pytest.approx(max(timeout_s, p)) for p in pauses]
    # The window after the network heals while a probe is out: from its heal to the next
    # probe's send, at most the longer of the two (before: their sum).
    assert max(gaps) == pytest.approx(max(timeout_s, 1.0))


def _backend(server: RedisServer) -> RedisBackend:
    settings = Settings.from_env(
        {},
        redis_url=server.url,
        key_prefix="brk",
        # (Generous: a loaded machine's Redis may take more than a second, the start's PING
        # and the first call's FUNCTION LOAD above all. Redis stopped refuses at once, and a
        # slower probe only succeeds where a shorter timeout would fail it: no check is
        # bounded by it.)
        redis_timeout_s=3.0,
        concurrency="8",
        failure_mode="closed",
    )
    return RedisBackend(settings)


@pytest.mark.anyio
async def test_many_requests_failing_at_once_leave_the_first_pause(
    redis_server: RedisServer,
) -> None:
    backend = _backend(redis_server)
    await backend.start()
    try:
        redis_server.stop()
        clock = Clock()
        backend._breaker = breaker = Breaker(clock=clock)
        outcomes = await asyncio.gather(
            *(backend.acquire(Request(f"r{n}", "acme")) for n in range(40))
        )
        assert outcomes == [UNAVAILABLE] * 40
        assert breaker.failures >= 2  # several callers failed in the one outage
        assert breaker.until_probe() == pytest.approx(0.1)  # not the longest pause
    finally:
        await backend.stop()


@pytest.mark.anyio
async def test_a_dead_redis_is_probed_once_per_pause_and_the_budget_is_back_soon(
    redis_server: RedisServer,
) -> None:
    """Requests keep coming while Redis is away for 2.2 s: the probes follow the pauses
    (0.1, 0.2, 0.4, 0.8, 1.0 s), however many requests fail, and Redis answers again
    within the pause of its return."""
    backend = _backend(redis_server)
    await backend.start()
    try:
        redis_server.stop()
        stopped = time.monotonic()
        n = 0
        while time.monotonic() - stopped < 2.2:
            batch = [backend.acquire(Request(f"r{n}-{i}", "acme")) for i in range(5)]
            assert await asyncio.gather(*batch) == [UNAVAILABLE] * 5
            n += 1
            await asyncio.sleep(0.01)
        breaker = backend._breaker
        # Probes at 0.1, 0.3, 0.7, 1.5 s (the next at 2.5): four failed, one at a time.
        assert breaker.probes_failed in (3, 4, 5), breaker.probes_failed
        redis_server.start()
        back = time.monotonic()
        for _ in range(300):
            if not breaker.is_open:
                break
            await asyncio.sleep(0.01)
        assert not breaker.is_open
        assert time.monotonic() - back <= 1.0 + 0.5
        admitted = await backend.acquire(Request("after", "acme"))
        assert admitted != UNAVAILABLE
    finally:
        await backend.stop()


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.parametrize("timeout_s", [0.0, 0.4])
async def test_the_prober_sends_the_next_probe_a_pause_after_the_last_ones_send(
    timeout_s: float,
) -> None:
    """The backend's prober against a Redis whose probes fail after `timeout_s` (0:
    refused; 0.4: a partition, the call's timeout), pauses 0.1 then 0.2 s: probes go out
    0.1 s after the opening failure, then every max(`timeout_s`, 0.2) s, one at a time (not
    `timeout_s` + 0.2: 0.6 s apart before). Bounded waits: real time, slack 0.08 s."""
    backend = RedisBackend(
        Settings.from_env(
            {}, redis_url="redis://127.0.0.1:1/0", concurrency="4", failure_mode="local"
        )
    )
    backend._breaker = breaker = Breaker(0.1, 0.2)
    sends: list[float] = []
    out = 0

    async def probe() -> None:
        nonlocal out
        sends.append(time.monotonic())
        out += 1
        assert out == 1  # never two out at once
        await asyncio.sleep(timeout_s)
        out -= 1
        raise ConnectionError("no answer")

    backend._probe = probe  # type: ignore[method-assign]
    opened = time.monotonic()
    backend._on_failure(ConnectionError("gone"), breaker.generation)
    await asyncio.sleep(2.0)
    for task in list(backend._tasks):
        task.cancel()
    await asyncio.gather(*backend._tasks, return_exceptions=True)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sends)]
    print(f"probe failing after {timeout_s} s: first {sends[0] - opened:.3f} s, gaps {gaps}")
    assert 0.1 <= sends[0] - opened <= 0.1 + 0.08
    assert gaps[0] >= max(timeout_s, 0.2) - 0.005
    assert all(max(timeout_s, 0.2) - 0.005 <= g <= max(timeout_s, 0.2) + 0.08 for g in gaps), gaps
