"""SurveyTool end to end: real uvicorn servers on 127.0.0.1, real SQLite, real overload.

Servers come from tests/support/servers.py (`AppServer`), configured only by
environment variables, as users configure the app. Each test uses its own
tenant ids, so tests sharing a server do not see each other's data.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo_app.config import AppConfig
from demo_app.history import LimitHistory
from demo_app.publish import FleetStats
from demo_app.stats import OTHER, LiveCounters, merge
from demo_app.store import SurveyStore
from tests.support.ports import free_port, release_port
from tests.support.redis_server import RedisServer
from tests.support.servers import REPO_ROOT, AppServer, run_failing_app
from throttle_mw import ThrottleEvent

e2e = pytest.mark.e2e

APP = "demo_app.app:app"
ARTIFACTS = REPO_ROOT / "artifacts"
GOOD = {"respondent": "r-1", "answers": {"q1": 4, "q2": "yes", "q3": "more coffee"}}


def tenant(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def client(server: AppServer, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=15.0, trust_env=False, headers=headers)


def timings(response: httpx.Response) -> dict[str, float]:
    """``Server-Timing`` metrics by name (the header may repeat)."""
    found = {}
    for value in response.headers.get_list("server-timing"):
        for metric in value.split(","):
            match = re.match(r"\s*([\w-]+);dur=([\d.]+)", metric)
            if match:
                found[match.group(1)] = float(match.group(2))
    return found


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("surveytool-db")


@pytest.fixture(scope="module")
def app_server(db_dir: Path) -> Iterator[AppServer]:
    """A roomy budget and a fast store: for behaviour, not overload."""
    env = {
        "THROTTLE_RATE": "1000",
        "THROTTLE_CONCURRENCY": "64",
        "SURVEYTOOL_DB": str(db_dir / "roomy.sqlite3"),
        "SURVEYTOOL_WORK_MS": "2",
    }
    with AppServer(APP, env=env, health_path="/healthz") as server:
        yield server


@pytest.fixture(scope="module")
def tight_server(db_dir: Path) -> Iterator[AppServer]:
    """Two requests in flight, 200 ms each: about 10 requests/s, easy to overload."""
    env = {
        "THROTTLE_CONCURRENCY": "2",
        "THROTTLE_MAX_WAIT": "critical=5,high=5,normal=2,low=1",
        "SURVEYTOOL_DB": str(db_dir / "tight.sqlite3"),
        "SURVEYTOOL_SLOTS": "2",
        "SURVEYTOOL_WORK_MS": "200",
    }
    with AppServer(APP, env=env, health_path="/healthz") as server:
        yield server


@pytest.fixture(scope="module")
def learning_server(db_dir: Path) -> Iterator[AppServer]:
    """A learned limit (nothing else set) in front of 4 slots of 50 ms (80/s), whose slots
    the admin route may change."""
    env = {
        "THROTTLE_CONCURRENCY": "auto",
        "SURVEYTOOL_DB": str(db_dir / "learning.sqlite3"),
        "SURVEYTOOL_SLOTS": "4",
        "SURVEYTOOL_WORK_MS": "50",
        "SURVEYTOOL_ADMIN": "true",
    }
    with AppServer(APP, env=env, health_path="/healthz") as server:
        yield server


def submit(http: httpx.Client, survey: str = "s1", body: Any = GOOD, **kw: Any) -> httpx.Response:
    return http.post(f"/api/surveys/{survey}/responses", json=body, **kw)


# --- behaviour ---------------------------------------------------------------------------


@e2e
def test_submissions_are_stored_and_aggregated_on_the_dashboard(app_server: AppServer) -> None:
    acme = tenant("acme")
    with client(app_server, **{"X-Tenant-ID": acme}) as http:
        first = submit(http, body={"respondent": "ann", "answers": {"q1": 4, "q2": "yes"}})
        second = submit(http, body={"respondent": "bob", "answers": {"q1": 2, "q2": "yes"}})
        third = submit(http, body={"respondent": "cy", "answers": {"q2": "no", "new": 7}})
        assert [r.status_code for r in (first, second, third)] == [201, 201, 201]
        ids = {r.json()["id"] for r in (first, second, third)}
        assert len(ids) == 3
        board = http.get("/api/dashboard", params={"survey_id": "s1"})
    assert board.status_code == 200
    data = board.json()
    assert data["responses"] == 3
    questions = {q["question_id"]: q for q in data["questions"]}
    assert questions["q1"]["answers"] == 2
    assert questions["q1"]["mean"] == 3.0
    assert (questions["q1"]["min"], questions["q1"]["max"]) == (2, 4)
    assert questions["q2"]["top_answers"][0] == {"answer": "yes", "count": 2}
    assert questions["new"]["mean"] == 7.0
    # Another tenant's dashboard does not see acme's responses.
    with client(app_server, **{"X-Tenant-ID": tenant("globex")}) as http:
        other = http.get("/api/dashboard", params={"survey_id": "s1"}).json()
    assert other["responses"] == 0


@e2e
def test_replicas_sharing_the_sqlite_file_see_the_same_data(
    app_server: AppServer, db_dir: Path
) -> None:
    env = {
        "THROTTLE_RATE": "1000",
        "SURVEYTOOL_DB": str(db_dir / "roomy.sqlite3"),
        "SURVEYTOOL_WORK_MS": "2",
    }
    acme = {"X-Tenant-ID": tenant("acme")}
    with AppServer(APP, env=env, health_path="/healthz") as replica:
        with client(app_server, **acme) as http:
            assert submit(http, "s3").status_code == 201
        with client(replica, **acme) as http:
            board = http.get("/api/dashboard", params={"survey_id": "s3"})
    assert board.json()["responses"] == 1


def _open_store(db_path: str, start: Any) -> None:
    from demo_app.config import AppConfig
    from demo_app.store import SurveyStore

    async def open_and_close() -> None:
        store = SurveyStore(AppConfig(db_path=Path(db_path), slots=2))
        start.wait()
        await store.start()
        await store.stop()

    asyncio.run(open_and_close())


def test_replicas_creating_the_sqlite_file_together_all_start(tmp_path: Path) -> None:
    # Replicas racing to switch a new file to WAL once failed with "database is locked".
    ctx = multiprocessing.get_context("fork")  # fork: all six reach the start line together
    for attempt in range(20):
        db = tmp_path / f"race-{attempt}.sqlite3"
        start = ctx.Event()
        procs = [ctx.Process(target=_open_store, args=(str(db), start)) for _ in range(6)]
        for proc in procs:
            proc.start()
        time.sleep(0.2)
        start.set()
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0] * 6


@e2e
def test_every_app_response_reports_its_own_service_time(app_server: AppServer) -> None:
    with client(app_server, **{"X-Tenant-ID": tenant("acme")}) as http:
        created = submit(http)
        missing = http.get("/api/dashboard", params={"survey_id": "nope"})
        health = http.get("/healthz")
        page = http.get("/")
    for response in (created, missing, health, page):
        assert "app" in timings(response), response.headers
    # The store holds a slot for its work time: the submission's app time shows it.
    assert timings(created)["app"] >= 1.0
    assert "throttle" in timings(created)  # throttled routes also say how long they waited
    assert "throttle" not in timings(health)  # exempt: the throttle is not involved


@e2e
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"THROTTLE_CONCURRENCY": "eight"}, "THROTTLE_CONCURRENCY=eight"),
        ({"THROTTLE_RATE": "80", "SURVEYTOOL_SLOTS": "0"}, "SURVEYTOOL_SLOTS=0"),
    ],
)
def test_a_bad_setting_stops_the_app_with_a_message_naming_it(
    env: dict[str, str], named: str, tmp_path: Path
) -> None:
    failed = run_failing_app(APP, env={"SURVEYTOOL_DB": str(tmp_path / "db"), **env})
    assert failed.returncode != 0
    assert named in failed.output


def _chunks(size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        sent += 16 * 1024
        yield b"[" * 16 * 1024


S1 = "/api/surveys/s1/responses"


def answer(value: object) -> dict[str, Any]:
    return {"json": {"respondent": "x", "answers": {"q1": value}}}


BAD_INPUTS: list[tuple[str, str, dict[str, Any], int]] = [
    # (method, path, httpx request arguments, expected status)
    ("POST", S1, {"content": b'{"respondent": "x", '}, 400),
    ("POST", S1, {"content": b"\xff\xfe{}"}, 400),
    ("POST", S1, {"content": b""}, 400),
    ("POST", S1, {"content": b"[" * 60_000}, 400),  # deep enough to exhaust the parser
    ("POST", S1, {"content": b'{"respondent":"x","answers":{"q":' + b"1" * 5000 + b"}}"}, 400),
    ("POST", S1, {"json": {"answers": {"q1": 1}}}, 422),
    ("POST", S1, {"json": {"respondent": "x"}}, 422),
    ("POST", S1, {"json": [GOOD]}, 422),
    ("POST", S1, {"content": b"null"}, 422),
    ("POST", S1, {"json": {"respondent": "", "answers": {}}}, 422),
    ("POST", S1, {"json": {"respondent": "x" * 65, "answers": {}}}, 422),
    ("POST", S1, {"json": {"respondent": 7, "answers": {}}}, 422),
    ("POST", S1, {"json": {"respondent": "x", "answers": [1]}}, 422),
    ("POST", S1, answer(1.5), 422),
    ("POST", S1, answer(True), 422),
    ("POST", S1, answer(None), 422),
    ("POST", S1, answer(10**30), 422),
    ("POST", S1, answer("a" * 5000), 422),
    ("POST", S1, answer({"nested": 1}), 422),
    ("POST", S1, {"json": {"respondent": "x", "answers": {"bad id!": 1}}}, 422),
    ("POST", S1, {"json": {"respondent": "x", "answers": {f"q{i}": 1 for i in range(51)}}}, 422),
    ("POST", S1, {"content": b'{"respondent": "\\ud800", "answers": {}}'}, 422),
    ("POST", S1, {"content": b'{"respondent": "x", "answers": {"q1": "\\udfff"}}'}, 422),
    ("POST", S1, {"content": b"x" * 200_000}, 413),
    ("POST", S1, {"content": _chunks(300_000)}, 413),  # chunked: no Content-Length
    ("POST", S1, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
    ("POST", "/api/surveys/nope/responses", {"json": GOOD}, 404),
    ("POST", "/api/surveys/" + "s" * 300 + "/responses", {"json": GOOD}, 404),
    ("GET", "/api/dashboard", {}, 422),
    ("GET", "/api/dashboard?survey_id=nope", {}, 404),
    ("GET", "/api/dashboard?survey_id=" + "s" * 100, {}, 422),
    ("GET", "/api/stats/live?survey_id=nope", {}, 404),
    ("GET", "/api/stats/live", {}, 422),
    ("GET", "/api/dashboard?survey_id=s1", {"headers": {"X-Tenant-ID": "not a tenant!"}}, 400),
    ("GET", "/api/dashboard?survey_id=s1", {"headers": {"X-Tenant-ID": "t" * 300}}, 400),
    ("PUT", S1, {"json": GOOD}, 405),
    ("GET", "/api/nothing-here", {}, 404),
]


@pytest.mark.parametrize(
    ("method", "path", "request_args", "status"),
    BAD_INPUTS,
    ids=[f"{i}-{m}-{s}" for i, (m, _, _, s) in enumerate(BAD_INPUTS)],
)
@e2e
def test_bad_input_is_a_client_error_never_a_500(
    app_server: AppServer, method: str, path: str, request_args: dict[str, Any], status: int
) -> None:
    args = dict(request_args)
    headers = {"Content-Type": "application/json", **args.pop("headers", {})}
    headers.setdefault("X-Tenant-ID", "bad-input")
    if "json" in args:
        args["content"] = httpx.Request("POST", "/", json=args.pop("json")).content
    with client(app_server) as http:
        response = http.request(method, path, headers=headers, **args)
    assert response.status_code == status, response.text[:300]


@e2e
def test_api_keys_name_the_tenant(db_dir: Path) -> None:
    env = {
        "THROTTLE_RATE": "1000",
        "SURVEYTOOL_DB": str(db_dir / "keys.sqlite3"),
        "SURVEYTOOL_WORK_MS": "2",
        "SURVEYTOOL_API_KEYS": "key-acme-1=acme,key-globex-2=globex",
    }
    with AppServer(APP, env=env, health_path="/healthz") as server:
        with client(server, Authorization="Bearer key-acme-1") as http:
            assert submit(http).status_code == 201
            acme_board = http.get("/api/dashboard", params={"survey_id": "s1"}).json()
            stats = http.get("/api/throttle/stats").json()
        with client(server, Authorization="Bearer key-globex-2") as http:
            globex_board = http.get("/api/dashboard", params={"survey_id": "s1"}).json()
        with client(server) as http:
            anonymous = submit(http)
        with client(server, Authorization="Bearer wrong-key", **{"X-Tenant-ID": "acme"}) as http:
            wrong = http.get("/api/dashboard", params={"survey_id": "s1"})
    assert (acme_board["responses"], globex_board["responses"]) == (1, 0)
    assert (anonymous.status_code, wrong.status_code) == (401, 401)
    assert "acme" in {row["tenant"] for row in stats["tenants"]}


@e2e
def test_stats_endpoint_counts_per_tenant(app_server: AppServer) -> None:
    busy, quiet = tenant("busy"), tenant("quiet")
    with client(app_server, **{"X-Tenant-ID": busy}) as http:
        for _ in range(6):
            assert submit(http).status_code == 201
    with client(app_server, **{"X-Tenant-ID": quiet}) as http:
        assert http.get("/api/dashboard", params={"survey_id": "s2"}).status_code == 200
        stats = http.get("/api/throttle/stats")
    assert stats.status_code == 200
    data = stats.json()
    rows = {row["tenant"]: row for row in data["tenants"]}
    assert rows[busy]["admitted_per_s"] > 0
    assert rows[quiet]["admitted_per_s"] > 0
    assert rows[busy]["admitted_per_s"] > rows[quiet]["admitted_per_s"]
    assert rows[busy]["rejected_per_s"] == 0
    assert data["throttle"]["enabled"] is True
    assert data["throttle"]["rate"] == 1000.0
    assert data["store"]["slots"] == 8
    assert data["source"] == "this process"


def test_the_store_loses_slots_and_gets_them_back(tmp_path: Path) -> None:
    """`resize` takes idle slots out at once and busy ones as they come back; nothing
    running is interrupted, and the capacity follows."""

    async def scenario() -> list[tuple[int, int, float]]:
        config = AppConfig(db_path=tmp_path / "resize.sqlite3", slots=4, work_ms=50, jitter=0)
        store = SurveyStore(config)
        await store.start()
        seen = []
        try:
            busy = [asyncio.create_task(store.live_stats("t", "s1")) for _ in range(4)]
            await asyncio.sleep(0.02)
            store.resize(2)  # all four busy: two are parked as they come back
            seen.append((store.slots, store.busy, store.capacity_per_s))
            await asyncio.gather(*busy)
            seen.append((store.slots, store.busy, store.capacity_per_s))
            many = [asyncio.create_task(store.live_stats("t", "s1")) for _ in range(4)]
            await asyncio.sleep(0.02)
            seen.append((store.slots, store.busy, float(store.waiting)))
            await asyncio.gather(*many)
            store.resize(4)
            seen.append((store.slots, store.busy, store.capacity_per_s))
            with pytest.raises(ValueError, match="slots must be within"):
                store.resize(5)  # never more than it opened
        finally:
            await store.stop()
        return seen

    assert asyncio.run(scenario()) == [(2, 4, 40.0), (2, 0, 40.0), (2, 2, 2.0), (4, 0, 80.0)]


def test_the_history_keeps_the_last_two_minutes() -> None:
    clock = FakeClock(0.0)
    readings = iter(range(1000))
    history = LimitHistory(lambda: (next(readings), 8, 3), keep_s=10.0, every_s=1.0, clock=clock)
    for _ in range(30):
        history.take()
        clock.now += 1.0
    data = history.to_json()
    assert data["fields"] == ["at", "limit", "slots", "busy"]
    rows = data["rows"]
    assert isinstance(rows, list)
    assert len(rows) == 11  # 10 s of points a second apart, both ends
    assert rows[-1] == [29.0, 29, 8, 3]


@e2e
def test_the_admin_route_is_off_unless_enabled(app_server: AppServer) -> None:
    with client(app_server) as http:
        response = http.post("/api/admin/store", params={"slots": 2})
        assert response.status_code == 404
        assert http.get("/api/throttle/stats").json()["store"]["slots"] == 8


@e2e
def test_the_stats_show_the_learned_limit_and_the_stores_slots_over_time(
    learning_server: AppServer,
) -> None:
    with client(learning_server) as http:
        before = http.get("/api/throttle/stats").json()
        assert http.post("/api/admin/store", params={"slots": 0}).status_code == 422
        assert http.post("/api/admin/store", params={"slots": 9}).status_code == 422
        resized = http.post("/api/admin/store", params={"slots": 2})
        assert resized.status_code == 200
        assert resized.json() == {"slots": 2}
        time.sleep(1.5)  # a history point or two with the new slots
        after = http.get("/api/throttle/stats").json()
        assert http.post("/api/admin/store", params={"slots": 4}).json() == {"slots": 4}
    throttle = before["throttle"]
    assert throttle["enabled"] is True
    assert isinstance(throttle["concurrency"], int)  # the limit in force, learned
    assert throttle["learned"]["reason"]
    assert throttle["learned"]["limit"] >= 1
    assert (before["store"]["slots"], before["store"]["capacity_per_s"]) == (4, 80.0)
    assert (after["store"]["slots"], after["store"]["capacity_per_s"]) == (2, 40.0)
    history = after["history"]
    assert history["fields"] == ["at", "limit", "slots", "busy"]
    rows = history["rows"]
    assert len(rows) >= 2
    assert rows[-1][2] == 2
    assert all(isinstance(row[1], int) for row in rows)
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)


# --- under overload ------------------------------------------------------------------------


async def _burst(url: str, who: str, count: int) -> list[int]:
    """`count` concurrent survey submissions; their status codes."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0, trust_env=False) as http:
        responses = await asyncio.gather(
            *(
                http.post("/api/surveys/s2/responses", json=GOOD, headers={"X-Tenant-ID": who})
                for _ in range(count)
            )
        )
    return [r.status_code for r in responses]


