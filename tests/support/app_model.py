"""A simulated app of `c` slots behind a learned concurrency limit, on a fake clock.

Discrete events, seeded, no sleeps: time jumps from one arrival, completion or
estimator poll to the next, so a minute of simulated traffic takes well under a
second. The pieces, as in production:

- the load: open-loop Poisson arrivals at a rate that may change over time;
- the limiter (the middleware): admits while in flight < the estimator's limit,
  else queues the request outside the app (bounded length, bounded wait; a
  request that waited too long is dropped when its turn comes);
- the app: `slots` workers (like threads) and a FIFO queue inside the app beyond
  them; service times jittered around a mean (uniform within ±50%, or lognormal
  for a heavier tail), optionally failing a share of requests;
- the estimator: one `Sample` per finished request, with its time from
  admission to completion (the wait in the app's own queue included: that is
  the overload signal) and the in flight at its admission; the process's in
  flight over time (`InFlight`, on the simulated clock) gives each window's mean;
- or, with ``processes`` > 1, a fleet: requests spread over the processes
  (round-robin, or at random as a load balancer of random choice does), each
  process with its own `InFlight`, and the limit is the fleet's, stepped as
  `FleetLearner` steps it (`FleetLearnerModel`).

Slots, mean service time, load and failure share are step schedules: tuples of
``(from_s, value)``, so a test can halve the slots or double the work midway.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from throttle_mw.backends.redis.learner import fleet_lag, fleet_step
from throttle_mw.scheduler.limit import (
    InFlight,
    LimitConfig,
    LimitEstimator,
    LimitState,
    Sample,
    WindowSummary,
    initial_state,
)

#: A value that changes over time: ``(from_s, value)`` pairs, the first from 0.
Schedule = Sequence[tuple[float, float]]
Jitter = Literal["uniform", "lognormal"]
Spread = Literal["round-robin", "random"]
#: The order the app serves its own queue in: first come, first served, or any waiter
#: at random (a lock or pool whose freed slot goes to whichever waiter wakes first).
Order = Literal["fifo", "random"]

_ARRIVE, _DONE, _POLL = 0, 1, 2
#: A request in the app: when it was admitted, the in flight it saw (its process's),
#: whether it fails, its process, and whether it waited in the limiter's queue.
Item = tuple[float, int, bool, int, bool]
_NONE: Item = (0.0, 0, False, 0, False)


class FleetLearnerModel:
    """`FleetLearner` without Redis or real time: each process summarises its own
    samples and pushes the summary every half window (the processes staggered), an
    empty one too, with its in flight since its last push (`flights`, one per
    process); the first push after a window is over takes the fleet's step
    (`fleet_step`) and claims the next window. Same interface as `LimitEstimator`,
    but `observe` says which process measured."""

    def __init__(self, config: LimitConfig, flights: Sequence[InFlight], now: float) -> None:
        self._config = config
        self.state = initial_state(config)
        self.limit = self.state.in_force
        processes = len(flights)
        self._flights = flights
        self._lags = [0.0] * processes
        for flight in flights:
            flight.take(now)
        self._summaries = [WindowSummary() for _ in range(processes)]
        self._pushed: list[str] = []
        self._waits: list[str] = []  # P:lq's entries
        self._interval = config.window_s / 2
        self._pushes = [now + self._interval * (i + 1) / processes for i in range(processes)]
        self._claim_ends = now + config.window_s
        self._stepped_at = now

    @property
    def next_due(self) -> float:
        return min(self._pushes)

    def observe(self, sample: Sample, process: int = 0) -> None:
        self._summaries[process].add(sample)

    def poll(self, now: float) -> bool:
        before = self.limit
        for process, due in enumerate(self._pushes):
            if due > now:
                continue
            self._pushes[process] = due + self._interval
            summary, self._summaries[process] = self._summaries[process], WindowSummary()
            lag = self._lags[process] = fleet_lag(self._lags[process], summary)
            summary.measure(*self._flights[process].take(lag, due))
            self._pushed.append(f"p{process}|{summary.encode()}")
            if summary.waited:
                self._waits.append(f"p{process}|{summary.waited}")
            if now >= self._claim_ends:
                self._claim_ends = now + self._config.window_s
                elapsed = max(now - self._stepped_at, self._config.window_s)
                state, kept, kept_waits = fleet_step(
                    self._config, self.state, self._pushed, elapsed, self._waits
                )
                self._pushed, self._waits = kept, kept_waits
                if not kept:
                    self.state, self.limit, self._stepped_at = state, state.in_force, now
        return self.limit != before


def at(schedule: Schedule, now: float) -> float:
    """The schedule's value at `now`."""
    value = schedule[0][1]
    for start, v in schedule:
        if start > now:
            break
        value = v
    return value


def _next_change(schedule: Schedule, now: float) -> float:
    return next((start for start, _ in schedule if start > now), math.inf)


def service_sampler(jitter: Jitter, sigma: float = 0.6) -> Callable[[random.Random, float], float]:
    """Service times around a mean: uniform within ±50%, or lognormal with `sigma` (the
    log's standard deviation; 0.6 puts p99 near 4x the median) scaled to the mean."""
    if jitter == "uniform":
        return lambda rng, mean: mean * (0.5 + rng.random())
    shift = -0.5 * sigma * sigma
    return lambda rng, mean: mean * math.exp(rng.gauss(shift, sigma))


