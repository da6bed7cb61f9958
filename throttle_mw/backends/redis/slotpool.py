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
2. Admission: ``pool.take(now, cost, queue_empty, leases)``: a kept lease id (admitted
   here, nothing sent) or None (to Redis as without the pool). A lease Redis admits:
   ``pool.admitted(now, lease, cost, born, leases)`` (the pool may keep it). Both count
   this process's busy slots (`leases`: its leases in Redis, kept ones included) for the
   pool's cap (``pool.busy(now, n)``: `n` requests hold a slot).
3. Release: ``pool.keep(now, lease)``: True: kept, nothing
   sent; False: released in Redis as without the pool (``pool.let_go(lease)`` when the
   backend does not ask). Its cap's share of the limit: ``pool.share(processes,
   concurrency)`` whenever the fleet's size or the limit changes.
4. ``pool.aged(now)`` (a timer at ``pool.next_at``, moved sooner when a slot kept ages
   before it): the slots to give back. ``pool.drain()``: all of them (limits changed,
   shutdown); ``pool.forget()`` (a fault or a new epoch: the backend forgets them rather
   than gives them back), and the leases running requests are not kept at their release;
   ``pool.forget(lease)`` when the heartbeat finds `lease` gone from Redis.

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
    """This process's kept slots: lease ids still held in Redis, none of them in use.

    What runs per request is a few dict operations and compares: ``take`` pops the slot
    kept last (a dict's last item, O(1); the others stay idle and age out) and scans, from
    the last, only when that one is of another cost or aged; ``keep`` reads the cap, set
    when what it depends on changes (the busy peak in ``busy`` and ``take``, the share
    when the backend tells ``share``); aging is checked against ``due_at``, a bound below
    which no kept slot ages, so ``aged`` scans only when a slot may be due (at most once
    per lease admitted: amortized O(1))."""

    def __init__(self, keep_s: float) -> None:
        if keep_s <= 0:
            raise ValueError("slots are kept for a positive time")
        #: T: a slot is kept until T after Redis admitted it.
        self.keep_s = keep_s
        #: The leases this pool may keep (`admitted`), kept or running a request, by lease
        #: id: (cost, when it ages: T after Redis admitted it). One tuple per lease, made
        #: at its admission and shared with `_kept`: nothing is allocated per request.
        self._held: dict[str, tuple[int, float]] = {}
        #: Kept slots (idle), by lease id, in the order kept: the last kept is taken first.
        self._kept: dict[str, tuple[int, float]] = {}
        #: No kept slot ages before this (inf: none kept): a bound, exact after `aged`.
        #: A slot taken out may leave it early: the next `aged` then finds nothing due
        #: and sets it anew.
        self.due_at = math.inf
        #: T after the latest reply saying nobody waits was heard: slots are taken and
        #: kept before then only (-inf: none, or one since said someone waits).
        self.quiet_until = -math.inf
        #: This process's peak of busy slots in the window ending at `_window_end` (-inf:
        #: none opened yet), and the most of it and the window's before (`_recent`).
        self._peak = 0
        self._prev_peak = 0
        self._recent = 0
        self._window_end = -math.inf
        #: This process's share of the limit (`share`: none until told), and the cap: the
        #: least of it and `_recent`, set whenever either changes (`keep` reads it).
        self._share = 0
        self._cap = 0
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
            until = now + self.keep_s
            if until > self.quiet_until:
                self.quiet_until = until
            return []
        self.quiet_until = -math.inf
        return self.drain()

    def admitted(self, now: float, lease: str, cost: int, born: float, leases: int) -> None:
        """Redis admitted `lease` (of `cost`, its acquire sent at `born`): the pool may keep
        it at its release. `leases`: this process's leases in Redis now, for `busy`."""
        self._held[lease] = (cost, born + self.keep_s)
        self.busy(now, leases - len(self._kept))

    def take(self, now: float, cost: int, queue_empty: bool, leases: int) -> str | None:
        """A kept slot of `cost` for a new request: only if nobody waited as last heard,
        less than T ago, and nothing of this process waits (it would be overtaken). None:
        send it to Redis as without the pool. `leases`: this process's leases in Redis
        (kept ones included), for `busy`."""
        kept = self._kept
        if not kept or not queue_empty or now >= self.quiet_until:
            return None
        lease, entry = kept.popitem()
        if entry[0] != cost or now >= entry[1]:
            kept[lease] = entry  # (back where it was: last)
            for lease, entry in reversed(kept.items()):  # (the next kept last)
                if entry[0] == cost and now < entry[1]:
                    del kept[lease]
                    break
            else:
                return None
        self.local_admissions += 1
        # `busy`, inline (once per admission): the window's end, then the peak.
        held = leases - len(kept)
        if now >= self._window_end:
            self._roll(now)
        if held > self._peak:
            self._peak = held
            if held > self._recent:
                self._recent = held
                self._cap = min(self._share, held)
        return lease

    def busy(self, now: float, held: int) -> None:
        """This process's requests holding a slot (a lease, kept ones not counted) now:
        for the peak (`cap`)."""
        if now >= self._window_end:
            self._roll(now)
        if held > self._peak:
            self._peak = held
            if held > self._recent:
                self._recent = held
                self._cap = min(self._share, held)

    def _roll(self, now: float) -> None:
        """A window of T is over: a new one from `now`; the one that ended is remembered
        if it ended less than T ago (else it, too, saw nothing)."""
        end = self._window_end
        if end != -math.inf:
            self._prev_peak = self._peak if now < end + self.keep_s else 0
            self._peak = 0
            self._recent = self._prev_peak
            self._cap = min(self._share, self._recent)
        self._window_end = now + self.keep_s

    @property
    def cap(self) -> int:
        """Slots this process may keep: its peak of busy slots over the last one to two
        T, and at most its share of the limit (`share`)."""
        return self._cap

    def share(self, processes: int, concurrency: int | None) -> None:
        """The fleet's size and the concurrency limit whose slots may be kept (None: no
        slot is), as this process last heard them: its share of the limit is
        ``KEPT_SHARE x concurrency / processes``, whole. Told when either changes."""
        if concurrency is None:
            self._share = 0
        else:
            self._share = math.floor(concurrency * KEPT_SHARE / max(1, processes))
        self._cap = min(self._share, self._recent)

    def keep(self, now: float, lease: str) -> bool:
        """A request of this process finished on `lease`: keep its slot (True: nothing to
        send) if the pool may (`admitted`), nobody waited as last heard less than T ago,
        the slot is younger than T and the pool is below its cap (`cap`); else False:
        release it in Redis (the pool forgets it)."""
        entry = self._held.get(lease)
        if entry is None:
            return False
        kept = self._kept
        if now >= self.quiet_until or now >= entry[1] or len(kept) >= self._cap:
            del self._held[lease]
            return False
        kept[lease] = entry
        if entry[1] < self.due_at:
            self.due_at = entry[1]
        self.kept += 1
        return True

    def let_go(self, lease: str) -> None:
        """`lease` goes back to Redis without `keep` (the backend would not keep it): the
        pool forgets its admission."""
        self._held.pop(lease, None)

    def aged(self, now: float) -> list[str]:
        """The kept slots T or more past their admission: to give back. Nothing to scan
        before `due_at`."""
        if now < self.due_at:
            return []
        kept = self._kept
        old = [lease for lease, (_, due) in kept.items() if now >= due]
        for lease in old:
            del kept[lease]
            del self._held[lease]
        self.due_at = min((due for _, due in kept.values()), default=math.inf)
        self.returned += len(old)
        return old

    @property
    def next_at(self) -> float | None:
        """When the oldest kept slot ages, or a little before (`due_at`: the backend's
        timer finds nothing then and asks again), or None: none kept."""
        return self.due_at if self._kept else None

    def drain(self) -> list[str]:
        """Every kept slot, to give back (limits changed, someone waits, shutdown)."""
        leases = self._drop(list(self._kept))
        self.returned += len(leases)
        return leases

    def forget(self, lease: str | None = None) -> list[str]:
        """Forget one slot (Redis no longer has it), or all (a fault, a new epoch): the kept
        ones, returned, have nothing to give back (they lapse in Redis as leases do); one
        running a request is not kept at its release, as Redis may have given its slot to
        another process (all of them after a fault: Redis may have let them lapse while
        this process could not renew them)."""
        leases = list(self._kept) if lease is None else [lease] if lease in self._kept else []
        self._drop(leases)
        if lease is None:
            self._held.clear()
        else:
            self._held.pop(lease, None)
        self.forgotten += len(leases)
        return leases

    def _drop(self, leases: list[str]) -> list[str]:
        kept, held = self._kept, self._held
        for lease in leases:
            del kept[lease]
            held.pop(lease, None)
        if not kept:
            self.due_at = math.inf
        return leases
