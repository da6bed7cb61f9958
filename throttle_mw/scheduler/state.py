"""The scheduler's per-tenant and per-waiter state.

Plain mutable records (``__slots__``) that only `throttle_mw.scheduler.core`
changes. The Lua twin keeps the same fields in Redis hashes (see the key layout
in ``throttle_mw/backends/redis/scripts/store.lua``).

A tenant moves between three states; the rules in ``core.py`` make every move:

==========  ===============================================  ==========
from        on                                               to
==========  ===============================================  ==========
idle        a request of it queues (``_push``)               active
active      its turn, but its rate cap is empty (``_dispatch``)  capped
capped      its cap has refilled (``_release_capped``)       active
active      its head request is admitted (``_dispatch``)     idle; active
                                                             again if more wait
active,     its last waiting request leaves (cancel,         idle
capped      eviction, expiry: ``_remove``)
==========  ===============================================  ==========

Only active tenants are in line for the budget, and only their weights count
in the fair rate. Heap entries of the active and capped lines carry the
tenant's `version` when pushed; a state change bumps it, so stale entries are
skipped when they reach the top instead of being searched for and removed.
"""

from __future__ import annotations

from collections import OrderedDict

from ..priorities import PRIORITIES, RANK
from .constants import IDLE
from .types import Request

# Shared by tenants that never waited; never mutated, since only a tenant with a
# waiter (which gets its own list in `Tenant.open_queues`) has its queued cost changed.
_NO_COST: list[int] = [0] * len(PRIORITIES)


class Waiter:
    """A request waiting in its tenant's queue."""

    __slots__ = ("cost", "deadline", "enqueued_at", "id", "rank", "tenant")

    def __init__(
        self, req: Request, tenant: Tenant, cost: int, now: float, deadline: float
    ) -> None:
        self.id = req.id
        self.tenant = tenant
        #: Index of its priority in PRIORITIES: lower goes first.
        self.rank = RANK[req.priority]
        #: Budget units, already clamped to what the budget can ever admit.
        self.cost = cost
        self.enqueued_at = now
        self.deadline = deadline


class Tenant:
    """One tenant's fairness tag, rate-cap bucket and queue (one FIFO per priority)."""

    __slots__ = (
        "cap_at",
        "cap_tokens",
        "cost_by_rank",
        "finish",
        "name",
        "pushed",
        "queues",
        "seen_at",
        "state",
        "version",
    )

    def __init__(self, name: str, now: float, cap_tokens: float, finish: float) -> None:
        self.name = name
        #: Virtual finish tag of its last admission. A new tenant joins as if it had
        #: just been served once at the virtual clock: credit is earned by using less
        #: than the fair share while others use more, never granted to a new id, and
        #: a stream of new ids moves the clock instead of freezing it.
        self.finish = finish
        #: One FIFO per priority rank (request id -> waiter), made on the first wait:
        #: most tenants never wait.
        self.queues: tuple[OrderedDict[str, Waiter], ...] = ()
        #: Cost waiting per priority rank.
        self.cost_by_rank = _NO_COST
        #: Its rate cap's token bucket, refilled up to `cap_at`.
        self.cap_tokens = cap_tokens
        self.cap_at = now
        #: Last use: its last arrival, or its last waiter leaving (`Scheduler._unlink`);
        #: idle tenants are forgotten in this order.
        self.seen_at = now
        #: IDLE, ACTIVE or CAPPED (see the module docstring).
        self.state = IDLE
        #: Bumped on every state change: heap entries with an older version are stale.
        self.version = 0
        #: Sequence number of its latest queued request (tie-break for longest queue).
        self.pushed = 0

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues)

    def open_queues(self) -> None:
        """Give the tenant its own queues on its first wait."""
        if not self.queues:
            self.queues = tuple(OrderedDict() for _ in PRIORITIES)
            self.cost_by_rank = [0] * len(PRIORITIES)

    def head(self) -> Waiter:
        """The waiter to admit next: most urgent, oldest."""
        for queue in self.queues:
            if queue:
                return next(iter(queue.values()))
        raise LookupError("empty tenant queue")

    def last(self) -> Waiter | None:
        """The waiter to drop first: lowest priority, newest."""
        for queue in reversed(self.queues):
            if queue:
                return next(reversed(queue.values()))
        return None
