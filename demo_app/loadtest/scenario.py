"""Scenario files: JSON in, a validated ``Scenario`` out, errors that name the field.

Built-in scenarios live in ``scenarios/`` beside this module (``seed``,
``flash_crowd``, ``many_tenants``); ``load`` also takes a path. The format::

    {
      "name": "seed",                    # required
      "description": "...",              # optional
      "duration_s": 60,                  # required, > 0
      "warmup_s": 10,                    # optional (0): excluded from rates
      "seed": 1,                         # optional (0): same seed, same plan
      "timeout_s": 30,                   # optional (30): per-request client timeout
      "params": {"survey": ["s1", "s2"]},    # optional: values for {survey}
      "routes": {                        # required: name -> route
        "submit": {
          "method": "POST",              # required
          "path": "/api/surveys/{survey}/responses",   # required
          "priority": "critical",        # required: a label for reports
          "json": {"respondent": "{tenant}-{n}"},      # optional: a JSON body
          "body": "raw text",            # optional, instead of "json"
          "headers": {"X-Demo": "1"}     # optional
        }
      },
      "tenants": [                       # required, not empty
        {
          "tenant": "C",                 # required
          "rate": 150,                   # required: requests per second
          "arrivals": "poisson",         # optional: "poisson" or "even"
          "mix": {"submit": 70, "dashboard": 20},      # required: route -> weight
          "phases": [{"from_s": 20, "to_s": 40, "rate": 1500}],  # optional
          "header": "X-Tenant-ID",       # optional
          "count": 50                    # optional: 50 tenants C-01..C-50
        }
      ]
    }

Placeholders ``{name}`` in a path or body take a random value from
``params[name]`` per request, or the built-ins ``{tenant}`` and ``{n}`` (the
tenant's request counter). Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

from demo_app.loadtest.plan import Phase, Route, Scenario, ScenarioError, TenantLoad

_T = TypeVar("_T")

_SCENARIO_KEYS = {"name", "description", "duration_s", "warmup_s", "seed", "timeout_s"}
_TOP_KEYS = _SCENARIO_KEYS | {"params", "routes", "tenants"}
_ROUTE_KEYS = {"method", "path", "priority", "json", "body", "headers"}
_TENANT_KEYS = {"tenant", "rate", "arrivals", "mix", "phases", "header", "count"}
_PHASE_KEYS = {"from_s", "to_s", "rate"}


def builtin_names() -> list[str]:
    """The names of the scenarios shipped in ``scenarios/``."""
    folder = resources.files("demo_app.loadtest") / "scenarios"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def load(name_or_path: str) -> Scenario:
    """A built-in scenario by name (``seed``), or a scenario file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError("", f"cannot read scenario file {path}: {exc.strerror}") from exc
        where = str(path)
    elif name_or_path in builtin_names():
        resource = resources.files("demo_app.loadtest") / "scenarios" / f"{name_or_path}.json"
        text, where = resource.read_text(encoding="utf-8"), name_or_path
    else:
        known = ", ".join(builtin_names())
        raise ScenarioError("", f"no scenario {name_or_path!r}: give a path or one of {known}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError("", f"{where}: not valid JSON: {exc}") from exc
    return parse(data)


def parse(data: object) -> Scenario:
    """A ``Scenario`` from decoded JSON (see the module docstring for the format)."""
    top = _object(data, "", _TOP_KEYS, required={"name", "duration_s", "routes", "tenants"})
    with _under("params"):
        params = _params(top.get("params", {}))
    routes_data = _object(top["routes"], "routes", None, required=set())
    with _under("routes"):
        if not routes_data:
            raise ScenarioError("", "must define at least one route")
        routes = {name: _route(name, spec) for name, spec in routes_data.items()}
    tenants_data = top["tenants"]
    if not isinstance(tenants_data, list) or not tenants_data:
        raise ScenarioError("tenants", "must be a non-empty list")
    tenants: list[TenantLoad] = []
    for i, spec in enumerate(tenants_data):
        with _under(f"tenants[{i}]"):
            tenants.extend(_tenants(spec, routes))
    kwargs = {key: top[key] for key in _SCENARIO_KEYS if key in top}
    for key in ("name", "description"):
        if key in kwargs:
            _expect(kwargs[key], str, key)
    for key in ("duration_s", "warmup_s", "timeout_s"):
        if key in kwargs:
            _expect_number(kwargs[key], key)
    if "seed" in kwargs:
        _expect(kwargs["seed"], int, "seed")
    kwargs.setdefault("seed", 0)
    return Scenario(tenants=tuple(tenants), params=params, **kwargs)


def with_overrides(
    scenario: Scenario,
    *,
    duration_s: float | None = None,
    warmup_s: float | None = None,
    seed: int | None = None,
    rate_scale: float = 1.0,
) -> Scenario:
    """The scenario with another duration, warm-up or seed, and every rate times ``rate_scale``."""
    if not rate_scale > 0:
        raise ScenarioError("rate_scale", "must be > 0")
    tenants = tuple(
        dataclasses.replace(
            load,
            rate=load.rate * rate_scale,
            phases=tuple(dataclasses.replace(p, rate=p.rate * rate_scale) for p in load.phases),
        )
        for load in scenario.tenants
    )
    return dataclasses.replace(
        scenario,
        tenants=tenants,
        duration_s=scenario.duration_s if duration_s is None else duration_s,
        warmup_s=scenario.warmup_s if warmup_s is None else warmup_s,
        seed=scenario.seed if seed is None else seed,
    )


@contextmanager
def _under(prefix: str) -> Iterator[None]:
    """Errors raised inside name their field under ``prefix``."""
    try:
        yield
    except ScenarioError as exc:
        raise exc.under(prefix) from None


def _object(
    value: object, where: str, allowed: set[str] | None, *, required: set[str]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(where, f"must be a JSON object, got {_kind(value)}")
    obj = cast(dict[str, Any], value)
    missing = sorted(required - obj.keys())
    if missing:
        raise ScenarioError(f"{where}.{missing[0]}" if where else missing[0], "is required")
    if allowed is not None:
        for key in obj:
            if key not in allowed:
                raise ScenarioError(
                    f"{where}.{key}" if where else key,
                    f"unknown field; expected one of {', '.join(sorted(allowed))}",
                )
    return obj


def _params(value: object) -> dict[str, tuple[str, ...]]:
    obj = _object(value, "", None, required=set())
    out: dict[str, tuple[str, ...]] = {}
    for name, values in obj.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ScenarioError(name, "must be a list of strings")
        out[name] = tuple(values)
    return out


def _route(name: str, value: object) -> Route:
    with _under(name):
        spec = _object(value, "", _ROUTE_KEYS, required={"method", "path", "priority"})
        for key in ("method", "path", "priority"):
            _expect(spec[key], str, key)
        if "json" in spec and "body" in spec:
            raise ScenarioError("body", "give either 'json' or 'body', not both")
        headers = _object(spec.get("headers", {}), "headers", None, required=set())
        for key, header_value in headers.items():
            _expect(header_value, str, f"headers.{key}")
        body: bytes | None = None
        if "json" in spec:
            body = json.dumps(spec["json"], separators=(",", ":")).encode()
            headers.setdefault("Content-Type", "application/json")
        elif "body" in spec:
            body = _expect(spec["body"], str, "body").encode()
        return Route(
            name=name,
            method=spec["method"].upper(),
            path=spec["path"],
            priority=spec["priority"],
            body=body,
            headers=tuple(headers.items()),
        )


def _tenants(value: object, routes: dict[str, Route]) -> list[TenantLoad]:
    spec = _object(value, "", _TENANT_KEYS, required={"tenant", "rate", "mix"})
    tenant = _expect(spec["tenant"], str, "tenant")
    rate = _expect_number(spec["rate"], "rate")
    mix_spec = _object(spec["mix"], "mix", None, required=set())
    mix: list[tuple[float, Route]] = []
    for route_name, weight in mix_spec.items():
        if route_name not in routes:
            known = ", ".join(sorted(routes))
            raise ScenarioError(f"mix.{route_name}", f"no such route; routes: {known}")
        mix.append((_expect_number(weight, f"mix.{route_name}"), routes[route_name]))
    phases_spec = spec.get("phases", [])
    if not isinstance(phases_spec, list):
        raise ScenarioError("phases", "must be a list")
    phases = []
    for j, phase in enumerate(phases_spec):
        with _under(f"phases[{j}]"):
            obj = _object(phase, "", _PHASE_KEYS, required=_PHASE_KEYS)
            numbers = {key: _expect_number(obj[key], key) for key in _PHASE_KEYS}
            phases.append(Phase(**numbers))
    count = _expect(spec.get("count", 1), int, "count")
    if not 1 <= count <= 10_000:
        raise ScenarioError("count", "must be between 1 and 10000")
    names = [tenant] if "count" not in spec else [f"{tenant}-{k:02d}" for k in range(1, count + 1)]
    options: dict[str, Any] = {}
    for key in ("arrivals", "header"):
        if key in spec:
            options[key] = _expect(spec[key], str, key)
    return [
        TenantLoad(tenant=name, rate=rate, mix=tuple(mix), phases=tuple(phases), **options)
        for name in names
    ]


def _expect(value: object, kind: type[_T], where: str) -> _T:
    if not isinstance(value, kind) or isinstance(value, bool):
        wanted = {str: "a string", int: "an integer"}.get(kind, kind.__name__)
        raise ScenarioError(where, f"must be {wanted}, got {_kind(value)}")
    return value


def _expect_number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(where, f"must be a number, got {_kind(value)}")
    return float(value)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else f"{value!r}"
    )
