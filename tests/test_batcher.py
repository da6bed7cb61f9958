"""The batcher's contract with batch.lua: deferred operations go again, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.batcher import MAX_BATCH, Batcher
from throttle_mw.backends.redis.protocol import DEFERRED, Op
from throttle_mw.scheduler import Request


def test_operations_the_script_deferred_go_in_the_next_call_in_their_order() -> None:
    calls: list[list[Op]] = []

    async def call(ops: Sequence[Op], retry: bool) -> list[str]:
        calls.append(list(ops))
        done = 2 if len(calls) == 1 else len(ops)  # the first call does two, defers the rest
        return [f"ok {op}" for op in ops[:done]] + [DEFERRED] * (len(ops) - done) + ["", "1", ""]

    async def main() -> list[str]:
        batcher = Batcher(call, lambda trailer: None)
        failed: list[BaseException] = []
        futures = [batcher.submit(f"A|{i}") for i in range(3)]
        batcher.send("R|x", failed.append)  # fire and forget: deferred too, not lost
        futures.append(batcher.submit("A|3"))
        results = await asyncio.gather(*futures)
        await batcher.close()
        assert not failed
        return results

    results = asyncio.run(main())
    assert results == ["ok A|0", "ok A|1", "ok A|2", "ok A|3"]
    assert calls == [["A|0", "A|1", "A|2", "R|x", "A|3"], ["A|2", "R|x", "A|3"]]


def test_after_a_call_that_deferred_most_the_next_carries_about_what_one_runs() -> None:
    """The script splits and answers every operation sent: 200 sent for 20 run would
    cost Redis more than the running. The next call carries a quarter more than the
    last one ran (at least MIN_BATCH), and twice as many after each that ran them all."""
    sizes: list[int] = []

    async def call(ops: Sequence[Op], retry: bool) -> list[str]:
        sizes.append(len(ops))
        done = min(len(ops), 20 if len(sizes) <= 2 else len(ops))
        return [f"ok {op}" for op in ops[:done]] + [DEFERRED] * (len(ops) - done) + ["", "1", ""]

    async def main() -> None:
        batcher = Batcher(call, lambda trailer: None)
        await asyncio.gather(*(batcher.submit(f"A|{i}") for i in range(300)))
        await batcher.close()

    asyncio.run(main())
    # 20 ran of MAX_BATCH, then of 26 (20 + 5 + 1); then all ran: twice as many, to the rest.
    assert sizes == [MAX_BATCH, 26, 26, 52, 104, 300 - 20 - 20 - 26 - 52 - 104]


TAIL = protocol.acquire_tail(Request("r", "acme"), 1.0, 2.0)
ACQUIRE = protocol.acquire_op("r1", TAIL)


def test_a_call_sent_before_the_breaker_closed_goes_again_as_a_retry_with_what_queued() -> None:
    """A call goes out into a partition; while it is out another call finds Redis back (the
    breaker closes: its generation moves), and more operations queue behind it; then it
    times out. Its silence is old news: its operations go again, first, acquires as retries
    (answered from what ran, never done twice), with those queued behind, and nobody sees
    a failure (which would apply the failure mode beside the shared budget)."""
    calls: list[list[Op]] = []
    generation = [0]

    async def call(ops: Sequence[Op], retry: bool) -> list[str]:
        calls.append(list(ops))
        if len(calls) == 1:
            await asyncio.sleep(0.01)
            generation[0] += 1  # meanwhile the probe (another call) closed the breaker
            raise RedisTimeoutError("Timeout reading from socket")
        return [f"ok {op}" for op in ops] + ["", "1", ""]

    async def main() -> list[str]:
        batcher = Batcher(call, lambda trailer: None, lambda: generation[0])
        failed: list[BaseException] = []
        first = [batcher.submit(ACQUIRE), batcher.submit(protocol.TICK)]
        await asyncio.sleep(0)  # the first call is out
        batcher.send(protocol.release_op("r0"), failed.append)  # queued behind it
        queued = batcher.submit(protocol.acquire_op("r2", TAIL))
        results = await asyncio.gather(*first, queued)
        await batcher.close()
        assert not failed
        return results

    results = asyncio.run(main())
    again = [protocol.as_retry(ACQUIRE), protocol.TICK]
    assert again[0] != ACQUIRE  # (marked a retry)
    assert calls == [
        [ACQUIRE, protocol.TICK],
        [*again, protocol.release_op("r0"), protocol.acquire_op("r2", TAIL)],
    ]
    assert results == [f"ok {op}" for op in again] + [f"ok {protocol.acquire_op('r2', TAIL)}"]


@pytest.mark.parametrize("closes", [0, 1, 2], ids=["no-close", "closed-once", "closed-twice"])
def test_a_call_that_gets_no_answer_fails_what_queued_unless_redis_answered_meanwhile(
    closes: int,
) -> None:
    """No close while it was out (the outage is news): it fails, and what queued behind it
    with it, at once (one timeout, not two). A close meanwhile: sent again, once; if that
    call too fails after yet another close, it fails (Redis keeps answering some calls and
    not others: the failure mode decides)."""
    calls: list[list[Op]] = []
    generation = [0]

    async def call(ops: Sequence[Op], retry: bool) -> list[str]:
        calls.append(list(ops))
        await asyncio.sleep(0.01)
        if len(calls) <= closes:
            generation[0] += 1
        raise RedisTimeoutError("Timeout reading from socket")

    async def main() -> list[BaseException]:
        batcher = Batcher(call, lambda trailer: None, lambda: generation[0])
        futures = [batcher.submit(protocol.TICK)]
        await asyncio.sleep(0)
        futures.append(batcher.submit(ACQUIRE))  # queued behind it
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return [o for o in outcomes if isinstance(o, BaseException)]

    failures = asyncio.run(main())
    assert len(failures) == 2
    retry = protocol.as_retry(ACQUIRE)
    if closes == 0:
        assert calls == [[protocol.TICK]]
    elif closes == 1:
        assert calls == [[protocol.TICK], [protocol.TICK, ACQUIRE]]  # again, with what queued
    else:
        # Each operation once again at most: the tick fails, the acquire (queued the first
        # time, sent once since) goes once more.
        assert calls == [[protocol.TICK], [protocol.TICK, ACQUIRE], [retry]]
