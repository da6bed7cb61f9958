"""A circuit breaker, so a dead Redis is not hammered and a live one is back soon.

Closed: calls go through. The first failure opens it for a pause; while it is
open no call goes through (`allow` is false) but the one probe that the
backend's prober makes once the pause is over (`until_probe`). A success (the
probe's, or any call's that was still out) closes it; a failed probe opens it
again for twice the pause, up to `max_open_s`.

The pause grows once per failed probe, never once per failing caller: the
requests in flight when Redis went away fail together (and some, sent just
before, a whole timeout later), and they are one failure, not fifty. Only the
prober probes, so two probes are never out at once. With the default ceiling
of one second the shared budget is in use again within about a second of
Redis returning.

The clock is given (``time.monotonic`` unless a test gives another).
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
        self.first_open_s = first_open_s
        self.max_open_s = max_open_s
        self._clock = clock
        #: The pause after the next failed probe.
        self._pause = first_open_s
        self._open_until = 0.0
        #: `allow`, as an attribute: read on every admission and release of a kept slot.
        self.closed = True
        #: Failures reported, every caller's (for the tests and the logs).
        self.failures = 0
        #: Probes that failed.
        self.probes_failed = 0

    @property
    def is_open(self) -> bool:
        return self._open_until > 0.0

    def allow(self) -> bool:
        """May a call go to Redis now? Only while closed (open: only the prober's probe)."""
        return self.closed

    def until_probe(self) -> float:
        """Seconds until the probe is due (0.0: due now, or closed)."""
        if self._open_until == 0.0:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def success(self) -> None:
        self._open_until = 0.0
        self.closed = True
        self._pause = self.first_open_s

    def failure(self) -> None:
        """A call failed. Closed: open for the first pause. Open: a caller of the failure
        that opened it (or of the same outage), nothing new."""
        self.failures += 1
        if self._open_until == 0.0:
            self._open_until = self._clock() + self._pause
            self._pause = min(self.max_open_s, self._pause * 2)
            self.closed = False

    def probe_failed(self) -> None:
        """The probe failed: open again, for the pause; the next one doubles."""
        self.failures += 1
        self.probes_failed += 1
        self._open_until = self._clock() + self._pause
        self.closed = False
        self._pause = min(self.max_open_s, self._pause * 2)
