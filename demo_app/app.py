"""SurveyTool's HTTP API and live page, throttled by throttle_mw.

``uvicorn demo_app.app:app`` serves it. The throttle is configured only by
the ``THROTTLE_*`` variables, as a user would configure it; the app by
``SURVEYTOOL_*`` (see `demo_app.config`). Routes carry their priority tags:
submissions are critical, dashboards low, live stats sheddable with a degraded
answer, and the health check, the page and its JSON are exempt. ``/metrics``
serves the throttle's Prometheus metrics (exempt too); with several workers,
set ``PROMETHEUS_MULTIPROC_DIR`` (see docs/operations.md). With
``SURVEYTOOL_ADMIN=true``, ``POST /api/admin/store?slots=N`` changes the store's
slots live (a database that slows down), exempt too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry

from throttle_mw import ConfigError, Settings, ThrottleMiddleware, priority
from throttle_mw.backends import Backend, make_backend
from throttle_mw.metrics import ThrottleMetrics

from .config import AppConfig
from .history import LimitHistory
from .page import page as page_html
from .payloads import read_submission
from .publish import FleetStats
from .stats import LiveCounters, TenantRates, fold, merge
from .store import StoreBusy, SurveyStore
from .tenants import ApiKeys, tenant_of
from .timing import ServerTiming


async def request_tenant(request: Request) -> str:
    """Dependency: the caller's tenant (see `demo_app.tenants`); async, so FastAPI does not
    hand it to a worker thread."""
    return tenant_of(request, request.app.state.api_keys, request.app.state.tenant_header)


Tenant = Annotated[str, Depends(request_tenant)]
SurveyId = Annotated[str, Query(min_length=1, max_length=64)]
logger = logging.getLogger("demo_app")

#: How long the page waits for the budget's state (a Redis round trip) before going without.
SNAPSHOT_TIMEOUT_S: Final = 1.0
#: Tenants shown on the live page (the rest are added up as "(other)").
TOP_TENANTS: Final = 10
#: Live-stats snapshots kept for degraded answers, per (tenant, survey).
CACHE_SIZE: Final = 1024
#: The story's tenants: each gets series of its own in the metrics, the rest are "other".
STORY_TENANTS: Final = ("A", "B", "C")


class LiveCache:
    """The latest computed live stats per key: what a degraded request gets instead."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], tuple[float, dict[str, Any]]] = OrderedDict()

    def put(self, key: tuple[str, str], value: dict[str, Any]) -> None:
        self._items[key] = (time.monotonic(), value)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def get(self, key: tuple[str, str]) -> tuple[float, dict[str, Any]] | None:
        """(age in seconds, value), or None."""
        found = self._items.get(key)
        return None if found is None else (time.monotonic() - found[0], found[1])


