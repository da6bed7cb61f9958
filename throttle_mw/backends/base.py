"""The contract every budget backend keeps (in-memory, Redis).

A backend makes the scheduler's decisions for one app, in one process or for
the whole fleet. The middleware calls it like this, and only like this:

1. ``outcome = backend.decide_now(request)``, and if that is None (the decision
   needs I/O), ``outcome = await backend.acquire(request)``: `Admitted`,
   `Waiting` or `Reject`. (The synchronous path spares the in-memory backend a
   coroutine per request: it is the hot path of every app within its budget.)
2. For `Waiting`: await ``waiting.future`` (it resolves to `Admitted` or
   `Reject`) until ``waiting.deadline``. To stop waiting early (deadline,
   client gone, shutdown) call ``await backend.cancel(waiting)``: it returns a
   `Reject` if the request left the queue, or `Admitted` if a grant won the race.
3. For every `Admitted` with ``lease=True``: call ``backend.release(request_id)``
   exactly once when the response is done. It does not block and survives
   cancellation of the caller; further calls are ignored.
4. While ``backend.learning`` (the concurrency limit is learned), bracket each
   admitted request with ``backend.flight.admit(now)`` (its in flight, for the
   sample) and ``backend.flight.finish(now)``, ``now`` read from
   ``time.perf_counter`` (``flight.clock``), and call ``backend.observe(sample)``
   once per finished admitted request: how long the app took and whether it
   failed. None of these blocks.

A backend may also offer ``fast_path()`` (`FastPathBackend`), returning a
`FastPath` or None (none for this backend, e.g. a subclass deciding its own
way). Then, for a request that is not sheddable, has no body to read ahead and
comes while not draining, the middleware first calls ``admit(clock(), key,
tenant, cost)`` with ``key = next(lease_keys)``: None (declined), or admitted
at once and whether it holds a lease, keyed by `key` (a number: no id string
or `Request` is made). It releases such a lease with ``release_at_once(key)``,
and if that is False, ``release(key)`` (step 3). Any other request, and one
``admit`` declined, gets its `Request` and ``decide_rest(request)`` in place of
``decide_now`` (step 1); if that is None, ``await acquire_rest(request)`` for a
request ``admit`` declined (the rest of `acquire`, without what ``admit``
already tried), ``await acquire(request)`` for any other. The in-memory
backend's ``admit`` and ``release_at_once`` are the scheduler's own
(``admit_unsheddable``, ``release_at_once``); the Redis backend's admit from
this process's lease of rate tokens or kept slots.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..scheduler import LeaseKey, Limits, Reject, Request, Snapshot
from ..scheduler.limit import InFlight, LimitState, Sample


class Admitted(NamedTuple):
    """The request may run. `lease`: it holds concurrency to release."""

    request_id: str
    waited_s: float = 0.0
    degraded: bool = False
    lease: bool = False
    #: Admitted without consulting the shared budget (failure mode `open`).
    unthrottled: bool = False


@dataclass(eq=False, slots=True)
class Waiting:
    """The request is queued; `future` resolves to its admission or rejection."""

    request_id: str
    #: Latest time to wait until, on the event loop's clock (``loop.time()``).
    deadline: float
    estimated_wait_s: float
    future: asyncio.Future[Admitted | Reject] = field(repr=False)
    #: Queued for the concurrency limit (`Enqueue.limited`): a learned limit's `Sample.waited`.
    limited: bool = False


Outcome = Admitted | Waiting | Reject


class Backend(Protocol):
    """A budget shared by one process (memory) or a fleet (Redis)."""

    async def start(self) -> None:
        """Connect and start background work (called at ASGI lifespan start-up)."""

    async def stop(self) -> None:
        """Reject whoever still waits, and leave nothing of this process behind."""

    def decide_now(self, request: Request) -> Outcome | None:
        """The decision if it needs no I/O, else None (then call `acquire`)."""

    async def acquire(self, request: Request) -> Outcome: ...

    async def cancel(self, waiting: Waiting) -> Admitted | Reject: ...

    def release(self, request_id: str) -> None: ...

    async def snapshot(self) -> Snapshot: ...

    async def set_limits(self, limits: Limits) -> None:
        """Change the budget at run time."""

    @property
    def learning(self) -> bool:
        """The concurrency limit is learned: `observe` wants a sample per request."""
        ...

    def observe(self, sample: Sample) -> None:
        """One finished admitted request, for the learned limit."""

    @property
    def flight(self) -> InFlight:
        """This process's requests in the app over time, for the learned limit: each
        window's mean in flight."""
        ...

    @property
    def learned(self) -> LimitState | None:
        """The learned limit's state as this process last saw it (None: not learning)."""
        ...

    @property
    def limits(self) -> Limits:
        """The limits in force as this process last learned them, without I/O (responses
        describe them): a live change reaches every process with its next decision."""
        ...


class FastPath(NamedTuple):
    """A backend's fast path (`FastPathBackend.fast_path`); see the module docstring."""

    #: The clock ``admit`` is given (the backend's own, e.g. the loop's).
    clock: Callable[[], float]
    #: The lease keys of requests ``admit`` is tried on: numbers unique to the backend.
    lease_keys: Iterator[int]
    #: (now, lease key, tenant, cost) -> None (declined) or whether it holds a lease.
    admit: Callable[[float, int, str, int], bool | None]
    #: A lease given back without more work (True), else ``release(key)`` follows.
    release_at_once: Callable[[LeaseKey], bool]
    #: In place of ``decide_now`` once the fast path is bound.
    decide_rest: Callable[[Request], Outcome | None]
    #: In place of ``acquire`` for a request ``admit`` declined.
    acquire_rest: Callable[[Request], Awaitable[Outcome]]


#: A `FastPath.release_at_once` that gives nothing back at once (every lease goes
#: through ``release``): a fast path without one, or none bound.
NOT_AT_ONCE: Callable[[LeaseKey], bool] = frozenset[LeaseKey]().__contains__


class FastPathBackend(Backend, Protocol):
    """A backend that offers a fast path to a caller deciding every request itself."""

    def fast_path(self) -> FastPath | None:
        """Bound once, in the event loop the backend runs on; None: no fast path."""


class RequestIds:
    """Ids unique across processes and hosts: a random process token and a counter."""

    def __init__(self) -> None:
        self.token = os.urandom(6).hex()
        #: An id is ``prefix + str(next(counter))``: the middleware builds it inline.
        self.prefix = self.token + "."
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        # Concatenation: several times cheaper than an f-string, once per request.
        return self.prefix + str(next(self.counter))
