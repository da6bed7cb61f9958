"""A wrong Redis address is easy to spot: logs name the endpoint, never the credentials.

At start-up the Redis backend logs which Redis it uses (scheme, host, port, db)
and whether it answered a PING; every log line about a Redis failure names it
too. `settings.redis_endpoint` is the one place that turns a URL into that text
(the ``throttle-mw`` tool's status uses it as well).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from tests.support.ports import free_port, release_port
from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer, wait_until
from throttle_mw.backends import Admitted
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings, redis_endpoint

PASSWORD = "n0t-in-the-logs"
USER = "default"  # Redis' own user: the password alone authenticates as it


@pytest.mark.parametrize(
    ("url", "cluster", "shown"),
    [
        ("redis://localhost", False, "redis://localhost:6379/0"),
        ("redis://:pw@cache.internal:6380/3", False, "redis://cache.internal:6380/3"),
        ("rediss://app:pw@10.0.0.5:6390/2", False, "rediss://10.0.0.5:6390/2"),
        ("redis://h:7000/0?password=pw&db=5", False, "redis://h:7000/5"),
        ("redis://app:pw@[::1]:7000", False, "redis://[::1]:7000/0"),
        ("redis://app:pw@node-1:7000/0", True, "redis://node-1:7000 (cluster)"),
        ("unix:///run/redis.sock?db=4&password=pw", False, "unix:///run/redis.sock?db=4"),
        ("unix://app:pw@/run/redis.sock", False, "unix:///run/redis.sock?db=0"),
    ],
)
def test_the_endpoint_is_scheme_host_port_and_db_without_credentials(
    url: str, cluster: bool, shown: str
) -> None:
    assert redis_endpoint(url, cluster=cluster) == shown
    assert "pw" not in shown
    assert "app" not in shown


@pytest.fixture
def protected_redis(redis_binary: object) -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture
def dead_port() -> Iterator[int]:
    port = free_port()  # reserved, never listened on: connections are refused
    try:
        yield port
    finally:
        release_port(port)


def backend_for(url: str) -> RedisBackend:
    # Redis timeout 3 s: generous, for a loaded machine (the start's PING must be answered
    # in it); a dead port and a stopped Redis refuse at once, so no check is bounded by it.
    return RedisBackend(
        Settings.from_env({}, rate=50.0, redis_url=url, key_prefix="ep", redis_timeout_s=3.0)
    )


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


@pytest.mark.anyio
async def test_start_up_logs_the_endpoint_and_that_redis_answered(
    protected_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="throttle_mw")
    endpoint = f"redis://127.0.0.1:{protected_redis.port}/0"
    backend = backend_for(f"redis://{USER}:{PASSWORD}@127.0.0.1:{protected_redis.port}/0")
    await backend.start()
    await backend.stop()
    text = logged(caplog)
    assert f"shared budget in Redis at {endpoint}" in text
    assert f"Redis at {endpoint} answered in" in text
    assert PASSWORD not in text
    assert f"{USER}:" not in text
    assert "did not answer" not in text


@pytest.mark.anyio
async def test_start_up_logs_the_endpoint_and_that_redis_did_not_answer(
    dead_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="throttle_mw")
    backend = backend_for(f"redis://{USER}:{PASSWORD}@127.0.0.1:{dead_port}/2")
    await backend.start()  # information, not a failure: the failure mode applies
    try:
        outcome = await backend.acquire(Request("r1", "acme"))
        assert isinstance(outcome, Admitted)  # decided locally (failure mode `local`)
    finally:
        await backend.stop()
    text = logged(caplog)
    endpoint = f"redis://127.0.0.1:{dead_port}/2"
    assert (
        f"Redis at {endpoint} cannot be used at start-up: the connection was refused "
        "(is Redis running at THROTTLE_REDIS_URL?); failure mode 'local' until it can"
    ) in text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings
    assert all(endpoint in r.getMessage() for r in warnings), [r.getMessage() for r in warnings]
    assert PASSWORD not in text
    assert f"{USER}:" not in text


@pytest.mark.anyio
async def test_failure_logs_name_the_endpoint(
    protected_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="throttle_mw")
    endpoint = f"redis://127.0.0.1:{protected_redis.port}/0"
    backend = backend_for(protected_redis.url)
    await backend.start()
    try:
        await backend.acquire(Request("r1", "acme"))
        protected_redis.stop()
        await backend.acquire(Request("r2", "acme"))  # fails: the failure mode decides
        # The grant listener notices too (its BLPOP's connection closed, or its 1 s block
        # timing out): waited for, 5 s at most, not a fixed 1.5 s a loaded machine can miss.
        for _ in range(100):
            if f"grant listener lost Redis at {endpoint}" in logged(caplog):
                break
            await asyncio.sleep(0.05)
        text = logged(caplog)
        assert f"Redis at {endpoint} unavailable" in text
        assert f"grant listener lost Redis at {endpoint}" in text
        protected_redis.start()
        for n in range(50):  # the breaker lets a probe through within a second
            await backend.acquire(Request(f"r{3 + n}", "acme"))
            if f"Redis at {endpoint} is back" in logged(caplog):
                break
            await asyncio.sleep(0.1)
        assert f"Redis at {endpoint} is back" in logged(caplog)
    finally:
        await backend.stop()
    assert PASSWORD not in logged(caplog)


@pytest.mark.anyio
@pytest.mark.redis  # its Redis is looked up by name (conftest.py: the mark)
@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_concurrent_first_requests_start_the_backend_once_and_all_get_an_answer(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """With ``--lifespan off`` the first requests start the backend; the start-up PING
    (and the cluster's slot map) must not leave the others a half-started backend."""
    fixture = "clean_redis_server" if kind == "redis" else "clean_redis_cluster"
    url = request.getfixturevalue(fixture).url
    settings = Settings.from_env(
        {}, rate=1000.0, redis_url=url, redis_cluster=kind == "cluster", redis_timeout_s=2.0
    )
    backend = RedisBackend(settings)
    try:
        outcomes = await asyncio.gather(
            *(backend.acquire(Request(f"first.{n}", f"t{n}")) for n in range(20))
        )
    finally:
        await backend.stop()
    assert all(isinstance(o, Admitted) for o in outcomes), outcomes


@pytest.mark.e2e
def test_uvicorn_shows_an_unreachable_redis_by_its_endpoint(dead_port: int) -> None:
    """Without any logging set-up (uvicorn's own only), the warning reaches the server log."""
    env = {
        "THROTTLE_REDIS_URL": f"redis://app:{PASSWORD}@127.0.0.1:{dead_port}/1",
        "THROTTLE_RATE": "10",
    }
    with AppServer("tests.apps.fleet_probe:app", env=env, health_path="/healthz") as server:
        expected = f"Redis at redis://127.0.0.1:{dead_port}/1 cannot be used at start-up"
        assert wait_until(lambda: expected in server.log(), timeout_s=10), server.log()
        log = server.log()
    assert PASSWORD not in log
    assert "app:" not in log
    assert "Traceback" not in log
