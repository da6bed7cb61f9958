"""A process's kept concurrency slots (``THROTTLE_KEEP_SLOTS``): the pure rules.

Without it, each admission under a concurrency budget is two script calls: an acquire
(its lease goes in P:leases) and a release (it comes out). With it, a request of this
process that finishes while nobody waits for the budget (as the process last heard from
Redis) may leave its lease in Redis, counted in flight and renewed by the heartbeat like
any lease, in this pool: the process's next request of the same cost runs on it without
a Redis call. The concurrency bound stays exact (a kept slot is a lease in Redis); what
is traded is that an idle kept slot is unavailable to other processes for at most T, and
that fairness and priority across processes are approximate within T.

This module is the pool's state machine: no I/O and no clock of its own (every method is
given ``now``, the event loop's time), so its tests drive it on a fake clock. The
backend (``backend.py``) does the I/O:

1. Every Redis reply: ``pool.heard(now, quiet)`` (`quiet`: it said nobody waits); a
   reply saying someone waits returns every kept slot, to give back (one call for all).
2. Admission: ``pool.take(now, cost, queue_empty)``: a kept lease id (admitted here,
   nothing sent) or None (to Redis as without the pool). ``pool.busy(now, n)`` after
   each admission (`n`: this process's requests holding a slot): the pool's cap.
3. Release: ``pool.keep(now, lease, cost, born, processes, concurrency)``: True: kept,
   nothing sent; False: released in Redis as without the pool.
4. ``pool.aged(now)`` (a timer at ``pool.next_at``, and on each take and keep): the
   slots to give back. ``pool.drain()``: all of them (limits changed, shutdown, a fault
   or a new epoch: then the backend forgets them rather than gives them back).

A slot is kept until T after Redis admitted it (`born`: the acquire's send time), never
longer however often it is reused: each slot goes back to Redis at least every T, and
its release's reply tells the process whether anyone waits. A kept slot is taken only
while the process heard "nobody waits" less than T ago, and nothing of its own waits.
The pool holds at most this process's peak of busy slots over the last one to two T, and
at most its share of the limit (``KEPT_SHARE x concurrency / processes``, whole): the
fleet's idle kept slots are at most half the limit at once.
"""

from __future__ import annotations

import math

#: The fleet's kept slots are at most this share of the concurrency limit at once (each
#: process's at most its part of it): the rest is free for any process's requests.
KEPT_SHARE = 0.5


class SlotPool:
    """This process's kept slots: lease ids still held in Redis, none of them in use."""

    def __init__(self, keep_s: float) -> None:
        if keep_s <= 0:
            raise ValueError("slots are kept for a positive time")
        #: T: a slot is kept until T after Redis admitted it.
        self.keep_s = keep_s
        #: Kept slots by lease id: (cost, when Redis admitted it), oldest admission first.
        self._kept: dict[str, tuple[int, float]] = {}
        #: When the latest reply saying nobody waits was heard (-inf: none, or one since
        #: said someone waits).
        self.quiet_at = -math.inf
        #: This process's peak of busy slots in the window open since `_start`, and in the
        #: one before it.
        self._peak = 0
        self._prev_peak = 0
        self._start: float | None = None
        #: Counters for metrics: admissions from kept slots, slots kept at a release,
        #: kept slots given back (aged, someone waits, limits, shutdown) and forgotten
        #: (a fault, a new epoch, gone from Redis).
        self.local_admissions = 0
        self.kept = 0
        self.returned = 0
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, lease: object) -> bool:
        return lease in self._kept

    def heard(self, now: float, quiet: bool) -> list[str]:
        """A Redis reply (to a call sent at `now`) said whether anyone waits for the budget.
        Someone waits: every kept slot, to give back at once (they may be what it waits
        for), and none taken or kept until a reply says nobody waits again."""
        if quiet:
            self.quiet_at = max(self.quiet_at, now)
            return []
        self.quiet_at = -math.inf
        return self.drain()

    def _quiet(self, now: float) -> bool:
        return now - self.quiet_at < self.keep_s

    def take(self, now: float, cost: int, queue_empty: bool) -> str | None:
        """A kept slot of `cost` for a new request: only if nobody waited as last heard,
        less than T ago, and nothing of this process waits (it would be overtaken). None:
        send it to Redis as without the pool."""
        if not queue_empty or not self._quiet(now):
            return None
        for lease, (held, born) in self._kept.items():
            if held == cost and now < born + self.keep_s:
                del self._kept[lease]
                self.local_admissions += 1
                return lease
        return None

    def busy(self, now: float, held: int) -> None:
        """This process's requests holding a slot (a lease, kept ones not counted) now."""
        start = self._start
        if start is None:
            self._start = now
        elif now - start >= self.keep_s:
            self._prev_peak, self._peak = (self._peak if now - start < 2 * self.keep_s else 0), 0
            self._start = now
        if held > self._peak:
            self._peak = held

    def cap(self, processes: int, concurrency: int | None) -> int:
        """Slots this process may keep: its peak of busy slots over the last one to two
        T, and at most its share of the limit (``KEPT_SHARE x concurrency / processes``)."""
        if concurrency is None:
            return 0
        share = math.floor(concurrency * KEPT_SHARE / max(1, processes))
        return min(share, max(self._peak, self._prev_peak))

    def keep(
        self,
        now: float,
        lease: str,
        cost: int,
        born: float,
        processes: int,
        concurrency: int | None,
    ) -> bool:
        """A request of this process finished: keep its slot (True: nothing to send) if
        nobody waited as last heard less than T ago, the slot is younger than T and the
        pool is below its cap (`cap`); else False: release it in Redis."""
        if not self._quiet(now) or now >= born + self.keep_s:
            return False
        if len(self._kept) >= self.cap(processes, concurrency):
            return False
        self._kept[lease] = (cost, born)
        self.kept += 1
        return True

    def aged(self, now: float) -> list[str]:
        """The kept slots T or more past their admission: to give back."""
        old = [lease for lease, (_, born) in self._kept.items() if now >= born + self.keep_s]
        for lease in old:
            del self._kept[lease]
        self.returned += len(old)
        return old

    @property
    def next_at(self) -> float | None:
        """When the oldest kept slot ages (the backend's timer), or None: none kept."""
        if not self._kept:
            return None
        return min(born for _, born in self._kept.values()) + self.keep_s

    def drain(self) -> list[str]:
        """Every kept slot, to give back (limits changed, someone waits, shutdown)."""
        leases = list(self._kept)
        self._kept.clear()
        self.returned += len(leases)
        return leases

    def forget(self, lease: str | None = None) -> list[str]:
        """Forget one kept slot (Redis no longer has it), or all (a fault, a new epoch):
        nothing to give back, they lapse in Redis as leases do."""
        leases = list(self._kept) if lease is None else [lease] if lease in self._kept else []
        for each in leases:
            del self._kept[each]
        self.forgotten += len(leases)
        return leases
