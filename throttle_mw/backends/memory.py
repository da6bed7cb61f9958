"""The in-memory backend: the scheduler run directly, on the event loop's clock.

One budget per process. Every scheduler call is synchronous and runs without
an ``await`` in between, so each decision is atomic within the event loop.
A single timer wakes the scheduler when its next token is due. A learned
concurrency limit (``THROTTLE_CONCURRENCY=auto``) is this process's own: the
estimator steps as samples arrive, and the scheduler takes each new limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Iterable

from ..scheduler import (
    Admit,
    Enqueue,
    Event,
    Evicted,
    Granted,
    LeaseKey,
    Limits,
    Policy,
    Reject,
    Request,
    Scheduler,
    Snapshot,
)
from ..scheduler.limit import InFlight, LimitConfig, LimitEstimator, LimitState, Sample
from .base import Admitted, FastPath, Outcome, Waiting

_new_tuple = tuple.__new__
#: `Admit.lease`, by index (a NamedTuple's attribute access is a generic lookup in 3.11).
_LEASE = 2


class MemoryBackend:
    """A budget kept in this process's memory."""

    def __init__(self, limits: Limits, policy: Policy, learn: LimitConfig | None = None) -> None:
        self._limits = limits
        self._policy = policy
        self._learn = learn or LimitConfig()
        self._estimator: LimitEstimator | None = None
        #: The concurrency limit is learned (`observe` wants samples): whether
        #: `_estimator` is set, kept as a plain attribute because the middleware
        #: reads it for every request.
        self.learning = False
        #: This budget's requests in the app over time (the middleware brackets each
        #: learning request): each window's mean in flight.
        self.flight = InFlight()
        self._scheduler: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, Waiting] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: Lease keys of the fast path: numbers, unique within this backend (which
        #: several middlewares may share).
        self._lease_keys = itertools.count(1)

    def _sched(self) -> tuple[Scheduler, float]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        scheduler = self._scheduler
        if scheduler is None:
            if self._limits.learned:
                self._estimator = LimitEstimator(self._learn, now, self.flight)
                self.learning = True
                self._limits = self._learned_limits(self._limits)
            scheduler = self._scheduler = Scheduler(self._limits, self._policy, now)
        return scheduler, now

    async def start(self) -> None:
        self._sched()

    async def stop(self) -> None:
        for waiting in list(self._waiters.values()):
            await self.cancel(waiting)
            if not waiting.future.done():
                waiting.future.set_result(Reject("shutting_down", 1.0))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def acquire(self, request: Request) -> Outcome:
        return self.decide_now(request)

    def fast_path(self) -> FastPath | None:
        """For a caller that decides every request itself (the middleware): the
        loop's clock, a source of lease keys (numbers: no id string is made for a
        request admitted at once), the scheduler's ``admit_unsheddable`` (the caller
        sends sheddable requests to `decide_rest` itself) and ``release_at_once``,
        called without a frame of this backend's in between, and `decide_rest` for
        the requests ``admit_unsheddable`` declined (with their id strings). The same
        decisions as `decide_now` and `release` (which takes a lease key too): the
        scheduler and the loop are this backend's for good once it has started.
        None for a subclass that decides or releases its own way."""
        kind = type(self)
        if kind.decide_now is not MemoryBackend.decide_now or kind.release is not (
            MemoryBackend.release
        ):
            return None
        scheduler, _ = self._sched()
        assert self._loop is not None
        return FastPath(
            self._loop.time,
            self._lease_keys,
            scheduler.admit_unsheddable,
            scheduler.release_at_once,
            self.decide_rest,
            self.acquire,  # (never called: `decide_rest` always decides)
        )

    def decide_now(self, request: Request) -> Outcome:
        """Every decision here is made at once, in memory."""
        scheduler = self._scheduler
        loop = self._loop
        if scheduler is None or loop is None:
            scheduler, now = self._sched()
        else:
            now = loop.time()
        admit = scheduler.admit_at_once(now, request)
        if admit is not None:
            # tuple.__new__ skips the NamedTuple's Python-level __new__: this runs per request.
            return _new_tuple(Admitted, (request[0], 0.0, False, admit[_LEASE], False))
        return self._decide(scheduler, now, request)

    def decide_rest(self, request: Request) -> Outcome:
        """`decide_now` for a request the scheduler's ``admit_at_once`` just declined
        (`fast_path`): the full decision, as of now."""
        scheduler, now = self._sched()
        return self._decide(scheduler, now, request)

    def _decide(self, scheduler: Scheduler, now: float, request: Request) -> Outcome:
        decision, events = scheduler.acquire(now, request)
        if events:
            self._apply(events)
        if isinstance(decision, Admit):
            if not scheduler.idle:
                self._schedule(scheduler, now)
            return Admitted(request.id, 0.0, decision.degraded, decision.lease)
        if isinstance(decision, Enqueue):
            assert self._loop is not None
            waiting = Waiting(
                request.id,
                decision.deadline,
                decision.estimated_wait_s,
                self._loop.create_future(),
                decision.limited,
            )
            self._waiters[request.id] = waiting
            self._schedule(scheduler, now)
            return waiting
        self._schedule(scheduler, now)
        return decision

    async def cancel(self, waiting: Waiting) -> Admitted | Reject:
        scheduler, now = self._sched()
        reject, events = scheduler.cancel(now, waiting.request_id)
        self._waiters.pop(waiting.request_id, None)
        self._apply(events)
        self._schedule(scheduler, now)
        if reject is not None:
            if not waiting.future.done():
                waiting.future.set_result(reject)
            return reject
        if waiting.future.done() and not waiting.future.cancelled():
            return waiting.future.result()
        return Reject("expired", 1.0)  # never queued here: nothing to give back

    def release(self, request_id: LeaseKey) -> None:
        scheduler = self._scheduler
        if scheduler is None or self._loop is None:
            return
        if scheduler.release_at_once(request_id):
            return  # nobody waits: no clock, no dispatch
        now = self._loop.time()
        events = scheduler.release(now, request_id)
        if events:
            self._apply(events)
        if not scheduler.idle:
            self._schedule(scheduler, now)

    async def snapshot(self) -> Snapshot:
        scheduler, now = self._sched()
        # A tick may grant or evict waiters: deliver its events like any other call's.
        self._apply(scheduler.tick(now))
        self._schedule(scheduler, now)
        snapshot = scheduler.snapshot()
        if self._estimator is not None:
            snapshot = dataclasses.replace(snapshot, learned=self._estimator.state)
        return snapshot

    @property
    def limits(self) -> Limits:
        """The scheduler's limits: those of `set_limits` once it was called."""
        scheduler = self._scheduler
        return self._limits if scheduler is None else scheduler.limits

    @property
    def learned(self) -> LimitState | None:
        return None if self._estimator is None else self._estimator.state

    def observe(self, sample: Sample) -> None:
        estimator = self._estimator
        if estimator is None or self._loop is None:
            return
        estimator.observe(sample)
        now = self._loop.time()
        if now >= estimator.next_due and estimator.poll(now):
            scheduler = self._scheduler
            assert scheduler is not None
            limits = self._learned_limits(scheduler.limits)
            self._apply(scheduler.set_limits(limits, now))
            self._schedule(scheduler, now)

    def _learned_limits(self, limits: Limits) -> Limits:
        assert self._estimator is not None
        return dataclasses.replace(limits, concurrency=self._estimator.limit, learned=True)

    async def set_limits(self, limits: Limits) -> None:
        scheduler, now = self._sched()
        if not limits.learned:
            self._estimator = None
        else:
            if self._estimator is None:
                self._estimator = LimitEstimator(self._learn, now, self.flight)
            limits = self._learned_limits(limits)
        self.learning = self._estimator is not None
        self._limits = limits
        self._apply(scheduler.set_limits(limits, now))
        self._schedule(scheduler, now)

    def _apply(self, events: Iterable[Event]) -> None:
        for event in events:
            waiting = self._waiters.pop(event.id, None)
            if isinstance(event, Granted):
                if waiting is None or waiting.future.done():
                    # Nobody is waiting for it any more: give the capacity back.
                    if event.lease and self._scheduler is not None and self._loop is not None:
                        self._apply(self._scheduler.release(self._loop.time(), event.id))
                    continue
                waiting.future.set_result(Admitted(event.id, event.waited_s, False, event.lease))
            elif isinstance(event, Evicted) and waiting is not None and not waiting.future.done():
                waiting.future.set_result(event.reject)

    def _schedule(self, scheduler: Scheduler, now: float) -> None:
        due = scheduler.next_due(now)
        if due is None:
            return
        if self._timer is not None and self._timer_at <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = due
        self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._scheduler is None or self._loop is None:
            return
        now = self._loop.time()
        self._apply(self._scheduler.tick(now))
        self._schedule(self._scheduler, now)
