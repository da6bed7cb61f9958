"""The fair-rate window: how fast the virtual clock moves, measured once a window.

The virtual clock advances by cost/weight per admission of a tenant held to
its share, so its speed is the *fair rate per unit of weight* (the water level
of max-min fairness). Waits are estimated in virtual time and turned into
seconds with this speed; the throughput measured over the same window stands
in for the capacity when there is no rate budget. The Lua twin is
``window.lua``, function for function.
"""

from __future__ import annotations

import math

from .constants import STALE_WINDOWS, WINDOW_S


class FairRateWindow:
    """Measurements of the last complete window; `roll` closes a window."""

    __slots__ = ("cost", "measured_at", "start", "throughput", "v0", "v_rate")

    def __init__(self, now: float) -> None:
        #: When the open window began, and the virtual clock then.
        self.start = now
        self.v0 = 0.0
        #: Cost admitted in the open window.
        self.cost = 0
        #: The last measurement: virtual-clock speed, admissions per second, and when.
        self.v_rate = 0.0
        self.throughput = 0.0
        self.measured_at = -math.inf

    def roll(self, now: float, vtime: float, busy: bool) -> None:
        """Close the open window and start the next one now: ``_refill`` once it is complete
        (``now - start >= WINDOW_S``), with `busy` whether requests wait now; ``_push``
        when a queue forms, not busy.

        The clock moves at the fair rate only while someone is held back: a window is
        measured only if requests waited throughout it, which is when they wait as it
        closes (`busy`), since a window starts anew whenever a queue forms. Over one in
        which nobody waited for a while, the clock moved as fast as the demand, and a rate
        of an idle stretch turned a queue's first waits into seconds beyond their maximum
        wait (README, "Waiting and rejecting"). Nor is one much longer than `WINDOW_S`
        measured: it spans a gap with no call, and says nothing of the current rate. The
        last measurement stands meanwhile, while fresh (the fair rate until a queue forms:
        ``_push`` drops it).
        """
        window = now - self.start
        if busy and window <= STALE_WINDOWS * WINDOW_S:
            self.v_rate = (vtime - self.v0) / window
            self.throughput = self.cost / window
            self.measured_at = now
        self.start, self.v0, self.cost = now, vtime, 0

    def fresh(self, now: float) -> bool:
        """Is the last measurement recent enough to go by?"""
        return now - self.measured_at <= STALE_WINDOWS * WINDOW_S
