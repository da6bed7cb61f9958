"""A process's lease of rate tokens (``THROTTLE_RATE_LEASE``): the pure rules.

The Redis backend takes `k` tokens out of the fleet's bucket in one script call
(``ratelease.lua``, while nobody waits for the budget) and admits the next requests of
this process from them without calling Redis. This module is the pool's state machine:
no I/O and no clock of its own (every method is given ``now``, the event loop's time),
so its tests drive it on a fake clock. The backend (``backend.py``) does the I/O:

1. ``pool.take(now, cost, queue_empty, tenant)``: True: admitted here, nothing to send
   (the admission is recorded against its tenant, to be charged at the next renewal).
   False: the request goes to Redis as it would without leases.
2. After each, ``pool.due(now)``: if True, start a renewal in the background:
   ``returned, epoch, wants = pool.renewal(now, processes, burst)`` (``pool.sending``: the
   charges the call carries, `LeaseCharge` per tenant; the pool keeps up
   to the next lease's size and tops itself up: it goes on admitting while the call is
   out; unspent tokens above that size go back in the call; ``pool.held`` is the last
   lease as the call tells it), call the script, then ``pool.granted(sent, taken, epoch,
   kept=, generation=, until=, charged=)`` with the loop time `sent` from before the call (the
   lease's life counts from then: Redis took the tokens after it, and counts them out
   until its own later expiry). A renewal that
   got less than it asked is not followed by another before ``RETRY_SHARE`` of T; one
   with nothing to give back, nothing wanted and nothing to charge makes no call:
   ``pool.skip(sent)``.
3. Someone started waiting for the budget in Redis (a message on this process's grant
   list, store.lua's ``call.signal_waiting``): ``pool.waits()``: the pool admits nothing
   more, and its next renewal (`due` at once while it holds tokens) gives every unspent
   token back and asks for none, so the waiter is admitted from them by Redis's own
   dispatch. After it the pool is empty and follows the rules above (its next renewal
   not before ``RETRY_SHARE`` of T): a lease comes only from a renewal Redis answers
   while nobody waits.
4. A new epoch or limits that allow no lease: ``pool.drop()`` (the tokens lapse; the
   failure mode applies as without leases); a Redis fault: ``pool.fault()`` (the same,
   but the charges are kept: see Charges below). At shutdown:
   ``pool.renewal(now, ..., final=True)``: every unspent token given back.

Sizing: `k` is this process's request rate over the last one to two `T` times `T`
(``rate_here x T``), at least one token, at most its share of the burst (``BURST_SHARE x
burst / processes``, whole): the fleet's leases hold at most half a burst at once. Redis
counts every lease's tokens out until it expires (spent or not) and refills the bucket
only to its burst less them, so over any window the fleet admits at most what the plain
bucket would: its refill plus its burst. A lease lasts `T`; it is renewed early, once it
is down to a quarter of its size or past three quarters of its life, while this process
still admits; an old lease with tokens left and no request since gives them back rather
than let them lapse.

Charges: every admission from a lease is recorded against its tenant (the cost in all
and the last admission's cost, per tenant, in order of first admission) and sent with
the next renewal, which charges them to the tenants' fairness tags in Redis as the
admissions would have been charged there one by one (``Scheduler._charge_leased``): the
fair queueing sees lease admissions, within one renewal of when they were made. At most
MAX_CHARGED tenants are recorded at once: a request of another tenant, the record full,
goes to Redis (charged there) rather than from the pool, so nothing is folded or lost and
the memory is bounded; a renewal sends at most MAX_CHARGED, and Redis charges as many as
its work bound allows (``charged``): the rest go with the next renewal. A Redis fault
(``pool.fault()``) drops the lease but not the charges: they stay, with the epoch of the
state they are of, for the first renewal once Redis is back (charged if that state is
there still, dropped with it if not), and so do a failed renewal's if it was refused
before anything was sent (``pool.failed(unsent)``); a renewal that may have run (a
timeout, a connection cut: a frozen Redis runs it when it resumes) is not sent again,
else it could be charged twice. Recorded and carried together, at most 2 x MAX_CHARGED
tenants at once."""

from __future__ import annotations

import itertools
import math

from ...scheduler import NO_LEASE, HeldLease, LeaseCharge