@e2e
def test_live_stats_degrade_while_requests_wait(tight_server: AppServer) -> None:
    who = tenant("flood")
    with client(tight_server, **{"X-Tenant-ID": who}) as http:
        fresh = http.get("/api/stats/live", params={"survey_id": "s2"})
        assert fresh.status_code == 200
        assert fresh.json()["degraded"] is False

        statuses: list[int] = []
        burst = threading.Thread(
            target=lambda: statuses.extend(asyncio.run(_burst(tight_server.url, who, 20)))
        )
        burst.start()
        try:
            degraded: dict[str, Any] | None = None
            health: httpx.Response | None = None
            deadline = time.monotonic() + 10.0
            while degraded is None and burst.is_alive() and time.monotonic() < deadline:
                live = http.get("/api/stats/live", params={"survey_id": "s2"})
                assert live.status_code == 200
                if live.json()["degraded"]:
                    degraded = live.json()
                    health = http.get("/healthz")
                time.sleep(0.05)
        finally:
            burst.join(timeout=60.0)
    assert degraded is not None, "live stats never degraded while submissions waited"
    assert degraded["stale"] is True
    assert degraded["age_s"] >= 0.0
    assert degraded["stats"]["survey_id"] == "s2"
    # The health check is exempt: answered at once, with no throttle involved.
    assert health is not None
    assert health.status_code == 200
    assert "throttle" not in timings(health)
    # The critical submissions were queued, not failed: every one was stored.
    assert statuses == [201] * 20


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium_argv(binary: str, profile: Path) -> list[str]:
    return [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--virtual-time-budget=2000",
    ]  # fmt: skip


