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

    def roll(self, now: float, vtime: float) -> None:
        """Close the open window if it is complete; callers check ``now - start >= WINDOW_S``.

        A window much longer than `WINDOW_S` spans an idle gap: it says nothing about
        the current rate, so it is dropped rather than measured.
        """
        window = now - self.start
        if window <= STALE_WINDOWS * WINDOW_S:
            self.v_rate = (vtime - self.v0) / window
            self.throughput = self.cost / window
            self.measured_at = now
        self.start, self.v0, self.cost = now, vtime, 0

    def fresh(self, now: float) -> bool:
        """Is the last measurement recent enough to go by?"""
        return now - self.measured_at <= STALE_WINDOWS * WINDOW_S
