"""Prometheus metrics: decision counters, wait times, the budget's live state, ``/metrics``.

Needs the ``metrics`` extra (``pip install 'throttle_mw[metrics]'``); importing
``throttle_mw`` alone never imports prometheus_client. One `ThrottleMetrics`
per app::

    metrics = ThrottleMetrics(tenants=["acme"], top_tenants=5)
    app.add_middleware(ThrottleMiddleware, observers=[metrics])
    app.routes.append(metrics.route())  # GET /metrics, exempt from throttling

Counters come from the middleware's events, so they count this process's
decisions (add them up across processes). Gauges come from the backend's
snapshot: with Redis they are the whole fleet's state, the same in every
process (take the max, not the sum). The snapshot is taken at scrape time,
at most once per `snapshot_min_age_s`, and a scrape waits for it at most
`snapshot_timeout_s`: a slow or dead Redis makes the gauges older
(``throttle_snapshot_age_seconds``), never the scrape slow or failed.

Several worker processes behind one port (``uvicorn --workers N``, gunicorn):
with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps every process's
counters and histogram in files there, and whichever worker answers a scrape
serves the sum over all of them. The gauges need no such files: the answering
worker reads them fresh from the budget, which with Redis is the fleet's one
state (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .asgi.middleware import ThrottleMiddleware
from .backends.base import Backend
from .observe import ThrottleEvent
from .priorities import PRIORITIES, priority

if TYPE_CHECKING:
    from .backends.redis.ratepool import RatePool
    from .backends.redis.slotpool import SlotPool
from .scheduler import Snapshot

__all__ = ["OTHER", "OUTCOMES", "WAIT_BUCKETS_S", "ThrottleMetrics"]

logger = logging.getLogger("throttle_mw.metrics")

#: The tenant label of every tenant without a series of its own.
OTHER: Final = "other"
#: How a request left the throttle; the words of `ThrottleDecision.outcome`, plus the
#: rejections and the clients that went away while queued.
OUTCOMES: Final = (
    "admitted",
    "degraded",
    "unthrottled",
    "would_queue",
    "rejected",
    "would_reject",
    "left",
)
#: Wait-time buckets: a millisecond (the fast path) up to the longest default maximum wait.
WAIT_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: A tenant is promoted to its own series after this many events in one window.
PROMOTE_AT: Final = 10
_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps metric values in ``PROMETHEUS_MULTIPROC_DIR`` files.

    It decides once, when first imported, from that variable: asking it (rather
    than the environment now) is what tells how the counters really behave.
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _outcome(event: ThrottleEvent) -> str:
    kind = event.kind
    if kind == "admitted" and event.unthrottled:
        return "would_queue" if event.dry_run else "unthrottled"
    if kind == "rejected" and event.dry_run:
        return "would_reject"
    return kind


class TenantLabels:
    """Which tenants get a series of their own: a fixed list, plus up to `top` heavy hitters.

    The others share the label `OTHER`, so a flood of tenant ids cannot grow the
    number of series. Heavy hitters are found with a Misra-Gries sketch of
    bounded size; each `window_s` the `top` tenants with the most events keep
    (or get) a label, and the ones that lose it are passed to `on_drop` so
    their series can go.
    """

    def __init__(
        self,
        fixed: Iterable[str],
        top: int,
        window_s: float,
        clock: Callable[[], float],
        on_drop: Callable[[str], None],
    ) -> None:
        self.fixed = frozenset(fixed)
        self.top = top
        self._window_s = window_s
        self._clock = clock
        self._on_drop = on_drop
        self._capacity = max(16, 4 * top)
        self.promoted: dict[str, int] = {}  # tenant -> its events this window
        self._sketch: dict[str, int] = {}
        self._rotate_at = clock() + window_s

    def __call__(self, tenant: str) -> str:
        if tenant in self.fixed:
            return tenant
        if not self.top:
            return OTHER
        if self._clock() >= self._rotate_at:
            self.rotate()
        count = self.promoted.get(tenant)
        if count is not None:
            self.promoted[tenant] = count + 1
            return tenant
        seen = self._count(tenant)
        if seen >= PROMOTE_AT and len(self.promoted) < self.top:
            del self._sketch[tenant]
            self.promoted[tenant] = seen
            return tenant
        return OTHER

    def _count(self, tenant: str) -> int:
        sketch = self._sketch
        if tenant in sketch:
            sketch[tenant] += 1
            return sketch[tenant]
        if len(sketch) < self._capacity:
            sketch[tenant] = 1
            return 1
        # Misra-Gries: a full sketch pays for a newcomer by taking one from everyone.
        for name in list(sketch):
            if sketch[name] <= 1:
                del sketch[name]
            else:
                sketch[name] -= 1
        return 0

    def rotate(self) -> None:
        """Start a new window: the `top` busiest of the last one keep or get a label."""
        self._rotate_at = self._clock() + self._window_s
        ranked = [(n, t) for t, n in self.promoted.items() if n > 0]
        ranked += [(n, t) for t, n in self._sketch.items() if n >= PROMOTE_AT]
        ranked.sort(reverse=True)
        keep = {t for _, t in ranked[: self.top]}
        for tenant in self.promoted.keys() - keep:
            self._on_drop(tenant)
        self.promoted = dict.fromkeys(keep, 0)
        self._sketch = {}


class _Taken(NamedTuple):
    snapshot: Snapshot
    at: float


class ThrottleMetrics:
    """Prometheus metrics for one throttled app; pass it in ``observers=[...]``.

    `registry`: where the metrics live (the global one by default; give each
    app or test its own `CollectorRegistry` to keep them apart). `backend`: the
    budget whose live state the gauges show; by default the `ThrottleMiddleware`
    of the app that serves the scrape is found and its backend used.
    `tenants` always get a series of their own, and so do the `top_tenants`
    busiest others; everyone else is counted under the tenant label ``other``.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry = REGISTRY,
        backend: Backend | None = None,
        namespace: str = "throttle",
        tenants: Iterable[str] = (),
        top_tenants: int = 0,
        tenant_window_s: float = 60.0,
        wait_buckets_s: Sequence[float] = WAIT_BUCKETS_S,
        snapshot_timeout_s: float = 0.25,
        snapshot_min_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        fixed = tuple(tenants)
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"namespace must be a Prometheus metric name prefix, got {namespace!r}"
            )
        if not all(isinstance(t, str) and t for t in fixed):
            raise ValueError(f"tenants must be non-empty strings, got {fixed!r}")
        if isinstance(top_tenants, bool) or not 0 <= top_tenants <= 100:
            raise ValueError(f"top_tenants must be a whole number in [0, 100], got {top_tenants!r}")
        multiprocess = multiprocess_mode()
        if multiprocess and top_tenants:
            # A series cannot be removed from the per-process files, so the busiest
            # tenants of every window would add series for good.
            raise ValueError(
                "top_tenants needs single-process metrics: with PROMETHEUS_MULTIPROC_DIR a "
                "dropped tenant's series cannot be removed, so they would grow without "
                "bound; list the tenants to count (tenants=[...]) instead"
            )
        if not tenant_window_s > 0 or not snapshot_timeout_s > 0 or snapshot_min_age_s < 0:
            raise ValueError(
                "tenant_window_s and snapshot_timeout_s must be > 0, snapshot_min_age_s >= 0"
            )
        self.registry = registry
        self.backend = backend
        self.namespace = namespace
        self._timeout_s = snapshot_timeout_s
        self._min_age_s = snapshot_min_age_s
        self._clock = clock
        self._taken: _Taken | None = None
        self._tried_at = -float("inf")
        self._pending: asyncio.Task[None] | None = None

        ns = namespace
        self._requests = Counter(
            "requests",
            "Requests by how they left the throttle (each request counts once).",
            ["priority", "outcome"],
            namespace=ns,
            registry=registry,
        )
        self._queued = Counter(
            "queued", "Requests that had to wait for the budget.", ["priority"], namespace=ns,
            registry=registry,
        )  # fmt: skip
        self._rejections = Counter(
            "rejections",
            "Rejections by reason and HTTP status (dry_run: decided but not enforced).",
            ["priority", "reason", "status", "dry_run"],
            namespace=ns,
            registry=registry,
        )
        self._cancelled = Counter(
            "cancelled",
            "Admitted requests whose app work was cancelled because the client left "
            "(THROTTLE_CANCEL_ON_DISCONNECT); each is also counted in requests as admitted.",
            ["priority"],
            namespace=ns,
            registry=registry,
        )
        self._wait = Histogram(
            "wait_seconds",
            "Time admitted requests spent in the throttle before going on to the app.",
            ["priority"],
            namespace=ns,
            registry=registry,
            buckets=tuple(wait_buckets_s),
        )
        # Label lookups cost more than the increment: do each once.
        self._by_outcome = {
            (p, o): self._requests.labels(p, o) for p in PRIORITIES for o in OUTCOMES
        }
        self._queued_by = {p: self._queued.labels(p) for p in PRIORITIES}
        self._cancelled_by = {p: self._cancelled.labels(p) for p in PRIORITIES}
        self._wait_by = {p: self._wait.labels(p) for p in PRIORITIES}
        self._tenant_requests: Counter | None = None
        self._labels: TenantLabels | None = None
        if fixed or top_tenants:
            self._tenant_requests = Counter(
                "tenant_requests",
                f"Requests per tenant and outcome; tenants without a series are {OTHER!r}.",
                ["tenant", "outcome"],
                namespace=ns,
                registry=registry,
            )
            self._labels = TenantLabels(
                fixed, top_tenants, tenant_window_s, clock, self._drop_tenant
            )
        # A real counter (not part of the snapshot): kept in the files in multiprocess mode.
        self._snapshot_errors = Counter(
            "snapshot_errors",
            "Budget snapshots that failed or timed out.",
            namespace=ns,
            registry=registry,
        )
        # A failing tenant_resolver (the request fell back to its client address): the
        # middleware calls `tenant_resolver_failed`. The types are the resolver's own
        # exception and return types, at most 32 and then "other".
        self._resolver_failures = Counter(
            "tenant_resolver_failures",
            "Requests whose tenant_resolver raised or returned an unusable type, by failure "
            "(raised, returned) and type name; they were throttled as their client address.",
            ["failure", "type"],
            namespace=ns,
            registry=registry,
        )
        #: What a scrape serves: the registry, or in multiprocess mode every process's
        #: files (all of the app's metrics) and this process's fresh reading of the gauges.
        self.exposed = registry
        if multiprocess:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)  # type: ignore[no-untyped-call]
        self.exposed.register(_SnapshotCollector(self))
        if not multiprocess:
            # This process's lease of rate tokens (THROTTLE_RATE_LEASE): its counters live
            # in the backend, read at collect time; with PROMETHEUS_MULTIPROC_DIR only the
            # answering worker's would show, so none do.
            self.exposed.register(_RateLeaseCollector(self))
            self.exposed.register(_KeptSlotsCollector(self))  # (THROTTLE_KEEP_SLOTS: as above)

    # --- the observer: cheap, synchronous, no I/O --------------------------------------

    def __call__(self, event: ThrottleEvent, /) -> None:
        if event.kind == "queued":
            self._queued_by[event.priority].inc()
            return
        if event.kind == "cancelled":  # after its admission, which counted the request
            self._cancelled_by[event.priority].inc()
            return
        outcome = _outcome(event)
        self._by_outcome[(event.priority, outcome)].inc()
        if event.kind == "rejected":
            self._rejections.labels(
                event.priority, event.reason or "", str(event.status), str(event.dry_run).lower()
            ).inc()
        elif event.kind != "left":
            self._wait_by[event.priority].observe(event.waited_s)
        if self._labels is not None and self._tenant_requests is not None:
            self._tenant_requests.labels(self._labels(event.tenant), outcome).inc()

    def tenant_resolver_failed(self, failure: str, type_name: str) -> None:
        """Count a request whose ``tenant_resolver`` failed (called by the middleware)."""
        self._resolver_failures.labels(failure, type_name).inc()

    def _drop_tenant(self, tenant: str) -> None:
        assert self._tenant_requests is not None
        for outcome in OUTCOMES:
            with contextlib.suppress(KeyError):
                self._tenant_requests.remove(tenant, outcome)

    # --- the snapshot ------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot the gauges show, if any."""
        return None if self._taken is None else self._taken.snapshot

    async def refresh(self) -> None:
        """Take a new snapshot unless the last try is recent; wait `snapshot_timeout_s` at most.

        A snapshot still running when the wait ends goes on in the background
        and serves the next scrape; a failed one only counts an error.
        """
        backend = self.backend
        if backend is None or self._clock() - self._tried_at < self._min_age_s:
            return
        task = self._pending
        if task is None or task.done():
            self._tried_at = self._clock()
            task = self._pending = asyncio.get_running_loop().create_task(self._take(backend))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self._timeout_s)

    async def _take(self, backend: Backend) -> None:
        try:
            # Bounded even if a backend's own timeouts are not.
            async with asyncio.timeout(max(10 * self._timeout_s, 2.0)):
                snapshot = await backend.snapshot()
        except Exception as exc:
            self._snapshot_errors.inc()
            logger.debug("throttle_mw metrics: snapshot failed (%s)", type(exc).__name__)
            return
        self._taken = _Taken(snapshot, self._clock())

    # --- serving /metrics --------------------------------------------------------------

    def asgi_app(self) -> ASGIApp:
        """The scrape endpoint as an ASGI app, tagged exempt from throttling.

        ``app.mount("/metrics", metrics.asgi_app())`` serves ``/metrics/``: a request
        for ``/metrics`` gets Starlette's slash redirect, which is throttled like any
        unmatched path. `route` serves ``/metrics`` itself.
        """
        return priority("exempt")(_MetricsApp(self))

    def route(self, path: str = "/metrics") -> Route:
        """A route serving the metrics at `path`: ``app.routes.append(metrics.route())``."""
        return Route(path, self.asgi_app(), methods=["GET"], name="metrics")

    def find_backend(self, app: object) -> Backend | None:
        """Use (and return) the backend of the `ThrottleMiddleware` in `app`'s middleware stack."""
        node = getattr(app, "middleware_stack", None) or app
        for _ in range(32):
            if isinstance(node, ThrottleMiddleware):
                self.backend = node.backend
                return self.backend
            node = getattr(node, "app", None)
            if node is None:
                break
        return None

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """What a scrape gets (`exposed`), in the format `accept` asks for: (body, content type)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.exposed), content_type


class _MetricsApp:
    """GET: refresh the snapshot (a bounded wait), then send the registry."""

    def __init__(self, metrics: ThrottleMetrics) -> None:
        self._metrics = metrics
        self._looked = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"the metrics endpoint serves HTTP only, not {scope['type']!r}")
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"", [(b"allow", b"GET, HEAD")])
            return
        metrics = self._metrics
        if metrics.backend is None and not self._looked:
            self._looked = True
            metrics.find_backend(scope.get("app"))
        await metrics.refresh()
        headers = dict(scope["headers"])
        body, content_type = metrics.render(headers.get(b"accept", b"").decode("latin-1"))
        extra = [(b"content-type", content_type.encode("latin-1"))]
        if b"gzip" in headers.get(b"accept-encoding", b""):
            body = gzip.compress(body)
            extra.append((b"content-encoding", b"gzip"))
        await _respond(send, 200, body, extra, head=method == "HEAD")


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], head: bool = False
) -> None:
    length = (b"content-length", str(len(body)).encode("ascii"))
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": b"" if head else body})


class _SnapshotCollector(Collector):
    """The gauges read from the latest snapshot: one consistent reading, no I/O at collect."""

    def __init__(self, metrics: ThrottleMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        return list(self._families(m._taken))

    def _families(self, taken: _Taken | None) -> Iterator[Metric]:
        m = self._metrics
        ns = m.namespace
        age = GaugeMetricFamily(
            f"{ns}_snapshot_age_seconds", "Age of the budget snapshot the gauges show."
        )
        tokens = GaugeMetricFamily(
            f"{ns}_tokens", "Tokens in the rate budget's bucket (absent without a rate budget)."
        )
        in_flight = GaugeMetricFamily(
            f"{ns}_in_flight", "Requests holding the budget's concurrency."
        )
        depth = GaugeMetricFamily(
            f"{ns}_queue_depth",
            "Requests waiting for the budget, by priority.",
            labels=["priority"],
        )
        tenants = GaugeMetricFamily(f"{ns}_tenants", "Tenants the budget keeps state for.")
        fair = GaugeMetricFamily(
            f"{ns}_fair_rate", "Measured admissions per second per unit of tenant weight."
        )
        limit = GaugeMetricFamily(
            f"{ns}_concurrency_limit",
            "The concurrency limit in force: set, or learned from latency (absent without one).",
        )
        baseline = GaugeMetricFamily(
            f"{ns}_concurrency_baseline_seconds",
            "A learned limit's no-load service time: what requests take when nothing waits.",
        )
        per_tenant = GaugeMetricFamily(
            f"{ns}_tenant_queue_depth",
            f"Waiting requests of the busiest tenants; the rest are {OTHER!r}.",
            labels=["tenant"],
        )
        if taken is not None:
            snap = taken.snapshot
            age.add_metric([], max(0.0, m._clock() - taken.at))
            if snap.tokens is not None:
                tokens.add_metric([], snap.tokens)
            in_flight.add_metric([], snap.in_flight)
            for p in PRIORITIES:
                depth.add_metric([p], snap.queued_by_priority.get(p, 0))
            tenants.add_metric([], snap.tenants)
            fair.add_metric([], snap.fair_rate)
            if snap.limits is not None and snap.limits.concurrency is not None:
                limit.add_metric([], snap.limits.concurrency)
            if snap.learned is not None and snap.learned.baseline_s > 0:
                baseline.add_metric([], snap.learned.baseline_s)
            if m._labels is not None:
                for tenant, queued in _tenant_depths(snap, m._labels).items():
                    per_tenant.add_metric([tenant], queued)
        yield from (age, tokens, in_flight, depth, tenants, fair, limit, baseline)
        if m._labels is not None:
            yield per_tenant


class _RateLeaseCollector(Collector):
    """This process's lease of rate tokens (``RedisBackend.rate_lease``), if it has one:
    admissions made from it (counted in ``requests`` as ``admitted`` too), lease calls,
    and tokens leased, given back and lapsed unspent."""

    def __init__(self, metrics: ThrottleMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(getattr(self._metrics.backend, "rate_lease", None)))

    def _families(self, pool: RatePool | None) -> Iterator[Metric]:
        ns = self._metrics.namespace
        local = CounterMetricFamily(
            f"{ns}_rate_lease_admissions",
            "Admissions made from this process's lease of rate tokens, without a Redis call.",
        )
        calls = CounterMetricFamily(
            f"{ns}_rate_lease_calls", "Lease calls (renewals and give-backs) to Redis."
        )
        tokens = CounterMetricFamily(
            f"{ns}_rate_lease_tokens",
            "Rate tokens leased, given back unspent, or lapsed unspent.",
            labels=["how"],
        )
        if pool is not None:
            local.add_metric([], pool.local_admissions)
            calls.add_metric([], pool.calls)
            tokens.add_metric(["leased"], pool.leased)
            tokens.add_metric(["returned"], pool.returned)
            tokens.add_metric(["lapsed"], pool.lapsed)
        yield from (local, calls, tokens)


class _KeptSlotsCollector(Collector):
    """This process's kept concurrency slots (``RedisBackend.kept_slots``), if it keeps
    any: admissions made on them, slots kept at a release, given back and forgotten."""

    def __init__(self, metrics: ThrottleMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(getattr(self._metrics.backend, "kept_slots", None)))

    def _families(self, pool: SlotPool | None) -> Iterator[Metric]:
        ns = self._metrics.namespace
        local = CounterMetricFamily(
            f"{ns}_kept_slot_admissions",
            "Admissions made on a slot this process kept, without a Redis call.",
        )
        slots = CounterMetricFamily(
            f"{ns}_kept_slots",
            "Concurrency slots kept at a release, given back to Redis later, or forgotten "
            "(a Redis fault or a new state: they lapse as leases do).",
            labels=["how"],
        )
        held = GaugeMetricFamily(f"{ns}_kept_slots_held", "Slots this process keeps now.")
        if pool is not None:
            local.add_metric([], pool.local_admissions)
            slots.add_metric(["kept"], pool.kept)
            slots.add_metric(["returned"], pool.returned)
            slots.add_metric(["forgotten"], pool.forgotten)
            held.add_metric([], len(pool))
        yield from (local, slots, held)


def _tenant_depths(snap: Snapshot, labels: TenantLabels) -> dict[str, int]:
    """Queue depth of the listed tenants and of the `top` busiest; the rest under `OTHER`."""
    out: dict[str, int] = {}
    ranked = 0
    for entry in snap.busiest:
        if entry.tenant in labels.fixed:
            out[entry.tenant] = entry.queued
        elif ranked < labels.top and entry.queued > 0:
            ranked += 1
            out[entry.tenant] = entry.queued
    out[OTHER] = max(0, sum(snap.queued_by_priority.values()) - sum(out.values()))
    return out
