"""The batcher's contract with batch.lua: deferred operations go again, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from throttle_mw.backends.redis.batcher import MAX_BATCH, Batcher
from throttle_mw.backends.redis.protocol import DEFERRED, Op


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
