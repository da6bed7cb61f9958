"""Drive the scheduler with a fake clock: arrivals, service times, deadlines, ticks.

Time moves only from one event to the next, so runs are exact and take
milliseconds. Leases are released `service_s` after admission, as a backend
with that work time would.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from throttle_mw.priorities import Priority
from throttle_mw.scheduler import (
    Admit,
    Enqueue,
    Event,
    Evicted,
    Granted,
    Reject,
    Request,
    Scheduler,
)


@dataclass(frozen=True)
class Arrival:
    at: float
    tenant: str
    priority: Priority = "normal"
    cost: int = 1
    sheddable: bool = False
    degradable: bool = False
    service_s: float = 0.0
    #: The client goes away this long after arriving (None: it stays).
    leaves_after_s: float | None = None


@dataclass
class Outcome:
    arrival: Arrival
    admitted_at: float | None = None
    degraded: bool = False
    rejected: Reject | None = None
    rejected_at: float | None = None
    left: bool = False

    @property
    def waited_s(self) -> float | None:
        return None if self.admitted_at is None else self.admitted_at - self.arrival.at


@dataclass
class Simulation:
    scheduler: Scheduler
    outcomes: list[Outcome] = field(default_factory=list)
    in_service: int = 0
    max_in_service: int = 0

    def run(self, arrivals: Iterable[Arrival]) -> list[Outcome]:
        seq = itertools.count()
        queue: list[tuple[float, int, str, int]] = []
        for arrival in sorted(arrivals, key=lambda a: a.at):
            index = len(self.outcomes)
            self.outcomes.append(Outcome(arrival))
            heapq.heappush(queue, (arrival.at, next(seq), "arrive", index))
        ticks: set[float] = set()
        now = 0.0

        def admitted(index: int, lease: bool) -> None:
            outcome = self.outcomes[index]
            outcome.admitted_at = now
            self.in_service += 1
            self.max_in_service = max(self.max_in_service, self.in_service)
            heapq.heappush(queue, (now + outcome.arrival.service_s, next(seq), "done", index))

        def apply(events: Sequence[Event]) -> None:
            for event in events:
                index = int(event.id)
                if isinstance(event, Granted):
                    admitted(index, event.lease)
                elif isinstance(event, Evicted):
                    self.outcomes[index].rejected = event.reject
                    self.outcomes[index].rejected_at = now

        steps = 0
        while queue:
            steps += 1
            if steps > 10_000_000:
                raise RuntimeError("simulation does not converge")
            now, _, kind, index = heapq.heappop(queue)
            sched = self.scheduler
            if kind == "arrive":
                a = self.outcomes[index].arrival
                req = Request(str(index), a.tenant, a.priority, a.cost, a.sheddable, a.degradable)
                decision, events = sched.acquire(now, req)
                if isinstance(decision, Admit):
                    self.outcomes[index].degraded = decision.degraded
                    admitted(index, decision.lease)
                elif isinstance(decision, Enqueue):
                    heapq.heappush(queue, (decision.deadline, next(seq), "deadline", index))
                    if a.leaves_after_s is not None:
                        heapq.heappush(queue, (a.at + a.leaves_after_s, next(seq), "leave", index))
                else:
                    self.outcomes[index].rejected = decision
                    self.outcomes[index].rejected_at = now
                apply(events)
            elif kind in ("deadline", "leave"):
                reject, events = sched.cancel(now, str(index))
                if reject is not None:
                    if kind == "leave":
                        self.outcomes[index].left = True
                    else:
                        self.outcomes[index].rejected = reject
                        self.outcomes[index].rejected_at = now
                apply(events)
            elif kind == "done":
                self.in_service -= 1
                apply(sched.release(now, str(index)))
            else:
                ticks.discard(now)
                apply(sched.tick(now))
            due = sched.next_due(now)
            if due is not None and due not in ticks:
                ticks.add(due)
                heapq.heappush(queue, (max(due, now), next(seq), "tick", -1))
        return self.outcomes


def even(
    tenant: str, rate: float, start: float, end: float, phase: float = 0.0, **kwargs: object
) -> list[Arrival]:
    """Arrivals exactly 1/rate apart."""
    step = 1.0 / rate
    n = int((end - start - phase) / step)
    return [Arrival(start + phase + i * step, tenant, **kwargs) for i in range(n)]  # type: ignore[arg-type]


def poisson(
    tenant: str, rate: float, start: float, end: float, rng: random.Random, **kwargs: object
) -> list[Arrival]:
    """Arrivals of a Poisson process."""
    out = []
    t = start + rng.expovariate(rate)
    while t < end:
        out.append(Arrival(t, tenant, **kwargs))  # type: ignore[arg-type]
        t += rng.expovariate(rate)
    return out
