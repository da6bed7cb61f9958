"""Rejection at arrival against the waits that followed, on the Python scheduler's fake clock.

    python bench/arrivalestimate.py [--variants main,seen,drain,floor] [--scenarios ...]

A request that cannot go at once is rejected at arrival when its estimated wait exceeds its
maximum wait (docs/design.md). Both ways of getting that wrong are counted, per scenario:

- ``expired``: queued, then rejected at its deadline, after its full wait (a 503 that an
  exact estimate would have sent at arrival);
- ``wrong``: rejected at arrival although it would have been admitted: the same run again
  with that one request queued (its estimate forced to 0) admits it within its wait, and
  admits more in all (``net``; a request let in only at another's cost is not counted).

Scenarios (``--seeds`` seeds each, service times uniform):

- ``bursts``: branch idlerate's bursts after idle gaps, with calm spells longer than the
  stale limit between them (every ``--gap`` s, 0.6 s long, tenants U, V, W at 25 and 40 a
  second each; service 50-350 ms; maximum wait 2 s; tenant queue limit 20), on a rate and
  concurrency budget whose slots hold the queue (rate 200, concurrency 4: some 20 a second),
  one whose rate and slots both do (rate 40 burst 8, concurrency 3), and a concurrency
  budget alone (4): the queue's first second goes by the rate or by nothing (leftover (a));
- ``credit``: the stopped-fleet test's traffic, open loop: 300 tenants, three requests
  each 0.3 s apart, the first ones uniform over 3 s (rate 200, concurrency 2, service
  5-15 ms, maximum wait 1.5 s): tenants served on banked credit hold the virtual clock
  back (leftover (b));
- ``flood``: the story's flood (tests/test_scheduler.py: A 10/s, B 30/s, C 150/s against
  a rate of 80, tenant queue limit 1,000): C's excess must be rejected at arrival.

Variants, all subclasses here (none is the scheduler's code): ``main`` (the scheduler as
it is); ``seen`` (a queue whose slots are full goes, in its first second, by its own
window: admitted plus in flight over its age, shared by the weight in line); ``drain``
(the fair-share wait capped by everything waiting over the measured throughput or the
rate); ``floor`` (the measured fair rate at least the measured throughput over the
weight in line now).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `tests` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.simulation import Arrival, Outcome, Simulation, poisson
from throttle_mw.scheduler import Limits, Policy, Reason, Scheduler
from throttle_mw.scheduler.constants import EPS
from throttle_mw.scheduler.state import Tenant, Waiter
from throttle_mw.settings import DEFAULT_MAX_WAIT_S


class Main(Scheduler):
    """The scheduler, with one request's estimate forced to 0 (`forced`: it queues)."""

    forced: str | None = None

    def _estimate(
        self, tenant: Tenant, rank: int, now: float, waiter: Waiter | None = None
    ) -> tuple[float, Reason]:
        if waiter is not None and waiter.id == self.forced:
            return 0.0, "overloaded"
        return super()._estimate(tenant, rank, now, waiter)


class Seen(Main):
    def _fair_rate(self, now: float, extra_weight: float = 0.0) -> float:
        speed = super()._fair_rate(now, extra_weight)
        window, concurrency = self._window, self._limits.concurrency
        if window.v_rate > 0 and window.fresh(now):
            return speed
        if concurrency is None or not self._waiting or self._in_flight + 1 <= concurrency:
            return speed
        elapsed = now - window.start
        if elapsed <= 0:
            return speed
        weight = self._active_weight + extra_weight
        seen = (window.cost + self._in_flight) / elapsed / (weight if weight > EPS else 1.0)
        return seen if not speed or seen < speed else speed


class Drain(Main):
    def _estimate(
        self, tenant: Tenant, rank: int, now: float, waiter: Waiter | None = None
    ) -> tuple[float, Reason]:
        wait, reason = super()._estimate(tenant, rank, now, waiter)
        if reason != "tenant_over_share" or wait <= 0:
            return wait, reason
        capacity = self._limits.rate
        window = self._window
        measured = window.throughput > 0 and window.fresh(now)
        if measured and (capacity is None or window.throughput < capacity):
            capacity = window.throughput
        if capacity:
            drain = sum(w.cost for w in self._waiting.values()) / capacity
            if self._limits.rate is not None:  # (the rate bound stands)
                own = sum(tenant.cost_by_rank[: rank + 1])
                drain = max(drain, (own - self._tokens) / self._limits.rate)
            wait = min(wait, drain)
        return wait, reason


class Floor(Main):
    def _fair_rate(self, now: float, extra_weight: float = 0.0) -> float:
        speed = super()._fair_rate(now, extra_weight)
        window = self._window
        if window.v_rate > 0 and window.fresh(now):
            weight = self._active_weight + extra_weight
            floor = window.throughput / (weight if weight > EPS else 1.0)
            return max(speed, floor)
        return speed


