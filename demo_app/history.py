"""The last two minutes of the concurrency limit against the store's slots, for the page.

The live page draws the limit in force as a line over time against the store's
true capacity. Sampled here, in the app, once a second from the moment it
starts, so a page opened mid-run (after the store slowed down) still shows
what happened before. Reading the limit costs no I/O: the backend's `limits`
are what this process last learned (with Redis, the fleet's limit as of its
last decision), so sampling never adds a Redis call.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

#: Seconds of history kept, and how often a point is taken.
KEEP_S: Final = 120.0
EVERY_S: Final = 1.0


class Point(NamedTuple):
    #: Wall-clock seconds (the page compares it with the stats' ``at``).
    at: float
    #: The concurrency limit in force; None: no concurrency limit (or the throttle off).
    limit: int | None
    #: The store's slots (its true capacity) and how many were busy.
    slots: int
    busy: int


class LimitHistory:
    """A bounded series of `Point`s, taken by `run` every `every_s` seconds."""

    def __init__(
        self,
        read: Callable[[], tuple[int | None, int, int]],
        *,
        keep_s: float = KEEP_S,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read = read
        self._every_s = every_s
        self._clock = clock
        self._points: deque[Point] = deque(maxlen=max(1, int(keep_s / every_s) + 1))

    def take(self) -> None:
        """Record one point now."""
        self._points.append(Point(self._clock(), *self._read()))

    async def run(self) -> None:
        """Take a point every `every_s` seconds until cancelled."""
        while True:
            self.take()
            await asyncio.sleep(self._every_s)

    def to_json(self) -> dict[str, object]:
        return {"fields": list(Point._fields), "rows": [list(p) for p in self._points]}
