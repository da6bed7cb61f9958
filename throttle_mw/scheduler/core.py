"""The scheduling rules, as a pure state machine: no I/O, no clock of its own.

Every method takes ``now`` (seconds on any monotonic clock; the caller's) and
returns decisions and events; nothing happens between calls. The in-memory
backend drives it directly and the Redis scripts mirror it step by step, so
this module is the reference semantics of throttle_mw. ``README.md`` next to
this file derives the fairness rules (start-time fair queuing with banked
credit) in prose.

Contract for callers:

- ``acquire`` returns `Admit`, `Enqueue` or `Reject` for the new request, plus
  events for *other* requests (grants, evictions) the call caused.
- After `Admit(lease=True)` or `Granted(lease=True)`, call ``release(id)``
  exactly once when the response is done (extra calls are ignored).
- After `Enqueue`, exactly one of these ends the wait: a `Granted` or `Evicted`
  event for that id from any later call, or the caller's own ``cancel(id)``
  (returns False if the request had already been granted, in which case it
  holds a lease to release).
- Call ``tick(now)`` at ``next_due()``: that is when the next token is due, a
  capped tenant becomes eligible or a deadline passes.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass

from ..priorities import PRIORITIES, RANK
from .types import (
    Admit,
    Decision,
    Enqueue,
    Event,
    Evicted,
    Granted,
    Limits,
    Policy,
    Reason,
    Reject,
    Request,
)

#: Measuring window of the virtual clock's speed (the fair rate per unit weight).
WINDOW_S = 1.0
_EPS = 1e-6
_IDLE, _ACTIVE, _CAPPED = 0, 1, 2
_PUSH_SPAN = 2**32  # the Lua twin packs (queued, pushed) into one sorted-set score
_ADMIT = Admit()
_ADMIT_LEASE = Admit(lease=True)
_NO_EVENTS: list[Event] = []  # shared and never mutated: callers only iterate events
# Shared by tenants that never waited; never mutated, since only a tenant with a
# waiter (which gets its own list in _push) has its queued cost changed.
_NO_COST: list[int] = [0] * len(PRIORITIES)


class _Waiter:
    __slots__ = ("cost", "deadline", "enqueued_at", "id", "rank", "tenant")

    def __init__(self, req: Request, tenant: _Tenant, now: float, deadline: float) -> None:
        self.id = req.id
        self.tenant = tenant
        self.rank = RANK[req.priority]
        self.cost = req.cost
        self.enqueued_at = now
        self.deadline = deadline


class _Tenant:
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

    def __init__(self, name: str, now: float, cap_tokens: float, vtime: float) -> None:
        self.name = name
        #: Virtual finish tag of its last admission. A new tenant joins as if it had
        #: just been served once at the virtual clock: credit is earned by using less
        #: than the fair share while others use more, never granted to a new id, and
        #: a stream of new ids moves the clock instead of freezing it.
        self.finish = vtime
        #: One FIFO per priority, made on the first wait (most tenants never wait).
        self.queues: tuple[OrderedDict[str, _Waiter], ...] = ()
        self.cost_by_rank = _NO_COST
        self.cap_tokens = cap_tokens
        self.cap_at = now
        self.seen_at = now
        self.state = _IDLE
        self.version = 0
        #: Sequence number of its latest queued request (tie-break for longest queue).
        self.pushed = 0

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues)

    def head(self) -> _Waiter:
        for queue in self.queues:
            if queue:
                return next(iter(queue.values()))
        raise LookupError("empty tenant queue")

    def last(self) -> _Waiter | None:
        """The waiter to drop first: lowest priority, newest."""
        for queue in reversed(self.queues):
            if queue:
                return next(reversed(queue.values()))
        return None


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


class Scheduler:
    """Budget, fair queues and priorities of one app; see the module docstring."""

    def __init__(self, limits: Limits, policy: Policy, now: float) -> None:
        self._limits = limits
        self._reserve = limits.reserve
        self._policy = policy
        self._tokens = limits.burst
        self._refilled_at = now
        self._in_flight = 0
        self._leases: dict[str, int] = {}
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._waiting: dict[str, _Waiter] = {}
        self._queued_by_rank = [0] * len(PRIORITIES)
        self._active: list[tuple[float, int, int, _Tenant]] = []
        self._capped: list[tuple[float, int, int, _Tenant]] = []
        self._deadlines: list[tuple[float, int, str]] = []
        self._active_weight = 0.0
        self._seq = itertools.count()
        # The virtual clock: the start tag of the latest admission (never decreases).
        self._vtime = 0.0
        self._window_at = now
        self._window_v0 = 0.0
        self._window_cost = 0
        self._v_rate = 0.0
        self._throughput = 0.0
        self._measured_at = -math.inf

    # --- public API -------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    def set_limits(self, limits: Limits, now: float) -> list[Event]:
        """Apply new limits (live change); takes effect for every later decision."""
        self._refill(now)
        self._limits = limits
        self._reserve = limits.reserve
        self._tokens = min(self._tokens, limits.burst)
        # Weights may have changed: recount the weight of the tenants in line.
        self._active_weight = sum(
            limits.weight(t.name) for t in self._tenants.values() if t.state == _ACTIVE
        )
        events: list[Event] = []
        self._dispatch(now, events)
        return events

    def admit_at_once(self, now: float, req: Request) -> bool:
        """The fast path alone: admit `req` if nothing waits and the budget has room.

        Returns False, having changed nothing, when `acquire` must decide instead.
        Takes a lease when the budget has a concurrency limit, as `acquire` does.
        """
        if self._waiting or req.sheddable:
            return False
        self._refill(now)
        return self._admit_if_room(now, req)

    def _admit_if_room(self, now: float, req: Request) -> bool:
        """Admit `req` if the budget (and its tenant's cap) has room for it now."""
        tenant = self._tenants.get(req.tenant)
        if tenant is None:
            tenant = self._tenant(req.tenant, now)
        else:
            self._tenants.move_to_end(req.tenant)
            tenant.seen_at = now
        cost = req.cost if req.cost == 1 else self._clamp(req.cost)
        limits = self._limits
        if (
            (limits.rate is None or self._tokens + _EPS >= cost)
            and (limits.concurrency is None or self._in_flight + cost <= limits.concurrency)
            and (limits.tenant_rate is None or self._cap_ok(tenant, cost, now))
        ):
            self._take(tenant, req.id, cost, now)
            return True
        return False

    def acquire(self, now: float, req: Request) -> tuple[Decision, list[Event]]:
        """Decide on a new request: admit it, queue it or reject it."""
        self._refill(now)
        # Fast path: nothing waits anywhere, so nothing can go before this request.
        if not self._waiting and self._admit_if_room(now, req):
            return (_ADMIT if self._limits.concurrency is None else _ADMIT_LEASE), _NO_EVENTS
        events: list[Event] = []
        self._dispatch(now, events)
        tenant = self._tenant(req.tenant, now)
        cost = self._clamp(req.cost)
        budget_waiting = bool(self._active)

        if req.sheddable:
            return self._shed_or_admit(now, req, tenant, cost, budget_waiting), events

        if (
            not budget_waiting
            and tenant.state == _IDLE
            and self._cap_ok(tenant, cost, now)
            and self._fits(cost, reserve=False)
        ):
            return self._admit_now(now, req.id, tenant, cost), events

        max_wait = self._policy.max_wait_s[req.priority]
        rejected = self._make_room(now, tenant, RANK[req.priority], events)
        if rejected is not None:
            return rejected, events
        deadline = now + max_wait
        waiter = _Waiter(req, tenant, now, deadline)
        waiter.cost = cost
        self._push(waiter, now)
        granted = self._dispatch(now, events, watch=waiter)
        if granted:
            return Admit(lease=self._limits.concurrency is not None), events

        estimate, reason = self._estimate(tenant, waiter.rank, now, waiter=waiter)
        if estimate > max_wait + _EPS or max_wait <= 0:
            self._remove(waiter)
            self._dispatch(now, events)
            return Reject(reason, estimate - max_wait), events
        heapq.heappush(self._deadlines, (deadline, next(self._seq), req.id))
        return Enqueue(deadline=deadline, estimated_wait_s=estimate), events

    def cancel(self, now: float, request_id: str) -> tuple[Reject | None, list[Event]]:
        """Take a waiting request out of the queue (its deadline passed, or it went away).

        Returns the rejection to send if it was still waiting, or None if it was
        not: it was granted before the cancel (the caller then holds a lease to
        release), evicted, or never queued.
        """
        self._refill(now)
        waiter = self._waiting.get(request_id)
        events: list[Event] = []
        if waiter is None:
            return None, events
        reject = self._expiry(waiter, now)
        self._remove(waiter)
        self._dispatch(now, events)
        return reject, events

    def release(self, now: float, request_id: str) -> list[Event]:
        """Give back a lease's concurrency; idempotent."""
        cost = self._leases.pop(request_id, None)
        if cost is not None:
            self._in_flight -= cost
        if not self._waiting:
            return _NO_EVENTS  # nobody to hand it to
        self._refill(now)
        if cost is None:
            return []
        events: list[Event] = []
        self._dispatch(now, events)
        return events

    def tick(self, now: float) -> list[Event]:
        """Advance time: refill, expire overdue waiters, dispatch, forget idle tenants."""
        self._refill(now)
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now + _EPS:
            _, _, request_id = heapq.heappop(self._deadlines)
            waiter = self._waiting.get(request_id)
            if waiter is not None:
                reject = self._expiry(waiter, now)
                self._remove(waiter)
                events.append(Evicted(request_id, reject))
        self._dispatch(now, events)
        self._forget_idle(now)
        return events

    def next_due(self, now: float) -> float | None:
        """When ``tick`` can next change something; None: only a release or arrival can."""
        due: list[float] = []
        head = self._top_active()
        if head is not None and self._limits.rate is not None:
            tenant, waiter = head
            need = self._need(waiter.cost, reserve=tenant.finish >= self._vtime)
            concurrency = self._limits.concurrency
            if self._tokens + _EPS < need and (
                concurrency is None or self._in_flight + waiter.cost <= concurrency
            ):
                due.append(now + (need - self._tokens) / self._limits.rate)
        if self._capped:
            due.append(self._capped[0][0])
        if self._deadlines:
            due.append(self._deadlines[0][0])
        return min(due) if due else None

    def snapshot(self, top: int = 10) -> Snapshot:
        busiest = heapq.nlargest(
            top,
            (t for t in self._tenants.values() if t.state != _IDLE),
            key=lambda t: t.queued,
        )
        return Snapshot(
            tokens=self._tokens if self._limits.rate is not None else None,
            in_flight=self._in_flight,
            queued_by_priority=dict(zip(PRIORITIES, self._queued_by_rank, strict=True)),
            tenants=len(self._tenants),
            busiest=tuple(TenantSnapshot(t.name, t.queued, t.finish) for t in busiest),
            fair_rate=self._v_rate,
            limits=self._limits,
        )

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing waits and no deadline is pending: no tick can change anything."""
        return not self._waiting and not self._deadlines and not self._capped

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # --- budget ------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        elapsed = now - self._refilled_at
        if elapsed > 0:
            rate = self._limits.rate
            if rate is not None:
                tokens = self._tokens + elapsed * rate
                burst = self._limits.burst
                self._tokens = tokens if tokens < burst else burst
            self._refilled_at = now
        window = now - self._window_at
        if window >= WINDOW_S:
            if window <= 3 * WINDOW_S:
                self._v_rate = (self._vtime - self._window_v0) / window
                self._throughput = self._window_cost / window
                self._measured_at = now
            self._window_at, self._window_v0, self._window_cost = now, self._vtime, 0

    def _clamp(self, cost: int) -> int:
        """A cost above the burst or the concurrency could never be admitted."""
        limit = cost
        if self._limits.rate is not None:
            limit = min(limit, math.floor(self._limits.burst))
        if self._limits.concurrency is not None:
            limit = min(limit, self._limits.concurrency)
        return max(1, limit)

    def _need(self, cost: int, *, reserve: bool) -> float:
        if not reserve:
            return float(cost)
        return min(cost + self._reserve, self._limits.burst)

    def _fits(self, cost: int, *, reserve: bool) -> bool:
        if self._limits.rate is not None and self._tokens + _EPS < self._need(
            cost, reserve=reserve
        ):
            return False
        concurrency = self._limits.concurrency
        return concurrency is None or self._in_flight + cost <= concurrency

    def _cap_ok(self, tenant: _Tenant, cost: int, now: float) -> bool:
        rate = self._limits.tenant_rate
        if rate is None:
            return True
        self._refill_cap(tenant, now)
        return tenant.cap_tokens + _EPS >= cost

    def _refill_cap(self, tenant: _Tenant, now: float) -> None:
        rate = self._limits.tenant_rate
        if rate is not None and now > tenant.cap_at:
            tenant.cap_tokens = min(
                self._limits.tenant_burst, tenant.cap_tokens + (now - tenant.cap_at) * rate
            )
        tenant.cap_at = max(tenant.cap_at, now)

    # --- fairness -------------------------------------------------------------------------

    def _fair_rate(self, now: float, extra_weight: float = 0.0) -> float:
        """Virtual-clock speed: the fair admission rate per unit of weight (0: unknown)."""
        if self._v_rate > 0 and now - self._measured_at <= 3 * WINDOW_S:
            return self._v_rate
        capacity = self._limits.rate
        if capacity is None and now - self._measured_at <= 3 * WINDOW_S:
            capacity = self._throughput
        weight = self._active_weight + extra_weight
        return capacity / (weight if weight > 0 else 1.0) if capacity else 0.0

    def _credit(self, now: float) -> float:
        return self._policy.credit_s * self._fair_rate(now)

    def _take(self, tenant: _Tenant, request_id: str, cost: int, now: float) -> None:
        """Charge an admission to the budget, the tenant's cap and its fairness tag."""
        limits = self._limits
        if limits.rate is not None:
            self._tokens -= cost
        if limits.tenant_rate is not None:
            tenant.cap_tokens -= cost
        if limits.concurrency is not None:
            self._in_flight += cost
            self._leases[request_id] = cost
        start = tenant.finish
        if start < self._vtime:  # behind the clock: its banked credit is bounded
            start = max(start, self._vtime - self._credit(now))
        else:
            self._vtime = start
        tenant.finish = start + cost / (
            limits.weights.get(tenant.name, 1.0) if limits.weights else 1.0
        )
        self._window_cost += cost

    def _admit_now(self, now: float, request_id: str, tenant: _Tenant, cost: int) -> Admit:
        self._take(tenant, request_id, cost, now)
        return _ADMIT_LEASE if self._limits.concurrency is not None else _ADMIT

    def _shed_or_admit(
        self, now: float, req: Request, tenant: _Tenant, cost: int, budget_waiting: bool
    ) -> Decision:
        if not self._cap_ok(tenant, cost, now):
            if req.degradable:
                return Admit(degraded=True)
            wait = (cost - tenant.cap_tokens) / (self._limits.tenant_rate or 1.0)
            return Reject("tenant_rate_cap", wait)
        if not budget_waiting and tenant.state == _IDLE and self._fits(cost, reserve=False):
            return self._admit_now(now, req.id, tenant, cost)
        if req.degradable:
            return Admit(degraded=True)
        return Reject("shed", self._drain_time(now))

    def _expiry(self, waiter: _Waiter, now: float) -> Reject:
        """The rejection of a waiter that ran out of time: 429 if its tenant is to blame."""
        estimate, reason = self._estimate(waiter.tenant, waiter.rank, now, waiter=waiter)
        return Reject("expired" if reason == "overloaded" else reason, estimate)

    def _drain_time(self, now: float) -> float:
        """Expected time until everything now waiting has been admitted."""
        queued = sum(w.cost for w in self._waiting.values()) if self._waiting else 0
        rate = self._limits.rate
        if rate is None:
            rate = self._throughput if now - self._measured_at <= 3 * WINDOW_S else 0.0
        return queued / rate if rate else 1.0

    def _estimate(
        self, tenant: _Tenant, rank: int, now: float, waiter: _Waiter | None = None
    ) -> tuple[float, Reason]:
        """Expected wait of a request at `rank` in `tenant`'s queue, and who is to blame.

        The request starts, in virtual time, after the tenant's tag and the cost
        queued ahead of it in its own queue; the virtual clock runs at the fair rate
        per unit weight. Own cost ahead also bounds the wait through the global and
        the tenant's token buckets.
        """
        ahead = sum(tenant.cost_by_rank[: rank + 1])
        if waiter is not None:
            ahead -= waiter.cost  # count it once, as its own cost below
        cost = waiter.cost if waiter is not None else 1
        weight = self._limits.weight(tenant.name)
        fair_rate = self._fair_rate(now, 0.0 if tenant.state != _IDLE else weight)
        wait, reason = 0.0, "overloaded"
        if fair_rate > 0:
            start = max(tenant.finish, self._vtime - self._credit(now)) + ahead / weight
            wait = max(0.0, start - self._vtime) / fair_rate
            if wait > 0:
                reason = "tenant_over_share"
        rate = self._limits.rate
        if rate is not None:
            # Without credit it must also leave the reserve in the bucket.
            need = self._need(cost, reserve=tenant.finish >= self._vtime)
            bound = (ahead + need - self._tokens) / rate
            if bound > wait:
                wait = bound
                reason = "tenant_over_share" if ahead > 0 else "overloaded"
        tenant_rate = self._limits.tenant_rate
        if tenant_rate is not None:
            self._refill_cap(tenant, now)
            bound = (ahead + cost - tenant.cap_tokens) / tenant_rate
            # A capped tenant often drives the virtual clock itself, so its fair wait
            # mirrors its cap: name the cap whenever it accounts for most of the wait.
            if bound >= 0.5 * wait and bound > 0:
                wait, reason = max(wait, bound), "tenant_rate_cap"
        return wait, reason  # type: ignore[return-value]

    # --- queues ---------------------------------------------------------------------------

    def _tenant(self, name: str, now: float) -> _Tenant:
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = _Tenant(
                name, now, self._limits.tenant_burst, self._vtime + 1 / self._limits.weight(name)
            )
            self._tenants[name] = tenant
            self._forget_idle(now)
        else:
            self._tenants.move_to_end(name)
        tenant.seen_at = now
        return tenant

    def _forget_idle(self, now: float) -> None:
        """Drop idle tenants past the idle time, and the least recent beyond `max_tenants`.

        Tenants are kept in order of last use, so this stops at the first one still
        fresh; each tenant is dropped once, so the work is paid for by its creation.
        """
        idle_after = self._policy.tenant_idle_s
        if self._limits.tenant_rate is not None:
            idle_after = max(idle_after, self._limits.tenant_burst / self._limits.tenant_rate)
        excess = len(self._tenants) - self._policy.max_tenants
        doomed: list[str] = []
        for name, tenant in self._tenants.items():
            if tenant.state != _IDLE:
                continue  # has waiters: kept, whatever its age
            if excess <= 0 and now - tenant.seen_at <= idle_after:
                break
            doomed.append(name)
            excess -= 1
        for name in doomed:
            del self._tenants[name]

    def _make_room(
        self, now: float, tenant: _Tenant, rank: int, events: list[Event]
    ) -> Reject | None:
        """Enforce the queue limits before queueing at `rank` in `tenant`'s queue.

        A full queue drops its lowest-priority newest entry for a more urgent
        arrival; a full fleet-wide queue drops from the tenant with the longest queue.
        """
        policy = self._policy
        if tenant.queued >= policy.tenant_queue_limit:
            victim = tenant.last()
            if victim is None or victim.rank <= rank:
                wait, _ = self._estimate(tenant, rank, now)
                return Reject("tenant_queue_full", wait)
            self._evict(victim, "tenant_queue_full", now, events)
        if len(self._waiting) >= policy.queue_limit:
            heaviest = max(
                (t for t in self._tenants.values() if t.state != _IDLE),
                key=lambda t: (t.queued, t.pushed),  # ties: the latest to queue
                default=None,
            )
            if heaviest is None:
                return Reject("queue_full", self._drain_time(now))
            victim = heaviest.last()
            own = heaviest is tenant
            if (
                victim is None
                or (own and victim.rank <= rank)
                or (not own and heaviest.queued <= tenant.queued + 1)
            ):
                reason: Reason = "tenant_queue_full" if own else "queue_full"
                return Reject(reason, self._drain_time(now))
            self._evict(victim, "tenant_queue_full", now, events)
        return None

    def _evict(self, waiter: _Waiter, reason: Reason, now: float, events: list[Event]) -> None:
        wait, _ = self._estimate(waiter.tenant, waiter.rank, now, waiter=waiter)
        self._remove(waiter)
        events.append(Evicted(waiter.id, Reject(reason, wait)))

    def _push(self, waiter: _Waiter, now: float) -> None:
        tenant = waiter.tenant
        if not tenant.queues:
            tenant.queues = tuple(OrderedDict() for _ in PRIORITIES)
            tenant.cost_by_rank = [0] * len(PRIORITIES)
        tenant.pushed = next(self._seq) % _PUSH_SPAN
        tenant.queues[waiter.rank][waiter.id] = waiter
        tenant.cost_by_rank[waiter.rank] += waiter.cost
        self._queued_by_rank[waiter.rank] += 1
        self._waiting[waiter.id] = waiter
        if tenant.state == _IDLE:
            self._activate(tenant)

    def _remove(self, waiter: _Waiter) -> None:
        tenant = waiter.tenant
        del tenant.queues[waiter.rank][waiter.id]
        tenant.cost_by_rank[waiter.rank] -= waiter.cost
        self._queued_by_rank[waiter.rank] -= 1
        del self._waiting[waiter.id]
        if tenant.queued == 0:
            self._deactivate(tenant)

    def _activate(self, tenant: _Tenant) -> None:
        tenant.state = _ACTIVE
        tenant.version += 1
        self._active_weight += self._limits.weight(tenant.name)
        heapq.heappush(self._active, (tenant.finish, next(self._seq), tenant.version, tenant))

    def _deactivate(self, tenant: _Tenant) -> None:
        if tenant.state == _ACTIVE:
            self._active_weight -= self._limits.weight(tenant.name)
        tenant.state = _IDLE
        tenant.version += 1
        if not self._waiting:
            self._active_weight = 0.0  # no float drift across idle periods

    def _top_active(self) -> tuple[_Tenant, _Waiter] | None:
        while self._active:
            _, _, version, tenant = self._active[0]
            if tenant.version == version and tenant.state == _ACTIVE:
                return tenant, tenant.head()
            heapq.heappop(self._active)
        return None

    def _dispatch(self, now: float, events: list[Event], watch: _Waiter | None = None) -> bool:
        """Admit waiters while the budget allows, lowest virtual tag first.

        Tenants with banked credit (tag behind the virtual clock) may use the
        reserve tokens; others only take tokens above it. Returns whether `watch`
        was admitted (its grant is then not reported as an event).
        """
        while self._capped and self._capped[0][0] <= now + _EPS:
            _, _, version, tenant = heapq.heappop(self._capped)
            if tenant.version == version and tenant.state == _CAPPED:
                tenant.state = _IDLE
                self._activate(tenant)
        watched = False
        while (head := self._top_active()) is not None:
            tenant, waiter = head
            if not self._cap_ok(tenant, waiter.cost, now):
                heapq.heappop(self._active)
                self._active_weight -= self._limits.weight(tenant.name)
                tenant.state = _CAPPED
                tenant.version += 1
                ready = now + (waiter.cost - tenant.cap_tokens) / (self._limits.tenant_rate or 1.0)
                heapq.heappush(self._capped, (ready, next(self._seq), tenant.version, tenant))
                continue
            if not self._fits(waiter.cost, reserve=tenant.finish >= self._vtime):
                break
            heapq.heappop(self._active)
            tenant.state = _IDLE  # re-activated below with its new tag if more are waiting
            self._active_weight -= self._limits.weight(tenant.name)
            self._remove_head(waiter)
            self._take(tenant, waiter.id, waiter.cost, now)
            if tenant.queued:
                self._activate(tenant)
            if waiter is watch:
                watched = True
            else:
                lease = self._limits.concurrency is not None
                events.append(Granted(waiter.id, now - waiter.enqueued_at, lease))
        return watched

    def _remove_head(self, waiter: _Waiter) -> None:
        tenant = waiter.tenant
        del tenant.queues[waiter.rank][waiter.id]
        tenant.cost_by_rank[waiter.rank] -= waiter.cost
        self._queued_by_rank[waiter.rank] -= 1
        del self._waiting[waiter.id]
        tenant.version += 1
        if not self._waiting:
            self._active_weight = 0.0
