"""A circuit breaker, so a dead Redis is not hammered and a live one is back soon.

Closed: calls go through. After a failure it opens for a pause that doubles up
to `max_open_s`; then one probe call is let through (half-open). A success
closes it. With the default one-second ceiling the shared budget is in use
again within about a second of Redis returning.
"""

from __future__ import annotations

import time


class Breaker:
    def __init__(self, first_open_s: float = 0.1, max_open_s: float = 1.0) -> None:
        self._first = first_open_s
        self._max = max_open_s
        self._pause = first_open_s
        self._open_until = 0.0
        self._probing = False
        self.failures = 0

    @property
    def is_open(self) -> bool:
        return self._open_until > 0.0

    def allow(self) -> bool:
        """May a call go to Redis now? At most one probe while half-open."""
        if self._open_until == 0.0:
            return True
        if time.monotonic() < self._open_until or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._open_until = 0.0
        self._pause = self._first
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._open_until = time.monotonic() + self._pause
        self._pause = min(self._max, self._pause * 2)
        self._probing = False
