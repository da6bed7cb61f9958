"""Decision events, for metrics, logs and live dashboards.

The middleware calls its observers synchronously on the event loop for every
throttled request, so an observer must be cheap and must not block: count,
don't do I/O.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

from .priorities import Priority

EventKind = Literal["admitted", "degraded", "queued", "rejected", "left"]


class ThrottleEvent(NamedTuple):
    """One step of one request through the throttle.

    `queued` when it starts waiting; then exactly one of `admitted` (with the
    time it waited), `degraded`, `rejected` (with `status` and `reason`) or `left`
    (the client went away while it waited).
    """

    kind: EventKind
    tenant: str
    priority: Priority
    waited_s: float = 0.0
    status: int = 200
    reason: str | None = None
    #: Dry run: the decision was logged and counted but not enforced.
    dry_run: bool = False
    #: Admitted without the shared budget (failure mode `open`).
    unthrottled: bool = False


class Observer(Protocol):
    def __call__(self, event: ThrottleEvent, /) -> None: ...