def _render(binary: str, url: str, shot: Path, tmp_path: Path) -> str:
    """The page's DOM once its scripts ran, and a screenshot of it into `shot`."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    picture = [f"--screenshot={shot}", "--window-size=1280,1100"]
    # Current Chromium takes both at once; older ones need a second run for the picture.
    dom = subprocess.run(
        [*_chromium_argv(binary, tmp_path / "dom"), *picture, "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    if not shot.exists():
        subprocess.run(
            [*_chromium_argv(binary, tmp_path / "shot"), *picture, url],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return dom


async def _open_loop(
    url: str, rates: dict[str, float], duration_s: float, stop: threading.Event
) -> None:
    """Submissions at fixed rates per tenant for `duration_s`, whatever the answers take;
    `stop` ends it early, hanging up on requests still waiting."""
    async with httpx.AsyncClient(
        base_url=url, timeout=30.0, trust_env=False, limits=httpx.Limits(max_connections=200)
    ) as http:
        sent: list[asyncio.Task[httpx.Response]] = []
        start = time.monotonic()
        schedule = sorted(
            (i / rate, who) for who, rate in rates.items() for i in range(int(rate * duration_s))
        )
        for at, who in schedule:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            if stop.is_set():
                break
            sent.append(
                asyncio.create_task(
                    http.post("/api/surveys/s1/responses", json=GOOD, headers={"X-Tenant-ID": who})
                )
            )
        if stop.is_set():  # hang up on whoever still waits: they leave the queue
            for task in sent:
                task.cancel()
        await asyncio.gather(*sent, return_exceptions=True)


@e2e
def test_live_page_shows_the_throttle_at_work(tight_server: AppServer, tmp_path: Path) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    flood, steady = tenant("initech"), tenant("acme")
    stop = threading.Event()
    rates = {flood: 25.0, steady: 2.0}
    load = threading.Thread(
        target=asyncio.run, args=(_open_loop(tight_server.url, rates, 30.0, stop),)
    )
    load.start()
    try:
        time.sleep(2.5)  # let the queues build and the window fill
        shot = ARTIFACTS / "live_page.png"
        dom = _render(binary, tight_server.url + "/", shot, tmp_path)
    finally:
        stop.set()
        load.join(timeout=60.0)
    row = re.search(rf'<tr data-tenant="{flood}">(.*?)</tr>', dom, re.S)
    assert row is not None, dom[-3000:]

    def figure(field: str) -> float:
        assert row is not None
        match = re.search(rf'data-field="{field}"[^>]*>([^<]*)<', row.group(1))
        assert match is not None, row.group(1)
        return float(match.group(1).split()[0])

    assert figure("admitted_per_s") > 0
    assert figure("queued_per_s") > 0
    assert "Updated" in dom
    assert shot.stat().st_size > 10_000


@e2e
def test_live_page_draws_the_learned_limit_against_the_stores_slots(
    learning_server: AppServer, tmp_path: Path
) -> None:
    """Under overload the limit is learned; the store loses half its slots; the page draws
    the limit in force and the slots as lines over time, from the app's own history."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    stop = threading.Event()
    rates = {tenant("flood"): 100.0, tenant("steady"): 5.0}
    load = threading.Thread(
        target=asyncio.run, args=(_open_loop(learning_server.url, rates, 30.0, stop),)
    )
    load.start()
    try:
        time.sleep(4.0)  # the limit learned for 4 slots
        httpx.post(learning_server.url + "/api/admin/store", params={"slots": 2}).raise_for_status()
        time.sleep(3.0)  # history points with 2 slots
        shot = ARTIFACTS / "live_page_limit.png"
        dom = _render(binary, learning_server.url + "/", shot, tmp_path)
    finally:
        stop.set()
        load.join(timeout=60.0)
        httpx.post(learning_server.url + "/api/admin/store", params={"slots": 4})

    def element(id_: str) -> str:
        found = re.search(rf'<[^>]*id="{id_}"[^>]*>', dom)
        assert found is not None, dom[-3000:]
        return found.group(0)

    def data(id_: str, name: str) -> str:
        found = re.search(rf'data-{name}="([^"]*)"', element(id_))
        assert found is not None, element(id_)
        return found.group(1)

    limit = re.search(r'id="limit">([^<]*)<', dom)
    assert limit is not None, dom[-3000:]
    assert limit.group(1).startswith("learned "), limit.group(1)
    assert "THROTTLE_CONCURRENCY=auto" in dom
    assert int(data("limit-line", "samples")) >= 5
    assert int(data("slots-line", "samples")) >= 5
    assert data("slots-line", "last") == "2"
    points = re.search(r'points="([^"]*)"', element("slots-line"))
    assert points is not None
    heights = {float(p.split(",")[1]) for p in points.group(1).split()}
    assert len(heights) == 2  # 4 slots, then 2: a step in the line
    assert shot.stat().st_size > 10_000


