"""Metrics with several worker processes: prometheus_client's multiprocess mode.

In process: prometheus_client's own multiprocess value class, one per simulated
worker (it keys its files by a process identifier), shows that a scrape sums
every worker's counters and histograms and serves the gauges once, without a
``pid`` label. End to end: the demo app under ``uvicorn --workers 3`` with
``PROMETHEUS_MULTIPROC_DIR``, a known load over fresh connections (so the
kernel spreads it over the workers), and every scrape, whichever worker answers
it, reports exactly the counts the load implies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer
from throttle_mw import ThrottleEvent
from throttle_mw.backends import MemoryBackend
from throttle_mw.metrics import ThrottleMetrics, multiprocess_mode
from throttle_mw.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# --- in process: two simulated workers --------------------------------------------------------


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Any]]:
    """`worker("1")` puts prometheus_client in multiprocess mode as worker "1" would be."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    made: list[Any] = []

    def become(process: str) -> Any:
        value_class = values.MultiProcessValue(  # type: ignore[no-untyped-call]
            process_identifier=lambda: process
        )
        monkeypatch.setattr(values, "ValueClass", value_class)
        made.append(value_class)
        return value_class

    yield become
    for value_class in made:
        value_class.close_all_files()


def test_a_scrape_adds_up_every_worker_and_shows_the_gauges_once(
    worker: Callable[[str], Any], tmp_path: Path
) -> None:
    assert not multiprocess_mode()
    settings = Settings.from_env({}, rate=5.0, burst=5.0)
    backend = MemoryBackend(settings.limits(), settings.policy())
    worker("1")
    assert multiprocess_mode()
    first = ThrottleMetrics(registry=CollectorRegistry(), backend=backend, tenants=["acme"])
    worker("2")
    second = ThrottleMetrics(registry=CollectorRegistry(), backend=backend, tenants=["acme"])
    for _ in range(3):
        first(ThrottleEvent("admitted", "acme", "critical", 0.002))
    first(ThrottleEvent("rejected", "acme", "low", 0.0, 429, "tenant_over_share"))
    for _ in range(4):
        second(ThrottleEvent("admitted", "globex", "critical", 0.2))
    second(ThrottleEvent("degraded", "acme", "low", 0.0))
    assert {p.name for p in tmp_path.iterdir()} >= {"counter_1.db", "counter_2.db"}

    for metrics in (first, second):  # whichever worker answers the scrape
        m = parse(metrics.render()[0].decode())
        assert value(m, "throttle_requests_total", priority="critical", outcome="admitted") == 7
        assert value(m, "throttle_requests_total", priority="low", outcome="rejected") == 1
        assert value(m, "throttle_requests_total", priority="low", outcome="degraded") == 1
        assert value(m, "throttle_wait_seconds_count", priority="critical") == 7
        assert value(m, "throttle_wait_seconds_bucket", priority="critical", le="0.005") == 3
        assert value(m, "throttle_wait_seconds_bucket", priority="critical", le="0.25") == 7
        assert total(m, "throttle_rejections_total", status="429") == 1
        assert value(m, "throttle_tenant_requests_total", tenant="acme", outcome="admitted") == 3
        assert value(m, "throttle_tenant_requests_total", tenant="other", outcome="admitted") == 4
        assert value(m, "throttle_snapshot_errors_total") == 0
        assert not any(name.endswith("_created") for name, _ in m)
        assert not any(dict(labels).get("pid") for _, labels in m)


@pytest.mark.anyio
async def test_the_gauges_come_from_the_answering_worker_s_reading_of_the_budget(
    worker: Callable[[str], Any],
) -> None:
    settings = Settings.from_env({}, rate=5.0, burst=5.0)
    backend = MemoryBackend(settings.limits(), settings.policy())
    worker("1")
    metrics = ThrottleMetrics(registry=CollectorRegistry(), backend=backend)
    await metrics.refresh()
    m = parse(metrics.render()[0].decode())
    assert value(m, "throttle_tokens") == 5.0
    assert total(m, "throttle_queue_depth") == 0
    assert len([name for name, _ in m if name == "throttle_tokens"]) == 1


def test_top_tenants_is_refused_in_multiprocess_mode(worker: Callable[[str], Any]) -> None:
    worker("1")
    with pytest.raises(ValueError, match="top_tenants needs single-process metrics"):
        ThrottleMetrics(registry=CollectorRegistry(), top_tenants=3)


