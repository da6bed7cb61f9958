"""The load generator: its plan, its open-loop engine against real servers, its reports.

The plan tests use fixed seeds with bounds of five or more standard
deviations, so they check the arrival processes without any chance of
flaking. The engine tests run a small Starlette app under uvicorn in a thread
of this process, listening on 127.0.0.1, on a socket bound before the server
starts (so there is no port race and no start-up wait to guess).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as StarletteRoute

from demo_app.loadtest import scenario as scenarios
from demo_app.loadtest import server_timing
from demo_app.loadtest.chart import write_chart
from demo_app.loadtest.cli import build_parser, main, scenario_from_args
from demo_app.loadtest.clients import new_session
from demo_app.loadtest.engine import (
    Phase,
    Progress,
    Record,
    Route,
    Scenario,
    ScenarioError,
    TenantLoad,
    run,
    schedule,
)
from demo_app.loadtest.progress import ProgressLine, format_progress
from demo_app.loadtest.report import (
    Report,
    format_report,
    format_side_by_side,
    percentile,
    summarize,
)

GET_T = Route("t", "GET", "/t", "normal")
SLEEP = Route("sleep", "GET", "/sleep", "critical")


def scenario_of(*tenants: TenantLoad, duration_s: float = 1.0, **kwargs: object) -> Scenario:
    return Scenario("test", duration_s, 7, tenants, **kwargs)  # type: ignore[arg-type]


# --- the plan ----------------------------------------------------------------


def test_plan_is_deterministic_per_seed() -> None:
    base = scenarios.load("seed")
    assert schedule(base) == schedule(base)
    other = schedule(replace(base, seed=base.seed + 1))
    assert [p.due_s for p in other[:50]] != [p.due_s for p in schedule(base)[:50]]
    times = [p.due_s for p in schedule(base)]
    assert times == sorted(times)
    assert times[0] >= 0
    assert times[-1] < base.duration_s


def test_adding_a_tenant_leaves_the_others_plans_alone() -> None:
    a = TenantLoad("a", 20, ((1, GET_T),))
    b = TenantLoad("b", 50, ((1, GET_T),))
    alone = schedule(scenario_of(a, duration_s=10))
    together = [p for p in schedule(scenario_of(a, b, duration_s=10)) if p.tenant == "a"]
    assert alone == together


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_poisson_arrivals_have_the_rate_and_exponential_gaps(seed: int) -> None:
    rate, duration_s = 200.0, 50.0
    plan = schedule(Scenario("p", duration_s, seed, (TenantLoad("a", rate, ((1, GET_T),)),)))
    expected = rate * duration_s  # Poisson count: sd = sqrt(10000) = 100
    assert abs(len(plan) - expected) < 600
    gaps = [b.due_s - a.due_s for a, b in itertools.pairwise(plan)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.05)  # sd of the mean: 1%
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.1)  # exponential: CV 1
    below_mean = sum(g < mean for g in gaps) / len(gaps)
    assert below_mean == pytest.approx(1 - math.exp(-1), abs=0.03)  # sd ~0.005


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_even_arrivals_are_exactly_one_over_rate_apart(seed: int) -> None:
    load = TenantLoad("a", 40, ((1, GET_T),), arrivals="even")
    plan = schedule(Scenario("e", 10, seed, (load,)))
    assert len(plan) == 400
    assert 0 <= plan[0].due_s < 1 / 40
    for a, b in itertools.pairwise(plan):
        assert b.due_s - a.due_s == pytest.approx(1 / 40, abs=1e-9)


def test_even_arrival_phase_depends_on_the_seed() -> None:
    load = TenantLoad("a", 1, ((1, GET_T),), arrivals="even")
    firsts = {schedule(Scenario("e", 5, seed, (load,)))[0].due_s for seed in range(5)}
    assert len(firsts) == 5


def test_phases_change_the_rate() -> None:
    spike = (Phase(10, 20, 100),)
    even = TenantLoad("a", 10, ((1, GET_T),), arrivals="even", phases=spike)
    counts = Counter(int(p.due_s // 10) for p in schedule(Scenario("f", 30, 1, (even,))))
    assert counts == {0: 100, 1: 1000, 2: 100}
    poisson = replace(even, arrivals="poisson")
    counts = Counter(int(p.due_s // 10) for p in schedule(Scenario("f", 30, 1, (poisson,))))
    assert abs(counts[1] - 1000) < 200  # sd 32
    assert abs(counts[0] - 100) < 55
    assert abs(counts[2] - 100) < 55
    silent = replace(poisson, phases=(Phase(5, 15, 0),))
    assert not [p for p in schedule(Scenario("f", 30, 1, (silent,))) if 5 <= p.due_s < 15]


def test_mix_weights_and_placeholders() -> None:
    plan = schedule(scenarios.load("seed"))
    names = Counter(p.route.name for p in plan)
    assert names["submit"] / len(plan) == pytest.approx(0.7, abs=0.03)
    assert names["dashboard"] / len(plan) == pytest.approx(0.2, abs=0.03)
    assert names["live_stats"] / len(plan) == pytest.approx(0.1, abs=0.03)
    submits = [p for p in plan if p.route.name == "submit"]
    assert {p.route.path for p in submits} == {f"/api/surveys/s{i}/responses" for i in (1, 2, 3)}
    assert all(p.route.method == "POST" and p.route.priority == "critical" for p in submits)
    respondents = [json.loads(p.route.body or b"")["respondent"] for p in submits]
    assert len(set(respondents)) == len(respondents)
    assert json.loads(submits[0].route.body or b"")["answers"] == {"q1": 4, "q2": "free text"}
    dashboards = {p.route.path for p in plan if p.route.name == "dashboard"}
    assert dashboards == {f"/api/dashboard?survey_id=s{i}" for i in (1, 2, 3)}


# --- scenarios ------------------------------------------------------------------


def test_builtin_scenarios_load() -> None:
    assert scenarios.builtin_names() == ["flash_crowd", "many_tenants", "seed"]
    seed = scenarios.load("seed")
    assert {t.tenant: t.rate for t in seed.tenants} == {"A": 10, "B": 30, "C": 150}
    mix = {r.name: (w, r.priority) for w, r in seed.tenants[0].mix}
    assert mix == {
        "submit": (70, "critical"),
        "dashboard": (20, "low"),
        "live_stats": (10, "sheddable"),
    }
    assert all(t.arrivals == "poisson" and t.header == "X-Tenant-ID" for t in seed.tenants)
    many = scenarios.load("many_tenants")
    assert len(many.tenants) == 51
    assert len({t.tenant for t in many.tenants}) == 51
    flash = scenarios.load("flash_crowd")
    assert any(p.rate >= 10 * t.rate for t in flash.tenants for p in t.phases)


def test_overrides_scale_rates_and_duration() -> None:
    seed = scenarios.load("seed")
    scaled = scenarios.with_overrides(seed, duration_s=20, warmup_s=2, rate_scale=0.5, seed=9)
    assert [t.rate for t in scaled.tenants] == [5, 15, 75]
    assert (scaled.duration_s, scaled.warmup_s, scaled.seed) == (20, 2, 9)
    flash = scenarios.with_overrides(scenarios.load("flash_crowd"), rate_scale=2)
    assert flash.tenants[2].phases[0].rate == 400


def test_cli_shrinks_a_warmup_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    scenario = scenario_from_args(build_parser().parse_args(["--duration", "5"]))
    assert (scenario.duration_s, scenario.warmup_s) == (5, 1)
    assert "using 1 s (set it with --warmup)" in capsys.readouterr().err
    args = build_parser().parse_args(["--duration", "5", "--warmup", "0", "--rate-scale", "2"])
    scenario = scenario_from_args(args)
    assert (scenario.warmup_s, scenario.tenants[0].rate) == (0, 20)


GOOD = {
    "name": "x",
    "duration_s": 10,
    "routes": {"r": {"method": "GET", "path": "/x/{v}", "priority": "low"}},
    "params": {"v": ["1"]},
    "tenants": [{"tenant": "a", "rate": 1, "mix": {"r": 1}}],
}


def _edit(path: str, value: object) -> dict[str, object]:
    """GOOD with the dotted ``path`` set to ``value`` (or removed for ...)."""
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_edit("duration_s", ...), "duration_s: is required"),
        (_edit("duration_s", -1), "duration_s: must be > 0"),
        (_edit("warmup_s", 10), "warmup_s: must be >= 0 and less than duration_s"),
        (_edit("tenants.0.rate", "fast"), "tenants[0].rate: must be a number"),
        (_edit("tenants.0.rate", -3), "tenants[0].rate: must be a number >= 0"),
        (_edit("tenants.0.rat", 3), "tenants[0].rat: unknown field"),
        (_edit("tenants.0.mix", {"nope": 1}), "tenants[0].mix.nope: no such route"),
        (_edit("tenants.0.mix", {"r": 0}), "tenants[0].mix[0].weight: must be > 0"),
        (_edit("tenants.0.arrivals", "bursty"), "tenants[0].arrivals: must be 'poisson' or"),
        (
            _edit("tenants.0.phases", [{"from_s": 1, "to_s": 5, "rate": 2}] * 2),
            "tenants[0].phases: must not overlap",
        ),
        (_edit("tenants.0.phases", [{"from_s": 5, "to_s": 1, "rate": 2}]), "phases[0].to_s"),
        (_edit("tenants", []), "tenants: must be a non-empty list"),
        (_edit("routes.r.path", "x"), "routes.r.path: must start with '/'"),
        (_edit("routes.r.method", ...), "routes.r.method: is required"),
        (_edit("routes.r.json", {"a": "{v}"}), ""),
        (_edit("params", {}), "tenants[0].mix[0].route: 'r' uses unknown placeholder(s) ['v']"),
        ([1, 2], "must be a JSON object, got a list"),
    ],
)
def test_bad_scenarios_name_the_field(tmp_path: Path, data: object, field: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    if not field:  # a control: the edit is valid
        scenarios.load(str(path))
        return
    with pytest.raises(ScenarioError) as caught:
        scenarios.load(str(path))
    assert field in str(caught.value)


def test_unreadable_scenarios(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",')
    with pytest.raises(ScenarioError, match="not valid JSON"):
        scenarios.load(str(path))
    with pytest.raises(ScenarioError, match=r"no scenario 'nope'.*seed"):
        scenarios.load("nope")
    with pytest.raises(ScenarioError, match="cannot read"):
        scenarios.load(str(tmp_path / "missing.json"))


def test_duplicate_tenants_are_refused() -> None:
    load = TenantLoad("a", 1, ((1, GET_T),))
    with pytest.raises(ScenarioError, match=r"tenants\[1\].tenant: 'a' repeats"):
        scenario_of(load, load)


# --- Server-Timing ---------------------------------------------------------------


def test_server_timing_parses_entries_lines_and_quoted_desc() -> None:
    metrics = server_timing.parse(
        [
            'throttle;dur=12.5;desc="degraded, cached; \\"old\\"", cache;desc=hit',
            "app ; DUR = 98.1",
        ]
    )
    assert [m.name for m in metrics] == ["throttle", "cache", "app"]
    throttle = server_timing.find(metrics, "THROTTLE")
    assert throttle is not None
    assert throttle.dur_ms == 12.5
    assert throttle.desc == 'degraded, cached; "old"'
    app = server_timing.find(metrics, "app")
    assert app is not None
    assert app.dur_ms == 98.1
    assert app.desc is None
    assert server_timing.find(metrics, "db") is None


def test_server_timing_skips_what_is_malformed() -> None:
    metrics = server_timing.parse(
        '=bad, throttle;dur=abc, ;x, app;dur=5 junk, db;dur=1;dur=2, miss;desc="open, end;dur=3'
    )
    by_name = {m.name: m for m in metrics}
    assert by_name["throttle"].dur_ms is None  # not a number
    assert by_name["app"].dur_ms == 5  # trailing junk skipped
    assert by_name["db"].dur_ms == 1  # the first repeat wins
    assert "miss" not in by_name  # unterminated quote
    assert server_timing.parse("") == []
    assert server_timing.parse([]) == []
    assert server_timing.parse("x;dur=inf")[0].dur_ms is None


# --- a real server ---------------------------------------------------------------


@dataclass
class Seen:
    """What the test server saw."""

    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def make_app(seen: Seen) -> Starlette:
    async def t(request: Request) -> Response:
        tenant = request.headers.get("x-tenant-id", "")
        seen.requests.append((tenant, request.url.path, await request.body()))
        if tenant == "bad":
            return PlainTextResponse(
                "over share",
                429,
                headers={"Retry-After": "2", "Server-Timing": 'throttle;dur=0.4;desc="over share"'},
            )
        response = PlainTextResponse("ok")
        response.headers.append("Server-Timing", "throttle;dur=2.5")
        response.headers.append("Server-Timing", "app;dur=1.5")
        return response

    async def status(request: Request) -> Response:
        seen.requests.append((request.headers.get("x-tenant-id", ""), request.url.path, b""))
        return PlainTextResponse("", int(request.path_params["code"]))

    async def degraded(request: Request) -> Response:
        seen.requests.append((request.headers.get("x-tenant-id", ""), request.url.path, b""))
        return JSONResponse({"degraded": True}, headers={"Server-Timing": "app;dur=0.5"})

    async def sleep(request: Request) -> Response:
        seen.in_flight += 1
        seen.max_in_flight = max(seen.max_in_flight, seen.in_flight)
        try:
            await asyncio.sleep(1.0)
        finally:
            seen.in_flight -= 1
        return PlainTextResponse("slept", headers={"Server-Timing": "app;dur=1000"})

    return Starlette(
        routes=[
            StarletteRoute("/t", t, methods=["GET", "POST"]),
            StarletteRoute("/status/{code:int}", status),
            StarletteRoute("/degraded", degraded),
            StarletteRoute("/sleep", sleep),
        ]
    )


@contextmanager
def serve() -> Iterator[tuple[str, Seen]]:
    """A uvicorn server in a thread on 127.0.0.1: its base URL and what it saw."""
    seen = Seen()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # connections queue here even before uvicorn accepts
    config = uvicorn.Config(
        make_app(seen),
        lifespan="off",
        log_level="warning",
        access_log=False,
        loop="asyncio",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.e2e
def test_accounting_matches_a_known_load() -> None:
    s503 = Route("s503", "GET", "/status/503", "low")
    s404 = Route("s404", "GET", "/status/404", "low")
    deg = Route("deg", "GET", "/degraded", "sheddable")
    post = Route("post", "POST", "/t", "critical", body=b'{"n": "{n}"}')
    scenario = scenario_of(
        TenantLoad("good", 50, ((1, GET_T), (1, post)), arrivals="even"),
        TenantLoad("bad", 30, ((1, GET_T),)),
        TenantLoad("mixed", 40, ((1, s503), (1, s404), (1, deg))),
    )
    plan = schedule(scenario)
    planned = Counter((p.tenant, p.route.name) for p in plan)
    with serve() as (url, seen):
        records = asyncio.run(run(scenario, [url]))
    assert len(records) == len(plan) == len(seen.requests)
    assert [(r.tenant, r.route, r.due_s) for r in records] == [
        (p.tenant, p.route.name, p.due_s) for p in plan
    ]
    good = [r for r in records if r.tenant == "good"]
    assert all(r.status == 200 and r.error is None for r in good)
    assert all(r.throttle_ms == 2.5 and r.app_ms == 1.5 and r.desc is None for r in good)
    assert all(r.added_wait_ms == pytest.approx(r.latency_ms - 1.5) for r in good)
    bad = [r for r in records if r.tenant == "bad"]
    assert all(r.status == 429 and r.retry_after == "2" and r.desc == "over share" for r in bad)
    assert all(r.degraded == (r.route == "deg") for r in records)
    bodies = sorted(body for tenant, _, body in seen.requests if tenant == "good" and body)
    assert bodies == sorted(p.route.body or b"" for p in plan if p.route.name == "post")
    assert len(set(bodies)) == len(bodies)  # {n} counts the tenant's requests

    report = summarize(records, scenario)
    assert report.total.sent == len(plan)
    assert report.tenants["good"].served == planned["good", "t"] + planned["good", "post"]
    assert report.tenants["bad"].rejected_429 == planned["bad", "t"] == report.total.rejected_429
    mixed = report.tenants["mixed"]
    assert mixed.unavailable_503 == planned["mixed", "s503"]
    assert mixed.errors == planned["mixed", "s404"]
    assert mixed.served == mixed.degraded == planned["mixed", "deg"]
    assert report.priorities["low"].sent == planned["mixed", "s503"] + planned["mixed", "s404"]
    assert report.tenants["good"].wait_source == "latency_minus_app"


@pytest.mark.e2e
def test_open_loop_sends_without_waiting_for_responses() -> None:
    # 20 requests due over 0.5 s to an endpoint that takes 1 s: a closed-loop
    # client would need 20 s on one connection; open loop sends them all at once.
    scenario = scenario_of(TenantLoad("a", 40, ((1, SLEEP),), arrivals="even"), duration_s=0.5)
    with serve() as (url, seen):
        records = asyncio.run(run(scenario, [url]))
    assert len(records) == 20
    assert all(r.status == 200 for r in records)
    assert seen.max_in_flight == 20  # the server held all of them at once
    assert max(r.sent_s for r in records) < min(r.done_s for r in records)
    assert max(r.sent_s for r in records) < 1.0
    for r in records:
        assert r.latency_ms == pytest.approx((r.done_s - r.due_s) * 1000)
        assert r.latency_ms >= 1000  # the app's own second, counted from the due time
        assert r.added_wait_ms == pytest.approx(r.latency_ms - 1000)


@pytest.mark.e2e
def test_latency_counts_from_the_due_time_when_the_client_lags() -> None:
    # The first progress report blocks the event loop for 0.3 s: every request
    # due before then goes out late, and its latency must include that lag.
    scenario = scenario_of(TenantLoad("a", 20, ((1, GET_T),), arrivals="even"), duration_s=0.5)
    reports: list[Progress] = []

    def on_progress(progress: Progress) -> None:
        if not reports:
            time.sleep(0.3)
        reports.append(progress)

    with serve() as (url, _):
        records = asyncio.run(run(scenario, [url], on_progress=on_progress))
    late = [r for r in records if r.due_s < 0.25]
    assert late
    for r in late:
        assert r.sent_s >= 0.3
        assert r.lag_ms >= (0.3 - r.due_s) * 1000
        assert r.latency_ms >= r.lag_ms + (r.done_s - r.sent_s) * 1000 - 1e-6
    assert reports[-1].done == reports[-1].sent == len(records) == 10
    assert reports[-1].max_lag_s >= 0.3 - records[0].due_s - 1e-6


@pytest.mark.e2e
def test_targets_are_used_round_robin() -> None:
    scenario = scenario_of(TenantLoad("a", 20, ((1, GET_T),), arrivals="even"))
    with serve() as (one, seen_one), serve() as (two, seen_two):
        records = asyncio.run(run(scenario, [one, two + "/"]))
    assert [r.target for r in records] == [one, two] * 10
    assert len(seen_one.requests) == len(seen_two.requests) == 10


@pytest.mark.e2e
def test_transport_errors_and_timeouts_are_records_not_crashes() -> None:
    scenario = scenario_of(TenantLoad("a", 10, ((1, GET_T),), arrivals="even"), duration_s=0.3)
    records = asyncio.run(run(scenario, [closed_port_url()]))
    assert len(records) == 3
    assert all(r.status == 0 and "Connect" in (r.error or "") for r in records)
    slow = scenario_of(
        TenantLoad("a", 10, ((1, SLEEP),), arrivals="even"), duration_s=0.3, timeout_s=0.2
    )
    with serve() as (url, _):
        records = asyncio.run(run(slow, [url]))
    assert len(records) == 3
    assert all(r.status == 0 and "imeout" in (r.error or "") for r in records)
    assert all(r.done_s - r.sent_s < 0.9 for r in records)  # cut at 0.2 s, not the app's 1 s


@pytest.mark.e2e
def test_cli_runs_a_scenario_file_and_writes_report_and_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "name": "tiny",
        "duration_s": 1,
        "warmup_s": 0.2,
        "routes": {"t": {"method": "GET", "path": "/t", "priority": "normal"}},
        "tenants": [
            {"tenant": "good", "rate": 20, "mix": {"t": 1}, "arrivals": "even"},
            {"tenant": "bad", "rate": 10, "mix": {"t": 1}, "arrivals": "even"},
        ],
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    report_path, chart_path = tmp_path / "r.json", tmp_path / "c.png"
    with serve() as (url, _):
        args = ["--scenario", str(path), "--target", url, "--label", "first"]
        assert main([*args, "--report", str(report_path), "--chart", str(chart_path)]) == 0
        first = capsys.readouterr().out
        assert "good" in first
        assert "bad" in first
        assert "(first)" in first
        args = ["--scenario", str(path), "--target", url, "--label", "second"]
        assert main([*args, "--compare", str(report_path), "--rate-scale", "2"]) == 0
        side_by_side = capsys.readouterr().out
    saved = json.loads(report_path.read_text())
    assert saved["format"] == "throttle_mw.loadtest.report/1"
    assert saved["tenants"]["good"]["served"] == 20
    assert saved["tenants"]["bad"]["rejected_429"] == 10
    assert chart_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "first" in side_by_side
    assert "second" in side_by_side
    quiet = ["--scenario", str(path), "--target", closed_port_url(), "--quiet"]
    assert main(quiet) == 1  # nothing reached the target
    assert capsys.readouterr().out == ""
    assert main(["--scenario", str(tmp_path / "missing.json")]) == 2
    assert main(["--scenario", str(path), "--compare", str(path)]) == 2  # not a report
    assert main(["--scenario", str(path), "--target", "127.0.0.1:8000"]) == 2  # no scheme
    assert main(["--scenario", str(path), "--duration", "0.1", "--warmup", "0.1"]) == 2
    assert "warmup_s: must be >= 0 and less than duration_s" in capsys.readouterr().err


# --- reports -----------------------------------------------------------------------


def record(
    tenant: str,
    due_s: float,
    done_s: float,
    status: int = 200,
    *,
    priority: str = "critical",
    app_ms: float | None = None,
    throttle_ms: float | None = None,
) -> Record:
    return Record(
        tenant, "r", priority, due_s, due_s, done_s, status, app_ms=app_ms, throttle_ms=throttle_ms
    )


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7


def test_summary_counts_served_rate_by_completion_in_the_steady_window() -> None:
    load = TenantLoad("a", 1, ((1, GET_T),))
    scenario = Scenario("s", 3.0, 1, (load, TenantLoad("b", 1, ((1, GET_T),))), warmup_s=1.0)
    records = [
        record("a", 0.1, 0.5, app_ms=10),  # done in the warm-up: not in the rate
        record("a", 0.9, 1.2, app_ms=10),  # due in the warm-up, done in the window
        record("a", 1.5, 1.6, app_ms=10),
        record("a", 2.9, 3.5, app_ms=10),  # done in the drain: not in the rate
        record("a", 2.0, 2.1, 429),
        record("a", 2.0, 2.1, 503),
        record("a", 2.0, 2.1, 500),
        record("a", 2.0, 2.1, 0),
        record("b", 1.5, 2.5, priority="low", throttle_ms=7.0),
    ]
    report = summarize(records, scenario, label="on")
    a = report.tenants["a"]
    assert (a.sent, a.served, a.rejected_429, a.unavailable_503, a.errors) == (8, 4, 1, 1, 2)
    assert a.served_per_s == 2 / 2.0
    assert a.offered_per_s == 6 / 2.0  # due in [1, 3)
    assert a.latency_p50_ms == pytest.approx(100)
    assert a.latency_p99_ms == pytest.approx(600)
    assert a.wait_p99_ms == pytest.approx(590)
    assert a.wait_source == "latency_minus_app"
    assert a.rejected_p99_ms == pytest.approx(100)
    assert report.tenants["b"].wait_p50_ms == 7.0
    assert report.tenants["b"].wait_source == "throttle_dur"
    assert report.total.wait_source == "mixed"
    assert list(report.priorities) == ["normal", "critical", "low"]
    assert report.priorities["normal"].sent == 0
    assert report.total.statuses == {200: 5, 429: 1, 503: 1, 500: 1, 0: 1}

    data = json.loads(report.to_json())
    assert list(data) == [
        "format",
        "label",
        "scenario",
        "window_s",
        "client_lag_ms",
        "total",
        "tenants",
        "priorities",
    ]
    assert data["window_s"] == [1.0, 3.0]
    assert data["tenants"]["a"]["latency_ms"] == {"p50": 100.0, "p95": 600.0, "p99": 600.0}
    assert data["tenants"]["a"]["added_wait_ms"]["source"] == "latency_minus_app"
    assert data["total"]["statuses"] == {"0": 1, "200": 5, "429": 1, "500": 1, "503": 1}
    assert Report.from_dict(data).to_dict() == data


def test_tables_are_aligned_and_side_by_side_shows_both() -> None:
    scenario = Scenario("s", 2.0, 1, (TenantLoad("tenant-a", 1, ((1, GET_T),)),))
    off = summarize([record("tenant-a", 0.5, 1.9, app_ms=5)], scenario, label="throttle off")
    on = summarize([record("tenant-a", 0.5, 0.6, app_ms=5)], scenario, label="throttle on")
    text = format_report(on)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("sent"))
    rule = lines[header + 1]
    assert set(rule) == {"-"}
    rows = [line for line in lines[header + 2 :] if line.startswith(("  ", "all"))]
    assert rows
    assert all(len(line) == len(rule) for line in [lines[header], *rows])
    assert "tenant-a" in text
    assert "(throttle on)" in text
    both = format_side_by_side(off, on)
    assert "throttle off" in both
    assert "throttle on" in both
    assert "warning" not in both
    late = record("tenant-a", 0.5, 1.9)
    late.sent_s = 0.7  # the client sent it 200 ms late
    lagging = summarize([late], scenario, label="lagging")
    assert "warning: the client fell behind in 'lagging'" in format_side_by_side(off, lagging)
    assert "send lag p99 200 ms" in format_report(lagging)
    row = next(line for line in both.splitlines() if "tenant-a" in line)
    assert "1400" in row.split("|")[0]
    assert "100" in row.split("|")[1]


def test_chart_is_a_png(tmp_path: Path) -> None:
    tenants = tuple(TenantLoad(f"t{i}", 1, ((1, GET_T),)) for i in range(12))
    scenario = Scenario("s", 4.0, 1, tenants, warmup_s=1.0)
    records = [
        record(f"t{i}", due, due + 0.05 * (i + 1), 200 if i % 3 else 429, priority=f"p{i % 2}")
        for i in range(12)
        for due in (0.2, 1.1, 2.5, 3.9)
    ]
    path = tmp_path / "chart.png"
    write_chart(records, scenario, path, title="test")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    write_chart([], scenario, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


# --- clients and progress ------------------------------------------------------------


@pytest.mark.e2e
def test_a_given_session_is_used_and_left_open() -> None:
    scenario = scenario_of(TenantLoad("a", 10, ((1, GET_T),), arrivals="even"), duration_s=0.3)

    async def go(url: str) -> tuple[list[Record], bool]:
        session = new_session()
        try:
            records = await run(scenario, [url], session=session)
            return records, session.closed
        finally:
            await session.close()

    with serve() as (url, seen):
        records, closed = asyncio.run(go(url))
    assert [r.status for r in records] == [200, 200, 200]
    assert not closed
    assert len(seen.requests) == 3


@pytest.mark.e2e
def test_the_client_keeps_its_schedule_at_story_rates() -> None:
    """An open-loop client must not fall behind: its lag would count as latency."""
    scenario = scenario_of(TenantLoad("a", 200, ((1, GET_T),), arrivals="even"), duration_s=3.0)
    with serve() as (url, _):
        records = asyncio.run(run(scenario, [url]))
    assert all(r.status == 200 for r in records)
    lags = sorted(r.lag_ms for r in records)
    # Generous: unpinned, on a shared 2-core machine its p99 was 103-111 ms under other
    # work; a client that really falls behind lags by seconds.
    assert lags[int(len(lags) * 0.99)] < 250.0


def test_progress_line() -> None:
    progress = Progress(12.5, 100, 40, 30, 10, 25, 7.25, 0.003)
    text = format_progress(progress)
    assert text == "  12.5 s  sent 40/100  in flight 10  served 7.2/s  lag 3 ms"
    tty = io.StringIO()
    line = ProgressLine(tty, tty=True)
    line(progress)
    line(progress)
    line.close()
    assert tty.getvalue() == f"\r{text}\x1b[K" * 2 + "\n"
    log = io.StringIO()
    line = ProgressLine(log, tty=False, every_s=3600)
    line(progress)
    line(progress)  # within every_s: not repeated
    line.close()
    assert log.getvalue() == text + "\n"
