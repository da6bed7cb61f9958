"""Live per-tenant throttle figures: an observer counting decisions in a sliding window.

The middleware calls the observer synchronously for every decision, so it
only counts: one dict update per event, no I/O. Counts sit in one-second
buckets; the window is the last `window_s` of them.

Cardinality is bounded, because tenant ids are client-chosen: each bucket
holds at most `bucket_keys` tenants plus the `top` busiest of the window so
far (they keep their own line even while a flood of distinct ids fills the
buckets); a tenant arriving in a full bucket is counted as `OTHER` for that
second. Memory is at most ``window_s * (bucket_keys + top)`` small entries
(about 2 MB with the defaults). Reports show the `top` busiest tenants and
fold the rest into `OTHER`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from throttle_mw import ThrottleEvent

#: Not a valid tenant id (those start with a letter or digit), so never a real tenant.
OTHER: Final = "(other)"
KINDS: Final = ("admitted", "degraded", "queued", "rejected", "left")
_WAIT = len(KINDS)  # index of the summed wait (seconds) of admitted requests


@dataclass(frozen=True, slots=True)
class TenantRates:
    """One tenant's decisions per second over the window, and its mean wait when admitted."""

    tenant: str
    admitted_per_s: float = 0.0
    degraded_per_s: float = 0.0
    queued_per_s: float = 0.0
    rejected_per_s: float = 0.0
    left_per_s: float = 0.0
    mean_wait_ms: float = 0.0

    @property
    def traffic_per_s(self) -> float:
        """Requests decided per second (queued ones are counted when they are decided)."""
        return self.admitted_per_s + self.degraded_per_s + self.rejected_per_s + self.left_per_s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TenantRates:
        return cls(
            tenant=str(data["tenant"]),
            **{name: float(data.get(name, 0.0)) for name in _RATE_FIELDS},
        )


_RATE_FIELDS: Final = (*(f"{kind}_per_s" for kind in KINDS), "mean_wait_ms")


class LiveCounters:
    """The observer: pass it in ``observers=[...]``; read it with `rates`."""

    def __init__(
        self,
        *,
        window_s: int = 10,
        top: int = 10,
        bucket_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._top = top
        self._bucket_keys = bucket_keys
        self._clock = clock
        self._started = clock()
        self._buckets: deque[tuple[int, dict[str, list[float]]]] = deque()
        self._known: frozenset[str] = frozenset()

    @property
    def window_s(self) -> int:
        return self._window_s

    @property
    def entries(self) -> int:
        """Tenant entries held over the whole window (what the cardinality bound limits)."""
        return sum(len(bucket) for _, bucket in self._buckets)

    def __call__(self, event: ThrottleEvent) -> None:
        if event.kind not in KINDS:
            return  # `cancelled`: a step after the request's decision, counted there
        bucket = self._bucket(self._clock())
        counts = bucket.get(event.tenant)
        if counts is None:
            tenant = event.tenant
            if len(bucket) >= self._bucket_keys and tenant not in self._known:
                tenant = OTHER
            counts = bucket.get(tenant)
            if counts is None:
                counts = bucket[tenant] = [0.0] * (len(KINDS) + 1)
        counts[KINDS.index(event.kind)] += 1
        if event.kind == "admitted":
            counts[_WAIT] += event.waited_s

    def rates(self, limit: int | None = None) -> list[TenantRates]:
        """The busiest tenants first (at most `limit`, default `top`), then `OTHER` if any."""
        now = self._clock()
        self._bucket(now)
        # The window: the full seconds before this one, and this one so far.
        covered = self._window_s - 1 + (now - int(now))
        span = max(1.0, min(covered, now - self._started))
        totals = self._totals()
        rates = [_rates(tenant, counts, span) for tenant, counts in totals.items()]
        return fold(rates, self._top if limit is None else limit)

    def _bucket(self, now: float) -> dict[str, list[float]]:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            return self._buckets[-1][1]
        while self._buckets and self._buckets[0][0] <= second - self._window_s:
            self._buckets.popleft()
        # Once a second: remember who is busy, so they keep their own line in a flood.
        busiest = sorted(self._totals().items(), key=lambda item: -sum(item[1][:_WAIT]))
        self._known = frozenset(t for t, _ in busiest[: self._top] if t != OTHER)
        bucket: dict[str, list[float]] = {}
        self._buckets.append((second, bucket))
        return bucket

    def _totals(self) -> dict[str, list[float]]:
        totals: dict[str, list[float]] = {}
        for _, bucket in self._buckets:
            for tenant, counts in bucket.items():
                total = totals.get(tenant)
                if total is None:
                    totals[tenant] = list(counts)
                else:
                    for i, value in enumerate(counts):
                        total[i] += value
        return totals


def _rates(tenant: str, counts: list[float], span: float) -> TenantRates:
    return _make(tenant, [value / span for value in counts[:_WAIT]], counts[_WAIT] * 1000.0 / span)


def _make(tenant: str, per_s: list[float], wait_total: float) -> TenantRates:
    """Rates from per-second values (in `KINDS` order); `wait_total`: wait in ms per second."""
    admitted, degraded, queued, rejected, left = per_s
    return TenantRates(
        tenant,
        admitted_per_s=admitted,
        degraded_per_s=degraded,
        queued_per_s=queued,
        rejected_per_s=rejected,
        left_per_s=left,
        mean_wait_ms=wait_total / admitted if admitted else 0.0,
    )


def merge(groups: Iterable[Iterable[TenantRates]]) -> list[TenantRates]:
    """Add up the rates that several processes report (wait means weighted by admissions)."""
    sums: dict[str, list[float]] = {}
    for group in groups:
        for item in group:
            acc = sums.setdefault(item.tenant, [0.0] * (len(KINDS) + 1))
            for i, kind in enumerate(KINDS):
                acc[i] += getattr(item, f"{kind}_per_s")
            acc[_WAIT] += item.mean_wait_ms * item.admitted_per_s
    return [_make(tenant, acc[:_WAIT], acc[_WAIT]) for tenant, acc in sums.items()]


def fold(rates: Iterable[TenantRates], top: int) -> list[TenantRates]:
    """The `top` busiest tenants, then everyone else added up as `OTHER`."""
    ranked = sorted(rates, key=lambda r: (r.tenant == OTHER, -r.traffic_per_s, r.tenant))
    named = [r for r in ranked if r.tenant != OTHER]
    rest = [r for r in ranked if r.tenant == OTHER] + named[top:]
    shown = named[:top]
    if rest:
        shown.extend(merge([[replace(r, tenant=OTHER) for r in rest]]))
    return shown
