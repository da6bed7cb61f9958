"""A circuit breaker, so a dead Redis is not hammered and a live one is back soon.

Closed: calls go through. The first failure opens it for a pause; while it is
open no call goes through (`allow` is false) but the one probe that the
backend's prober makes once the pause is over (`until_probe`). A success (the
probe's, or any call's that was still out) closes it; a failed probe opens it
again for twice the pause, up to `max_open_s`.

The pause after a probe runs from the probe's send (`probing`), not from its
failure: a probe sent into a partition that heals meanwhile fails only at its
timeout (its connection stays silent), and a pause counted from then would keep
the failure mode for the timeout and the whole pause after the network is back
(in `local` mode: this process's share beside the others' shared budget). Counted
from the send, the next probe goes at the later of the pause's end and the
failure: one probe out at a time, one per pause or per Redis timeout, whichever
is longer, so the shared budget is in use again within the longer of the two
after Redis answers (not their sum).

The pause grows once per failed probe, never once per failing caller: the
requests in flight when Redis went away fail together (and some, sent just
before, a whole timeout later), and they are one failure, not fifty. Only the
prober probes, so two probes are never out at once. With the default ceiling
of one second the shared budget is in use again within about a second of
Redis returning.

A failure is news only of when its call was sent. A call sent before the breaker
last closed (a heartbeat, a probe, a batch sent into a partition that healed
since) may time out after some other call found Redis back: that failure is old
news and must not open it again (the failure mode would apply beside the shared
budget for another pause). So a call takes the breaker's `generation` (the closes
so far) as it is sent, and its failure gives it back (`sent`): a failure of an
older generation is counted (`stale`) and nothing else.

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
        #: How many times it closed after being open: a call takes it as it is sent
        #: (`failure`'s `sent`). Read per call: an attribute.
        self.generation = 0
        #: Failures of calls sent before it last closed: ignored (old news).
        self.stale = 0
        #: When the probe out now was sent (`probing`); None: no probe out.
        self._probe_sent: float | None = None

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
        if self._open_until != 0.0:
            self.generation += 1  # calls out before this close: their failures are old news
        self._open_until = 0.0
        self.closed = True
        self._pause = self.first_open_s
        self._probe_sent = None

    def probing(self) -> int:
        """The prober sends its probe now: the pause after it, should it fail, runs from
        now (`probe_failed`). Returns its stamp (`generation`, as `failure`'s `sent`)."""
        self._probe_sent = self._clock()
        return self.generation

    def old(self, sent: int | None) -> bool:
        """Was a call stamped `sent` sent before the breaker last closed? (None: unknown,
        taken as new.)"""
        return sent is not None and sent != self.generation

    def failure(self, sent: int | None = None) -> None:
        """A call failed. Closed: open for the first pause. Open: a caller of the failure
        that opened it (or of the same outage), nothing new. Sent before the breaker last
        closed (`sent`, its `generation` then): old news, counted and ignored."""
        self.failures += 1
        if self.old(sent):
            self.stale += 1
            return
        if self._open_until == 0.0:
            self._open_until = self._clock() + self._pause
            self._pause = min(self.max_open_s, self._pause * 2)
            self.closed = False

    def probe_failed(self, sent: int | None = None) -> None:
        """The probe failed: open again until the pause from its send is over (`probing`;
        at once if it took longer, its timeout; from now if its send was not told); the
        next pause doubles. Unless another call closed the breaker while the probe was out
        (`sent`, as in `failure`): then its failure is old news."""
        self.failures += 1
        if self.old(sent):
            self.stale += 1
            return
        self.probes_failed += 1
        now = self._clock()
        since = now if self._probe_sent is None else self._probe_sent
        self._probe_sent = None
        self._open_until = max(now, since + self._pause)  # (> 0: open)
        self.closed = False
        self._pause = min(self.max_open_s, self._pause * 2)