@dataclass
class AppModel:
    """Run with `run(until)`, as often as needed; read the records in between."""

    slots: Schedule
    mean_s: Schedule
    load: Schedule  # arrivals per second
    config: LimitConfig = field(default_factory=LimitConfig)
    jitter: Jitter = "uniform"
    fail_share: Schedule = ((0.0, 0.0),)
    queue_limit: int = 1000
    max_wait_s: float = 2.0
    seed: int = 1
    processes: int = 1
    spread: Spread = "round-robin"
    order: Order = "fifo"

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.spread_rng = random.Random(self.seed + 1000)  # the load balancer's own
        self.order_rng = random.Random(self.seed + 2000)  # the app queue's, if random
        self.service = service_sampler(self.jitter)
        self.now = 0.0
        #: Each process's requests in the app over time, on the simulated clock.
        self.flights = [InFlight(lambda: self.now) for _ in range(self.processes)]
        self.estimator: LimitEstimator | FleetLearnerModel = (
            LimitEstimator(self.config, 0.0, self.flights[0])
            if self.processes == 1
            else FleetLearnerModel(self.config, self.flights, 0.0)
        )
        self._turn = 0  # the process the next admission goes to (round-robin)
        self.in_flight = 0  # admitted, not finished: in service or in the app's queue
        self.busy = 0  # in service
        self.app_queue: deque[Item] = deque()
        self.waiting: deque[float] = deque()  # the limiter's queue: arrival times
        self._events: list[tuple[float, int, int, Item]] = []
        self._seq = 0
        #: Records: the limit in force after every poll and every state the estimator
        #: went through, counts, the peak in flight (reset it to measure a stretch).
        self.limits: list[tuple[float, int]] = [(0.0, self.estimator.limit)]
        self.states: list[LimitState] = [self.estimator.state]
        self.completed = 0
        self.rejected = 0
        self.peak_in_flight = 0
        self._push(self._next_arrival(0.0), _ARRIVE, _NONE)
        self._push(self.estimator.next_due, _POLL, _NONE)

    # --- reading the records ---------------------------------------------------------

    def limits_between(self, start: float, end: float) -> list[int]:
        return [limit for t, limit in self.limits if start <= t < end]

    def limit_at(self, now: float) -> int:
        return next(limit for t, limit in reversed(self.limits) if t <= now)

    # --- the event loop --------------------------------------------------------------

    def run(self, until: float) -> None:
        events = self._events
        while events and events[0][0] <= until:
            now, _, kind, item = heapq.heappop(events)
            self.now = now
            if kind == _ARRIVE:
                self._arrive(now)
            elif kind == _DONE:
                self._done(now, item)
            else:
                self.estimator.poll(now)
                self.limits.append((now, self.estimator.limit))
                if self.estimator.state is not self.states[-1]:
                    self.states.append(self.estimator.state)
                self._start_service(now)
                self._admit_waiting(now)
                self._push(self.estimator.next_due, _POLL, item)
        self.now = until

    def _push(self, when: float, kind: int, item: Item) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, item))

    def _next_arrival(self, now: float) -> float:
        while (rate := at(self.load, now)) <= 0.0:
            now = _next_change(self.load, now)
            if now == math.inf:
                return math.inf
        return now + self.rng.expovariate(rate)

    def _arrive(self, now: float) -> None:
        self._push(self._next_arrival(now), _ARRIVE, _NONE)
        if self.in_flight < self.estimator.limit and not self.waiting:
            self._admit(now)
        elif len(self.waiting) < self.queue_limit:
            self.waiting.append(now)
        else:
            self.rejected += 1

    def _admit(self, now: float, waited: bool = False) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        failed = self.rng.random() < at(self.fail_share, now)
        if self.spread == "random":
            process = self.spread_rng.randrange(self.processes)
        else:
            process = self._turn
            self._turn = (process + 1) % self.processes
        running = self.flights[process].admit(now)
        self.app_queue.append((now, running, failed, process, waited))
        self._start_service(now)

    def _start_service(self, now: float) -> None:
        slots = at(self.slots, now)
        while self.busy < slots and self.app_queue:
            self.busy += 1
            if self.order == "random" and len(self.app_queue) > 1:
                index = self.order_rng.randrange(len(self.app_queue))
                self.app_queue.rotate(-index)
                item = self.app_queue.popleft()
                self.app_queue.rotate(index)
            else:
                item = self.app_queue.popleft()
            self._push(now + self.service(self.rng, at(self.mean_s, now)), _DONE, item)

    def _done(self, now: float, item: Item) -> None:
        admitted_at, in_flight, failed, process, waited = item
        self.busy -= 1
        self.in_flight -= 1
        self.flights[process].finish(now)
        self.completed += 1
        sample = Sample(now - admitted_at, failed, in_flight, waited)
        if isinstance(self.estimator, FleetLearnerModel):
            self.estimator.observe(sample, process)
        else:
            self.estimator.observe(sample)
        self._start_service(now)
        self._admit_waiting(now)

    def _admit_waiting(self, now: float) -> None:
        while self.waiting and self.in_flight < self.estimator.limit:
            arrived = self.waiting.popleft()
            if now - arrived <= self.max_wait_s:
                self._admit(now, waited=True)
            else:
                self.rejected += 1
