"""What the learned limit's measures cost per request: `WindowSummary.add` (once per
finished request) and the in-flight meter's `admit` + `finish` (the middleware's,
around every learning request), against the plain counter the meter replaced.

    python bench/inflightcost.py

Best of 9 repeats, nanoseconds per call (per request for the meter, its two
perf_counter reads included on both sides).
"""

from __future__ import annotations

import random
import time
import timeit

from throttle_mw.scheduler.limit import InFlight, Sample, WindowSummary


class _Counter:
    """The middleware's counter before the meter: one increment, one decrement."""

    __slots__ = ("running",)

    def __init__(self) -> None:
        self.running = 0


def main() -> None:
    rng = random.Random(1)
    samples = [
        Sample(rng.uniform(0.05, 0.15), rng.random() < 0.01, rng.randint(1, 12))
        for _ in range(1000)
    ]

    def add_all() -> None:
        add = WindowSummary().add
        for sample in samples:
            add(sample)

    best = min(timeit.repeat(add_all, number=200, repeat=9))
    print(f"WindowSummary.add: {best / 200 / len(samples) * 1e9:.0f} ns per sample")

    clock = time.perf_counter
    counter, flight = _Counter(), InFlight()

    def counted() -> None:
        counter.running += 1
        clock()
        clock()
        counter.running -= 1

    def metered() -> None:
        flight.admit(clock())
        flight.finish(clock())

    n = 300_000
    for name, request in (("counter (before)", counted), ("InFlight (after)", metered)):
        best = min(timeit.repeat(request, number=n, repeat=9))
        print(f"{name}: {best / n * 1e9:.0f} ns per request")


if __name__ == "__main__":
    main()