#: Renew once the pool is down to this share of the lease it got...
LOW_SHARE = 0.25
#: ... or this share of its life has passed.
OLD_SHARE = 0.75
#: ``THROTTLE_RATE_LEASE=auto``: T. Short, as fairness and priority across processes are
#: approximate within T while leases are out, and long enough that a process admitting
#: AUTO_MIN_TOKENS / T requests a second (40/s) fills a worthwhile lease.
AUTO_LEASE_S = 0.1
#: ``auto``: no lease smaller than this many tokens (this process's rate x T, within its
#: share of the burst): a lease call costs Redis about what one admission call does, so a
#: lease of k tokens saves about k - 1 calls; below 4 the saving is small, and a process
#: admitting a handful a second makes no lease call at all (its requests go to Redis).
AUTO_MIN_TOKENS = 4
#: The fleet's leases hold at most this share of the burst at once (each process's lease
#: at most its part of it): the rest stays in the bucket for requests that go to Redis.
BURST_SHARE = 0.5
#: A renewal that got less than it asked (someone waits, the bucket runs dry) is followed by
#: the next one after this share of T at the earliest: meanwhile requests go to Redis one
#: by one, as without leases, and a saturated budget sees few lease calls.
RETRY_SHARE = 0.5
#: Tenants whose admissions from leases one pool records at once, to charge at the next
#: renewal (and sends in one renewal at most): a request of another tenant while it is
#: full goes to Redis. A renewal's call grows with them (docs/performance.md), and a batch
#: call's work bound takes about 32 new tenants (the rest go with the next renewal).
MAX_CHARGED = 64


