"""What goes into the scheduler and what comes out of it.

The per-request types are NamedTuples: immutable, and several times cheaper to
build than frozen dataclasses, which matters on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

from ..priorities import Priority
from .constants import RESERVE_DIVISOR

if TYPE_CHECKING:
    from .limit import LimitState

#: The concurrency limit's value when it is learned (``THROTTLE_CONCURRENCY=auto``).
AUTO: Final = "auto"

#: Why a request was turned away. Fixed strings: they reach clients and logs.
Reason = Literal[
    "tenant_over_share",  # the tenant's wait exceeds its maximum: it is over its fair share
    "tenant_rate_cap",  # the tenant's own rate cap would hold it past its maximum wait
    "tenant_queue_full",  # the tenant already has its limit of waiting requests
    "overloaded",  # the app cannot serve this in time although the tenant is within its share
    "queue_full",  # the fleet-wide queue is full
    "shed",  # a sheddable route while requests are waiting
    "expired",  # waited its maximum without being admitted
    "shutting_down",  # the process is draining
    "unavailable",  # the shared budget is unreachable and the failure mode is `closed`
]

#: HTTP status per reason: 429 when the tenant is over its share or cap, 503 when the app sheds.
STATUS: Final[Mapping[Reason, int]] = MappingProxyType(
    {
        "tenant_over_share": 429,
        "tenant_rate_cap": 429,
        "tenant_queue_full": 429,
        "overloaded": 503,
        "queue_full": 503,
        "shed": 503,
        "expired": 503,
        "shutting_down": 503,
        "unavailable": 503,
    }
)


class Request(NamedTuple):
    """One request asking for budget."""

    id: str
    tenant: str
    priority: Priority = "normal"
    cost: int = 1
    sheddable: bool = False
    degradable: bool = False


#: What the scheduler keys a lease by: the request's id, or, on the in-memory
#: backend's fast path, a number unique within that backend (no id string is made
#: for a request admitted at once; numbers and id strings never compare equal).
LeaseKey = str | int

#: A `Request`'s fields as a plain tuple, in its order, with the lease key for its id:
#: what `Scheduler.admit_at_once` reads (a `Request` is one). The in-memory fast path
#: builds this and makes the `Request` only when the scheduler must decide in full.
RequestFields = tuple[LeaseKey, str, Priority, int, bool, bool]


class Admit(NamedTuple):
    """Go ahead. If `lease`, call ``release(id)`` exactly once when the response is done."""

    waited_s: float = 0.0
    degraded: bool = False
    lease: bool = False


class Enqueue(NamedTuple):
    """Queued. A `Granted` or `Evicted` event follows, or the caller cancels at `deadline`.

    `limited`: the concurrency limit was full for it when it queued (its in flight plus
    its cost above the limit), whatever else held it (rate tokens, its tenant's cap, the
    fair order): a learned limit's `Sample.waited`. False when the limit had room and it
    queued only for tokens, a cap or the requests ahead."""

    deadline: float
    estimated_wait_s: float
    limited: bool = False


class Reject(NamedTuple):
    """Turned away; `retry_after_s` is the honest expected wait before a retry can succeed."""

    reason: Reason
    retry_after_s: float

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    @property
    def retry_after_header(self) -> int:
        """Whole seconds, at least 1 (RFC 9110 delay-seconds)."""
        return max(1, min(86400, math.ceil(self.retry_after_s - 1e-9)))


Decision = Admit | Enqueue | Reject


class Granted(NamedTuple):
    """A queued request was admitted; it holds a lease if the budget has a concurrency limit."""

    id: str
    waited_s: float
    lease: bool


class Evicted(NamedTuple):
    """A queued request left the queue without being admitted."""

    id: str
    reject: Reject


Event = Granted | Evicted


class HeldLease(NamedTuple):
    """A process's last lease of rate tokens, as it tells ``lease_tokens`` at a renewal:
    the generation and expiry the grant named (`LeaseGrant`), the tokens the grant counted
    out (`size`: those it kept and those it took), and of them, the unspent ones it gives
    back now (`returned`) and the ones it keeps spending (`kept`)."""

    generation: int = 0
    until: float = 0.0
    size: int = 0
    returned: int = 0
    kept: int = 0


#: No lease held: a process's first lease.
NO_LEASE = HeldLease()


class LeaseCharge(NamedTuple):
    """What a process admitted from its leases for one tenant since its last renewal, told
    at the next (``lease_tokens``): the cost in all and the cost of the last admission
    (the virtual clock goes to that one's start tag, as `_take` one by one would move it).
    """

    tenant: str
    cost: int
    last: int


class LeaseGrant(NamedTuple):
    """``lease_tokens``'s answer: tokens taken out of the bucket, the kept tokens it still
    counts (0: the last lease had lapsed here, so they lapse in the process too), and the
    generation and expiry of the new lease (0: none, the process holds nothing)."""

    taken: int = 0
    kept: int = 0
    generation: int = 0
    until: float = 0.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The budget and the per-tenant limits: what the live-limits tool can change."""

    rate: float | None = None
    burst: float = 1.0
    concurrency: int | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    tenant_rate: float | None = None
    tenant_burst: float = 1.0
    #: `concurrency` is learned from the app's latency (``THROTTLE_CONCURRENCY=auto``):
    #: it is the limit in force now, and moves.
    learned: bool = False

    @property
    def reserve(self) -> float:
        """Tokens kept back for tenants under their share while others wait (half the burst)."""
        if self.burst < RESERVE_DIVISOR:
            return 0.0
        return float(math.floor(self.burst / RESERVE_DIVISOR))

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)


@dataclass(frozen=True, slots=True)
class Policy:
    """Queueing rules that do not change at run time."""

    max_wait_s: Mapping[Priority, float]
    queue_limit: int = 1000
    tenant_queue_limit: int = 100
    credit_s: float = 2.0
    tenant_idle_s: float = 60.0
    max_tenants: int = 10_000


@dataclass(frozen=True, slots=True)
class TenantSnapshot:
    tenant: str
    queued: int
    finish: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Budget in use and queue depths, for metrics and the live-limits tool."""

    tokens: float | None
    in_flight: int
    queued_by_priority: dict[str, int]
    tenants: int
    busiest: tuple[TenantSnapshot, ...]
    fair_rate: float
    #: Processes sharing the budget (1 for the in-memory backend).
    processes: int = 1
    #: The limits in force (live overrides included), when the backend knows them.
    limits: Limits | None = None
    #: A learned concurrency limit's state: its baseline latency and last step's reason.
    learned: LimitState | None = None
