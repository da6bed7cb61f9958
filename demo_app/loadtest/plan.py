"""The plan of a load test: the scenario model and its seeded arrival schedule.

Pure and deterministic: no I/O and no clock, so the same scenario and seed
always give the same list of ``Planned`` requests, and tests check arrival
counts and spacing exactly and fast. ``engine`` sends the plan.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

#: Placeholders every route may use besides the scenario's params: the tenant,
#: and a per-tenant request counter (so ``"respondent": "{tenant}-{n}"`` is unique).
BUILTIN_PLACEHOLDERS: Final = ("tenant", "n")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_BYTES = re.compile(rb"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_METHOD = re.compile(r"[A-Z]+")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ScenarioError(ValueError):
    """A scenario is invalid; ``field`` names where (``tenants[2].rate``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def under(self, prefix: str) -> ScenarioError:
        """The same error, with ``field`` placed under ``prefix``."""
        if not self.field:
            return ScenarioError(prefix, self.message)
        joiner = "" if self.field.startswith("[") else "."
        return ScenarioError(f"{prefix}{joiner}{self.field}", self.message)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ScenarioError(field, message)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True)
class Route:
    """One kind of request. ``priority`` is a label for reports: the server decides.

    ``path`` and ``body`` may hold ``{name}`` placeholders, filled per request
    from the scenario's ``params`` (a seeded random choice) or the built-ins
    ``{tenant}`` and ``{n}``.
    """

    name: str
    method: str
    path: str
    priority: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty")
        _check(bool(_METHOD.fullmatch(self.method)), "method", "must be upper case, e.g. GET")
        _check(self.path.startswith("/"), "path", f"must start with '/', got {self.path!r}")
        _check(bool(self.priority), "priority", "must not be empty")

    def placeholders(self) -> tuple[str, ...]:
        """The placeholder names used in path and body, sorted."""
        names = set(_PLACEHOLDER.findall(self.path))
        if self.body:
            names.update(n.decode("ascii") for n in _PLACEHOLDER_BYTES.findall(self.body))
        return tuple(sorted(names))


@dataclass(frozen=True)
class Phase:
    """From ``from_s`` to ``to_s`` (seconds since start) the tenant sends ``rate`` req/s."""

    from_s: float
    to_s: float
    rate: float

    def __post_init__(self) -> None:
        _check(_finite(self.from_s) and self.from_s >= 0, "from_s", "must be >= 0")
        _check(_finite(self.to_s) and self.to_s > self.from_s, "to_s", "must be > from_s")
        _check(_finite(self.rate) and self.rate >= 0, "rate", "must be >= 0")


@dataclass(frozen=True)
class TenantLoad:
    """One tenant's traffic: a rate, an arrival process and a weighted route mix.

    ``"poisson"`` arrivals have exponential gaps (real users acting
    independently); ``"even"`` ones are exactly ``1/rate`` apart, starting at a
    seeded random phase. ``phases`` override the rate in their time ranges.
    """

    tenant: str
    rate: float
    mix: tuple[tuple[float, Route], ...]
    arrivals: Literal["poisson", "even"] = "poisson"
    phases: tuple[Phase, ...] = ()
    header: str = "X-Tenant-ID"

    def __post_init__(self) -> None:
        _check(
            bool(self.tenant) and self.tenant.isprintable(),
            "tenant",
            "must be printable text (it is sent as a header value)",
        )
        _check(_finite(self.rate) and self.rate >= 0, "rate", "must be a number >= 0")
        _check(self.arrivals in ("poisson", "even"), "arrivals", "must be 'poisson' or 'even'")
        _check(bool(self.mix), "mix", "must name at least one route")
        for i, (weight, _) in enumerate(self.mix):
            _check(_finite(weight) and weight > 0, f"mix[{i}].weight", "must be > 0")
        _check(bool(_TOKEN.fullmatch(self.header)), "header", "must be an HTTP header name")
        ordered = sorted(self.phases, key=lambda p: p.from_s)
        for before, after in itertools.pairwise(ordered):
            _check(after.from_s >= before.to_s, "phases", "must not overlap")

    def segments(self, duration_s: float) -> list[tuple[float, float, float]]:
        """``(start_s, end_s, rate)`` covering ``[0, duration_s)``, phases applied."""
        out: list[tuple[float, float, float]] = []
        at = 0.0
        for phase in sorted(self.phases, key=lambda p: p.from_s):
            start, end = min(phase.from_s, duration_s), min(phase.to_s, duration_s)
            if start > at:
                out.append((at, start, self.rate))
            if end > start:
                out.append((start, end, phase.rate))
            at = max(at, end)
        if at < duration_s:
            out.append((at, duration_s, self.rate))
        return out


