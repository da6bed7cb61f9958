"""A process's in flight over time: the load a window's latency was measured at.

The learned limit reads each window's *time-weighted* mean in flight: the integral
of the process's in flight over the window, divided by its length. It is kept here
exactly, at each admission and completion (the in flight only changes then), on one
clock: `InFlight` is a step function's running integral. Summed over a fleet's
processes, their time averages over the same stretch of time add up to the fleet's,
however the load balancer spreads requests.

Why not the mean of the in flight each request saw at its admission (what this
replaced)? Each request counts itself, and arrivals that bunch see more than the
time average: a process of Poisson arrivals reads the time average plus one, and a
fleet of P processes, each read so and summed, about P - 1 too many (13.1 for a
fleet holding 10 over four processes). Nor Little's law over the requests that
finished in the window (their service times summed over its length): exact on
average, but it lags whenever the throughput moves (the work in progress at the
window's end is missing), and reads low right when the app slows down.

The cost: two calls per learning request (`admit`, `finish`) in the middleware,
each an addition to a sum and to a count (the times they are given the middleware
reads anyway); nothing more in `WindowSummary.add`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class InFlight:
    """The process's requests in the app, and their integral over time since `take`.

    `admit(now)` and `finish(now)` bracket each request, `now` read from `clock`
    (time.perf_counter, the middleware's; a test's own). `take()` returns the
    in-flight seconds since the last take (the integral) and the seconds that
    covers, and starts anew: their ratio is the mean in flight over that time.

    The integral needs no step-by-step bookkeeping: up to `t`, each finished request
    contributes its end less its start and each running one `t` less its start, so
    it is (the ends) - (the starts) + running * t. Two sums and a count, each one
    addition per event, exact in whatever order the events are reported; a take
    starts them anew from its own time (the running requests as if admitted then).
    """

    __slots__ = ("_rest", "_taken", "clock", "ended", "running", "started")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        #: Requests admitted and not finished.
        self.running = 0
        #: Since the last take: the sum of the finished requests' ends, and of the
        #: admissions' times (the running requests' at the take counted at it).
        self.ended = 0.0
        self.started = 0.0
        self._taken = clock()
        #: The end of the last take's time that its lag kept back: ``(area, span)``.
        self._rest = (0.0, 0.0)

    def admit(self, now: float) -> int:
        """One more in flight from `now`; returns the in flight with it (itself
        included: what `Sample.in_flight` reports)."""
        self.started += now
        self.running += 1
        return self.running

    def finish(self, now: float) -> None:
        """One fewer in flight from `now`."""
        self.ended += now
        self.running -= 1

    def take(self, lag: float = 0.0, now: float | None = None) -> tuple[float, float]:
        """``(area, span)``: the in flight integrated over `span` seconds, from where the
        last take ended to `lag` seconds before `now` (default: `clock()`), and at least
        to the last take's `now`: each take's stretch ends where the next one's begins,
        so that over many takes every second is counted once. Within the time between
        two takes the in flight is taken as spread evenly.

        A window's requests were admitted about one service time before they finished:
        with `lag` their mean service time, the mean in flight is the load their
        latencies were measured at, as the in flight at their admissions was (a cut
        lowers the in flight at once, and the requests still finishing were admitted
        before it).
        """
        if now is None:
            now = self.clock()
        running = self.running
        area = self.ended - self.started + running * now
        span = now - self._taken
        self.ended, self.started, self._taken = 0.0, running * now, now
        # What the last take left for this one (the lag it kept back), then this take's
        # time up to its own lag; the rest waits for the next take.
        rest_area, rest_span = self._rest
        lag = min(max(lag, 0.0), span)
        kept = area * lag / span if lag > 0.0 else 0.0
        self._rest = (kept, lag)
        return rest_area + area - kept, rest_span + span - lag
