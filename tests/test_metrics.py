"""Prometheus metrics: exact counts for a known load, bounded tenant series, safe scrapes."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import Message, Scope

from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer
from throttle_mw import ThrottleEvent, ThrottleMiddleware
from throttle_mw.backends import MemoryBackend
from throttle_mw.backends.redis import RedisBackend
from throttle_mw.metrics import OTHER, PROMOTE_AT, TenantLabels, ThrottleMetrics
from throttle_mw.scheduler import Request as BudgetRequest
from throttle_mw.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


pytestmark = pytest.mark.usefixtures("clean_env")


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a series that does not exist (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls) in samples if n == name}


def fresh(**kwargs: Any) -> ThrottleMetrics:
    return ThrottleMetrics(registry=CollectorRegistry(), **kwargs)


# --- end to end: a known load, scraped over HTTP ------------------------------------------


@pytest.mark.e2e
def test_a_known_load_is_counted_exactly_and_the_scrape_is_never_throttled(
    start_app_server: Callable[..., AppServer],
) -> None:
    # A burst of 5 tokens refilled at 0.01/s: the first 5 requests are admitted and
    # the budget then stays empty for the whole test.
    server = start_app_server(
        "tests.apps.metered:app", env={"THROTTLE_RATE": "0.01", "THROTTLE_BURST": "5"}
    )
    statuses: Counter[tuple[str, int]] = Counter()
    with httpx.Client(base_url=server.url, headers={"x-tenant-id": "acme"}) as http:
        for _ in range(8):
            statuses["/", http.get("/").status_code] += 1
        degraded = [http.get("/stats").json()["degraded"] for _ in range(4)]
        healthz = [http.get("/healthz").status_code for _ in range(3)]
        other = [http.get("/", headers={"x-tenant-id": f"t{i}"}).status_code for i in range(2)]
        mounted = http.get("/mounted/")
        scrape = http.get("/metrics")

    rejected = {status for (_, status), _ in statuses.items() if status != 200}
    assert statuses["/", 200] == 5
    assert sum(statuses.values()) - 5 == 3
    assert len(rejected) == 1
    (status,) = rejected
    assert degraded == [True] * 4
    assert healthz == [200] * 3
    assert other == [status] * 2
    assert mounted.status_code == 200
    assert "throttle_requests_total" in mounted.text
    assert scrape.status_code == 200
    m = parse(scrape.text)

    assert value(m, "throttle_requests_total", priority="normal", outcome="admitted") == 5
    assert value(m, "throttle_requests_total", priority="normal", outcome="rejected") == 5
    assert value(m, "throttle_requests_total", priority="low", outcome="degraded") == 4
    # Every request counted once, exempt ones (health checks, scrapes) not at all.
    assert total(m, "throttle_requests_total") == 5 + 5 + 4
    assert total(m, "throttle_rejections_total", status=str(status), dry_run="false") == 5
    assert total(m, "throttle_rejections_total") == 5
    assert value(m, "throttle_wait_seconds_count", priority="normal") == 5
    assert value(m, "throttle_wait_seconds_count", priority="low") == 4
    assert value(m, "throttle_wait_seconds_bucket", priority="normal", le="0.1") == 5
    assert total(m, "throttle_queued_total") == 0
    # acme is listed; the two others sent 1 request each: below the promotion bar.
    assert value(m, "throttle_tenant_requests_total", tenant="acme", outcome="admitted") == 5
    assert value(m, "throttle_tenant_requests_total", tenant="acme", outcome="rejected") == 3
    assert value(m, "throttle_tenant_requests_total", tenant="acme", outcome="degraded") == 4
    assert value(m, "throttle_tenant_requests_total", tenant=OTHER, outcome="rejected") == 2
    # The gauges come from the middleware's own backend, found without being passed.
    assert value(m, "throttle_tokens") < 1
    assert value(m, "throttle_tenants") == 3
    assert total(m, "throttle_queue_depth") == 0
    assert value(m, "throttle_snapshot_errors_total") == 0


# --- in process: queueing, leaving, gauges ----------------------------------------------------


def http_scope(path: str, tenant: str = "acme") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tenant-id", tenant.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }


def receiver(gone: asyncio.Event) -> Callable[[], Any]:
    """An ASGI receive: the (empty) request body, then a disconnect once `gone` is set."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


