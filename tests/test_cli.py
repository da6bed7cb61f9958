"""The live-limits tool: input validation, status against a real Redis, and a fleet that follows.

The fleet test runs four uvicorn processes sharing one Redis under steady
open-loop load above the budget, changes the rate with the tool while the
load runs, and checks that the fleet's admitted rate follows.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from demo_app.loadtest import engine
from demo_app.loadtest.engine import Route, Scenario, TenantLoad
from tests.support.ports import free_port, release_port
from tests.support.redis_server import RedisCluster, RedisServer
from tests.support.servers import AppServer, wait_until
from throttle_mw import cli
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.backends.redis.keys import tenant_digest
from throttle_mw.scheduler import Request
from throttle_mw.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_env")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def app_env(clean_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> RedisServer:
    """The app's own environment, as an operator's shell inside a pod would have it."""
    monkeypatch.setenv("THROTTLE_REDIS_URL", clean_redis_server.url)
    monkeypatch.setenv("THROTTLE_KEY_PREFIX", "survey")
    # A token every 4 s: no request gets admitted while a test looks.
    monkeypatch.setenv("THROTTLE_RATE", "0.25")
    monkeypatch.setenv("THROTTLE_BURST", "1")
    monkeypatch.setenv("THROTTLE_MAX_WAIT", "600")
    monkeypatch.setenv("THROTTLE_TENANT_WEIGHTS", "acme=2")
    return clean_redis_server


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set"], "nothing to set"),
        (["set", "--rate", "-3"], "--rate -3: invalid, expected a positive number"),
        (["set", "--rate", "fast"], "--rate fast: invalid"),
        (["set", "--burst", "0.5"], "--burst 0.5: invalid, expected a number >= 1"),
        (["set", "--burst", "none"], "only a rate or the concurrency can be off"),
        (["set", "--concurrency", "2.5"], "--concurrency 2.5: invalid, expected a whole number"),
        (["set", "--weight", "acme"], "--weight acme: invalid, expected tenant=weight pairs"),
        (["set", "--weight", "acme=0"], "--weight acme=0: invalid"),
        (["set", "--weight", "bad tenant=2"], "--weight bad tenant=2: invalid"),
        (["set", "--rate", "none"], "would leave no budget"),
        (["reset", "--weight", "no spaces"], "--weight no spaces: invalid"),
        (["status", "--top", "0"], "expected a whole number from 1 to 100"),
        (["--prefix", "{x}"], "--prefix {x}: invalid"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_it(
    app_env: RedisServer, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("throttle-mw: error: ")
    assert message in err
    with app_env.client() as client:
        assert client.keys("*") == []  # nothing was written


def test_a_redis_url_is_needed_and_its_password_is_never_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "status")
    assert code == 2
    assert "pass --redis-url or set THROTTLE_REDIS_URL" in err
    code, _, err = run(capsys, "--redis-url", "http://user:hunter2@example.com")
    assert code == 2
    assert "--redis-url" in err
    assert "hunter2" not in err
    port = free_port()  # reserved and never listened on: refused at once
    try:
        code, out, err = run(capsys, "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0")
    finally:
        release_port(port)
    assert code == 1
    assert "Redis unreachable" in err
    assert "hunter2" not in err + out


def test_bad_environment_is_reported_like_bad_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THROTTLE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("THROTTLE_RATE", "lots")
    code, _, err = run(capsys, "status")
    assert code == 2
    assert "THROTTLE_RATE=lots: invalid" in err


# --- status, set, reset against a real Redis ----------------------------------------------


@pytest.fixture
def busy_budget(app_env: RedisServer) -> Iterator[None]:
    """A process with 12 requests in the budget: the first admitted, then a burst of 1 is
    gone, so 11 wait (9 for c and 2 for b; 6 low and 5 normal)."""
    settings = Settings.from_env()
    backend = RedisBackend(settings)
    loop = asyncio.new_event_loop()

    async def fill() -> None:
        await backend.start()
        for i in range(12):
            tenant = "c" if i % 4 else "b"
            await backend.acquire(Request(f"r{i}", tenant, "low" if i % 2 else "normal"))

    loop.run_until_complete(fill())
    yield
    loop.run_until_complete(backend.stop())
    loop.close()


def status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "status", "--json", *argv)
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_status_shows_the_live_state_and_the_limits_in_force(
    busy_budget: None, capsys: pytest.CaptureFixture[str]
) -> None:
    data = status_json(capsys)
    assert data["prefix"] == "survey"
    assert data["processes"] == 1
    assert data["waiting"] == 11 == sum(data["queued_by_priority"].values())
    assert data["queued_by_priority"]["low"] == 6
    assert data["queued_by_priority"]["normal"] == 5
    assert data["busiest"] == [{"tenant": "c", "queued": 9}, {"tenant": "b", "queued": 2}]
    assert data["tenants"] == 2
    assert 0 <= data["tokens"] < 1
    limits = data["limits"]
    assert limits["live"] == {}
    assert limits["environment"]["rate"] == 0.25
    assert limits["environment"]["burst"] == 1
    assert limits["in_force"]["rate"] == 0.25
    assert data["weights"] == {"live": {}, "environment": {"acme": 2.0}}

    code, text, _ = run(capsys)  # the default command, for people
    assert code == 0
    assert "1 live process" in text
    assert "queued     critical 0  high 0  normal 5  low 6  (11 in all)" in text
    assert "       9  c" in text


def test_set_stores_live_overrides_that_status_shows_and_reset_removes(
    busy_budget: None, capsys: pytest.CaptureFixture[str], app_env: RedisServer
) -> None:
    code, out, _ = run(
        capsys, "set", "--rate", "60", "--concurrency", "8", "--weight", "globex=3",
        "--weight", "acme=0.5", "--tenant-rate", "10", "--tenant-burst", "4",
    )  # fmt: skip
    assert code == 0
    assert "rate=60, burst=12" in out
    with app_env.client(decode_responses=True) as client:
        assert client.hgetall("{survey}:cfg") == {
            "rate": "60.0",
            "burst": "12.0",  # the default for the new rate: a fifth of a second of it
            "concurrency": "8",
            "tenant_rate": "10.0",
            "tenant_burst": "4.0",
        }
        assert client.hget("{survey}:w", tenant_digest("globex")) == "3.0"

    data = status_json(capsys)
    assert data["limits"]["live"] == {
        "rate": 60.0, "burst": 12.0, "concurrency": 8.0, "tenant_rate": 10.0, "tenant_burst": 4.0,
    }  # fmt: skip
    assert data["limits"]["in_force"]["rate"] == 60.0
    assert data["limits"]["environment"]["rate"] == 0.25
    assert data["weights"]["live"] == {"acme": 0.5, "globex": 3.0}

    assert run(capsys, "set", "--rate", "none")[0] == 0  # concurrency 8 is still a budget
    assert status_json(capsys)["limits"]["in_force"]["rate"] is None
    assert status_json(capsys)["tokens"] is None

    assert run(capsys, "reset", "--concurrency", "--weight", "globex")[0] == 0
    data = status_json(capsys)
    assert "concurrency" not in data["limits"]["live"]
    assert data["weights"]["live"] == {"acme": 0.5}

    code, out, _ = run(capsys, "reset")
    assert code == 0
    assert "live limits: none" in out
    with app_env.client() as client:
        assert not client.exists("{survey}:cfg", "{survey}:w", "{survey}:wn")
    assert status_json(capsys)["limits"]["in_force"]["rate"] == 0.25


def test_without_the_app_s_environment_the_unknown_is_shown_as_unknown(
    clean_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = clean_redis_server.url
    assert run(capsys, "--redis-url", url, "set", "--concurrency", "5")[0] == 0
    data = status_json(capsys, "--redis-url", url)
    assert data["limits"]["environment"] is None
    assert data["limits"]["in_force"] == {"concurrency": 5.0}
    assert data["tokens"] is None
    code, text, _ = run(capsys, "--redis-url", url)
    assert code == 0
    assert "each process's own" in text


def test_a_refusal_by_redis_is_reported_without_the_password(
    clean_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with clean_redis_server.client() as client:
        client.acl_setuser("viewer", enabled=True, passwords=["+pw-xyz"], commands=["+ping"])
    try:
        url = f"redis://viewer:pw-xyz@127.0.0.1:{clean_redis_server.port}/0"
        code, out, err = run(capsys, "--redis-url", url, "set", "--rate", "5")
    finally:
        with clean_redis_server.client() as client:
            client.acl_deluser("viewer")
    assert code == 1
    assert "Redis refused (NoPermissionError" in err
    assert "pw-xyz" not in out + err


def test_status_and_set_work_on_redis_cluster(
    clean_redis_cluster: RedisCluster,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_REDIS_URL", clean_redis_cluster.url)
    monkeypatch.setenv("THROTTLE_REDIS_CLUSTER", "true")
    monkeypatch.setenv("THROTTLE_RATE", "5")
    assert run(capsys, "set", "--rate", "9", "--weight", "acme=2")[0] == 0
    data = status_json(capsys)
    assert data["limits"]["in_force"]["rate"] == 9.0
    assert data["weights"]["live"] == {"acme": 2.0}
    assert run(capsys, "reset")[0] == 0
    assert status_json(capsys)["limits"]["live"] == {}


def test_watch_refreshes_until_interrupted(
    app_env: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    naps: list[float] = []

    async def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_nap", nap)  # the watch loop's one-second nap
    code, out, _ = run(capsys, "status", "--watch", "--json")
    assert code == 0
    assert naps == [1.0, 1.0, 1.0]
    assert [json.loads(line)["prefix"] for line in out.splitlines()] == ["survey"] * 3


def test_the_module_and_its_help_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "throttle_mw", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "{status,set,reset}" in done.stdout


# --- the fleet follows -----------------------------------------------------------------------

WINDOW_S = 0.5
OFFERED = 80.0
PHASES: Sequence[tuple[float, float]] = ((0.0, 20.0), (3.0, 60.0), (6.0, 20.0))
DURATION_S = 9.0


def windows(times: Sequence[float], start: float, end: float) -> list[float]:
    """Admissions per second in each whole WINDOW_S window from `start` until `end`."""
    count = int((end - start) // WINDOW_S)
    rates = [0.0] * count
    for t in times:
        k = int((t - start) // WINDOW_S)
        if 0 <= k < count:
            rates[k] += 1 / WINDOW_S
    return rates


def response_s(times: Sequence[float], at: float, old: float, new: float) -> float:
    """How long after `at` the admitted rate (over a sliding 0.5 s window) got halfway to `new`."""
    halfway = (old + new) / 2
    t = at - WINDOW_S
    while t < at + 3.0:
        rate = sum(1 for x in times if t <= x < t + WINDOW_S) / WINDOW_S
        if (rate >= halfway) if new > old else (rate <= halfway):
            return max(0.0, t + WINDOW_S / 2 - at)
        t += 0.02
    return float("inf")


@pytest.mark.e2e
def test_a_fleet_of_four_follows_a_rate_change_within_a_second(
    clean_redis_server: RedisServer,
    start_app_servers: Callable[..., list[AppServer]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = clean_redis_server.url
    env = {
        "THROTTLE_REDIS_URL": url,
        "THROTTLE_KEY_PREFIX": "fleet",
        "THROTTLE_RATE": str(PHASES[0][1]),
        "THROTTLE_MAX_WAIT": "1",
        "THROTTLE_FAILURE_MODE": "closed",  # a Redis hiccup must not admit extra
        "THROTTLE_REDIS_TIMEOUT": "1",
    }
    servers = start_app_servers(4, "tests.apps.metered:app", env=env)
    args = ("--redis-url", url, "--prefix", "fleet")
    assert wait_until(lambda: status_json(capsys, *args)["processes"] == 4, timeout_s=10)

    load = TenantLoad("t", OFFERED, ((1.0, Route("r", "GET", "/", "normal")),), arrivals="even")
    scenario = Scenario("rate-change", DURATION_S, 1, (load,), timeout_s=5.0)
    changed: list[tuple[float, float]] = []  # (when, how long the tool took)

    async def change_rates(started: float) -> None:
        for at, rate in PHASES[1:]:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            before = time.perf_counter()
            code = await asyncio.to_thread(cli.main, [*args, "set", "--rate", f"{rate:g}"])
            assert code == 0
            changed.append((before - started, time.perf_counter() - before))

    async def drive() -> list[engine.Record]:
        started = time.perf_counter()
        records, _ = await asyncio.gather(
            engine.run(scenario, [s.url for s in servers]), change_rates(started)
        )
        return records

    records = asyncio.run(drive())
    capsys.readouterr()
    admitted = sorted(r.done_s for r in records if r.status == 200)
    statuses = {r.status for r in records}
    assert statuses <= {200, 429, 503}, statuses
    assert len(changed) == 2

    report = []
    bounds = [(PHASES[0][0], changed[0][0]), (changed[0][0], changed[1][0])]
    bounds.append((changed[1][0], DURATION_S))
    for (start, end), (_, rate), i in zip(bounds, PHASES, range(3), strict=True):
        # Skip the first second of each phase: the fleet has that long to follow.
        steady = windows(admitted, start + 1.0, end)
        mean = sum(steady) / len(steady)
        report.append((rate, mean, steady))
        assert 0.75 * rate <= mean <= 1.15 * rate, (i, rate, mean, steady)
        if i > 0:
            old = PHASES[i - 1][1]
            halfway = (old + rate) / 2
            # Every window from one second after the change is past the halfway mark.
            assert all((r > halfway) if rate > old else (r < halfway) for r in steady), (
                i, rate, steady,
            )  # fmt: skip
    followed = [
        response_s(admitted, changed[i - 1][0], PHASES[i - 1][1], PHASES[i][1]) for i in (1, 2)
    ]
    with capsys.disabled():
        print(
            f"\nrate change: tool took {[round(c[1] * 1000) for c in changed]} ms; fleet crossed "
            f"halfway after {[round(f, 2) for f in followed]} s; steady rates "
            f"{[(r, round(m, 1)) for r, m, _ in report]}"
        )
    assert all(f <= 1.0 for f in followed), followed
    for server in servers:
        assert "Traceback" not in server.log()
    with redis.Redis.from_url(url) as client:
        assert client.hget("{fleet}:cfg", "rate") == b"20.0"