def create_app(config: AppConfig | None = None) -> FastAPI:
    """Build the app from the environment (`config` overrides ``SURVEYTOOL_*``)."""
    config = config or AppConfig.from_env()
    keys = ApiKeys(config.api_keys) if config.api_keys else None
    try:
        settings: Settings | None = Settings.from_env()
    except ConfigError:
        settings = None  # the middleware reports it and fails the start-up
    backend: Backend | None = None
    if settings is not None and settings.enabled:
        backend = make_backend(settings)
    header = settings.tenant_header if settings is not None else "x-tenant-id"
    store = SurveyStore(config)
    counters = LiveCounters()
    fleet: FleetStats | None = None
    if settings is not None and settings.redis_url:
        fleet = FleetStats(
            counters,
            settings.redis_url,
            namespace=f"surveytool:{settings.key_prefix}:live",
            replica=config.replica,
        )
    cache = LiveCache()

    def limit_now() -> tuple[int | None, int, int]:
        limit = backend.limits.concurrency if backend is not None else None
        return limit, store.slots, store.busy

    history = LimitHistory(limit_now)
    # A registry per app (tests build several); with PROMETHEUS_MULTIPROC_DIR the values
    # live in that folder's files and every worker's are served.
    metrics = ThrottleMetrics(registry=CollectorRegistry(), backend=backend, tenants=STORY_TENANTS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await store.start()
        if fleet is not None:
            await fleet.start()
        # Move the ~65,000 start-up objects (FastAPI, pydantic, uvicorn, the throttle)
        # out of the collector's reach: otherwise each full collection under load stops
        # the process for 40-75 ms of CPU on a small machine, which alone sets every
        # tenant's p99. They are never garbage, so nothing leaks.
        gc.collect()
        gc.freeze()
        sampling = asyncio.create_task(history.run())
        try:
            yield
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
            if fleet is not None:
                await fleet.stop()
            await store.stop()

    app = FastAPI(title="SurveyTool", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(ServerTiming)
    extra: dict[str, Any] = {"tenant_resolver": keys} if keys is not None else {}
    app.add_middleware(
        ThrottleMiddleware,
        backend=backend,
        observers=[counters, metrics],
        **extra,
    )
    app.routes.append(metrics.route())  # GET /metrics, exempt from throttling

    app.state.api_keys = keys
    app.state.tenant_header = header

    def survey(survey_id: str) -> str:
        if survey_id not in store.surveys:
            raise HTTPException(404, "No such survey.")
        return survey_id

    @app.exception_handler(StoreBusy)
    async def store_busy(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "The store is busy; try again."}, 503, headers={"Retry-After": "1"}
        )

    @app.post("/api/surveys/{survey_id}/responses", status_code=201)
    @priority("critical")
    async def submit(survey_id: str, request: Request, who: Tenant) -> dict[str, int]:
        """Store one survey response."""
        survey(survey_id)
        payload = await read_submission(request, config.max_body_bytes)
        response_id = await store.add_response(who, survey_id, payload.respondent, payload.answers)
        return {"id": response_id}

    @app.get("/api/dashboard")
    @priority("low")
    async def dashboard(survey_id: SurveyId, who: Tenant) -> dict[str, Any]:
        """A survey's results for the caller's tenant."""
        return await store.dashboard(who, survey(survey_id))

    @app.get("/api/stats/live")
    @priority("low", degradable=True)
    async def live_stats(survey_id: SurveyId, request: Request, who: Tenant) -> dict[str, Any]:
        """Real-time figures; under load, the last computed ones, marked stale."""
        key = (who, survey(survey_id))
        decision = getattr(request.state, "throttle", None)
        if decision is not None and decision.degraded:
            cached = cache.get(key)
            return {
                "degraded": True,
                "stale": True,
                "age_s": round(cached[0], 3) if cached else None,
                "stats": cached[1] if cached else None,
            }
        stats = await store.live_stats(*key)
        cache.put(key, stats)
        return {"degraded": False, "stale": False, "age_s": 0.0, "stats": stats}

    @app.get("/healthz")
    @priority("exempt")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    @priority("exempt")
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-store"})

    @app.post("/api/admin/store")
    @priority("exempt")
    async def admin_store(slots: Annotated[int, Query(ge=1, le=1024)]) -> dict[str, int]:
        """Change the store's slots live (``SURVEYTOOL_ADMIN=true`` only): the demo's
        database slowing down midway, to show the learned limit following."""
        if not config.admin:
            raise HTTPException(404, "Not Found")
        try:
            store.resize(slots)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"slots": store.slots}

    @app.get("/api/throttle/stats")
    @priority("exempt")
    async def throttle_stats() -> JSONResponse:
        """What the live page draws: per-tenant rates, queue depths, budget in use."""
        groups = await fleet.collect() if fleet is not None else None
        if groups:
            rates, replicas, source = fold(merge(groups), TOP_TENANTS), len(groups), "redis"
        else:
            rates, replicas, source = counters.rates(TOP_TENANTS), 1, "this process"
            if fleet is not None:
                source += " (redis unreachable)" if groups is None else " (none published yet)"
        budget, depths = await _budget(settings, backend)
        body = {
            "at": time.time(),
            "window_s": counters.window_s,
            "source": source,
            "replicas": replicas,
            "throttle": budget,
            "store": {
                "slots": store.slots,
                "busy": store.busy,
                "waiting": store.waiting,
                "capacity_per_s": round(store.capacity_per_s, 1),
            },
            "tenants": _tenant_rows(rates, depths),
            "history": history.to_json(),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return app


async def _budget(
    settings: Settings | None, backend: Backend | None
) -> tuple[dict[str, Any], dict[str, int]]:
    """The budget and how much of it is in use (fleet-wide with the Redis backend),
    and the queue depth of the tenants with the longest queues."""
    budget: dict[str, Any] = {
        "enabled": backend is not None,
        #: False when the budget's state could not be read (in-use figures are then unknown).
        "available": True,
        "rate": settings.rate if settings else None,
        "burst": settings.burst if settings else None,
        #: The concurrency limit in force (learned or set); `learned` says how it was learned.
        "concurrency": _set_concurrency(settings),
        "learned": None,
        "tokens": None,
        "in_flight": 0,
        "queued": {},
        "queued_total": 0,
        "tenants": 0,
    }
    if backend is None:
        return budget, {}
    try:
        snap = await asyncio.wait_for(backend.snapshot(), SNAPSHOT_TIMEOUT_S)
    except Exception:  # e.g. Redis down: the page still shows the rates, never a 500
        logger.debug("budget snapshot failed", exc_info=True)
        budget["available"] = False
        return budget, {}
    budget.update(
        tokens=round(snap.tokens, 2) if snap.tokens is not None else None,
        in_flight=snap.in_flight,
        queued=dict(snap.queued_by_priority),
        queued_total=sum(snap.queued_by_priority.values()),
        tenants=snap.tenants,
    )
    if snap.limits is not None:
        budget["concurrency"] = snap.limits.concurrency
    if snap.learned is not None:
        budget["learned"] = {
            "limit": round(snap.learned.limit, 2),
            "baseline_ms": round(snap.learned.baseline_s * 1000.0, 1),
            "reason": snap.learned.reason,
        }
    return budget, {t.tenant: t.queued for t in snap.busiest}


def _set_concurrency(settings: Settings | None) -> int | None:
    """The configured concurrency limit; None when unset or learned (the snapshot says)."""
    if settings is None or not isinstance(settings.concurrency, int):
        return None
    return settings.concurrency


def _tenant_rows(rates: list[TenantRates], depths: dict[str, int]) -> list[dict[str, Any]]:
    """Rates with each tenant's queue depth; queued tenants with no rate yet get a row too."""
    rows = [{**r.to_json(), "queue_depth": depths.pop(r.tenant, 0)} for r in rates]
    rows += [
        {**TenantRates(tenant).to_json(), "queue_depth": depth}
        for tenant, depth in depths.items()
        if depth > 0
    ]
    for row in rows:
        for name, value in row.items():
            if isinstance(value, float):
                row[name] = round(value, 2)
    return rows


app = create_app()