# --- end to end: the demo app with three uvicorn workers ----------------------------------------


def requests_by_process(directory: Path) -> dict[str, float]:
    """Throttle decisions counted in each process's file (the file name carries its pid)."""
    found = {}
    for path in directory.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
        found[path.stem.removeprefix("counter_")] = sum(
            s.value
            for family in families
            for s in family.samples
            if s.name == "throttle_requests_total"
        )
    return found


@pytest.mark.e2e
def test_three_workers_report_the_counts_a_known_load_implies(
    start_app_server: Callable[..., AppServer], redis_server: RedisServer, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    # One budget for the three workers, through Redis: a burst of 5 and then a token
    # every 1,000 s, so which requests go through does not depend on which worker
    # serves them: the first 5 submissions, then none.
    env = {
        "THROTTLE_REDIS_URL": redis_server.url,
        "THROTTLE_KEY_PREFIX": "metrics-e2e",
        "THROTTLE_RATE": "0.001",
        "THROTTLE_BURST": "5",
        "SURVEYTOOL_DB": str(tmp_path / "surveytool.sqlite3"),
        "SURVEYTOOL_WORK_MS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    server = start_app_server(
        "demo_app.app:app", env=env, workers=3, health_path="/healthz", startup_timeout_s=60.0
    )
    body = {"respondent": "r-1", "answers": {"q1": 4}}
    rounds = 0
    # No keep-alive: each request on a new connection, which any worker may accept.
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(
        base_url=server.url, headers={"x-tenant-id": "A"}, limits=fresh, timeout=15.0
    ) as http:
        admitted = [http.post("/api/surveys/s1/responses", json=body) for _ in range(5)]
        assert [r.status_code for r in admitted] == [201] * 5
        # Then rounds of refused submissions and dashboards and degraded live stats (and
        # an exempt health check, counted nowhere) until two workers or more have served.
        # (A worker that has served nothing may have a counter file already: count values.)
        while rounds < 40 and (
            rounds < 5 or sum(map(bool, requests_by_process(metrics_dir).values())) < 2
        ):
            rounds += 1
            refused = [
                http.post("/api/surveys/s1/responses", json=body),
                http.get("/api/dashboard", params={"survey_id": "s1"}),
            ]
            # 503 "overloaded": A, the only tenant, is within its share of an empty budget.
            assert [r.status_code for r in refused] == [503, 503], [r.text for r in refused]
            live = http.get("/api/stats/live", params={"survey_id": "s1"})
            assert live.json()["degraded"] is True
            assert http.get("/healthz").status_code == 200
        scrapes = [http.get("/metrics") for _ in range(6)]

    served = {pid: n for pid, n in requests_by_process(metrics_dir).items() if n}
    assert len(served) >= 2, f"one worker took everything in {rounds} rounds: {served}"
    assert sum(served.values()) == 5 + 3 * rounds
    for scrape in scrapes:  # every answer the same, whichever worker gave it
        assert scrape.status_code == 200
        assert "throttle;dur" not in scrape.headers.get("server-timing", "")  # exempt
        m = parse(scrape.text)
        assert value(m, "throttle_requests_total", priority="critical", outcome="admitted") == 5
        assert value(m, "throttle_requests_total", priority="critical", outcome="rejected") == (
            rounds
        )
        assert value(m, "throttle_requests_total", priority="low", outcome="rejected") == rounds
        assert value(m, "throttle_requests_total", priority="low", outcome="degraded") == rounds
        assert total(m, "throttle_requests_total") == 5 + 3 * rounds
        assert total(m, "throttle_rejections_total", status="503", dry_run="false") == 2 * rounds
        assert total(m, "throttle_rejections_total") == 2 * rounds
        assert value(m, "throttle_wait_seconds_count", priority="critical") == 5
        assert value(m, "throttle_wait_seconds_count", priority="low") == rounds
        assert total(m, "throttle_queued_total") == 0
        assert value(m, "throttle_tenant_requests_total", tenant="A", outcome="admitted") == 5
        assert value(m, "throttle_tenant_requests_total", tenant="A", outcome="rejected") == (
            2 * rounds
        )
        # The gauges: the fleet's budget read from Redis by the answering worker, once.
        assert value(m, "throttle_tokens") < 1
        assert total(m, "throttle_queue_depth") == 0
        assert not any(dict(labels).get("pid") for _, labels in m)
    assert os.listdir(metrics_dir)
