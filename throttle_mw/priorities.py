"""Priorities and the route tags that carry them.

A route's tag says how the throttle treats its requests: its priority, whether
it may be shed (or served degraded) under load, and how many budget units it
costs. Tags come from the `priority` decorator on endpoints or from the
`THROTTLE_ROUTE_PRIORITIES` variable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar, get_args

Priority = Literal["critical", "high", "normal", "low"]
Level = Literal["critical", "high", "normal", "low", "exempt"]

PRIORITIES: Final[tuple[Priority, ...]] = get_args(Priority)
LEVELS: Final[tuple[Level, ...]] = get_args(Level)
#: Lower rank is served first.
RANK: Final[dict[Priority, int]] = {p: i for i, p in enumerate(PRIORITIES)}

TAG_ATTRIBUTE: Final = "__throttle_tag__"

_F = TypeVar("_F", bound=Callable[..., object])


@dataclass(frozen=True, slots=True)
class RouteTag:
    """How the throttle treats one route's requests."""

    priority: Priority = "normal"
    exempt: bool = False
    #: Not queued under load: rejected at once, or admitted degraded if `degradable`.
    sheddable: bool = False
    #: Under load, admit with `degraded=True` instead of rejecting (implies sheddable).
    degradable: bool = False
    #: Budget units one request takes (tokens and concurrency slots).
    cost: int = 1

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(LEVELS)}, got {self.priority!r}")
        if self.cost < 1:
            raise ValueError(f"cost must be a whole number >= 1, got {self.cost!r}")


EXEMPT: Final = RouteTag(exempt=True)


def make_tag(
    level: str, *, sheddable: bool = False, degradable: bool = False, cost: int = 1
) -> RouteTag:
    """Build a tag from a level name, validating it."""
    if level not in LEVELS:
        raise ValueError(f"priority must be one of {', '.join(LEVELS)}, got {level!r}")
    if level == "exempt":
        return EXEMPT
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
    return RouteTag(
        priority=level,
        sheddable=sheddable or degradable,
        degradable=degradable,
        cost=cost,
    )


def priority(
    level: Level, *, sheddable: bool = False, degradable: bool = False, cost: int = 1
) -> Callable[[_F], _F]:
    """Tag a Starlette or FastAPI endpoint with its throttling priority.

    ``@priority("critical")`` puts a route ahead of others within its tenant's
    share; ``@priority("low", sheddable=True)`` rejects it at once with 503 while
    requests are waiting; ``degradable=True`` admits it with
    ``request.state.throttle.degraded`` set instead, so the endpoint can answer
    cheaply. ``@priority("exempt")`` bypasses the throttle. Works above or below
    the framework's route decorator, and on `HTTPEndpoint` classes and methods.
    """
    tag = make_tag(level, sheddable=sheddable, degradable=degradable, cost=cost)

    def decorate(endpoint: _F) -> _F:
        setattr(endpoint, TAG_ATTRIBUTE, tag)
        return endpoint

    return decorate


def tag_of(endpoint: object, method: str | None = None) -> RouteTag | None:
    """The tag set by `priority` on an endpoint (or its method handler), if any."""
    if method is not None:
        handler = getattr(endpoint, method.lower(), None)
        if handler is None and method == "HEAD":  # HTTPEndpoint answers HEAD with `get`
            handler = getattr(endpoint, "get", None)
        if handler is not None and isinstance(endpoint, type):
            found = getattr(handler, TAG_ATTRIBUTE, None)
            if isinstance(found, RouteTag):
                return found
    found = getattr(endpoint, TAG_ATTRIBUTE, None)
    return found if isinstance(found, RouteTag) else None