VARIANTS: dict[str, type[Main]] = {
    "main": Main,
    "seen": Seen,
    "drain": Drain,
    "floor": Floor,
}


def policy(max_wait_s: float, **kwargs: Any) -> Policy:
    return Policy({**DEFAULT_MAX_WAIT_S, "normal": max_wait_s}, **kwargs)


def bursts(per_s: float, gap: float) -> Callable[[int], list[Arrival]]:
    def make(seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        return sorted(
            (
                Arrival(a.at, a.tenant, service_s=0.05 + 0.3 * rng.random())
                for k in range(5)
                for t in "UVW"
                for a in poisson(t, per_s, gap * k, gap * k + 0.6, rng)
            ),
            key=lambda a: a.at,
        )

    return make


def credit(seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out = []
    for i in range(300):
        t0 = rng.uniform(0, 3)
        for k in range(3):
            at = t0 + 0.3 * k + 0.001 * rng.random()
            out.append(Arrival(at, f"t{i}", service_s=0.005 + 0.01 * rng.random()))
    return sorted(out, key=lambda a: a.at)


def flood(seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    return [
        *poisson("A", 10, 0, 40, rng),
        *poisson("B", 30, 0, 40, rng),
        *poisson("C", 150, 0, 40, rng),
    ]


#: name -> (limits, policy, arrivals by seed, counterfactuals?)
def scenarios(gap: float) -> dict[str, tuple[Limits, Policy, Callable[[int], list[Arrival]], bool]]:
    bursty = policy(2.0, tenant_queue_limit=20)
    out: dict[str, tuple[Limits, Policy, Callable[[int], list[Arrival]], bool]] = {}
    for name, limits in (
        ("rate200+conc4", Limits(rate=200, burst=20, concurrency=4)),
        ("rate40+conc3", Limits(rate=40, burst=8, concurrency=3)),
        ("conc4", Limits(concurrency=4)),
    ):
        for per_s in (25, 40):
            out[f"bursts {name} {per_s}/s"] = (limits, bursty, bursts(per_s, gap), True)
    out["credit"] = (Limits(rate=200, burst=20, concurrency=2), policy(1.5), credit, True)
    out["flood"] = (
        Limits(rate=80, burst=16),
        policy(DEFAULT_MAX_WAIT_S["normal"], tenant_queue_limit=1000),
        flood,
        False,
    )
    return out


def simulate(
    kind: type[Main], limits: Limits, pol: Policy, arrivals: list[Arrival], forced: str | None
) -> list[Outcome]:
    scheduler = kind(limits, pol, 0.0)
    scheduler.forced = forced
    return Simulation(scheduler).run(arrivals)


def count(
    kind: type[Main], limits: Limits, pol: Policy, arrivals: list[Arrival], counter: bool
) -> dict[str, int]:
    out = simulate(kind, limits, pol, arrivals, None)
    admitted = sum(o.admitted_at is not None for o in out)
    at_arrival = [
        i for i, o in enumerate(out) if o.rejected is not None and o.rejected_at == o.arrival.at
    ]
    expired = sum(o.rejected is not None and o.rejected_at != o.arrival.at for o in out)
    wrong = net = 0
    for i in at_arrival if counter else ():
        again = simulate(kind, limits, pol, arrivals, str(i))
        if again[i].admitted_at is not None:
            wrong += 1
            net += sum(o.admitted_at is not None for o in again) > admitted
    return {
        "arrivals": len(out),
        "admitted": admitted,
        "at_arrival": len(at_arrival),
        "wrong": wrong,
        "net": net,
        "expired": expired,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="main,seen,drain,floor")
    parser.add_argument("--scenarios", default="", help="names containing any of these (comma)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--gap", type=float, default=4.0, help="bursts' period, s")
    args = parser.parse_args()
    picked = [s for s in args.scenarios.split(",") if s]
    print("scenario | variant | arrivals | admitted | at arrival (wrong, net) | expired")
    for name, (limits, pol, arrivals, counter) in scenarios(args.gap).items():
        if picked and not any(p in name for p in picked):
            continue
        for variant in args.variants.split(","):
            total: dict[str, int] = {}
            for seed in range(args.seeds):
                for key, value in count(
                    VARIANTS[variant], limits, pol, arrivals(seed), counter
                ).items():
                    total[key] = total.get(key, 0) + value
            wrong = f"({total['wrong']}, {total['net']})" if counter else "(-)"
            print(
                f"{name} | {variant} | {total['arrivals']} | {total['admitted']} | "
                f"{total['at_arrival']} {wrong} | {total['expired']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