class RatePool:
    """Tokens of one lease, spent by this process until the lease expires."""

    def __init__(self, lease_s: float, *, auto: bool = False) -> None:
        if lease_s <= 0:
            raise ValueError("a lease lasts a positive time")
        #: T: how long a lease may be spent, from the moment its call was sent.
        self.lease_s = lease_s
        #: ``auto``: no lease below AUTO_MIN_TOKENS (see `wants`).
        self.auto = auto
        #: Unspent tokens, usable while ``now < expires_at``.
        self.tokens = 0
        self.expires_at = -math.inf
        #: The budget state's epoch the tokens came from ("": none held).
        self.epoch = ""
        #: The size of the last lease granted: the tokens it took and those the pool kept
        #: for it, spent meanwhile or not (the low-water mark is a share of it).
        self.size = 0
        #: The last lease as Redis counts it: its generation (0: none), its expiry in
        #: Redis's time and the tokens it counted out; and as the renewal out tells it
        #: (with the tokens it gives back and keeps).
        self.generation = 0
        self.until = 0.0
        self.counted = 0
        self.held: HeldLease = NO_LEASE
        #: A renewal call is out (`renewal` .. `granted`; the caller resets it if the call
        #: fails).
        self.renewing = False
        #: No renewal before this (the last one got nothing).
        self.retry_at = -math.inf
        #: Someone waits for the budget (`waits`): nothing is admitted from the pool, and
        #: the next renewal gives every token back (then it is cleared).
        self.yielding = False
        #: The renewal out gives everything back as someone waits: none after it before
        #: ``RETRY_SHARE`` of T (a budget at its edge does not lease and give back in turn).
        self._yielded = False
        #: This process's requests (cost), local or not, in the window open since `_start`
        #: and the one before it (since `_prev_start`): its rate over one to two T.
        self._count = 0
        self._prev_count = 0
        self._start: float | None = None
        self._prev_start = 0.0
        #: A request was seen since the last renewal; the tokens that renewal asked for.
        self._demand = False
        self._wanted = 0
        #: Admissions from leases not yet sent, per tenant: [cost in all, last cost], in
        #: order of first admission (at most MAX_CHARGED tenants, but for the rest of a
        #: renewal that Redis did not take); and the charges the renewal out carries.
        self._charges: dict[str, list[int]] = {}
        self.sending: list[LeaseCharge] = []
        #: Counters for metrics: admissions from the pool, requests seen, lease calls,
        #: tokens taken and given back, tokens that lapsed unspent.
        self.local_admissions = 0
        self.requests = 0
        self.calls = 0
        self.leased = 0
        self.returned = 0
        self.lapsed = 0

    def take(self, now: float, cost: int, queue_empty: bool, tenant: str = "") -> bool:
        """Admit a request of `tenant` and `cost` from the pool: only if the lease is
        unexpired, holds `cost` tokens, nothing of this process waits for the budget (it
        would be overtaken) and its tenant is recorded or has room among MAX_CHARGED. False:
        send it to Redis as without leases. Nothing while someone waits (`waits`)."""
        self.seen(now, cost)
        if self.yielding:
            return False
        if now >= self.expires_at:
            if self.tokens:
                self.lapsed += self.tokens
                self.tokens = 0
            return False
        if self.tokens < cost or not queue_empty:
            return False
        charge = self._charges.get(tenant)
        if charge is None:
            if len(self._charges) >= MAX_CHARGED:
                return False
            self._charges[tenant] = [cost, cost]
        else:
            charge[0] += cost
            charge[1] = cost
        self.tokens -= cost
        self.local_admissions += 1
        return True

    @property
    def pending(self) -> bool:
        """Admissions from leases not yet sent to be charged."""
        return bool(self._charges)

    def seen(self, now: float, cost: int) -> None:
        """Count a request of this process (admitted from the pool, or sent to Redis)."""
        start = self._start
        if start is None:
            self._start = self._prev_start = now
        elif now - start >= self.lease_s:
            self._prev_start, self._prev_count = start, self._count
            self._start, self._count = now, 0
        self._count += cost
        self._demand = True
        self.requests += 1

    def rate(self, now: float) -> float:
        """This process's requests per second over the last one to two T."""
        if self._start is None:
            return 0.0
        return (self._prev_count + self._count) / max(now - self._prev_start, self.lease_s)

    def due(self, now: float) -> bool:
        """Should a renewal start now? None is out, and: someone waits (`waits`) and the
        pool holds unexpired tokens (given back at once), or the pool is old (`old_at`)
        and holds tokens (given back before they lapse, a new lease only if this process
        saw a request since the last renewal: `wants`), or this process saw a request
        since and the pool is low or old."""
        if self.renewing:
            return False
        if self.yielding and self.tokens and now < self.expires_at:
            return True
        old = now >= self.old_at
        if old and self.tokens and now < self.expires_at:
            return True
        if not (self._demand or self._charges) or now < self.retry_at:
            return False
        return old or self.tokens <= self.size * LOW_SHARE

    @property
    def old_at(self) -> float:
        """When the lease is old enough to renew (or give back: the backend's timer)."""
        return self.expires_at - self.lease_s * (1.0 - OLD_SHARE)

    def wants(self, now: float, processes: int, burst: float) -> int:
        """The next lease's size: this process's rate times T, at least 1, at most its
        share of the burst (``BURST_SHARE x burst / processes``); 0: no request since the
        last renewal, a share below one token, or (``auto``) a size below
        AUTO_MIN_TOKENS (the process gives back what it holds and goes to Redis)."""
        share = math.floor(burst * BURST_SHARE / max(1, processes))
        if share < 1 or not self._demand:
            return 0
        size = max(1, min(share, math.ceil(self.rate(now) * self.lease_s)))
        if self.auto and size < AUTO_MIN_TOKENS:
            return 0
        return size

    def waits(self) -> None:
        """Someone started waiting for the budget in Redis (told on the grant list): admit
        nothing more from the pool; the next renewal (`due` at once, or when the one out
        is answered) gives every unspent token back and asks for none."""
        self.yielding = True

    def renewal(
        self, now: float, processes: int, burst: float, *, final: bool = False
    ) -> tuple[int, str, int]:
        """Start a renewal: (unspent tokens to give back, their epoch, tokens wanted). The
        pool keeps what it has up to the next lease's size (`wants`) and goes on spending
        it while the call is out; the rest leaves the pool now and goes back in the call
        (all of it if no request came since the last renewal, `final`: a process that
        stops, or someone waits: `waits`, cleared by this renewal). A lapsed lease gives
        nothing back."""
        target = 0 if final or self.yielding else self.wants(now, processes, burst)
        self._yielded, self.yielding = self.yielding, False
        alive = now < self.expires_at
        if not alive and self.tokens:
            self.lapsed += self.tokens
            self.tokens = 0
        keep = min(self.tokens, target)
        returned = self.tokens - keep
        self.tokens = keep
        self.held = HeldLease(self.generation, self.until, self.counted, returned, keep)
        self.returned += returned
        self.renewing = True
        self.calls += 1
        self._demand = False
        self._wanted = target - keep
        charges = self._charges
        names = list(itertools.islice(charges, MAX_CHARGED))
        self.sending = [LeaseCharge(name, *charges.pop(name)) for name in names]
        return returned, self.epoch, self._wanted

    def granted(
        self,
        sent: float,
        taken: int,
        epoch: str,
        *,
        kept: int | None = None,
        generation: int = 0,
        until: float = 0.0,
        charged: int | None = None,
    ) -> None:
        """A renewal's answer: `taken` tokens of the state of `epoch`, spendable with what
        the pool kept until `sent` + T (`sent`: the loop time before the call went out).
        What it kept lapses if Redis no longer counted it (`kept` below what the renewal
        kept: the last lease had expired there; None: all counted) or it is of another
        epoch (a state since lost). The new lease is Redis's `generation` until `until`.
        Redis took the first `charged` of the charges sent (None: all of them); the rest
        are sent again with the next renewal (not if the state is another: they went with
        the one they were of)."""
        self.renewing = False
        rest = self.sending[len(self.sending) if charged is None else charged :]
        self.sending = []
        if epoch != self.epoch:
            self._charges.clear()
        else:
            self._carry(rest)
        lost = epoch != self.epoch or (kept is not None and kept < self.held.kept)
        if lost and self.tokens:
            self.lapsed += self.tokens
            self.tokens = 0
        self.generation, self.until = generation, until
        self.counted = taken + (self.held.kept if kept is None else kept)
        self.tokens += taken
        # (what it took and what the pool kept: not less the tokens spent meanwhile)
        self.size = taken + (0 if lost else self.held.kept)
        self.leased += taken
        self.epoch = epoch
        self.expires_at = sent + self.lease_s if self.tokens else -math.inf
        if self._yielded:
            self._yielded = False
            self.retry_at = sent + self.lease_s * RETRY_SHARE
        elif taken >= self._wanted or not epoch:  # (no state yet: the next acquire makes it)
            self.retry_at = -math.inf
        else:
            self.retry_at = sent + self.lease_s * RETRY_SHARE

    def _carry(self, charges: list[LeaseCharge]) -> None:
        """Charges of a renewal that Redis did not take: sent again with the next one."""
        for name, cost, last in charges:
            charge = self._charges.get(name)
            if charge is None:
                self._charges[name] = [cost, last]
            else:
                charge[0] += cost  # (its last admission is the one recorded since)

    def failed(self, unsent: bool) -> None:
        """The renewal out failed. `unsent`: refused before anything was sent (it did not
        run): its charges go with the next renewal. Else it may have run (or run later):
        they are not sent again (charged twice otherwise)."""
        self.renewing = False
        if unsent:
            self._carry(self.sending)
        self.sending = []

    def fault(self) -> None:
        """A Redis fault: the lease is dropped (`drop`), not the admissions still to charge:
        they are their tenants' whatever Redis does. They stay, with their epoch, for the
        first renewal once Redis is back (charged if the state is there still, dropped
        with it if not: `granted`, the backend's new epoch). A renewal out resolves its
        own (`granted` or `failed`)."""
        charges, self._charges = self._charges, {}
        epoch, sending = self.epoch, self.sending
        self.drop()
        if charges or sending:
            self._charges, self.epoch, self.sending = charges, epoch, sending

    def skip(self, sent: float) -> None:
        """A renewal with nothing to give back and nothing wanted (a share of the burst
        below one token; ``auto``: a rate too low for a lease): no call (not counted);
        none again before ``RETRY_SHARE`` of T."""
        self.renewing = False
        self._yielded = False
        self.calls -= 1
        self.retry_at = sent + self.lease_s * RETRY_SHARE

    def drop(self) -> None:
        """Forget the lease (a Redis fault, a new epoch, limits that allow none): its
        tokens lapse (they left the bucket when leased; it refills without them). A
        renewal out stays out: its answer is a lease of the state it reached."""
        self.lapsed += self.tokens
        self.tokens = 0
        self.size = 0
        self._charges.clear()  # (their state is gone, or out of reach: not charged)
        self.sending = []
        self.epoch = ""
        self.expires_at = -math.inf
        self.generation, self.until, self.counted = 0, 0.0, 0
        self.yielding = False  # (nothing left to give back)
