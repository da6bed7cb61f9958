"""The scheduling rules, as a pure state machine: no I/O, no clock of its own.

Everything that decides who gets the budget lives in this file; the state it
works on is in ``state.py`` and ``window.py``. The in-memory backend drives it
directly, and the Redis scripts repeat it in Lua function for function
(``backends/redis/scripts/core.lua``: same names, same order, each with a
pointer back here), so this module is the reference semantics of throttle_mw.
``README.md`` next to this file derives the rules in prose and lists the few
steps that exist only in Lua.

Contract for callers:

- ``acquire`` returns `Admit`, `Enqueue` or `Reject` for the new request, plus
  events for *other* requests (grants, evictions) the call caused.
- After `Admit(lease=True)` or `Granted(lease=True)`, call ``release(id)``
  exactly once when the response is done (extra calls are ignored).
- After `Enqueue`, exactly one of these ends the wait: a `Granted` or `Evicted`
  event for that id from any later call, or the caller's own ``cancel(id)``
  (returns None if the request had already been granted, in which case it
  holds a lease to release).
- Call ``tick(now)`` at ``next_due()``: that is when the next token is due, a
  capped tenant becomes eligible or a deadline passes.

Conventions inside:

- Every public method first brings the budget up to `now` (``_refill``), so the
  rules below always see tokens, caps and the fair-rate window as of `now`.
- Methods that may admit or evict *other* requests take ``events``, a list they
  append `Granted`/`Evicted` to; the public method returns it. `_NO_EVENTS` is a
  shared empty list returned when nothing can have happened (never appended to).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable

from ..priorities import PRIORITIES, RANK
from .constants import (
    ACTIVE,
    CAP_BLAME_SHARE,
    CAPPED,
    EPS,
    IDLE,
    PUSH_SPAN,
    SWEEP_PERIOD_S,
    WINDOW_S,
)
from .state import Tenant, Waiter
from .types import (
    Admit,
    Decision,
    Enqueue,
    Event,
    Evicted,
    Granted,
    HeldLease,
    LeaseCharge,
    LeaseGrant,
    LeaseKey,
    Limits,
    Policy,
    Reason,
    Reject,
    Request,
    RequestFields,
    Snapshot,
    TenantSnapshot,
)
from .window import FairRateWindow

_ADMIT = Admit()
#: The tenants' OrderedDict's methods, called with it: 3.11 cannot specialize a method
#: lookup on an OrderedDict (it has an instance ``__dict__``), and ``admit_unsheddable``
#: calls both for every request.
_tenant_of = OrderedDict.get
_touch = OrderedDict.move_to_end
_ADMIT_LEASE = Admit(lease=True)
_NO_EVENTS: list[Event] = []  # shared and never mutated: callers only iterate events
_NO_GRANT = LeaseGrant()

#: A heap entry of the active or capped line: (key, seq, tenant version, tenant).
_Entry = tuple[float, int, int, Tenant]


class Scheduler:
    """Budget, fair queues and priorities of one app; see the module docstring."""

    def __init__(self, limits: Limits, policy: Policy, now: float) -> None:
        self._limits = limits
        self._reserve = limits.reserve
        self._policy = policy
        #: The rate budget's token bucket, refilled up to `_refilled_at`.
        self._tokens = limits.burst
        self._refilled_at = now
        #: Rate tokens out in processes' leases (`lease_tokens`), counted until they expire
        #: in two generations: the newer one (numbered `_lease_gen`; 0: no lease yet) takes
        #: every new lease; the older one (`_lease_gen - 1`) only loses leases renewed or
        #: lapsed, and is retired once it is empty or past its expiry. The bucket refills
        #: only up to its burst less these (`_lease_room`).
        self._lease_gen = 0
        self._leased = 0.0
        self._leased_until = -math.inf
        self._leased_before = 0.0
        self._leased_before_until = -math.inf
        #: Concurrency in use, and each lease's cost by request id.
        self._in_flight = 0
        self._leases: dict[LeaseKey, int] = {}
        #: Every tenant with state, least recently used first (`Tenant.seen_at`).
        self._tenants: OrderedDict[str, Tenant] = OrderedDict()
        #: None, or the tenant last in `_tenants` (the most recently used): its next
        #: request finds it without a lookup, and it needs no move (`admit_unsheddable`).
        #: Set wherever a tenant is put last; None when it is dropped (`_forget_idle`).
        self._newest: Tenant | None = None
        #: Idle tenants are forgotten at the end of an operation that made a tenant
        #: (`_made`) or at or after `_sweep_at`, the scripts' sweep (`SWEEP_PERIOD_S`).
        self._made = False
        self._sweep_at = -math.inf
        self._waiting: dict[str, Waiter] = {}
        self._queued_by_rank = [0] * len(PRIORITIES)
        #: Active tenants by finish tag; capped tenants by when their cap allows the head.
        self._active: list[_Entry] = []
        self._capped: list[_Entry] = []
        #: Waiters' deadlines: (deadline, seq, request id); entries of gone waiters are skipped.
        self._deadlines: list[tuple[float, int, str]] = []
        #: Sum of the active tenants' weights.
        self._active_weight = 0.0
        #: Tenants with requests waiting (active or capped): `max_tenants` bounds the others.
        self._busy = 0
        self._seq = itertools.count()
        #: The virtual clock: the start tag of the latest admission (never decreases).
        self._vtime = 0.0
        self._window = FairRateWindow(now)

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
            limits.weight(t.name) for t in self._tenants.values() if t.state == ACTIVE
        )
        events: list[Event] = []
        self._dispatch(now, events)
        return events

    def admit_at_once(self, now: float, req: RequestFields) -> Admit | None:
        """The fast path alone: admit `req` if nothing waits and the budget has room.

        Returns the `Admit` that `acquire` would (with a lease when the budget has a
        concurrency limit), or None, having changed nothing but the refill to `now`
        and its tenant's last use, when `acquire` must decide instead. `req` is a
        `Request` or a plain tuple of its fields.

        The in-memory backend calls this for every request, so the common case is
        written out in one frame: ``_refill``, ``_tenant`` (known tenant),
        ``_fits_at_once`` and ``_take`` (unweighted tenant at or ahead of the
        virtual clock), inlined step for step; anything else calls them.
        `tests/test_scheduler.py` checks it against ``acquire`` state for state.
        """
        # Unpacked: a NamedTuple's attribute access is a generic lookup in 3.11.
        request_id, name, _, cost, sheddable, _ = req
        if sheddable:
            return None
        leased = self.admit_unsheddable(now, request_id, name, cost)
        if leased is None:
            return None
        return _ADMIT_LEASE if leased else _ADMIT

    def admit_unsheddable(
        self, now: float, request_id: LeaseKey, name: str, cost: int
    ) -> bool | None:
        """`admit_at_once` for a request known not to be sheddable, given only the
        fields it reads, and answering with a plain value: None, or whether the
        admission holds a lease (its `Admit`'s ``lease``). The in-memory
        middleware's call: no tuple to build and unpack, no NamedTuple to index."""
        if self._waiting or now >= self._sweep_at:
            return None  # (a sweep due: acquire's, at its end)
        limits = self._limits
        rate = limits.rate
        # _refill
        elapsed = now - self._refilled_at
        if elapsed > 0.0:  # a float literal: 3.11 specializes float-to-float comparisons
            if rate is not None:
                if self._lease_gen:
                    tokens, burst = _leased_refill(self, now, rate), self._lease_room(now)
                else:
                    tokens, burst = self._tokens + elapsed * rate, limits.burst
                self._tokens = tokens if tokens < burst else burst
            self._refilled_at = now
        window = self._window
        if now - window.start >= WINDOW_S:
            window.roll(now, self._vtime, False)  # (nobody waits: not measured)
        # _tenant; the most recent tenant again (one process's clients behind one proxy,
        # one tenant header) is already last: no lookup, no move. (By identity: an equal
        # name in another string object takes the lookup, to the same tenant.)
        tenant = self._newest
        if tenant is None or tenant.name is not name:
            tenants = self._tenants
            tenant = _tenant_of(tenants, name)
            if tenant is None:
                tenant = self._tenant(name, now)
            else:
                _touch(tenants, name)
                self._newest = tenant
        tenant.seen_at = now
        if cost != 1:
            cost = self._clamp(cost)
        # _fits_at_once
        concurrency = limits.concurrency
        tenant_rate = limits.tenant_rate
        if not (
            tenant.state == IDLE
            and (not self._active or self._top_active() is None)
            and (rate is None or self._tokens + EPS >= cost)
            and (concurrency is None or self._in_flight + cost <= concurrency)
            and (tenant_rate is None or self._cap_ok(tenant, cost, now))
        ):
            return None
        if self._made:  # (its sweep: the admission leaves every tenant as it is)
            self._forget_idle(now)
        # _take
        start = tenant.finish
        if tenant_rate is not None or limits.weights or start < self._vtime:
            self._take(tenant, request_id, cost, now)
            return concurrency is not None
        if rate is not None:
            self._tokens -= cost
        self._vtime = start
        tenant.finish = start + cost  # weight 1.0
        window.cost += cost
        if concurrency is None:
            return False
        self._in_flight += cost
        self._leases[request_id] = cost
        return True

    def acquire(self, now: float, req: Request) -> tuple[Decision, list[Event]]:
        """Decide on a new request: admit it, queue it or reject it."""
        self._refill(now)
        try:
            events = _NO_EVENTS
            if self._waiting:
                events = []
                self._dispatch(now, events)
            tenant = self._tenant(req.tenant, now)
            cost = self._clamp(req.cost)
            if self._fits_at_once(tenant, cost, now):
                return self._admit_now(now, req.id, tenant, cost), events
            if events is _NO_EVENTS:
                events = []
            if req.sheddable:
                return self._shed_or_admit(now, req, tenant, cost), events

            max_wait = self._policy.max_wait_s[req.priority]
            rejected = self._make_room(now, tenant, RANK[req.priority], events)
            if rejected is not None:
                return rejected, events
            deadline = now + max_wait
            waiter = Waiter(req, tenant, cost, now, deadline)
            self._push(waiter)
            if self._dispatch(now, events, watch=waiter):
                return (_ADMIT if self._limits.concurrency is None else _ADMIT_LEASE), events

            estimate, reason = self._estimate(tenant, waiter.rank, now, waiter=waiter)
            if estimate > max_wait + EPS or max_wait <= 0:
                self._remove(waiter, now)
                self._dispatch(now, events)
                return Reject(reason, estimate - max_wait), events
            heapq.heappush(self._deadlines, (deadline, next(self._seq), req.id))
            # Queued for the concurrency limit (a learned limit's `Sample.waited`), not
            # only for rate tokens, its tenant's cap or the requests ahead.
            concurrency = self._limits.concurrency
            limited = concurrency is not None and self._in_flight + cost > concurrency
            return Enqueue(deadline, estimate, limited), events
        finally:
            self._forget_idle(now)

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
            self._forget_idle(now)
            return None, events
        reject = self._expiry(waiter, now)
        self._remove(waiter, now)
        self._dispatch(now, events)
        self._forget_idle(now)
        return reject, events

    def release(self, now: float, request_id: LeaseKey) -> list[Event]:
        """Give back a lease's concurrency; idempotent: a lease not held (released
        already, or never) changes nothing, not even the clock's state (an idle sweep due
        runs, as at the end of any operation: `_forget_idle`)."""
        cost = self._leases.pop(request_id, None)
        if cost is None:  # (a refill would roll the fair-rate window: core.lua's does not)
            self._forget_idle(now)
            return _NO_EVENTS
        self._in_flight -= cost
        if not self._waiting:
            self._forget_idle(now)
            return _NO_EVENTS  # nobody to hand it to
        self._refill(now)
        events: list[Event] = []
        self._dispatch(now, events)
        self._forget_idle(now)
        return events

    def release_at_once(self, request_id: LeaseKey) -> bool:
        """`release` when the scheduler is `idle` (nothing waits, no deadline pending):
        the lease goes back with no clock and no dispatch. False, having changed
        nothing, when it is not idle: call ``release(now, id)`` then."""
        if self._waiting or self._deadlines or self._capped:
            return False
        cost = self._leases.pop(request_id, None)
        if cost is not None:
            self._in_flight -= cost
        return True

    def tick(self, now: float) -> list[Event]:
        """Advance time: refill, expire overdue waiters, dispatch, forget idle tenants."""
        self._refill(now)
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now + EPS:
            _, _, request_id = heapq.heappop(self._deadlines)
            waiter = self._waiting.get(request_id)
            if waiter is not None:
                reject = self._expiry(waiter, now)
                self._remove(waiter, now)
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
            if self._tokens + EPS < need and (
                concurrency is None or self._in_flight + waiter.cost <= concurrency
            ):
                due.append(now + (need - self._tokens) / self._limits.rate)
        if self._capped:
            due.append(self._capped[0][0])
        if self._deadlines:
            due.append(self._deadlines[0][0])
        return min(due) if due else None

    def lease_tokens(
        self,
        now: float,
        lease_s: float,
        held: HeldLease,
        wants: int,
        charges: Iterable[LeaseCharge] = (),
    ) -> LeaseGrant:
        """A process's lease of rate tokens (``THROTTLE_RATE_LEASE``; ``ratelease.lua``).

        First its admissions from leases since its last renewal (`charges`, per tenant) are
        charged to their tenants (made if new, as an acquire makes them) as `_take` would
        have charged them one by one (`_charge_leased`): the fair queueing sees them.

        Its last lease (`held`) leaves its generation's count, if that still counts it;
        then its unspent tokens go back into the bucket's room and the ones it keeps stay
        counted, the kept ones only if that lease has not expired here (else they lapse
        in the process too). Then up to `wants` whole tokens leave the bucket, only while
        nobody waits, no idle sweep is due (the charges' own ran it; a renewal without
        charges runs none) and the budget is a rate alone (no concurrency, no tenant cap:
        those are decided here per request). The kept and the taken are counted out, in the
        newer generation, until `now + lease_s`: the bucket refills only to its burst
        less the tokens out in unexpired leases, so the fleet admits over any window at
        most what the plain bucket would (its refill plus its burst), leases included."""
        self._refill(now)
        charged = False
        for charge in charges:
            self._charge_leased(self._tenant(charge.tenant, now), charge.cost, charge.last, now)
            charged = True
        if charged:  # (a renewal without charges sweeps nothing: ratelease.lua's)
            self._forget_idle(now)
        # A sweep still due (a renewal without charges does not run it): no new lease, as
        # ratelease.lua takes none while the full call has a chore due; the caller's next
        # acquire sweeps (README, "Leases of rate tokens": "the state has no chore due").
        if now >= self._sweep_at:
            wants = 0
        limits = self._limits
        if limits.rate is None:
            return _NO_GRANT
        gen, kept = held.generation, 0
        counted = False
        if gen > 0 and gen == self._lease_gen and now < self._leased_until:
            self._leased = max(0.0, self._leased - held.size)
            counted = True
        elif gen > 0 and gen == self._lease_gen - 1 and now < self._leased_before_until:
            self._leased_before = max(0.0, self._leased_before - held.size)
            counted = True
        if counted:
            returned = min(held.returned, held.size)
            if now < held.until:
                kept = min(held.kept, held.size - returned)
            if returned > 0:
                tokens = self._tokens + returned
                room = self._lease_room(now) - kept
                self._tokens = tokens if tokens < room else room
        taken = 0
        if (
            wants > 0
            and limits.concurrency is None
            and limits.tenant_rate is None
            and not self._waiting
        ):
            taken = max(0, min(wants, math.floor(self._tokens + EPS)))
            self._tokens -= taken
        if kept + taken <= 0:
            return _NO_GRANT
        if not (now < self._leased_before_until and self._leased_before > 0):
            # The older generation counts nothing any more: retired, the newer one takes
            # its place (its number too) and a new one opens.
            self._leased_before = self._leased
            self._leased_before_until = self._leased_until
            self._leased, self._leased_until = 0.0, -math.inf
            self._lease_gen += 1
        until = now + lease_s
        self._leased += kept + taken
        if until > self._leased_until:
            self._leased_until = until
        return LeaseGrant(taken, kept, self._lease_gen, until)

    def snapshot(self, top: int = 10) -> Snapshot:
        busiest = heapq.nlargest(
            top,
            (t for t in self._tenants.values() if t.state != IDLE),
            key=lambda t: t.queued,
        )
        return Snapshot(
            tokens=self._tokens if self._limits.rate is not None else None,
            in_flight=self._in_flight,
            queued_by_priority=dict(zip(PRIORITIES, self._queued_by_rank, strict=True)),
            tenants=len(self._tenants),
            busiest=tuple(TenantSnapshot(t.name, t.queued, t.finish) for t in busiest),
            fair_rate=self._window.v_rate,
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
        """Bring the token bucket and the fair-rate window up to `now`."""
        elapsed = now - self._refilled_at
        if elapsed > 0:
            rate = self._limits.rate
            if rate is not None:
                if self._lease_gen:
                    tokens, burst = _leased_refill(self, now, rate), self._lease_room(now)
                else:
                    tokens, burst = self._tokens + elapsed * rate, self._limits.burst
                self._tokens = tokens if tokens < burst else burst
            self._refilled_at = now
        if now - self._window.start >= WINDOW_S:
            self._window.roll(now, self._vtime, bool(self._waiting))

    def _lease_room(self, now: float) -> float:
        """The most the bucket may hold: its burst less the tokens out in leases that
        have not expired (spent or not: the process spends them without asking)."""
        room = self._limits.burst
        if now < self._leased_until:
            room -= self._leased
        if now < self._leased_before_until:
            room -= self._leased_before
        return room

    def _clamp(self, cost: int) -> int:
        """A cost above the burst or the concurrency could never be admitted."""
        limit = cost
        if self._limits.rate is not None:
            limit = min(limit, math.floor(self._limits.burst))
        if self._limits.concurrency is not None:
            limit = min(limit, self._limits.concurrency)
        return max(1, limit)

    def _need(self, cost: int, *, reserve: bool) -> float:
        """Tokens that must be in the bucket to admit `cost` (with the reserve left in it)."""
        if not reserve:
            return float(cost)
        return min(cost + self._reserve, self._limits.burst)

    def _fits(self, cost: int, *, reserve: bool) -> bool:
        """Does the budget have room for `cost` now (leaving the reserve, if asked)?"""
        if self._limits.rate is not None and self._tokens + EPS < self._need(cost, reserve=reserve):
            return False
        concurrency = self._limits.concurrency
        return concurrency is None or self._in_flight + cost <= concurrency

    def _fits_at_once(self, tenant: Tenant, cost: int, now: float) -> bool:
        """The fast path's test: nobody waits for the budget, and it has room for `cost`.

        The tenant must not be waiting itself (its new request would overtake its
        queue) and its own cap must allow it. `_fits` without the reserve, inlined:
        this runs for every request.
        """
        limits = self._limits
        return (
            tenant.state == IDLE
            and (not self._active or self._top_active() is None)
            and (limits.rate is None or self._tokens + EPS >= cost)
            and (limits.concurrency is None or self._in_flight + cost <= limits.concurrency)
            and (limits.tenant_rate is None or self._cap_ok(tenant, cost, now))
        )

    def _cap_ok(self, tenant: Tenant, cost: int, now: float) -> bool:
        """Does the tenant's own rate cap allow `cost` now?"""
        rate = self._limits.tenant_rate
        if rate is None:
            return True
        self._refill_cap(tenant, now)
        return tenant.cap_tokens + EPS >= cost

    def _refill_cap(self, tenant: Tenant, now: float) -> None:
        rate = self._limits.tenant_rate
        if rate is not None and now > tenant.cap_at:
            tenant.cap_tokens = min(
                self._limits.tenant_burst, tenant.cap_tokens + (now - tenant.cap_at) * rate
            )
        tenant.cap_at = max(tenant.cap_at, now)

    # --- fairness -------------------------------------------------------------------------

    def _fair_rate(self, now: float, extra_weight: float = 0.0) -> float:
        """Virtual-clock speed: the fair admission rate per unit of weight (0: unknown)."""
        window = self._window
        fresh = window.fresh(now)
        if window.v_rate > 0 and fresh:
            return window.v_rate
        capacity = self._limits.rate
        if capacity is None and fresh:
            capacity = window.throughput
        weight = self._active_weight + extra_weight
        # (Below EPS: none in line. A sum of weights added and taken away one by one
        # drifts (0.1 + 0.2 - 0.1 - 0.2 is 2.8e-17), and a rate over that was ~1e17.)
        return capacity / (weight if weight > EPS else 1.0) if capacity else 0.0

    def _credit(self, now: float) -> float:
        """How far behind the virtual clock a tenant's tag may lag: its banked credit.

        With no fair rate to go by (a concurrency budget alone, in a queue's first second
        after a calm spell: no throughput measured fresh), the last throughput measured
        bounds it, shared by the weight in line: credit is the tenants', not the window's,
        and without this a tenant admitted then lost all of it (README, "Banked credit")."""
        rate = self._fair_rate(now)
        if rate <= 0 and self._window.throughput > 0:
            weight = self._active_weight
            rate = self._window.throughput / (weight if weight > EPS else 1.0)
        return self._policy.credit_s * rate

    def _take(self, tenant: Tenant, request_id: LeaseKey, cost: int, now: float) -> None:
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
        self._window.cost += cost

    def _charge_leased(self, tenant: Tenant, cost: int, last: int, now: float) -> None:
        """Charge a tenant's admissions from leases (`cost` in all, `last` the cost of the
        last one) to its fairness tag, the virtual clock and the fair-rate window, as `_take`
        one by one would have (the budget's tokens left with the lease). The tag moves by
        `cost` / weight from where its first admission would have started (its banked
        credit bounded by the clock now); the clock goes to the last admission's start tag
        if that is ahead of it. Exact when the bound on credit did not bind (a tenant within
        its credit, or ahead of the clock); when it did, it binds with the clock at the
        renewal, at least the clock of the first admission: the tenant banks no more.
        A tenant in line (requests of it queued since, from another process) is put back
        in line by its new tag."""
        active = tenant.state == ACTIVE
        if active:
            self._deactivate(tenant)
        start = tenant.finish
        if start < self._vtime:  # behind the clock: its banked credit is bounded
            start = max(start, self._vtime - self._credit(now))
        weight = self._limits.weights.get(tenant.name, 1.0) if self._limits.weights else 1.0
        finish = start + cost / weight
        tenant.finish = finish
        last_start = finish - last / weight
        if last_start > self._vtime:
            self._vtime = last_start
        self._window.cost += cost
        if active:
            self._activate(tenant)

    def _admit_now(self, now: float, request_id: str, tenant: Tenant, cost: int) -> Admit:
        self._take(tenant, request_id, cost, now)
        return _ADMIT_LEASE if self._limits.concurrency is not None else _ADMIT

    def _shed_or_admit(self, now: float, req: Request, tenant: Tenant, cost: int) -> Decision:
        """A sheddable request that cannot go at once: degraded if it may be, else rejected."""
        if req.degradable:
            return Admit(degraded=True)
        if not self._cap_ok(tenant, cost, now):
            wait = (cost - tenant.cap_tokens) / (self._limits.tenant_rate or 1.0)
            return Reject("tenant_rate_cap", wait)
        return Reject("shed", self._drain_time(now))

    def _expiry(self, waiter: Waiter, now: float) -> Reject:
        """The rejection of a waiter that ran out of time: 429 if its tenant is to blame."""
        estimate, reason = self._estimate(waiter.tenant, waiter.rank, now, waiter=waiter)
        return Reject("expired" if reason == "overloaded" else reason, estimate)

    def _drain_time(self, now: float) -> float:
        """Expected time until everything now waiting has been admitted."""
        queued = sum(w.cost for w in self._waiting.values()) if self._waiting else 0
        rate = self._limits.rate
        if rate is None:
            rate = self._window.throughput if self._window.fresh(now) else 0.0
        return queued / rate if rate else 1.0

    def _estimate(
        self, tenant: Tenant, rank: int, now: float, waiter: Waiter | None = None
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
        fair_rate = self._fair_rate(now, 0.0 if tenant.state != IDLE else weight)
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
            if bound >= CAP_BLAME_SHARE * wait and bound > 0:
                wait, reason = max(wait, bound), "tenant_rate_cap"
        return wait, reason  # type: ignore[return-value]

    # --- queues ---------------------------------------------------------------------------

    def _tenant(self, name: str, now: float) -> Tenant:
        """The tenant of an arriving request, made if new; marks it as just seen."""
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = Tenant(
                name, now, self._limits.tenant_burst, self._vtime + 1 / self._limits.weight(name)
            )
            self._tenants[name] = tenant
            self._made = True  # (idle ones forgotten at the operation's end: `_forget_idle`)
        else:
            self._tenants.move_to_end(name)
        self._newest = tenant
        tenant.seen_at = now
        return tenant

    def _forget_idle(self, now: float) -> None:
        """Drop idle tenants past the idle time, and the least recent beyond `max_tenants`
        idle ones; the next sweep is due `SWEEP_PERIOD_S` later.

        Tenants are kept in order of last use (their last arrival, or their last waiter
        leaving: `_unlink`), so this stops at the first one still fresh; each tenant is
        dropped once, so the work is paid for by its creation. Run at an operation's end
        (every public method with a clock, at its end), as the scripts run theirs at a call's:
        a tenant used again in the operation that found it stale is kept. Only if the
        operation made a tenant or a sweep is due (`SWEEP_PERIOD_S` after the last).
        """
        if not (self._made or now >= self._sweep_at):
            return
        self._made = False
        self._sweep_at = now + SWEEP_PERIOD_S
        idle_after = self._policy.tenant_idle_s
        if self._limits.tenant_rate is not None:
            idle_after = max(idle_after, self._limits.tenant_burst / self._limits.tenant_rate)
        # (Idle ones only: those with waiters come on top, at most `queue_limit`, as in the
        # scripts' idle list. Counted with them, a tenant made while `max_tenants` wait
        # was dropped as it was made, and each request of its made it anew.)
        excess = len(self._tenants) - self._busy - self._policy.max_tenants
        tenants = self._tenants
        doomed: list[str] = []
        tied: list[str] = []  # kept, but last used with the bound's last drop
        for name, tenant in tenants.items():
            if tenant.state != IDLE:
                continue  # has waiters: kept, whatever its age
            if excess <= 0 and now - tenant.seen_at <= idle_after:
                if doomed and tenant.seen_at == tenants[doomed[-1]].seen_at:
                    tied.append(name)
                    continue
                break
            doomed.append(name)
            excess -= 1
        if tied:
            # Tenants last used at the same time go by name, not by the order they
            # happened to be used in (a dispatch's): the scripts' list orders its ties by
            # member, a digest (the one rule of theirs this cannot take: README, "Memory").
            at, k = tenants[doomed[-1]].seen_at, 0
            while k < len(doomed) and tenants[doomed[-1 - k]].seen_at == at:
                k += 1
            doomed[-k:] = sorted(doomed[-k:] + tied)[:k]
        for name in doomed:
            del tenants[name]
        if doomed:
            self._newest = None  # (it may be among them)

    def _make_room(
        self, now: float, tenant: Tenant, rank: int, events: list[Event]
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
                (t for t in self._tenants.values() if t.state != IDLE),
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

    def _evict(self, waiter: Waiter, reason: Reason, now: float, events: list[Event]) -> None:
        """Drop a waiter from the queue to make room, telling its caller why."""
        wait, _ = self._estimate(waiter.tenant, waiter.rank, now, waiter=waiter)
        self._remove(waiter, now)
        events.append(Evicted(waiter.id, Reject(reason, wait)))

    def _push(self, waiter: Waiter) -> None:
        """Queue a waiter at the back of its priority's FIFO; an idle tenant gets in line.
        The first to wait starts a fair-rate window (one measured only while someone waits:
        `FairRateWindow.roll`) and drops the fair rate last measured: it measured the
        contention in a queue that has drained since, and says nothing of this one (the
        throughput, what the budget served, stands; README, "Waiting and rejecting")."""
        if not self._waiting:
            self._window.roll(waiter.enqueued_at, self._vtime, False)
            self._window.v_rate = 0.0
        tenant = waiter.tenant
        tenant.open_queues()
        tenant.pushed = next(self._seq) % PUSH_SPAN
        tenant.queues[waiter.rank][waiter.id] = waiter
        tenant.cost_by_rank[waiter.rank] += waiter.cost
        self._queued_by_rank[waiter.rank] += 1
        self._waiting[waiter.id] = waiter
        if tenant.state == IDLE:
            self._activate(tenant)

    def _unlink(self, waiter: Waiter, now: float) -> None:
        """Take a waiter out of every queue and count; its tenant's state is the caller's.
        A tenant left with none was last used now: its idle time starts here (the scripts'
        idle list takes it back with this time), not at its last arrival."""
        tenant = waiter.tenant
        del tenant.queues[waiter.rank][waiter.id]
        tenant.cost_by_rank[waiter.rank] -= waiter.cost
        self._queued_by_rank[waiter.rank] -= 1
        del self._waiting[waiter.id]
        if tenant.queued == 0:
            tenant.seen_at = now
            self._tenants.move_to_end(tenant.name)
            self._newest = tenant

    def _remove(self, waiter: Waiter, now: float) -> None:
        """A waiter leaves without being admitted; a tenant left with none goes idle."""
        self._unlink(waiter, now)
        if waiter.tenant.queued == 0:
            self._deactivate(waiter.tenant)

    def _activate(self, tenant: Tenant) -> None:
        """Put a tenant in line for the budget, ordered by its finish tag."""
        if tenant.state == IDLE:
            self._busy += 1
        tenant.state = ACTIVE
        tenant.version += 1
        self._active_weight += self._limits.weight(tenant.name)
        heapq.heappush(self._active, (tenant.finish, next(self._seq), tenant.version, tenant))

    def _deactivate(self, tenant: Tenant) -> None:
        """Take a tenant out of line (active or capped): it is idle now."""
        if tenant.state == ACTIVE:
            self._active_weight -= self._limits.weight(tenant.name)
        if tenant.state != IDLE:
            self._busy -= 1
        tenant.state = IDLE
        tenant.version += 1
        if not self._waiting:
            self._active_weight = 0.0  # no float drift across idle periods

    def _release_capped(self, now: float) -> None:
        """Capped tenants whose cap has refilled get back in line."""
        while self._capped and self._capped[0][0] <= now + EPS:
            _, _, version, tenant = heapq.heappop(self._capped)
            if tenant.version == version and tenant.state == CAPPED:
                self._activate(tenant)

    def _top_active(self) -> tuple[Tenant, Waiter] | None:
        """The tenant first in line and its head waiter; drops stale heap entries."""
        while self._active:
            _, _, version, tenant = self._active[0]
            if tenant.version == version and tenant.state == ACTIVE:
                return tenant, tenant.head()
            heapq.heappop(self._active)
        return None

    def _dispatch(self, now: float, events: list[Event], watch: Waiter | None = None) -> bool:
        """Admit waiters while the budget allows, lowest virtual tag first.

        Tenants with banked credit (tag behind the virtual clock) may use the
        reserve tokens; others only take tokens above it. Returns whether `watch`
        was admitted (its grant is then not reported as an event).
        """
        self._release_capped(now)
        watched = False
        while (head := self._top_active()) is not None:
            tenant, waiter = head
            if not self._cap_ok(tenant, waiter.cost, now):
                heapq.heappop(self._active)
                self._active_weight -= self._limits.weight(tenant.name)
                tenant.state = CAPPED
                tenant.version += 1
                ready = now + (waiter.cost - tenant.cap_tokens) / (self._limits.tenant_rate or 1.0)
                heapq.heappush(self._capped, (ready, next(self._seq), tenant.version, tenant))
                continue
            if not self._fits(waiter.cost, reserve=tenant.finish >= self._vtime):
                break
            heapq.heappop(self._active)
            self._unlink(waiter, now)
            self._deactivate(tenant)  # back in line below, with its new tag, if more wait
            self._take(tenant, waiter.id, waiter.cost, now)
            if tenant.queued:
                self._activate(tenant)
            if waiter is watch:
                watched = True
            else:
                lease = self._limits.concurrency is not None
                events.append(Granted(waiter.id, now - waiter.enqueued_at, lease))
        return watched


def _leased_refill(scheduler: Scheduler, now: float, rate: float) -> float:
    """The bucket refilled from its last refill to `now` (before the cap at `now`) while
    leases are counted: up to each generation's expiry in between, the bucket stops at the
    room it had then (the burst less the tokens that generation still counted), and only
    the refill after the expiry is added past it. (In one step over the expiry, it would
    also get what it could not hold before: a window from just before the expiry would see
    those tokens on top of the lease's own, spent then, and of the refill: more than the
    plain bucket.) A function, not a method: its Lua twin is core.lua's
    ``call.leased_refill`` (no local slot there), and `Scheduler._refill` calls it."""
    at, tokens = scheduler._refilled_at, scheduler._tokens
    first, second = scheduler._leased_until, scheduler._leased_before_until
    if second < first:
        first, second = second, first
    if at < first < now:
        tokens = min(tokens + (first - at) * rate, scheduler._lease_room(at))
        at = first
    if at < second < now:
        tokens = min(tokens + (second - at) * rate, scheduler._lease_room(at))
        at = second
    return tokens + (now - at) * rate
