"""A circuit breaker, so a dead Redis is not hammered and a live one is back soon.

Closed: calls go through. After a failure it opens for a pause; then one probe
call is let through (half-open). A success closes it; a failed probe opens it
again for twice the pause, up to `max_open_s`. The pause grows once per failed
probe, not once per failing caller: the requests in flight when Redis went
away fail together, and they are one failure, not fifty (a failure reported
while the breaker is open and its pause not over changes nothing). With the
default one-second ceiling the shared budget is in use again within about a
second of Redis returning.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self,
        first_open_s: float = 0.1,
        max_open_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._first = first_open_s
        self._max = max_open_s
        self._clock = clock
        #: The pause the next opening lasts.
        self._pause = first_open_s
        self._open_until = 0.0
        self._probing = False
        #: Failures reported (every caller's, counted for the tests and the logs).
        self.failures = 0

    @property
    def is_open(self) -> bool:
        return self._open_until > 0.0

    def allow(self) -> bool:
        """May a call go to Redis now? At most one probe while half-open."""
        if self._open_until == 0.0:
            return True
        if self._clock() < self._open_until or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._open_until = 0.0
        self._pause = self._first
        self._probing = False

    def failure(self) -> None:
        """A call failed. Closed, or its pause over (the probe, or a caller as late as it,
        failed): open for the pause, and double the next one. Within the pause: a caller of
        the failure that opened it, nothing new."""
        self.failures += 1
        now = self._clock()
        if now < self._open_until:
            return
        self._open_until = now + self._pause
        self._pause = min(self._max, self._pause * 2)
        self._probing = False
