"""The registry of benchmark variants: one name per way of serving the same app.

A variant says how to build the ASGI app (a builder the uvicorn subprocess
calls), the environment the server process is configured with (recorded in
the results, so a run says exactly what it measured), the services it needs
(started once per run by the runner, see `bench.services`) and the optional
modules it imports (so a missing peer library is reported before any server starts).

Builders register themselves with the `variant` decorator (see `bench.apps`);
this module imports nothing from the app side, so the runner can list and
check variants without building anything.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from starlette.types import ASGIApp

#: Builds the app from the server process' environment.
Builder = Callable[[Mapping[str, str]], ASGIApp]

#: The variable naming the variant in the server process.
VARIANT_ENV = "BENCH_VARIANT"


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    build: Builder = field(repr=False)
    #: Extra environment of the server process (e.g. ``THROTTLE_RATE``).
    env: Mapping[str, str] = field(default_factory=dict)
    #: Names in `bench.services.SERVICES`, started once per run.
    services: tuple[str, ...] = ()
    #: Importable modules the builder needs (peer libraries, redis).
    requires: tuple[str, ...] = ()
    #: The variant its ratios are also quoted against (same framework, nothing in
    #: front): ``bare`` for Starlette apps, ``bare-fastapi`` for FastAPI-only peers.
    baseline: str = "bare"

    def missing(self) -> list[str]:
        """Required modules that cannot be imported here."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


_REGISTRY: dict[str, Variant] = {}
VARIANTS: Mapping[str, Variant] = MappingProxyType(_REGISTRY)


def variant(
    name: str,
    summary: str,
    *,
    env: Mapping[str, str] | None = None,
    services: tuple[str, ...] = (),
    requires: tuple[str, ...] = (),
    baseline: str = "bare",
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as variant `name`."""

    def register(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"benchmark variant {name!r} is registered twice")
        _REGISTRY[name] = Variant(
            name, summary, build, dict(env or {}), services, requires, baseline
        )
        return build

    return register


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise KeyError(f"unknown benchmark variant {name!r}; known: {known}") from None
