"""``python -m demo_app`` end to end, and the load generator's accounting against the real
demo app's own counts.

The end-to-end run is short and scaled down, so it checks that the command
completes and what it prints and writes, not the story's numbers: those need
a full-length run on a quiet machine (``demo_app/README.md`` shows one).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo_app.loadtest import scenario as scenarios
from demo_app.loadtest.engine import Record, Scenario, TenantLoad, run, schedule
from demo_app.loadtest.report import Report, summarize
from demo_app.newcomer import parse_args
from demo_app.story import (
    Phase,
    Sample,
    Story,
    Verdict,
    follows_the_store,
    held_to_the_rest,
    live_stats_degraded,
    served_promptly,
    short_store_queue,
    submissions_first,
    unaffected,
)
from tests.support.servers import REPO_ROOT, AppServer, child_env

e2e = pytest.mark.e2e

CLAIMS = (
    "A goes on as if nothing happened",
    "B goes on as if nothing happened",
    "C is held to what is left",
    "survey submissions go ahead",
    "live stats are scaled back",
    "without the throttle A and B suffer",
)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@e2e
@pytest.mark.untimed  # it checks what the command prints and writes, not the story's numbers
@pytest.mark.timeout(240)
@pytest.mark.parametrize("budget", ["static", "auto-slowdown"])
def test_the_newcomer_command_runs_the_story_and_writes_its_report(
    tmp_path: Path, budget: str
) -> None:
    """With the static budget, and with the default learned limit in front of a store that
    loses half its slots midway."""
    out = tmp_path / "report"
    env = child_env({"SURVEYTOOL_SLOTS": "1"})  # ignored: the story sets its own
    argv = ["--duration", "8", "--rate-scale", "0.5", "--out", str(out)]
    argv += ["--budget", "static"] if budget == "static" else ["--slowdown"]
    result = subprocess.run(
        [sys.executable, "-m", "demo_app", *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    text = result.stdout
    assert result.returncode == 0, f"{text}\n{result.stderr}"
    assert "SCALED: the whole story runs at 0.5 x its rates" in text
    assert "note: ignoring SURVEYTOOL_SLOTS from your environment" in text
    for step in (
        "starting the app (throttle off)",
        "running 8 s with the throttle off",
        "starting the app (throttle on)",
        "running 8 s with the throttle on",
    ):
        assert step in text
    # The side-by-side table: both labels over one row per tenant and priority label.
    assert re.search(r"^\s+throttle off\s+throttle on$", text, re.MULTILINE)
    for row in ("A", "B", "C", "critical", "low", "sheddable"):
        assert re.search(rf"^  {row}\s+\d+\.\d .*\|", text, re.MULTILINE), row
    claims = CLAIMS if budget == "static" else (*CLAIMS, "the limit follows the store")
    verdicts = re.findall(r"^(PASS|FAIL)  ([^:]+): .+$", text, re.MULTILINE)
    assert [claim for _, claim in verdicts] == list(claims)
    assert re.search(rf"^\d of {len(claims)} claims hold\.$", text, re.MULTILINE)
    store_check = (
        "nothing waited inside the store"
        if budget == "static"
        else "the store's own queue stayed short"
    )
    assert re.search(rf"^(ok|WARN)\s+{store_check}", text, re.MULTILINE)
    assert re.search(r"^\s+load average before [\d.]+, ", text, re.MULTILINE)
    if budget != "static":
        assert "against a concurrency limit learned from the store's latency" in text
        assert "the store loses half its slots 4 s in (16 -> 8)" in text

    # The app processes are gone, and so is the temporary database folder.
    pids = [int(p) for p in re.findall(r"the app is up at \S+ \(pid (\d+)\)", text)]
    assert len(pids) == 2
    assert all(_pid_gone(pid) for pid in pids)

    files = {p.name for p in out.iterdir()}
    assert files == {
        "report.md",
        "summary.json",
        "throttle-off.json",
        "throttle-on.json",
        "records-throttle-off.csv",
        "records-throttle-on.csv",
        "chart-story.png",
        "chart-throttle-off.png",
        "chart-throttle-on.png",
        "chart-limit.png",
    }
    for chart in ("chart-story.png", "chart-throttle-off.png", "chart-throttle-on.png"):
        assert (out / chart).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (out / "chart-limit.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "```text" in report
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["format"] == "surveytool.newcomer/1"
    assert summary["rate_scale"] == 0.5
    assert [c["claim"] for c in summary["claims"]] == list(claims)
    on = summary["phases"]["throttle on"]
    fields = on["samples"]["fields"]
    rows = [dict(zip(fields, row, strict=True)) for row in on["samples"]["rows"]]
    assert rows
    if budget == "static":
        assert "| `THROTTLE_RATE` | `40` |" in report
        assert summary["settings"] == Story(0.5, "static").env()
        assert on["store_queue_max"] == 0
        assert {r["limit"] for r in rows} == {12}
    else:
        assert "| `THROTTLE_CONCURRENCY` | `auto` |" in report
        assert "THROTTLE_RATE" not in summary["settings"]
        assert summary["settings"] == Story(0.5, "auto", slowdown=True).env()
        assert (summary["budget_kind"], summary["slowdown"]) == ("auto", True)
        assert (rows[0]["slots"], rows[-1]["slots"]) == (16, 8)
        assert all(isinstance(r["limit"], int) for r in rows)  # the limit in force, learned
    off = summary["phases"]["throttle off"]["samples"]
    assert {row[1] for row in off["rows"]} == {None}  # no throttle, no limit
    for name in ("throttle-off", "throttle-on"):
        saved = Report.from_dict(json.loads((out / f"{name}.json").read_text(encoding="utf-8")))
        assert saved.label == name.replace("-", " ")
        assert set(saved.tenants) == {"A", "B", "C"}


def test_bad_arguments_are_refused_before_anything_starts() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo_app", "--rate-scale", "0"],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--rate-scale must be within" in result.stderr
    assert "starting the app" not in result.stdout


# --- the load generator's accounting against the demo app's own -------------------------


def _known_load(small: str, big: str) -> Scenario:
    """The seed scenario's routes, two tenants: one well within the budget, one over it."""
    seed = scenarios.load("seed")
    mix = seed.tenants[0].mix
    return Scenario(
        name="accounting",
        duration_s=5.0,
        seed=7,
        timeout_s=10.0,
        params=seed.params,
        tenants=(TenantLoad(small, 6.0, mix), TenantLoad(big, 60.0, mix)),
    )


