"""batch.lua refuses an acquire that is not as protocol.py writes it: a clear error,
and nothing decided."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.lua_scheduler import LuaScheduler
from tests.support.redis_server import RedisServer
from throttle_mw.backends.redis import protocol
from throttle_mw.priorities import PRIORITIES
from throttle_mw.scheduler import Limits, Policy, Request


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def test_a_malformed_acquire_is_an_error_not_a_decision(
    client: redis.Redis, functions: bool
) -> None:
    scheduler = LuaScheduler(
        client, Limits(concurrency=10), Policy(dict.fromkeys(PRIORITIES, 5.0)), 0.0,
        functions=functions,
    )  # fmt: skip
    scheduler.acquire(0.01, Request("ok", "t"))
    good = protocol.acquire_op("bad", protocol.acquire_tail(Request("bad", "t"), 1.0, 5.0))
    fields = good.split(protocol.SEP)
    for op in (
        protocol.SEP.join(fields[:-1]),  # a field short
        protocol.SEP.join([*fields[:7], "x", fields[8]]),  # flags no number
    ):
        for ops in ([op], [op, protocol.TICK]):  # alone (the fast path's try) or batched
            with pytest.raises(redis.ResponseError, match="malformed acquire"):
                scheduler.batch(0.02, ops)
    assert scheduler.in_flight == 1
    assert scheduler.waiting == 0
