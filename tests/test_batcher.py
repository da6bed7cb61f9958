"""The batcher's contract with batch.lua: deferred operations go again, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from throttle_mw.backends.redis.batcher import Batcher
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