@e2e
def test_the_load_generators_counts_agree_with_the_demo_apps_own(tmp_path: Path) -> None:
    """Every answer the load generator counts, the app counted too: stored submissions per
    tenant and survey exactly (from the database), and the throttle's decisions per tenant
    (from the live stats, which give rates over one window, so compared in proportion)."""
    small, big = f"small-{uuid.uuid4().hex[:6]}", f"big-{uuid.uuid4().hex[:6]}"
    env = {
        "THROTTLE_RATE": "30",
        "THROTTLE_CONCURRENCY": "4",
        "THROTTLE_MAX_WAIT": "critical=1,high=1,normal=1,low=0.5",
        "SURVEYTOOL_SLOTS": "4",
        "SURVEYTOOL_WORK_MS": "40",
        "SURVEYTOOL_DB": str(tmp_path / "accounting.sqlite3"),
    }
    scenario = _known_load(small, big)
    plan = schedule(scenario)
    with AppServer("demo_app.app:app", env=env, health_path="/healthz") as server:
        records = asyncio.run(run(scenario, [server.url]))
        with httpx.Client(base_url=server.url, timeout=10.0, trust_env=False) as http:
            live = http.get("/api/throttle/stats").json()
            stored = {
                (tenant, survey): _stored(http, tenant, survey)
                for tenant in (small, big)
                for survey in scenario.params["survey"]
            }

    assert [r.due_s for r in records] == [p.due_s for p in plan]
    assert all(r.status in (200, 201, 429, 503) for r in records), Counter(
        (r.status, r.error) for r in records
    )
    # Submissions: what the load generator saw answered 201 is exactly what was stored.
    created = Counter(
        (p.tenant, p.route.path.split("/")[3])
        for p, r in zip(plan, records, strict=True)
        if p.route.name == "submit" and r.status == 201
    )
    assert stored == {key: created.get(key, 0) for key in stored}
    assert created[big, "s1"] + created[big, "s2"] + created[big, "s3"] > 0

    # Decisions: the throttle's per-tenant rates, times the window they cover, are the
    # load generator's counts. The window is the same for every figure: estimate it from
    # the totals, then check every figure against it.
    seen = Counter((r.tenant, _kind(r.status, r.degraded)) for r in records)
    rows = {row["tenant"]: row for row in live["tenants"]}
    counted = {
        (tenant, kind): rows[tenant][f"{kind}_per_s"]
        for tenant in (small, big)
        for kind in ("admitted", "degraded", "rejected")
    }
    assert sum(counted.values()) > 0
    window_s = sum(seen.values()) / sum(counted.values())
    assert 1.0 <= window_s <= live["window_s"]
    for key, rate in counted.items():
        expected = seen.get(key, 0)
        assert rate * window_s == pytest.approx(expected, abs=max(1.0, 0.02 * expected)), key
    # The known load did what it was meant to: the big tenant was refused in part.
    assert seen[big, "rejected"] > 0
    assert seen[small, "rejected"] == 0
    assert rows[small]["left_per_s"] == rows[big]["left_per_s"] == 0


