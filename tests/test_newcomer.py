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
    Story,
    held_to_the_rest,
    live_stats_degraded,
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
@pytest.mark.timeout(240)
def test_the_newcomer_command_runs_the_story_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = child_env({"SURVEYTOOL_SLOTS": "1"})  # ignored: the story sets its own
    argv = ["--duration", "8", "--rate-scale", "0.5", "--out", str(out)]
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
    verdicts = re.findall(r"^(PASS|FAIL)  ([^:]+): .+$", text, re.MULTILINE)
    assert [claim for _, claim in verdicts] == list(CLAIMS)
    assert re.search(r"^\d of 6 claims hold\.$", text, re.MULTILINE)
    assert re.search(r"^(ok|WARN)\s+nothing waited inside the store", text, re.MULTILINE)
    assert re.search(r"^\s+load average before [\d.]+, ", text, re.MULTILINE)

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
    }
    for chart in ("chart-story.png", "chart-throttle-off.png", "chart-throttle-on.png"):
        assert (out / chart).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "```text" in report
    assert "| `THROTTLE_RATE` | `40` |" in report
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["format"] == "surveytool.newcomer/1"
    assert summary["rate_scale"] == 0.5
    assert summary["settings"] == Story(0.5).env()
    assert [c["claim"] for c in summary["claims"]] == list(CLAIMS)
    assert summary["phases"]["throttle on"]["store_queue_max"] == 0
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


def test_the_server_is_one_of_those_the_demo_knows() -> None:
    assert parse_args([]).server == "uvicorn"
    assert parse_args(["--server", "granian"]).server == "granian"
    with pytest.raises(SystemExit) as refused:
        parse_args(["--server", "daphne"])
    assert refused.value.code == 2
