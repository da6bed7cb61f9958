"""The SurveyTool story as settings, and its claims checked against a run's records.

`python -m demo_app` (see `demo_app.newcomer`) runs the ``seed`` scenario twice,
with the throttle off and on, and this module says whether the story came
out: one `Verdict` per claim, with the figures behind it.

Why these settings (``demo_app/README.md`` says the same at more length):

- The store has 12 connection slots of 100 ms (+-20%): 120 responses/s of true
  capacity. The budget is the story's "about 80/s", two thirds of that. At
  100% utilisation a backend's own queue random-walks and grows for everyone
  whatever the throttle does (measured: a rate of 80/s in front of the default
  8 x 100 ms store built a queue of 100-240 requests inside the store, and A
  and B waited seconds there); the headroom keeps the store out of that regime
  even when a busy machine stretches its work times.
- The concurrency budget equals the slots, so the throttle never admits more
  than the store can hold at once: nothing ever waits inside the store, where
  waiting is first come first served. It waits in the throttle, where A and B
  go first. With 8 of 12 slots busy on average the budget rarely binds; with
  10 slots (8 of 10 busy) A and B waited for a slot 35-150 ms at p99.
- The rate budget keeps half its burst (``THROTTLE_BURST`` 16, a fifth of a
  second of the rate) in reserve for tenants under their fair share, so A's and
  B's requests are admitted at once under C's flood; the concurrency budget
  alone could not (a slot kept free is capacity lost).
- Maximum waits of 5 s for submissions and 2 s for dashboards: a queued
  submission is worth serving within 5 s (someone is still looking at the
  page), well inside the clients' 10 s timeout, and a run drains within 5 s
  of the load stopping. (C's queue is also bounded by the default per-tenant
  queue limit, a tenth of ``THROTTLE_QUEUE_LIMIT``: 100 requests, about 2.5 s
  of its 42/s.)
- Priorities come from the routes' tags in `demo_app.app` (submissions
  critical, dashboards low, live stats degradable), not from settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from demo_app.loadtest import scenario as scenarios
from demo_app.loadtest.engine import Record, Scenario
from demo_app.loadtest.report import Report, Stats, percentile

#: The store: connection slots, mean work time per request and its spread.
STORE_SLOTS: Final = 12
STORE_WORK_MS: Final = 100.0
STORE_JITTER: Final = 0.2
#: The story's budget: "about 80 responses per second".
BUDGET_RATE: Final = 80.0
#: A fifth of a second of the budget; half of it is the reserve for tenants under their
#: share. Not scaled down with the story: a Poisson tenant's bursts shrink more slowly
#: than its rate (their spread goes with the square root of it), so a reserve scaled
#: down with the rate would make B wait for tokens more often in a scaled-down story.
BURST: Final = 16.0
MAX_WAIT: Final = "critical=5,high=4,normal=3,low=2"
#: Clients give up after this long (the throttle's longest wait is 5 s).
CLIENT_TIMEOUT_S: Final = 10.0

#: "No noticeable added wait" for A and B, and "every request served".
WAIT_LIMIT_MS: Final = 50.0
SERVED_MIN: Final = 0.99
#: What "held to what is left" tolerates (C's admissions against the budget left).
LEFT_TOLERANCE: Final = 0.15
#: Above this send lag (p99) the client could not keep up with the plan.
LAG_LIMIT_MS: Final = 50.0

ROUTE_NAMES: Final = {"submit": "survey submissions", "dashboard": "dashboards"}
LIVE: Final = "live_stats"


@dataclass(frozen=True)
class Story:
    """The story's settings at `rate_scale` (1: the story's own rates).

    Scaling keeps the shape: the tenants' rates, the rate budget and the
    store's capacity (through its work time) all scale together; slots and
    the concurrency budget stay as they are.
    """

    rate_scale: float = 1.0

    @property
    def rate(self) -> float:
        return BUDGET_RATE * self.rate_scale

    @property
    def work_ms(self) -> float:
        return STORE_WORK_MS / self.rate_scale

    @property
    def capacity_per_s(self) -> float:
        return STORE_SLOTS * 1000.0 / self.work_ms

    def env(self) -> dict[str, str]:
        """The ``THROTTLE_*`` and ``SURVEYTOOL_*`` settings of the throttled app."""
        return {
            "THROTTLE_RATE": f"{self.rate:g}",
            "THROTTLE_BURST": f"{max(BURST, self.rate / 5):g}",
            "THROTTLE_CONCURRENCY": str(STORE_SLOTS),
            "THROTTLE_MAX_WAIT": MAX_WAIT,
            "SURVEYTOOL_SLOTS": str(STORE_SLOTS),
            "SURVEYTOOL_WORK_MS": f"{self.work_ms:g}",
            "SURVEYTOOL_JITTER": f"{STORE_JITTER:g}",
        }

    def scenario(self, duration_s: float, warmup_s: float) -> Scenario:
        """The ``seed`` scenario at this scale, with the clients' timeout."""
        seed = scenarios.with_overrides(
            scenarios.load("seed"),
            duration_s=duration_s,
            warmup_s=warmup_s,
            rate_scale=self.rate_scale,
        )
        return dataclasses.replace(seed, timeout_s=CLIENT_TIMEOUT_S)


