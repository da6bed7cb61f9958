"""`python -m demo_app.fleet`: the compose topology as local processes, and nothing left after.

Runs use the real load generator at a twentieth of the story's rates, except
the Redis one: it uses a small stand-in (written to a temp dir, same flags,
a few requests a second to every target) that also records what each
replica's live-stats endpoint says, to check that every replica sees the
whole fleet. Every run checks that every process is gone at the end, after
a normal run and after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo_app.fleet import app_env
from tests.support.servers import REPO_ROOT, end_process, is_alive, log_tail, spawn, wait_until

e2e = pytest.mark.e2e
# Statuses, counts and processes gone, never a timing: CI runs these beside other tests.
untimed = pytest.mark.untimed

STUB_LOADGEN = '''
"""A tiny load generator with demo_app.loadtest's flags: 2 submissions/s per target."""
import argparse, json, time, urllib.error, urllib.request

parser = argparse.ArgumentParser()
for flag in ("--scenario", "--report", "--chart", "--label"):
    parser.add_argument(flag)
parser.add_argument("--target", action="append", required=True)
parser.add_argument("--duration", type=float, default=4.0)
parser.add_argument("--quiet", action="store_true")
args = parser.parse_args()
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = json.dumps({"respondent": "stub", "answers": {"q1": 3}}).encode()
statuses = {target: [] for target in args.target}
end = time.monotonic() + args.duration
while time.monotonic() < end:
    for target in args.target:
        request = urllib.request.Request(
            target + "/api/surveys/s1/responses", data=body, method="POST",
            headers={"Content-Type": "application/json", "X-Tenant-ID": "stub-tenant"},
        )
        try:
            with http.open(request, timeout=15) as response:
                statuses[target].append(response.status)
        except urllib.error.HTTPError as exc:
            statuses[target].append(exc.code)
    time.sleep(0.5)
stats = {}
metrics = {}
for target in args.target:
    with http.open(target + "/api/throttle/stats", timeout=15) as response:
        stats[target] = json.load(response)
    with http.open(target + "/metrics", timeout=15) as response:
        metrics[target] = response.read().decode()
with open(args.report, "w") as out:
    json.dump({"scenario": args.scenario, "label": args.label,
               "statuses": statuses, "stats": stats, "metrics": metrics}, out)