@dataclass(frozen=True)
class Scenario:
    """A whole load test. Rates are measured over ``[warmup_s, duration_s]``."""

    name: str
    duration_s: float
    seed: int
    tenants: tuple[TenantLoad, ...]
    warmup_s: float = 0.0
    #: Per-request client timeout, from when the request is sent.
    timeout_s: float = 30.0
    #: Values for route placeholders: ``{"survey": ("s1", "s2")}``.
    params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty")
        _check(_finite(self.duration_s) and self.duration_s > 0, "duration_s", "must be > 0")
        _check(isinstance(self.seed, int), "seed", "must be an integer")
        _check(
            _finite(self.warmup_s) and 0 <= self.warmup_s < self.duration_s,
            "warmup_s",
            f"must be >= 0 and less than duration_s ({self.duration_s:g})",
        )
        _check(_finite(self.timeout_s) and self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(bool(self.tenants), "tenants", "must not be empty")
        for name, values in self.params.items():
            _check(bool(values), f"params.{name}", "must list at least one value")
        known = set(self.params) | set(BUILTIN_PLACEHOLDERS)
        seen: set[str] = set()
        for i, load in enumerate(self.tenants):
            _check(load.tenant not in seen, f"tenants[{i}].tenant", f"{load.tenant!r} repeats")
            seen.add(load.tenant)
            for j, (_, route) in enumerate(load.mix):
                unknown = [n for n in route.placeholders() if n not in known]
                _check(
                    not unknown,
                    f"tenants[{i}].mix[{j}].route",
                    f"{route.name!r} uses unknown placeholder(s) {unknown}; known: {sorted(known)}",
                )


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the plan: due ``due_s`` after the start; placeholders filled."""

    due_s: float
    tenant: str
    route: Route


def schedule(scenario: Scenario) -> list[Planned]:
    """The whole arrival plan, sorted by due time. Same scenario and seed, same plan.

    Each tenant draws from random streams of its own (seeded by the scenario
    seed and the tenant's name), so adding a tenant leaves the others' plans
    unchanged.
    """
    plan: list[Planned] = []
    for load in scenario.tenants:
        plan.extend(_plan_tenant(scenario, load))
    plan.sort(key=lambda p: p.due_s)  # stable: ties keep tenant order
    return plan


def _plan_tenant(scenario: Scenario, load: TenantLoad) -> list[Planned]:
    times = _arrivals(load, scenario.duration_s, random.Random(f"{scenario.seed}/{load.tenant}"))
    pick = random.Random(f"{scenario.seed}/{load.tenant}/mix")
    cumulative = list(itertools.accumulate(float(w) for w, _ in load.mix))
    templates = [_Template(route) for _, route in load.mix]
    out = []
    for n, due_s in enumerate(times):
        template = templates[bisect.bisect_right(cumulative, pick.random() * cumulative[-1])]
        out.append(Planned(due_s, load.tenant, template.fill(load.tenant, n, scenario, pick)))
    return out


def _arrivals(load: TenantLoad, duration_s: float, rng: random.Random) -> list[float]:
    phase = rng.random()  # drawn first and always, so "even" and "poisson" stay aligned
    times: list[float] = []
    for start, end, rate in load.segments(duration_s):
        if rate <= 0:
            continue
        if load.arrivals == "even":
            count = max(0, math.ceil((end - start) * rate - phase))
            times.extend(start + (phase + k) / rate for k in range(count))
            continue
        # Poisson: memoryless, so restarting the clock at a segment start is exact.
        at = start + rng.expovariate(rate)
        while at < end:
            times.append(at)
            at += rng.expovariate(rate)
    return times


class _Template:
    """A route split once at its placeholders, so filling one is a join, not a regex."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.names = route.placeholders()
        # split() alternates literal text and placeholder names: [lit, name, lit, ...].
        self.path = _PLACEHOLDER.split(route.path)
        self.body = _PLACEHOLDER_BYTES.split(route.body) if route.body else None

    def fill(self, tenant: str, n: int, scenario: Scenario, rng: random.Random) -> Route:
        if not self.names:
            return self.route
        values = {"tenant": tenant, "n": str(n)}
        for name in self.names:  # sorted: the same draws in the same order every time
            if name in scenario.params:
                values[name] = rng.choice(scenario.params[name])
        path = "".join(
            part if i % 2 == 0 else values.get(part, f"{{{part}}}")
            for i, part in enumerate(self.path)
        )
        body = self.route.body
        if self.body is not None:
            body = b"".join(
                part if i % 2 == 0 else values.get(part.decode(), f"{{{part.decode()}}}").encode()
                for i, part in enumerate(self.body)
            )
        route = self.route
        return Route(route.name, route.method, path, route.priority, body, route.headers)