@dataclass(frozen=True)
class Verdict:
    """One claim of the story, whether the run bears it out, and the figures."""

    claim: str
    passed: bool
    figures: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.claim}: {self.figures}"


@dataclass(frozen=True)
class Phase:
    """One run: its records, its report and the largest queue seen inside the store."""

    records: Sequence[Record]
    report: Report
    scenario: Scenario
    #: Most requests seen waiting for a store slot (sampled), None if never sampled.
    store_queue_max: int | None = None


def verdicts(off: Phase, on: Phase, story: Story) -> list[Verdict]:
    """The story's claims, in the order docs/design.md tells them."""
    return [
        *(unaffected(on, tenant) for tenant in ("A", "B")),
        held_to_the_rest(on, story.rate),
        submissions_first(on),
        live_stats_degraded(on),
        off_hurts(off.report, on.report),
    ]


def checks(off: Phase, on: Phase) -> list[Verdict]:
    """Whether the measurement itself can be trusted (the client kept up, the store
    had no queue of its own with the throttle on)."""
    out = [
        Verdict(
            f"the client kept up ({phase.report.label})",
            (phase.report.lag_p99_ms or 0.0) <= LAG_LIMIT_MS,
            f"send lag p99 {_ms(phase.report.lag_p99_ms)} ms, max {_ms(phase.report.lag_max_ms)}"
            f" ms (limit {LAG_LIMIT_MS:g} ms)",
        )
        for phase in (off, on)
    ]
    if on.store_queue_max is not None:
        out.append(
            Verdict(
                "nothing waited inside the store with the throttle on",
                on.store_queue_max == 0,
                f"at most {on.store_queue_max} waiting for a slot (throttle off: "
                f"{off.store_queue_max if off.store_queue_max is not None else '?'})",
            )
        )
    return out


def unaffected(phase: Phase, tenant: str) -> Verdict:
    """A tenant under its share is served in full with no noticeable added wait.

    Added wait is latency (from the due time) minus the app's own time; the
    throttle's part of it (``Server-Timing: throttle``) is shown beside it, so
    a wait the throttle did not cause (a busy machine, the client) shows as such.
    """
    stats = phase.report.tenants.get(tenant)
    claim = f"{tenant} goes on as if nothing happened"
    if stats is None or stats.sent == 0:
        return Verdict(claim, False, "no requests")
    served = stats.served / stats.sent
    wait = stats.wait_p99_ms
    ok = served >= SERVED_MIN and wait is not None and wait <= WAIT_LIMIT_MS
    start, end = phase.scenario.warmup_s, phase.scenario.duration_s
    throttle = sorted(
        r.throttle_ms or 0.0
        for r in phase.records
        if r.tenant == tenant and 200 <= r.status < 300 and start <= r.due_s < end
    )
    return Verdict(
        claim,
        ok,
        f"{_pct(served)} of {stats.sent} served (>= {_pct(SERVED_MIN)}), added wait p99 "
        f"{_ms(wait)} ms (<= {WAIT_LIMIT_MS:g}; in the throttle: p99 "
        f"{_ms(percentile(throttle, 99))} ms), latency p99 {_ms(stats.latency_p99_ms)} ms",
    )