'''


def fleet_env(stub_dir: Path) -> dict[str, str]:
    """Ours, less any THROTTLE_*/SURVEYTOOL_* (the fleet's own defaults apply), plus the stub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THROTTLE_", "SURVEYTOOL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(stub_dir), str(REPO_ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment contains `text` (the fleet's temp dir)."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in blob:
            found.append(int(entry.name))
    return found


def listening(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def line_value(log: str, prefix: str) -> str:
    for line in log.splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise AssertionError(f"no line starting {prefix!r} in:\n{log}")


def run_fleet(tmp_path: Path, *flags: str, timeout_s: float = 90.0) -> tuple[int, str]:
    (tmp_path / "stub_loadgen.py").write_text(STUB_LOADGEN)
    log = tmp_path / "fleet.log"
    argv = [
        sys.executable, "-m", "demo_app.fleet", "--loadgen", "stub_loadgen",
        "--scenario", "tiny", "--reports", str(tmp_path / "reports"), *flags,
    ]  # fmt: skip
    # A later --loadgen/--scenario in `flags` wins (argparse keeps the last).
    proc = spawn(argv, log_path=log, env=fleet_env(tmp_path), cwd=REPO_ROOT)
    try:
        finished = wait_until(lambda: not is_alive(proc), timeout_s=timeout_s, interval_s=0.2)
    finally:
        code = end_process(proc, signal.SIGKILL, timeout_s=0.0)
    text = log.read_text(errors="replace")
    assert finished, f"the fleet did not finish in {timeout_s} s:\n{text}"
    return code, text


def assert_all_gone(log: str) -> None:
    workdir = line_value(log, "fleet: 3 replicas").rsplit("logs in ", 1)[1]
    urls = line_value(log, "fleet: replicas at").split()
    assert len(urls) == 3
    assert wait_until(lambda: not processes_mentioning(workdir), timeout_s=5.0)
    assert not any(listening(url) for url in urls)
    assert not Path(workdir).exists()


def report(tmp_path: Path) -> dict[str, Any]:
    data = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert isinstance(data, dict)
    return data


def test_without_redis_each_process_gets_its_share_of_the_budget() -> None:
    shared = app_env({}, replicas=3, redis_url="redis://127.0.0.1:6400/0")
    assert shared["THROTTLE_REDIS_URL"] == "redis://127.0.0.1:6400/0"
    assert (shared["THROTTLE_RATE"], shared["THROTTLE_CONCURRENCY"]) == ("80", "12")
    alone = app_env({"THROTTLE_REDIS_URL": "redis://elsewhere"}, replicas=3, redis_url=None)
    assert "THROTTLE_REDIS_URL" not in alone
    assert float(alone["THROTTLE_RATE"]) == pytest.approx(80 / 3, abs=0.001)
    assert alone["THROTTLE_CONCURRENCY"] == "4"
    assert alone["SURVEYTOOL_SLOTS"] == "6"
    # A budget set in the environment wins over the story's, and is split the same way.
    mine = app_env({"THROTTLE_RATE": "30", "THROTTLE_BURST": "9"}, replicas=3, redis_url=None)
    assert float(mine["THROTTLE_RATE"]) == pytest.approx(10.0)
    assert "THROTTLE_BURST" not in mine  # the default burst follows the process's rate


@e2e
@untimed
def test_fleet_runs_the_real_load_generator(tmp_path: Path) -> None:
    code, log = run_fleet(
        tmp_path,
        "--no-redis", "--loadgen", "demo_app.loadtest", "--scenario", "seed",
        "--duration", "3", "--warmup", "1", "--rate-scale", "0.05",
    )  # fmt: skip
    assert code == 0, log
    found = report(tmp_path)
    assert found  # the load generator's own format: it is tested with the load generator
    assert (tmp_path / "reports" / "chart.png").stat().st_size > 0
    assert_all_gone(log)


@e2e
@untimed
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    log_path = tmp_path / "fleet.log"
    argv = [
        sys.executable, "-m", "demo_app.fleet", "--no-redis", "--scenario", "seed",
        "--duration", "60", "--rate-scale", "0.05", "--reports", str(tmp_path / "reports"),
    ]  # fmt: skip
    proc = spawn(argv, log_path=log_path, env=fleet_env(tmp_path), cwd=REPO_ROOT)
    try:
        started = wait_until(
            lambda: "watch it live" in log_path.read_text(errors="replace"),
            timeout_s=60.0,
            alive=lambda: is_alive(proc),
        )
        assert started, log_tail(log_path)
        time.sleep(1.5)  # the load generator is running
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends the script
        stopped = wait_until(lambda: not is_alive(proc), timeout_s=40.0, interval_s=0.1)
        if not stopped:
            os.kill(proc.pid, signal.SIGUSR1)  # its stack, into the log
            time.sleep(1.0)
        assert stopped, log_tail(log_path)
    finally:
        end_process(proc, signal.SIGKILL, timeout_s=0.0)
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 130, log
    assert_all_gone(log)


@e2e
@untimed
def test_fleet_shares_one_budget_through_redis(tmp_path: Path) -> None:
    code, log = run_fleet(tmp_path, "--duration", "3")
    assert code == 0, log
    found = report(tmp_path)
    assert "shared Redis budget" in found["label"]
    targets = line_value(log, "fleet: replicas at").split()
    for target, statuses in found["statuses"].items():
        assert set(statuses) == {201}, (target, statuses)
        stats = found["stats"][target]
        # Every replica's page shows the whole fleet: three replicas publishing.
        assert stats["source"] == "redis"
        assert stats["replicas"] == 3
        assert stats["throttle"]["rate"] == 80.0
        assert stats["throttle"]["concurrency"] == 12
        rows = {row["tenant"]: row for row in stats["tenants"]}
        assert rows["stub-tenant"]["admitted_per_s"] > 0
        # Each replica's /metrics, where the script said it is, counts what it admitted.
        assert f"fleet: metrics of app{targets.index(target) + 1} at {target}/metrics" in log
        admitted = {
            s.value
            for family in text_string_to_metric_families(found["metrics"][target])
            for s in family.samples
            if s.name == "throttle_requests_total"
            and s.labels == {"priority": "critical", "outcome": "admitted"}
        }
        assert admitted == {float(len(statuses))}
    assert_all_gone(log)


@e2e
@untimed
@pytest.mark.parametrize("server", ["hypercorn", "granian"])
def test_the_fleet_runs_under_other_servers(tmp_path: Path, server: str) -> None:
    code, log = run_fleet(tmp_path, "--duration", "2", "--server", server)
    assert code == 0, log
    assert f"under {server}, logs in" in log
    found = report(tmp_path)
    for target, statuses in found["statuses"].items():
        assert set(statuses) == {201}, (target, statuses)
        assert found["stats"][target]["replicas"] == 3
    assert_all_gone(log)


def test_an_unknown_server_is_refused_before_anything_starts(tmp_path: Path) -> None:
    code, log = run_fleet(tmp_path, "--server", "daphne", timeout_s=30.0)
    assert code == 2, log
    assert "invalid choice: 'daphne'" in log
