"""Decision events, for metrics, logs and live dashboards.

The middleware calls its observers synchronously on the event loop for every
throttled request, so an observer must be cheap and must not block: count,
don't do I/O.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

from .priorities import Priority

EventKind = Literal["admitted", "degraded", "queued", "rejected", "left", "cancelled"]


class ThrottleEvent(NamedTuple):
    """One step of one request through the throttle.

    `queued` when it starts waiting; then exactly one of `admitted` (with the
    time it waited), `degraded`, `rejected` (with `status` and `reason`) or `left`
    (the client went away while it waited). With ``THROTTLE_CANCEL_ON_DISCONNECT``
    an admitted or degraded request may later also get `cancelled` (its client went
    away while the app ran, and the app's work was cancelled; `waited_s` is then how
    long the app had run).
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
    """Called with every `ThrottleEvent`.

    An observer may also have a method ``tenant_resolver_failed(failure, type_name)``:
    the middleware then calls it for every request whose ``tenant_resolver`` failed
    (``"raised"`` and the exception's type name, or ``"returned"`` and the returned
    value's; ``"other"`` beyond 32 kinds), before the request falls back to its
    client address. `throttle_mw.metrics.ThrottleMetrics` counts them.
    """

    def __call__(self, event: ThrottleEvent, /) -> None: ...