# --- live counters and their fleet-wide sharing ---------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_live_counters_measure_rates_over_the_window() -> None:
    clock = FakeClock()
    counters = LiveCounters(window_s=10, clock=clock)
    for second in range(20):
        clock.now = 1000.0 + second
        for _ in range(3):
            counters(ThrottleEvent("queued", "acme", "critical"))
            counters(ThrottleEvent("admitted", "acme", "critical", waited_s=0.02))
        counters(ThrottleEvent("rejected", "acme", "critical", status=429))
        counters(ThrottleEvent("degraded", "globex", "low"))
    clock.now += 0.999  # the end of the last second: the window holds 10 s of events
    rates = {r.tenant: r for r in counters.rates()}
    assert rates["acme"].admitted_per_s == pytest.approx(3.0, rel=1e-3)
    assert rates["acme"].queued_per_s == pytest.approx(3.0, rel=1e-3)
    assert rates["acme"].rejected_per_s == pytest.approx(1.0, rel=1e-3)
    assert rates["acme"].mean_wait_ms == pytest.approx(20.0)
    assert rates["globex"].degraded_per_s == pytest.approx(1.0, rel=1e-3)
    assert list(rates) == ["acme", "globex"]  # busiest first


def test_live_counters_stay_bounded_under_a_flood_of_tenant_ids() -> None:
    clock = FakeClock()
    counters = LiveCounters(window_s=10, top=3, bucket_keys=100, clock=clock)
    for second in range(15):
        clock.now = 1000.0 + second
        for i in range(5000):  # a flood of distinct ids, with a steady tenant among them
            # After the first second, the steady tenant only comes once a bucket is full.
            if i % 100 == 50 and (second == 0 or i > 100):
                counters(ThrottleEvent("admitted", "steady", "normal"))
            counters(ThrottleEvent("rejected", f"spam-{second}-{i}", "normal", status=429))
    assert counters.entries <= 10 * (100 + 3 + 1)
    rates = counters.rates()
    assert len(rates) == 4
    assert rates[-1].tenant == OTHER
    assert rates[-1].rejected_per_s > 4000
    # Among the busiest, the steady tenant keeps its own line although buckets are full.
    steady = {r.tenant: r for r in rates}.get("steady")
    assert steady is not None
    assert steady.admitted_per_s > 0


