"""The benchmarks still run end to end (they never assert on speed).

Throughput: one round of one second per variant, against real uvicorn
servers: with wrk when it is installed, and always once with the Python
fallback generator so that path cannot rot where wrk is present. Then the
Redis variants and the peers (those whose libraries are installed: the
``bench`` extra) with their Redis round trips, the sequential round-trip
count, grant latency, the overload story, the learned limit against a capacity
that halves, and ``run_all``'s summary, each with tiny durations, against a
private redis-server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from bench import (
    ceiling,
    churnsections,
    fastsections,
    grant_latency,
    instructions,
    keptidle,
    learned,
    learnedscore,
    opcodes,
    pacedcost,
    peerredis,
    rediscost,
    redisinstr,
    roundtrips,
    run_all,
    scriptinstructions,
    scriptsections,
    story,
)
from bench.runner import Trial, summarize
from bench.throughput import main
from tests.support.redis_server import RedisServer, redis_server_binary
from throttle_mw.backends.redis import scripts

# No assertion here is on speed or on a timing: CI runs these on two workers, beside others.
pytestmark = [pytest.mark.e2e, pytest.mark.untimed]


def run_bench(tmp_path: Path, generator: str) -> dict[str, Any]:
    out = tmp_path / f"{generator}.json"
    status = main(
        [
            "--variants",
            "bare,memory",
            "--rounds",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--connections",
            "4",
            "--generator",
            generator,
            "--json",
            str(out),
        ]
    )
    assert status == 0
    document: dict[str, Any] = json.loads(out.read_text())
    return document


@pytest.mark.parametrize("generator", ["auto", "python"])
def test_throughput_runs_end_to_end(tmp_path: Path, generator: str) -> None:
    document = run_bench(tmp_path, generator)

    expected = generator if generator != "auto" else ("wrk" if shutil.which("wrk") else "python")
    assert document["complete"] is True
    assert document["environment"]["generator"] == expected
    assert [(t["round"], t["variant"]) for t in document["trials"]] == [(1, "bare"), (1, "memory")]
    for trial in document["trials"]:
        assert trial["generator"] == expected
        assert trial["problems"] == []
        assert trial["requests"] > 0  # it ran; how fast is for the benchmark to say
        assert trial["bad_status"] == 0
        assert trial["socket_errors"] == 0
    memory = document["summary"]["variants"]["memory"]
    assert document["summary"]["baseline"] == "bare"
    assert "ratio_rps" in memory
    assert "median_paired_ratio_rps" in memory


def test_unknown_variant_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["--variants", "bare,nonesuch", "--json", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_summary_pairs_each_round_with_its_baseline() -> None:
    def trial(round_no: int, variant: str, rps: float) -> Trial:
        return Trial(round_no, variant, "wrk", 0.0, 0.0, rps=rps)

    trials = [
        trial(1, "bare", 100.0),
        trial(1, "memory", 90.0),
        trial(2, "bare", 200.0),
        trial(2, "memory", 100.0),
        trial(3, "bare", 100.0),
        trial(3, "memory", 80.0),
    ]
    memory = summarize(trials, ["bare", "memory"])["variants"]["memory"]

    assert memory["median_rps"] == 90.0
    assert memory["ratio_rps"] == pytest.approx(0.9)  # 90 / median(100, 200, 100)
    assert memory["paired_ratios_rps"] == pytest.approx([0.9, 0.5, 0.8])
    assert memory["median_paired_ratio_rps"] == pytest.approx(0.8)
    assert "median_rps_per_cpu" not in memory  # no CPU figures recorded


# --- the Redis variants, peers, round trips, grant latency, the overload story -------------

PEER_MODULES = {
    "slowapi": "slowapi",
    "fastapi-limiter": "fastapi_limiter",
    "asgi-ratelimit": "ratelimit",
}


def installed_peers() -> list[str]:
    """The peers whose libraries are installed (the `bench` extra)."""
    return [name for name, module in PEER_MODULES.items() if importlib.util.find_spec(module)]


def redis_variants() -> list[str]:
    return ["redis-rate", "redis-concurrency", *(f"{peer}-redis" for peer in installed_peers())]


def test_redis_and_peer_variants_run_and_count_round_trips(
    tmp_path: Path, redis_binary: Path
) -> None:
    peers = installed_peers()
    memory_peers = [f"{peer}-memory" for peer in peers]
    names = ["bare", "bare-fastapi", *redis_variants(), *memory_peers]
    out = tmp_path / "throughput.json"
    args = ["--variants", ",".join(names), "--rounds", "1", "--duration", "1", "--warmup", "0"]
    status = main([*args, "--connections", "4", "--json", str(out)])

    assert status == 0
    document = json.loads(out.read_text())
    assert document["complete"] is True
    assert [t["variant"] for t in document["trials"]] == names
    variants = document["summary"]["variants"]
    for name in redis_variants():
        per_request = variants[name]["median_counters_per_request"]
        assert per_request["redis.round_trips"] > 0  # counted by the private redis-server
        assert per_request["redis.script_calls"] > 0
    for name in ["bare", *memory_peers]:
        assert "median_counters_per_request" not in variants[name]  # no Redis for them
    if "fastapi-limiter" in peers:
        assert variants["fastapi-limiter-memory"]["own_baseline"] == "bare-fastapi"
        assert "ratio_rps_own" in variants["fastapi-limiter-memory"]
    assert document["services"]["redis"]["cpus"] is not None or shutil.which("taskset") is None


def test_round_trips_sequential(tmp_path: Path, redis_binary: Path) -> None:
    out = tmp_path / "roundtrips.json"
    status = roundtrips.main(
        [
            "--variants",
            "redis-rate,redis-concurrency",
            "--modes",
            "sequential",
            "--rounds",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )

    assert status == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"redis-rate", "redis-concurrency"}
    for row in rows.values():
        assert row["mode"] == "sequential"
        assert row["connections"] == 1
        assert row["round_trips"] > 0
        assert row["commands_incl_scripts"] >= row["script_calls"] > 0


def test_grant_latency_runs(tmp_path: Path, redis_binary: Path) -> None:
    out = tmp_path / "grant.json"
    assert grant_latency.main(["--samples", "5", "--json", str(out)]) == 0

    document = json.loads(out.read_text())
    assert document["complete"] is True
    assert len(document["latencies_ms"]) == 5
    assert all(latency >= 0 for latency in document["latencies_ms"])
    assert document["latency_ms"]["p99"] is not None


def test_story_runs_and_scores_every_tenant(tmp_path: Path, redis_binary: Path) -> None:
    out = tmp_path / "story.json"
    names = ["bare", "memory", "redis-both", *(f"{p}-memory" for p in installed_peers())]
    status = story.main(
        [
            "--variants",
            ",".join(names),
            "--tenants",
            "A=4,B=8,C=40",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--work-ms",
            "20",
            "--timeout",
            "3",
            "--json",
            str(out),
        ]
    )

    assert status == 0
    document = json.loads(out.read_text())
    assert list(document["variants"]) == names
    for result in document["variants"].values():
        assert set(result["tenants"]) == {"A", "B", "C"}
        assert result["all"]["offered"] > 0
        assert result["all"]["goodput_per_s"] > 0
    assert document["variants"]["redis-both"]["redis"]["round_trips_per_request"] > 0
    assert document["variants"]["bare"]["redis"] is None


def test_story_scoring_counts_due_requests_in_the_window() -> None:
    def record(tenant: str, due: float, done: float, status: int) -> dict[str, Any]:
        return {"tenant": tenant, "due_s": due, "sent_s": due, "done_s": done, "status": status}

    records = [
        record("A", 0.5, 0.6, 200),  # due before the window: not scored
        record("A", 1.0, 1.1, 200),
        record("A", 2.0, 2.5, 429),
        record("A", 3.0, 4.5, 200),  # due in the window, done after it: served, no goodput
        record("B", 1.5, 1.5, 0) | {"error": "timeout"},
    ]
    result = story.score([{"error": None} | r for r in records], ["A", "B"], 1.0, 4.0)

    a = result["tenants"]["A"]
    assert a["offered"] == 3
    assert a["served_fraction"] == pytest.approx(2 / 3)
    assert a["rejected_fraction"] == pytest.approx(1 / 3)
    assert a["served_latency_ms"]["max"] == pytest.approx(1500.0)
    assert a["goodput_per_s"] == pytest.approx(1 / 3)  # one 2xx completed in [1, 4)
    assert result["tenants"]["B"]["failed_fraction"] == 1.0
    assert result["errors"] == {"timeout": 1}


def test_the_learned_limit_benchmark_runs_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "learned.json"
    status = learned.main(
        [
            *("--rounds", "1", "--duration", "6", "--drop-at", "3", "--warmup", "1"),
            *("--settle", "1.5", "--timeout", "3", "--json", str(out)),
        ]
    )

    assert status == 0
    document = json.loads(out.read_text())
    assert document["complete"] is True
    assert [(t["round"], t["variant"]) for t in document["trials"]] == [
        (1, "none"),
        (1, "static"),
        (1, "auto"),
    ]
    trials = {t["variant"]: t for t in document["trials"]}
    # The limit in force was sampled: none without a throttle, 8 when set, learned with auto.
    assert {s["limit"] for s in trials["none"]["samples"]} == {None}
    assert {s["limit"] for s in trials["static"]["samples"]} == {8}
    auto = [s["limit"] for s in trials["auto"]["samples"]]
    assert auto
    assert all(isinstance(n, int) and n >= 1 for n in auto)
    # The app lost half its slots midway.
    slots = [s["slots"] for s in trials["auto"]["samples"]]
    assert slots[0] == 8
    assert slots[-1] == 4
    for figures in (t["figures"] for t in document["trials"]):
        assert figures["errors_5xx"] == 0
        assert figures["goodput_before"] > 0
    assert set(document["summary"]) == {"none", "static", "auto"}
    assert "goodput_met" in document["targets"]
    assert len(document["estimator_sha256"]) == 64
    assert Path(document["chart"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_learned_limit_benchmark_scores_convergence_and_windows() -> None:
    def sample(t: float, limit: int | None) -> dict[str, Any]:
        return {"t_s": t, "limit": limit}

    samples = [sample(0.0, 4), sample(1.0, 9), sample(2.0, 13), sample(3.0, 10), sample(4.0, 11)]
    assert learnedscore.converged_at(samples, (0.0, 5.0), 8) == 3.0  # in [8, 12] from 3 s for good
    assert learnedscore.converged_at(samples, (0.0, 2.5), 8) is None  # 13 at the window's end
    assert learnedscore.converged_at([sample(0.0, None)], (0.0, 1.0), 8) is None  # no throttle

    def record(tenant: str, due: float, done: float, status: int = 200) -> dict[str, Any]:
        return {"tenant": tenant, "due_s": due, "sent_s": due, "done_s": done, "status": status}

    plan = learnedscore.Story(duration_s=4.0, drop_at_s=2.0, slots=2, slots_after=1, work_s=0.5,
                 warmup_s=0.0, settle_s=1.0)  # fmt: skip
    records = [
        record("A", 0.1, 0.3),
        record("A", 0.5, 1.5),
        record("B", 1.0, 1.2, 429),
        record("A", 3.0, 3.4),
        record("C", 3.5, 3.9, 500),
    ]
    figures = learnedscore.trial_figures(records, [sample(0.0, 2), sample(3.0, 1)], plan)
    assert figures["A_served_before"] == 1.0
    assert figures["B_served_before"] == 0.0
    assert figures["goodput_before"] == pytest.approx((2 / 2.0) / 4.0)  # 2 per 2 s, cap 4/s
    assert figures["goodput_after"] == pytest.approx((1 / 1.0) / 2.0)  # 1 in [3, 4), cap 2/s
    assert figures["A_p50_after_ms"] == pytest.approx(400.0)
    assert figures["errors_5xx"] == 1
    assert figures["converge_after_drop_s"] == 1.0

    trial = {"variant": "auto", "figures": figures}
    never = {"variant": "auto", "figures": {**figures, "converge_after_drop_s": None}}
    # A round that never converged counts as infinite: two of three -> the median is never.
    medians = learnedscore.summarize
    assert medians([trial, never, never], ["auto"])["auto"]["converge_after_drop_s"] is None
    assert medians([trial, trial, never], ["auto"])["auto"]["converge_after_drop_s"] == 1.0


def test_run_all_writes_the_summary(tmp_path: Path, redis_binary: Path) -> None:
    status = run_all.main(
        ["--only", "grant_latency", "--grant-samples", "3", "--out", str(tmp_path)]
    )

    assert status == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["statuses"] == {"grant_latency": 0}
    text = (tmp_path / "summary.md").read_text()
    assert "### Grant latency" in text
    assert "shared, noisy 2-core VM" in text


def test_redis_round_trips_subtract_our_own_samples(redis_binary: Path, tmp_path: Path) -> None:
    from bench.services import RedisService, ServiceContext

    service = RedisService(ServiceContext(None, tmp_path))
    try:
        service.start()
        quiet = [service.counters() for _ in range(3)]
        with redis.Redis.from_url(service.url) as client:
            client.ping()  # the connection's set-up (HELLO...) happens here
            before = service.counters()
            for _ in range(5):
                client.eval("redis.call('SET', 'k', 'v'); return redis.call('GET', 'k')", 0)
            pipe = client.pipeline(transaction=False)
            pipe.get("k").get("k").get("k")
            pipe.execute()
            after = service.counters()
    finally:
        service.stop()

    assert quiet[2]["round_trips"] == quiet[0]["round_trips"]  # sampling alone counts nothing
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert delta["round_trips"] == 6  # 5 scripts + 1 pipeline; their inner commands are not
    assert delta["script_calls"] == 5
    assert delta["commands"] == 5 + 10 + 3  # the scripts, their SET and GET, the pipeline's GETs


#: Redis commands per admission of each peer, those its script runs included.
PEER_COMMANDS = {
    "slowapi": 2,  # EVALSHA, INCRBY (and EXPIRE once a window)
    "fastapi-limiter": 3,  # EVALSHA, ZCOUNT, ZADD (and the leaker's ZREMRANGEBYSCORE)
    "asgi-ratelimit": 5,  # TTL, EVALSHA, SET NX, GET, DECR
}


def test_redis_cost_of_the_peers_runs_beside_ours(tmp_path: Path, redis_binary: Path) -> None:
    if len(installed_peers()) < len(PEER_MODULES):
        pytest.skip("needs every peer: the bench extra")
    out = tmp_path / "rediscost.json"
    args = ["--n", "50", "--scenarios", "rate,concurrency,peers", "--redis-cpu", ""]
    assert rediscost.main([*args, "--json", str(out)]) == 0

    scenarios = json.loads(out.read_text())["scenarios"]
    assert set(peerredis.PEERS) <= set(scenarios)
    for name in peerredis.PEERS:
        figures = scenarios[name]
        assert figures["admissions"] == 50
        assert figures["calls"] == 1.0  # one script call per admission, the peer's own
        assert figures["commands"] == pytest.approx(PEER_COMMANDS[name], abs=0.25)
        assert figures["cpu_us"] > 0  # read from Redis's INFO cpu
        for ours in ("rate", "concurrency"):
            ratio = scenarios[ours]["cpu_us"] / figures["cpu_us"]
            assert figures[f"vs_{ours}"] == pytest.approx(ratio, abs=0.01)


def test_redis_cost_of_kept_slots_runs_beside_the_paced_fleet(
    tmp_path: Path, redis_binary: Path
) -> None:
    out = tmp_path / "rediscost.json"
    args = ["--n", "200", "--scenarios", "slots", "--redis-cpu", "", "--json", str(out)]
    assert rediscost.main(args) == 0

    scenarios = json.loads(out.read_text())["scenarios"]
    paced, kept = scenarios["concurrency-paced"], scenarios["concurrency-kept"]
    assert paced["admissions"] == kept["admissions"] == 200
    assert paced["calls"] > 0.5  # an acquire and a release each, some of them together
    assert kept["local"] > 0.5  # most on kept slots (the warm-up filled the pools)
    assert kept["vs_paced"] == pytest.approx(paced["cpu_us"] / max(0.1, kept["cpu_us"]), abs=0.1)


def test_redis_cost_measures_the_default_beside_the_per_request_path(
    tmp_path: Path, redis_binary: Path
) -> None:
    out = tmp_path / "rediscost.json"
    args = ["--n", "300", "--scenarios", "concurrency", "--redis-cpu", "", "--json", str(out)]
    assert rediscost.main(args) == 0

    scenarios = json.loads(out.read_text())["scenarios"]
    assert scenarios["concurrency"]["calls"] == pytest.approx(2.0, abs=0.05)  # kept slots off
    assert scenarios["concurrency-default"]["calls"] < 0.5  # most on kept slots


def test_kept_idle_measures_what_kept_slots_cost_another_process(
    tmp_path: Path, redis_binary: Path
) -> None:
    out = tmp_path / "keptidle.json"
    args = ["--keep", "0,0.2", "--seconds", "1", "--warmup", "0.3", "--gap", "0.3"]
    assert keptidle.main([*args, "--burst-hold", "0.1", "--redis-cpu", "", "--json", str(out)]) == 0

    off, kept = json.loads(out.read_text())["runs"]
    assert off["keep_s"] == 0.0
    assert kept["keep_s"] == 0.2
    assert off["keeper_local"] == 0
    assert off["idle_while_waiting"] == 0.0
    assert kept["keeper_local"] > 0  # the keeper ran on kept slots
    assert off["other_requests"] > 0
    assert kept["other_requests"] > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_redis_cost_logs_every_script_call_when_asked(tmp_path: Path, redis_binary: Path) -> None:
    out = tmp_path / "rediscost.json"
    args = ["--n", "128", "--scenarios", "churn", "--redis-cpu", "", "--every-call"]
    assert rediscost.main([*args, "--json", str(out)]) == 0

    figures = json.loads(out.read_text())["scenarios"]["churn"]
    assert figures["admissions"] == 512
    assert 0 < figures["call_us_p50"] <= figures["call_us_p90"] <= figures["call_us_p99"]
    assert figures["call_us_p99"] <= figures["longest_us"]


def test_redis_instructions_of_a_peer_are_counted_beside_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "slowapi" not in installed_peers():
        pytest.skip("needs slowapi: the bench extra")
    args = ["--n", "20", "--scenarios", "rate,slowapi", "--out", str(tmp_path)]
    assert redisinstr.main(args) == 0

    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    rate, slowapi = (int(lines[name].split()[0].replace(",", "")) for name in ("rate", "slowapi"))
    assert 1_000 < slowapi < rate  # one INCRBY script against our scheduler's
    assert f"rate / this {rate / slowapi:.2f}" in lines["slowapi"]
    assert "in the script call" in lines["slowapi"]  # EVALSHA's share found


def test_the_ceiling_runs_every_cell_and_the_fleet_story(
    tmp_path: Path, redis_binary: Path
) -> None:
    out = tmp_path / "ceiling.json"
    args = ["--processes", "1,2", "--duration", "0.5", "--heavy-inflight", "4"]
    args += ["--modes", "rate,rate-exact,concurrency"]
    story_args = ["--story", "--story-processes", "2", "--story-duration", "2"]
    status = ceiling.main([*args, *story_args, "--story-warmup", "0.5", "--json", str(out)])

    assert status == 0
    document = json.loads(out.read_text())
    cells = document["cells"]
    grid = {(c["mode"], c["processes"], c["load"]) for c in cells}
    modes = ("rate", "rate-exact", "concurrency")
    assert grid == {(m, n, load) for m in modes for n in (1, 2) for load in ("light", "heavy")}
    for cell in cells:
        assert cell["admitted"] > 0
        assert cell["redis_failures"] == 0
        assert cell["redis_cpu_s"] > 0  # read from Redis's INFO cpu
        # Unbatched: one script call per admission; batched: fewer (a heavy cell
        # may not fill its batches in half a second on a loaded machine). `rate` runs the
        # default settings: leases of rate tokens (auto), most admissions without a call.
        if cell["mode"] == "rate":
            assert cell["script_calls_per_admission"] < 0.5, cell
        elif cell["load"] == "light":
            assert cell["script_calls_per_admission"] == pytest.approx(1.0, abs=0.05)
    assert document["story"]["processes"] == 2
    assert document["story"]["admitted_per_s"] > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_instructions_are_counted_per_request(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    args = ["--variants", "bare,memory", "--requests", "50", "--warmup", "20"]
    status = instructions.main([*args, "--out", str(tmp_path), "--json", str(out)])

    assert status == 0
    results = json.loads(out.read_text())
    bare, memory = results
    assert bare["requests"] == 50
    # The dump holds only the measured requests: tens of thousands of instructions
    # each, not the hundreds of millions of start-up.
    assert 10_000 < bare["per_request"] < 5_000_000
    assert memory["per_request"] > bare["per_request"]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_script_instructions_count_wide_churn_calls_whole_on_an_unbounded_clock(
    tmp_path: Path,
) -> None:
    """`--calls` and `--unbounded-clock` (issue 14's churn figure in one command): under
    valgrind a call of 32 new tenants is cut by WORK_US unless the clock is unbounded; the
    package's scripts are left as they were."""
    args = ["--scenarios", "churn", "--width", "32", "--head-start", "100000", "--calls", "2"]
    evalsha = ["--evalsha"] if " v=6." in _redis_version() else []
    counted = {}
    for extra in ([], ["--unbounded-clock"]):
        out = tmp_path / f"churn{len(extra)}.json"
        argv = [*args, *evalsha, *extra, "--out", str(tmp_path), "--json", str(out)]
        assert scriptinstructions.main(argv) == 0
        churn = json.loads(out.read_text())["churn"]
        assert churn["calls"] == 2
        counted[bool(extra)] = churn["per_call"]
    # A whole call of 32 new tenants (some 2.5 M instructions) against one cut short.
    assert counted[True] > 2 * counted[False]
    assert scripts.SHARED["TUNING"]["WORK_US"] == scripts.WORK_US  # type: ignore[index]
    assert f"WORK_US = {scripts.WORK_US}," in scripts.library().text


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_script_instructions_split_a_saturated_run_into_ticks_and_acquires(
    tmp_path: Path,
) -> None:
    """`--per-call`: a saturated run's ticks and acquires counted apart (a tick, then its
    acquire, call after call: the dumps read in the order made, .10 after .9), and the
    floor function's (FCALL only) 16 commands counted too."""
    old = " v=6." in _redis_version()
    scenarios = "saturated" if old else "saturated,floor"
    out = tmp_path / "split.json"
    argv = ["--scenarios", scenarios, "--tenants", "10", "--calls", "6", "--per-call"]
    argv += [*(["--evalsha"] if old else []), "--out", str(tmp_path), "--json", str(out)]
    assert scriptinstructions.main(argv) == 0
    results = json.loads(out.read_text())
    run = results["saturated-10"]
    assert run["calls"] == 12
    # Each kind's mean, which together make the run's: a tick grants and reads the next in
    # line, its acquire queues.
    assert abs(run["tick"] + run["acquire"] - 2 * run["per_call"]) <= 2
    assert run["tick"] > 50_000
    assert run["acquire"] > 50_000
    if not old:
        floor16, floor28 = results["floor-cmds-16"], results["floor-cmds-28"]
        assert floor16["calls"] == 50
        assert 0 < floor16["per_call"] < floor28["per_call"] < run["tick"] + run["acquire"]


def test_paced_cost_times_the_saturated_scenario_back_to_back_and_paced(tmp_path: Path) -> None:
    """bench/pacedcost.py: Redis's own microseconds per FCALL of the saturated scenario and
    of the floor function, for each gap (FCALL: Redis 7)."""
    if " v=6." in _redis_version():
        pytest.skip("FCALL: Redis 7")
    out = tmp_path / "paced.json"
    argv = ["--tenants", "10", "--gaps", "0,0.001", "--ticks", "5", "--reps", "2"]
    assert pacedcost.main([*argv, "--redis-cpu", "", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert sorted(results) == ["saturated-10-gap-0", "saturated-10-gap-0.001"]
    for figures in results.values():
        for name in ("saturated", "floor-cmds-16"):
            assert len(figures[name]["us"]) == 2
            assert figures[name]["median_us"] > 0


def _redis_version() -> str:
    binary = str(redis_server_binary())
    return subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout


def test_opcodes_are_counted_per_function(capsys: pytest.CaptureFixture[str]) -> None:
    opcodes.main(["--variants", "bare,memory", "--warmup", "5", "--top", "50"])

    out = capsys.readouterr().out
    totals = {
        line.split(":")[0]: int(line.split()[1].replace(",", ""))
        for line in out.splitlines()
        if line.endswith(" opcodes")
    }
    assert set(totals) == {"bare", "memory"}
    # The memory variant runs the bare app and the middleware in front of it.
    assert totals["memory"] > totals["bare"] > 100
    assert "asgi/middleware.py:__call__" in out.split("memory:")[1]
    assert "asgi/middleware.py" not in out.split("memory:")[0]


def test_script_sections_find_each_anchor_once() -> None:
    """bench/scriptsections.py's markers go where its sections say (an anchor the scripts
    no longer have stops it)."""
    for name in {script for script, _, _ in scriptsections.SECTIONS}:
        text = scriptsections.marked_part(scripts._part)(name)
        wanted = sum(1 for script, _, _ in scriptsections.SECTIONS if script == name)
        assert text.count(scriptsections.MARKS) == wanted, name


def test_fast_sections_find_each_anchor_once() -> None:
    """bench/fastsections.py's markers, likewise (the fast path's sections)."""
    for name in {script for script, _, _ in fastsections.SECTIONS}:
        text = scriptsections.marked_part(scripts._part, fastsections.SECTIONS)(name)
        wanted = sum(1 for script, _, _ in fastsections.SECTIONS if script == name)
        assert text.count(scriptsections.MARKS) == wanted, name


def test_churn_sections_find_each_anchor_once() -> None:
    """bench/churnsections.py's markers, likewise (a churn call's sections)."""
    for name in {script for script, _, _ in churnsections.SECTIONS}:
        text = scriptsections.marked_part(scripts._part, churnsections.SECTIONS)(name)
        wanted = sum(1 for script, _, _ in churnsections.SECTIONS if script == name)
        assert text.count(scriptsections.MARKS) == wanted, name


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_script_sections_profile_a_saturated_tick_and_acquire(tmp_path: Path) -> None:
    version = subprocess.run(
        [str(redis_server_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    if " v=6." in version:
        pytest.skip("FCALL: Redis 7")
    result = scriptsections.run(tenants=20, rounds=3, out=tmp_path)
    assert set(result) == {"tick", "acquire"}
    tick, acquire = result["tick"], result["acquire"]
    assert tick["calls"] == acquire["calls"] == 3
    assert "tick: unlink" in tick
    assert "acquire: push" in acquire
    assert "tick: unlink" not in acquire
    total = sum(v for k, v in tick.items() if k not in ("calls", "marker"))
    assert 100_000 < total < 5_000_000
    # Nothing left patched: the library is the package's again.
    assert scriptsections.MARKS not in scripts.library().text


def test_redis_cost_of_a_learned_limit_reports_each_limit_it_took(
    tmp_path: Path, redis_binary: Path
) -> None:
    out = tmp_path / "rediscost.json"
    args = ["--n", "200", "--scenarios", "slots-kept", "--slots-limit", "auto"]
    for start in ([], ["--slots-together"]):  # spread evenly (the default), and at once
        assert rediscost.main([*args, *start, "--redis-cpu", "", "--json", str(out)]) == 0
        kept = json.loads(out.read_text())["scenarios"]["concurrency-kept"]
        assert kept["admissions"] == 200
        # No --slots-learn: no samples, so the limit stays at its start all along.
        assert kept["learned_path"] == [4]
        assert kept["learned"] == [4, "idle"]
    # THROTTLE_CONCURRENCY_MIN=8: it starts (and stays) at 8.
    assert rediscost.main([*args, "--slots-min", "8", "--redis-cpu", "", "--json", str(out)]) == 0
    kept = json.loads(out.read_text())["scenarios"]["concurrency-kept"]
    assert kept["learned_path"] == [8]


def skip_without_functions(redis_binary: Path) -> None:
    """The ``floor`` and ``busy`` scenarios load a function library: Redis 7 or Valkey."""
    version = subprocess.run(
        [str(redis_binary), "--version"], capture_output=True, text=True, check=True
    ).stdout
    if " v=6." in version:
        pytest.skip("FCALL: Redis 7")


def test_redis_cost_floor_runs_a_saturated_calls_commands_alone(
    tmp_path: Path, redis_binary: Path
) -> None:
    skip_without_functions(redis_binary)
    out = tmp_path / "rediscost.json"
    args = ["--n", "40", "--scenarios", "floor", "--redis-cpu", "", "--json", str(out)]
    assert rediscost.main(args) == 0

    scenarios = json.loads(out.read_text())["scenarios"]
    assert scenarios["floor-nop"]["commands"] == 1.0
    for count in rediscost.FLOOR_COMMANDS:
        figures = scenarios[f"floor-cmds-{count}"]
        assert figures["admissions"] == 40
        assert figures["calls"] == 1.0
        assert figures["commands"] == count + 1  # the FCALL and the commands it ran


def test_redis_cost_can_give_redis_its_cpu(redis_binary: Path) -> None:
    """``--redis-fifo``: every thread of the bench's redis-server at SCHED_FIFO, so that on a
    shared machine a call over 1 ms is the call's own doing, not Redis preempted."""
    if os.geteuid() != 0:
        pytest.skip("SCHED_FIFO needs root")
    server = RedisServer().start()
    try:
        rediscost.real_time(server.pid)
        threads = os.listdir(f"/proc/{server.pid}/task")
        assert len(threads) > 1  # the bio threads too, not only the main one
        assert {os.sched_getscheduler(int(tid)) for tid in threads} == {os.SCHED_FIFO}
        assert server.client().ping()
    finally:
        server.close()


def test_redis_cost_sizes_fixed_work_to_a_calls_length(tmp_path: Path, redis_binary: Path) -> None:
    """``busy``: calls of fixed work sized to ``--busy-us``, their calls over 1 ms counted."""
    skip_without_functions(redis_binary)
    out = tmp_path / "rediscost.json"
    args = ["--n", "50", "--scenarios", "busy", "--busy-us", "300", "--redis-cpu", ""]
    assert rediscost.main([*args, "--json", str(out)]) == 0

    figures = json.loads(out.read_text())["scenarios"]["busy"]
    assert figures["admissions"] == 50
    assert figures["calls"] == 1.0  # one script call each, nothing else
    assert figures["size"] > 1  # sized from the calls before: more than one step of work
    assert isinstance(figures["slow"], int)