def _kind(status: int, degraded: bool) -> str:
    if status in (429, 503):
        return "rejected"
    return "degraded" if degraded else "admitted"


def _stored(http: httpx.Client, tenant: str, survey: str) -> int:
    response = http.get(
        "/api/dashboard", params={"survey_id": survey}, headers={"X-Tenant-ID": tenant}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return int(body["responses"])


# --- the verdicts, on made-up records -----------------------------------------------------


def _record(tenant: str, route: str, due_s: float, status: int = 201, **kw: Any) -> Record:
    wait_ms = kw.pop("wait_ms", 5.0)
    app_ms = kw.pop("app_ms", 100.0)
    done_s = due_s + (wait_ms + app_ms) / 1000.0
    return Record(tenant, route, "", due_s, due_s, done_s, status, app_ms=app_ms, **kw)


def _phase(records: list[Record], label: str = "throttle on") -> Phase:
    scenario = Story().scenario(10.0, 2.0)
    return Phase(records, summarize(records, scenario, label=label), scenario, 0)


def _steady(tenant: str, per_s: int, route: str = "submit", **kw: Any) -> list[Record]:
    return [_record(tenant, route, i / per_s, **kw) for i in range(10 * per_s)]


def test_a_tenant_is_unaffected_only_with_everything_served_quickly() -> None:
    quick = _phase(_steady("A", 10, wait_ms=20.0, throttle_ms=1.0))
    verdict = unaffected(quick, "A")
    assert verdict.passed
    assert "100.0% of 100 served" in verdict.figures
    assert "in the throttle: p99 1.0 ms" in verdict.figures
    slow = _phase(_steady("A", 10, wait_ms=20.0)[:-3] + _steady("A", 10, wait_ms=80.0)[-3:])
    assert not unaffected(slow, "A").passed  # 3 of 100 over 50 ms: p99 80 ms
    refused = _steady("A", 10)
    refused[50] = _record("A", "submit", 5.0, status=429, retry_after="1")
    assert unaffected(_phase(refused), "A").passed  # 99 of 100: just enough
    refused[60] = _record("A", "submit", 6.0, status=503, retry_after="1")
    assert not unaffected(_phase(refused), "A").passed


def test_c_is_held_to_what_a_and_b_leave_of_the_budget() -> None:
    story = Story()
    a_b = _steady("A", 10) + _steady("B", 30)
    refused = [_record("C", "submit", i / 100, status=429, retry_after="2") for i in range(1000)]
    fair = _phase(a_b + _steady("C", 40) + refused)
    verdict = held_to_the_rest(fair, story.rate)
    assert verdict.passed, verdict.figures
    assert "1000 refused (1000 with Retry-After" in verdict.figures
    greedy = _phase(a_b + _steady("C", 60))
    assert not held_to_the_rest(greedy, story.rate).passed
    silent = [_record("C", "submit", i / 100, status=429) for i in range(10)]
    assert not held_to_the_rest(_phase(a_b + _steady("C", 40) + silent), story.rate).passed


def test_submissions_first_and_live_stats_degraded() -> None:
    records = (
        _steady("C", 10, "submit")
        + _steady("C", 10, "dashboard", status=429)[:50]
        + _steady("C", 10, "dashboard")[50:]
        + _steady("C", 5, "live_stats", degraded=True)
    )
    phase = _phase(records)
    verdict = submissions_first(phase)
    assert verdict.passed
    assert "survey submissions 100.0%, dashboards 50.0%, live stats 0.0%" in verdict.figures
    degraded = live_stats_degraded(phase)
    assert degraded.passed
    assert degraded.figures == "50 of 50 served degraded (cached), 0 in full, 0 not served"
    fresh = _phase(_steady("C", 5, "live_stats"))
    assert not live_stats_degraded(fresh).passed


def test_with_a_learned_limit_a_tenant_is_judged_on_its_latency_itself() -> None:
    """Waits inside the store hide in the app's own time: the claim reads the latency."""
    story = Story(budget="auto")
    bound = 2 * story.work_p99_ms  # 239.2 ms
    quick = _phase(_steady("A", 10, wait_ms=100.0, app_ms=120.0))  # 220 ms from due
    verdict = served_promptly(quick, "A", story)
    assert verdict.passed, verdict.figures
    assert "100.0% of 80 served" in verdict.figures  # due in [2, 10): the steady window
    assert f"(<= {bound:.0f}: 2 x the store's own p99 work time)" in verdict.figures
    slow = _steady("A", 10, wait_ms=100.0, app_ms=120.0)
    slow[-3:] = _steady("A", 10, wait_ms=150.0, app_ms=120.0)[-3:]  # 270 ms: 3 of 80
    assert not served_promptly(_phase(slow), "A", story).passed


def test_after_a_slowdown_the_transition_is_not_scored_but_the_limit_must_follow() -> None:
    story = Story(budget="auto", slowdown=True)
    scenario = story.scenario(40.0, 5.0)
    assert story.drop_at(scenario) == 20.0
    assert story.windows(scenario) == [(5.0, 20.0), (30.0, 40.0)]
    assert (story.slots, story.slots_after) == (16, 8)
    assert story.env()["SURVEYTOOL_ADMIN"] == "true"
    # Slow answers only in the transition: not scored.
    records = [_record("A", "submit", i / 10, wait_ms=20.0) for i in range(400)]
    records[220] = _record("A", "submit", 22.0, wait_ms=3000.0)
    phase = Phase(records, summarize(records, scenario, label="on"), scenario, 0)
    assert served_promptly(phase, "A", story).passed

    def limits(*values: int, slots_at: float = 20.0) -> list[Sample]:
        return [
            Sample(t, n, 16 if t < slots_at else 8, 0)
            for t, n in zip(range(40), values, strict=False)
        ]

    def follows(samples: list[Sample]) -> Verdict:
        return follows_the_store(Phase(records, phase.report, scenario, 0, samples), story)

    quick = follows(limits(*([19] * 20), 17, 15, 13, 12, 11, *([10] * 15)))
    assert quick.passed, quick.figures
    assert "limit in force 19 -> 10, within [8, 12] for good 3.0 s after (<= 10)" in quick.figures
    late = follows(limits(*([19] * 20), *([15] * 12), *([10] * 8)))
    assert not late.passed  # 12 s after
    stuck = follows(limits(*([19] * 40)))
    assert not stuck.passed
    assert "never" in stuck.figures

    short = short_store_queue(phase, Phase(records, phase.report, scenario, 9, [
        Sample(2.0, 4, 16, 9),  # the start-up: not scored
        Sample(10.0, 19, 16, 3),
        Sample(25.0, 12, 8, 7),  # the transition: not scored
        Sample(35.0, 10, 8, 2),
    ]), story)  # fmt: skip
    assert short.passed, short.figures
    assert short.figures.startswith("at most 3 waiting for a slot")
    deep = Phase(records, phase.report, scenario, 9, [Sample(35.0, 16, 8, 5)])
    assert not short_store_queue(phase, deep, story).passed  # 5 of 8 slots: over half


def test_the_server_is_one_of_those_the_demo_knows() -> None:
    assert parse_args([]).server == "uvicorn"
    # A learned limit's cold start is left out of the figures; a static budget's 5 s.
    learned, static = parse_args([]), parse_args(["--budget", "static"])
    assert (learned.duration, learned.warmup) == (35.0, 10.0)
    assert (static.duration, static.warmup) == (30.0, 5.0)
    assert parse_args(["--server", "granian"]).server == "granian"
    with pytest.raises(SystemExit) as refused:
        parse_args(["--server", "daphne"])
    assert refused.value.code == 2
