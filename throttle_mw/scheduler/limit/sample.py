"""One finished admitted request: what the limit estimator learns from."""

from __future__ import annotations

from typing import NamedTuple


class Sample(NamedTuple):
    """A finished admitted request, reported once when its response is done.

    - `service_s`: seconds from its admission to its last body chunk (or to the
      app raising, or to the client leaving); the wait in the throttle's queue is
      not included, the wait in the app's own queue is (that is the overload signal).
    - `failed`: the app answered 5xx or raised, or the client timed out or left
      before the response ended.
    - `in_flight`: the process's requests in flight when it was admitted,
      itself included (`InFlight.admit`): the window's peak comes from it. (Its
      mean does not: each request counts itself, and arrivals see more than the
      time average; the window's mean is the in flight over its time,
      `WindowSummary.measure`.)
    - `waited`: it was queued in the throttle for the limit before its admission: the
      concurrency limit was full for it when it queued (`Enqueue.limited`). Not a
      request admitted at once (nor from a lease or a kept slot), nor one queued only
      for rate tokens, its tenant's cap or the requests ahead while the limit had
      room: a limit that holds most of a window's requests back is in use whatever
      the app's in flight; a rate pacing them is not the limit.
    """

    service_s: float
    failed: bool
    in_flight: int
    waited: bool = False