def held_to_the_rest(phase: Phase, rate: float) -> Verdict:
    """C gets what A and B leave of the budget; its excess is refused at once, honestly.

    Rates count full answers (2xx, not degraded: degraded ones take no budget)
    by completion time in the steady window.
    """
    fresh = full_rates(phase.records, phase.scenario)
    left = rate - fresh.get("A", 0.0) - fresh.get("B", 0.0)
    got = fresh.get("C", 0.0)
    c = [r for r in phase.records if r.tenant == "C"]
    refused = [r for r in c if r.status in (429, 503)]
    honest = sum(r.retry_after is not None for r in refused)
    failed = sum(not (200 <= r.status < 300 or r.status in (429, 503)) for r in c)
    stats = phase.report.tenants.get("C")
    quick = stats.rejected_p50_ms if stats is not None else None
    ok = (
        left > 0
        and abs(got - left) <= LEFT_TOLERANCE * left
        and honest == len(refused)
        and failed == 0
    )
    return Verdict(
        "C is held to what is left",
        ok,
        f"{got:.1f}/s served in full, what A and B left of {rate:g}/s: {left:.1f}/s; "
        f"{len(refused)} refused ({honest} with Retry-After, p50 {_ms(quick)} ms after due), "
        f"{failed} failed",
    )


def submissions_first(phase: Phase) -> Verdict:
    """Survey submissions succeed more often than dashboards and full live stats."""
    rates = success_rates(phase.records)
    submit = rates.get("submit", 0.0)
    others = {name: value for name, value in rates.items() if name != "submit"}
    ok = bool(others) and all(submit > value for value in others.values())
    shown = ", ".join(f"{_label(name)} {_pct(value)}" for name, value in rates.items())
    return Verdict(
        "survey submissions go ahead", ok, f"answered in full: {shown} (all tenants, whole run)"
    )


def live_stats_degraded(phase: Phase) -> Verdict:
    """Under load, live stats are answered from the cache rather than refused or queued."""
    live = [r for r in phase.records if r.route == LIVE]
    degraded = sum(r.degraded for r in live if 200 <= r.status < 300)
    full = sum(not r.degraded for r in live if 200 <= r.status < 300)
    refused = len(live) - degraded - full
    ok = bool(live) and degraded >= len(live) / 2 and refused == 0
    return Verdict(
        "live stats are scaled back",
        ok,
        f"{degraded} of {len(live)} served degraded (cached), {full} in full, {refused} not served",
    )


def off_hurts(off: Report, on: Report) -> Verdict:
    """Without the throttle, A and B visibly suffer: far slower, or not served."""
    parts, ok = [], True
    for tenant in ("A", "B"):
        was, now = off.tenants.get(tenant), on.tenants.get(tenant)
        if was is None or now is None or was.sent == 0:
            return Verdict("without the throttle A and B suffer", False, "no requests")
        slow = _slower(was, now)
        served = was.served / was.sent
        ok = ok and (slow or served < 0.95)
        parts.append(
            f"{tenant} p99 {_s(was.latency_p99_ms)} (on: {_s(now.latency_p99_ms)}), "
            f"{_pct(served)} served"
        )
    return Verdict("without the throttle A and B suffer", ok, "; ".join(parts))


def _slower(off: Stats, on: Stats) -> bool:
    """p99 latency at least 1 s and 5 times what it is with the throttle on."""
    if off.latency_p99_ms is None:
        return True  # nothing answered in the window at all
    return off.latency_p99_ms >= max(1000.0, 5 * (on.latency_p99_ms or 0.0))


def full_rates(records: Sequence[Record], scenario: Scenario) -> dict[str, float]:
    """Full answers (2xx, not degraded) per second per tenant, by completion time in the
    steady window: the budget each tenant used."""
    start, end = scenario.warmup_s, scenario.duration_s
    counts: dict[str, int] = {}
    for r in records:
        if 200 <= r.status < 300 and not r.degraded and start <= r.done_s <= end:
            counts[r.tenant] = counts.get(r.tenant, 0) + 1
    return {tenant: n / (end - start) for tenant, n in counts.items()}


def success_rates(records: Sequence[Record]) -> dict[str, float]:
    """Per route, the share of requests answered in full (a degraded answer is not)."""
    sent: dict[str, int] = {}
    full: dict[str, int] = {}
    for r in records:
        sent[r.route] = sent.get(r.route, 0) + 1
        if 200 <= r.status < 300 and not r.degraded:
            full[r.route] = full.get(r.route, 0) + 1
    return {route: full.get(route, 0) / n for route, n in sent.items()}


def to_json(items: Sequence[Verdict]) -> list[Mapping[str, object]]:
    return [{"claim": v.claim, "passed": v.passed, "figures": v.figures} for v in items]


def _label(route: str) -> str:
    return ROUTE_NAMES.get(route, route.replace("_", " "))


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%" if value < 0.999 or value == 1 else f"{value * 100:.2f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def _s(value_ms: float | None) -> str:
    if value_ms is None:
        return "-"
    return f"{value_ms:.0f} ms" if value_ms < 1000 else f"{value_ms / 1000:.1f} s"
