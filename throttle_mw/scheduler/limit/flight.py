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
each a multiply and a few attribute updates; nothing more in `WindowSummary.add`.
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
    """

    __slots__ = ("_area", "_rest", "_since", "_taken", "clock", "running")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        #: Requests admitted and not finished.
        self.running = 0
        now = clock()
        #: The integral of `running` from `_taken` to `_since`, and those two times.
        self._area = 0.0
        self._since = now
        self._taken = now
        #: The end of the last take's time that its lag kept back: ``(area, span)``.
        self._rest = (0.0, 0.0)

    def admit(self, now: float) -> int:
        """One more in flight from `now`; returns the in flight with it (itself
        included: what `Sample.in_flight` reports)."""
        running = self.running
        self._area += running * (now - self._since)
        self._since = now
        self.running = running = running + 1
        return running

    def finish(self, now: float) -> None:
        """One fewer in flight from `now`."""
        running = self.running
        self._area += running * (now - self._since)
        self._since = now
        self.running = running - 1

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
        # A `now` behind the last change (read before it): count up to the change.
        since = max(now, self._since)
        area = self._area + self.running * (since - self._since)
        span = since - self._taken
        self._area, self._since, self._taken = 0.0, since, since
        # What the last take left for this one (the lag it kept back), then this take's
        # time up to its own lag; the rest waits for the next take.
        rest_area, rest_span = self._rest
        lag = min(max(lag, 0.0), span)
        kept = area * lag / span if lag > 0.0 else 0.0
        self._rest = (kept, lag)
        return rest_area + area - kept, rest_span + span - lag