def test_replicas_publish_their_counts_and_the_page_adds_them_up(
    clean_redis_server: RedisServer,
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        first, second = LiveCounters(clock=clock), LiveCounters(clock=clock)
        for _ in range(10):
            first(ThrottleEvent("admitted", "acme", "critical", waited_s=0.010))
        for _ in range(5):
            second(ThrottleEvent("admitted", "acme", "critical", waited_s=0.040))
        second(ThrottleEvent("rejected", "initech", "critical", status=429))
        clock.now += 1.0
        namespace = "surveytool:test:live"
        fleet = [
            FleetStats(counters, clean_redis_server.url, namespace=namespace, replica=name)
            for counters, name in ((first, "app1"), (second, "app2"))
        ]
        for replica in fleet:
            await replica.start()
            await replica.publish_once()
        groups = await fleet[0].collect()
        assert groups is not None
        assert len(groups) == 2
        merged = {r.tenant: r for r in merge(groups)}
        assert merged["acme"].admitted_per_s == pytest.approx(15.0)
        assert merged["acme"].mean_wait_ms == pytest.approx(20.0)  # (10 x 10 + 5 x 40) / 15
        assert merged["initech"].rejected_per_s == pytest.approx(1.0)
        await fleet[1].stop()  # a replica that stops removes its figures at once
        after = await fleet[0].collect()
        assert after is not None
        assert len(after) == 1
        await fleet[0].stop()

    asyncio.run(scenario())
    # Nothing of the demo is left in Redis.
    with clean_redis_server.client() as redis:
        assert redis.keys("surveytool:*") == []


def test_a_replica_stopped_while_it_publishes_stops(clean_redis_server: RedisServer) -> None:
    """`stop()` right after `start()`, its cancel landing anywhere in the first publish
    (redis-py setting up its connection): it returns, and the task has ended. A cancel
    swallowed there once left the loop publishing and `stop()` waiting forever (a CI run
    hung here for pytest's 300 s)."""

    async def scenario() -> list[int]:
        hung = []
        for i in range(100):
            url, namespace = clean_redis_server.url, "surveytool:test:stop"
            replica = FleetStats(LiveCounters(), url, namespace=namespace, replica="a")
            await replica.start()
            task = replica._task
            await asyncio.sleep(i * 0.00005)  # 0 to 5 ms: somewhere in the first publish
            # Not wait_for: its cancel of a hung stop() would cancel the task again, which
            # is what stop() should have done itself.
            stopping = asyncio.create_task(replica.stop())
            done, _ = await asyncio.wait({stopping}, timeout=5.0)
            if not done:
                hung.append(i)
                while not stopping.done():  # end it, to report
                    stopping.cancel()
                    await asyncio.wait({stopping}, timeout=0.1)
                break
            stopping.result()
            assert task is not None
            assert task.done()
        return hung

    assert asyncio.run(scenario()) == []
    with clean_redis_server.client() as redis:
        assert redis.keys("surveytool:*") == []


def test_an_unreachable_redis_only_hides_the_other_replicas() -> None:
    async def scenario(port: int) -> None:
        counters = LiveCounters()
        counters(ThrottleEvent("admitted", "acme", "critical"))
        fleet = FleetStats(
            counters, f"redis://127.0.0.1:{port}/0", namespace="surveytool:test:live", replica="a"
        )
        await fleet.start()
        started = time.monotonic()
        assert await fleet.collect() is None  # the page then shows this process's figures
        assert time.monotonic() - started < 5.0
        await fleet.stop()

    port = free_port()  # reserved, and nobody listens on it
    try:
        asyncio.run(scenario(port))
    finally:
        release_port(port)