@pytest.mark.anyio
async def test_queue_gauges_and_a_client_that_leaves_while_queued() -> None:
    entered, release, queued = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold(request: Request) -> PlainTextResponse:
        entered.set()
        await release.wait()
        return PlainTextResponse("done")

    def on_queued(event: ThrottleEvent) -> None:
        if event.kind == "queued":
            queued.set()

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/hold", hold), Route("/", fast)])
    settings = Settings.from_env({}, concurrency=1)
    backend = MemoryBackend(settings.limits(), settings.policy())
    metrics = fresh(backend=backend, tenants=["acme"], snapshot_min_age_s=0)
    app = ThrottleMiddleware(inner, backend=backend, observers=[metrics, on_queued], concurrency=1)
    sent: dict[str, list[Message]] = {"/hold": [], "/": []}

    async def call(path: str, gone: asyncio.Event) -> None:
        async def send(message: Message) -> None:
            sent[path].append(message)

        await app(http_scope(path), receiver(gone), send)

    never, gone = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(call("/hold", never))
    await asyncio.wait_for(entered.wait(), 5.0)
    waiter = asyncio.create_task(call("/", gone))
    await asyncio.wait_for(queued.wait(), 5.0)

    await metrics.refresh()
    m = parse(metrics.render()[0].decode())
    assert value(m, "throttle_in_flight") == 1
    assert value(m, "throttle_queue_depth", priority="normal") == 1
    assert value(m, "throttle_tenant_queue_depth", tenant="acme") == 1
    assert value(m, "throttle_tenant_queue_depth", tenant=OTHER) == 0
    assert "throttle_tokens" not in {name for name, _ in m}  # no rate budget

    gone.set()
    await asyncio.wait_for(waiter, 5.0)
    assert sent["/"] == []  # the client left: nothing is sent to it
    release.set()
    await asyncio.wait_for(holder, 5.0)

    await metrics.refresh()
    m = parse(metrics.render()[0].decode())
    assert value(m, "throttle_requests_total", priority="normal", outcome="admitted") == 1
    assert value(m, "throttle_requests_total", priority="normal", outcome="left") == 1
    assert value(m, "throttle_tenant_requests_total", tenant="acme", outcome="left") == 1
    assert value(m, "throttle_queued_total", priority="normal") == 1
    assert value(m, "throttle_wait_seconds_count", priority="normal") == 1  # not the one that left
    assert value(m, "throttle_in_flight") == 0
    assert total(m, "throttle_queue_depth") == 0


@pytest.mark.anyio
async def test_a_cancelled_app_is_counted_once_and_its_slot_comes_back() -> None:
    """THROTTLE_CANCEL_ON_DISCONNECT: the client leaves while the app runs; the app is
    cancelled, `throttle_cancelled_total` counts it (its admission already counted the
    request), the slot is free again, and the request ends without raising."""
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def hold(request: Request) -> PlainTextResponse:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return PlainTextResponse("done")

    inner = Starlette(routes=[Route("/hold", hold)])
    settings = Settings.from_env({}, concurrency=1)
    backend = MemoryBackend(settings.limits(), settings.policy())
    metrics = fresh(backend=backend, snapshot_min_age_s=0)
    app = ThrottleMiddleware(
        inner, backend=backend, observers=[metrics], concurrency=1, cancel_on_disconnect=True
    )
    assert app.error is None
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    gone = asyncio.Event()
    call = asyncio.create_task(app(http_scope("/hold"), receiver(gone), send))
    await asyncio.wait_for(entered.wait(), 5.0)
    gone.set()
    await asyncio.wait_for(call, 5.0)  # returns: no CancelledError, no other exception
    assert cancelled.is_set()
    assert sent == []

    await metrics.refresh()
    m = parse(metrics.render()[0].decode())
    assert value(m, "throttle_cancelled_total", priority="normal") == 1
    assert value(m, "throttle_requests_total", priority="normal", outcome="admitted") == 1
    assert value(m, "throttle_in_flight") == 0


def test_dry_run_and_failure_mode_outcomes_use_the_decision_words() -> None:
    metrics = fresh()
    for event in (
        ThrottleEvent("admitted", "a", "high", unthrottled=True),  # failure mode open
        ThrottleEvent("queued", "a", "high", dry_run=True),
        ThrottleEvent("admitted", "a", "high", unthrottled=True, dry_run=True),
        ThrottleEvent("rejected", "a", "high", 0.0, 429, "tenant_over_share", dry_run=True),
        ThrottleEvent("rejected", "a", "high", 0.2, 503, "expired"),
    ):
        metrics(event)
    m = parse(metrics.render()[0].decode())
    for outcome in ("unthrottled", "would_queue", "would_reject", "rejected"):
        assert value(m, "throttle_requests_total", priority="high", outcome=outcome) == 1, outcome
    assert value(m, "throttle_queued_total", priority="high") == 1
    assert total(m, "throttle_rejections_total", dry_run="true", status="429") == 1
    assert (
        value(
            m,
            "throttle_rejections_total",
            priority="high",
            reason="expired",
            status="503",
            dry_run="false",
        )
        == 1
    )
    # No backend: no gauge samples, only their descriptions.
    assert "throttle_in_flight" not in {name for name, _ in m}


# --- mounting and exemption ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_route_and_mount_bypass_an_exhausted_budget() -> None:
    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    metrics = fresh()
    inner = Starlette(
        routes=[
            Route("/", fast),
            metrics.route(),
            Mount("/scrape", metrics.asgi_app()),
        ]
    )
    app = ThrottleMiddleware(inner, observers=[metrics], rate=0.01, burst=1, max_wait_s=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/")).status_code == 200
        rejected = {(await http.get("/")).status_code for _ in range(3)}
        assert rejected in ({429}, {503})
        route = await http.get("/metrics")
        mount = await http.get("/scrape/")
        head = await http.head("/metrics")
        post = await http.post("/scrape/")
    assert route.status_code == mount.status_code == head.status_code == 200
    assert head.content == b""
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    m = parse(route.text)
    assert total(m, "throttle_requests_total") == 4  # the scrapes are not counted


@pytest.mark.anyio
async def test_a_failing_resolver_is_counted_per_request_by_failure_and_type() -> None:
    """Every request whose resolver failed, not only the first of a kind (the log line's):
    by failure and type name, bounded at 32 types, then "other"."""

    class Failure(Exception):
        pass

    kinds = [type(f"Failure{i}", (Failure,), {}) for i in range(35)]

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.throttle.tenant)

    def resolver(scope: Scope) -> Any:
        kind = dict(scope["headers"]).get(b"x-kind", b"").decode()
        if kind == "float":
            return 1.5
        if kind.isdigit():
            raise kinds[int(kind)]("the key sk-secret")
        return {"acme": "acme"}[kind]  # KeyError for any other

    metrics = fresh()
    inner = Starlette(routes=[Route("/", fast), metrics.route()])
    app = ThrottleMiddleware(inner, observers=[metrics], rate=1000.0, tenant_resolver=resolver)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        sent = ["acme", "nobody", "nobody", "nobody", "float", "float", "0", "0"]
        sent += [str(i) for i in range(1, 35)]  # 34 more kinds: 2 past the bound of 32
        tenants = [(await http.get("/", headers={"x-kind": kind})).text for kind in sent]
        m = parse((await http.get("/metrics")).text)
    assert tenants[0] == "acme"
    assert set(tenants[1:]) == {"ip:127.0.0.1"}
    name = "throttle_tenant_resolver_failures_total"
    assert value(m, name, failure="raised", type="KeyError") == 3
    assert value(m, name, failure="returned", type="float") == 2
    assert value(m, name, failure="raised", type="Failure0") == 2
    # KeyError, float and Failure0-29 are the 32 kinds; Failure30-34 are "other".
    assert value(m, name, failure="raised", type="Failure29") == 1
    assert value(m, name, failure="raised", type="other") == 5  # Failure30-34
    assert "Failure30" not in label_values(m, name, "type")
    assert total(m, name) == len(sent) - 1
    assert "sk-secret" not in str(m)


@pytest.mark.anyio
async def test_the_documented_fastapi_set_up_is_exempt_and_finds_the_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_RATE", "0.01")
    monkeypatch.setenv("THROTTLE_BURST", "1")
    metrics = fresh(top_tenants=5)
    app = FastAPI()
    app.add_middleware(ThrottleMiddleware, observers=[metrics])
    app.routes.append(metrics.route())

    @app.get("/work")
    async def work() -> dict[str, bool]:
        return {"ok": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        codes = [(await http.get("/work")).status_code for _ in range(3)]
        scrape = await http.get("/metrics")
    assert codes[0] == 200
    assert codes[1] == codes[2] != 200
    assert scrape.status_code == 200
    m = parse(scrape.text)
    assert total(m, "throttle_requests_total") == 3
    assert value(m, "throttle_tenants") == 1  # the gauges read the middleware's own backend
    assert value(m, "throttle_tokens") < 1


@pytest.mark.anyio
async def test_the_scrape_negotiates_openmetrics_and_gzip() -> None:
    metrics = fresh()
    metrics(ThrottleEvent("admitted", "a", "normal", 0.003))
    transport = httpx.ASGITransport(app=metrics.asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        plain = await http.get("/", headers={"accept-encoding": "identity"})
        om = await http.get(
            "/",
            headers={"accept": "application/openmetrics-text", "accept-encoding": "gzip"},
        )
    assert plain.headers["content-type"].startswith("text/plain")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.headers["content-encoding"] == "gzip"
    assert om.text.rstrip().endswith("# EOF")  # httpx has decompressed it
    assert len(gzip.compress(om.content)) < len(om.content)


def test_registries_keep_apps_apart_and_one_registry_refuses_a_second_copy() -> None:
    a, b = fresh(), fresh()
    a(ThrottleEvent("admitted", "x", "normal"))
    assert value(parse(a.render()[0].decode()), "throttle_requests_total",
                 priority="normal", outcome="admitted") == 1  # fmt: skip
    assert value(parse(b.render()[0].decode()), "throttle_requests_total",
                 priority="normal", outcome="admitted") == 0  # fmt: skip
    shared = CollectorRegistry()
    ThrottleMetrics(registry=shared)
    with pytest.raises(ValueError, match="Duplicated"):
        ThrottleMetrics(registry=shared)
    ThrottleMetrics(registry=shared, namespace="other_app")  # a second app, its own names


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        fresh(namespace="bad-name")
    with pytest.raises(ValueError, match="top_tenants"):
        fresh(top_tenants=1000)
    with pytest.raises(ValueError, match="tenants"):
        fresh(tenants=[""])


def test_importing_throttle_mw_does_not_import_prometheus_client() -> None:
    code = "import sys, throttle_mw; assert 'prometheus_client' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# --- cardinality --------------------------------------------------------------------------------


def test_ten_thousand_tenant_ids_cannot_explode_the_series() -> None:
    metrics = fresh(tenants=["acme"], top_tenants=3)
    sent: Counter[str] = Counter()
    heavy = ["big1", "big2", "big3", "big4"]
    for i in range(10_000):
        for tenant in (f"flood-{i}", heavy[i % 4] if i % 5 else "acme"):
            metrics(ThrottleEvent("rejected", tenant, "normal", 0.0, 429, "tenant_over_share"))
            sent[tenant] += 1
    body = metrics.render()[0].decode()
    m = parse(body)
    tenants = label_values(m, "throttle_tenant_requests_total", "tenant")
    assert len(tenants) <= 1 + 3 + 1
    assert {"acme", OTHER} <= tenants
    assert len(tenants & set(heavy)) == 3
    assert not any(t.startswith("flood-") for t in tenants)
    assert total(m, "throttle_tenant_requests_total") == sum(sent.values()) == 20_000
    assert value(m, "throttle_tenant_requests_total", tenant="acme", outcome="rejected") == 2_000
    assert len(body) < 20_000  # the whole exposition stays small


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_busiest_tenants_change_at_each_window_and_old_series_go() -> None:
    clock = FakeClock()
    dropped: list[str] = []
    labels = TenantLabels(["fixed"], 2, 60.0, clock, dropped.append)

    def send(tenant: str, count: int) -> str:
        return [labels(tenant) for _ in range(count)][-1]

    assert send("fixed", 1) == "fixed"
    assert send("a", PROMOTE_AT - 1) == OTHER
    assert send("a", 1) == "a"
    assert send("b", 30) == "b"
    assert send("c", 40) == OTHER  # both slots are taken within the window
    clock.now += 61
    assert send("c", 1) == "c"  # the new window: c (40) displaced a (10)
    assert dropped == ["a"]
    assert labels.promoted.keys() == {"b", "c"}
    clock.now += 61
    send("c", 1)
    assert dropped == ["a", "b"]  # b was idle for a whole window
    assert labels("b") == OTHER


def test_a_dropped_tenant_s_series_disappears() -> None:
    clock = FakeClock()
    metrics = fresh(top_tenants=1, tenant_window_s=10, clock=clock)
    for _ in range(PROMOTE_AT + 5):
        metrics(ThrottleEvent("admitted", "a", "normal"))
    assert "a" in label_values(parse(metrics.render()[0].decode()),
                               "throttle_tenant_requests_total", "tenant")  # fmt: skip
    clock.now += 11
    for _ in range(2 * PROMOTE_AT):
        metrics(ThrottleEvent("admitted", "b", "normal"))
    clock.now += 11
    metrics(ThrottleEvent("admitted", "b", "normal"))
    tenants = label_values(parse(metrics.render()[0].decode()),
                           "throttle_tenant_requests_total", "tenant")  # fmt: skip
    assert tenants == {"b", OTHER}


# --- a slow Redis -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_frozen_redis_makes_the_gauges_older_never_the_scrape_slow(
    redis_server: RedisServer,
) -> None:
    # Redis's own timeout long (2 s): a scrape that waited for the snapshot would take that
    # long, so the bound below (1 s of slack over the 0.2 s wait, for a loaded machine) can
    # only hold by the metrics' own wait. (With the default 0.25 s the socket's timeout
    # ended such a scrape within the bound.)
    settings = Settings.from_env(
        {}, redis_url=redis_server.url, key_prefix="m", rate=5, burst=2, redis_timeout_s=2.0
    )
    backend = RedisBackend(settings)
    metrics = fresh(backend=backend, snapshot_timeout_s=0.2, snapshot_min_age_s=0)
    transport = httpx.ASGITransport(app=metrics.asgi_app())
    try:
        for i in range(4):
            await backend.acquire(BudgetRequest(f"r{i}", "acme"))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            m = parse((await http.get("/")).text)
            assert value(m, "throttle_queue_depth", priority="normal") == 2
            redis_server.freeze()
            try:
                slowest = 0.0
                deadline = time.monotonic() + 10.0  # (the error comes after 2 s)
                while value(m, "throttle_snapshot_errors_total") == 0:
                    assert time.monotonic() < deadline, "no snapshot error counted"
                    started = time.perf_counter()
                    response = await http.get("/")
                    slowest = max(slowest, time.perf_counter() - started)
                    assert response.status_code == 200
                    m = parse(response.text)
                    # The last good reading is still there, only older.
                    assert value(m, "throttle_queue_depth", priority="normal") == 2
                    await asyncio.sleep(0.05)
                assert slowest < 0.2 + 1.0
                assert value(m, "throttle_snapshot_age_seconds") > 0.2
            finally:
                redis_server.thaw()
    finally:
        await backend.stop()
