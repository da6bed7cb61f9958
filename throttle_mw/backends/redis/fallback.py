"""What a process decides while Redis is unreachable: ``THROTTLE_FAILURE_MODE``.

``open`` admits (unthrottled), ``closed`` rejects with 503, ``local`` enforces
this process's share of the fleet's budget in memory: the limits divided by the
number of live processes last seen in Redis. In ``local`` mode a request that
was waiting in Redis when it went away joins the local queue (`adopt`), and
when Redis is back every local waiter leaves the local queue again
(`give_back`) to wait in Redis, so that one shared budget decides once more.
The leases this process still holds in Redis count in its local share (`held`):
their requests run on while Redis is away.

Callers always hold a `Waiting` of this module's own, never the local
backend's: moving a waiter out of the local queue must not settle it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ...scheduler import Limits, Policy, Reject, Request
from ...settings import FailureMode
from ..base import Admitted, Outcome, Waiting
from ..memory import MemoryBackend

UNAVAILABLE = Reject("unavailable", 1.0)


@dataclass(eq=False)
class _Local:
    request: Request
    caller: Waiting  # what the caller holds
    queued: Waiting  # the local backend's handle


class Fallback:
    def __init__(
        self, mode: FailureMode, limits: Limits, policy: Policy, held: Callable[[], int] = int
    ) -> None:
        self.mode = mode
        self.limits = limits
        #: Live processes last seen in Redis: this process enforces 1/fleet of the budget.
        self.fleet = 1
        self._policy = policy
        self._local: MemoryBackend | None = None
        #: The concurrency this process holds in Redis (its requests still run).
        self._held = held
        self._applied: tuple[Limits, int, int] | None = None  # the local budget's inputs
        self._waiting: dict[str, _Local] = {}
        #: Leases of the local budget: their cost, by request id.
        self._leases: dict[str, int] = {}
        self._withdrawn: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def holds(self) -> bool:
        """Are requests admitted here still running (or waiting here)?"""
        return bool(self._leases or self._waiting)

    def lease_costs(self) -> list[tuple[str, int]]:
        """The leases of the local budget (request id, cost), to count in Redis once back."""
        return list(self._leases.items())

    def held_changed(self) -> None:
        """A lease held in Redis was given back while Redis is away: the local share has
        room for one more."""
        if self.mode == "local" and self._local is not None:
            task = asyncio.get_running_loop().create_task(self._reapply())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reapply(self) -> None:
        await self._backend()

    def owns(self, request_id: str) -> bool:
        """Was this request decided here (waiting locally, or holding a local lease)?"""
        return request_id in self._waiting or request_id in self._leases

    def settle(self, request_id: str) -> Admitted | Reject:
        """The answer of `open` or `closed` mode."""
        if self.mode == "open":
            return Admitted(request_id, unthrottled=True)
        return UNAVAILABLE

    async def acquire(self, request: Request) -> Outcome:
        if self.mode != "local":
            return self.settle(request.id)
        outcome = await (await self._backend()).acquire(request)
        if isinstance(outcome, Waiting):
            caller = Waiting(
                request.id,
                outcome.deadline,
                outcome.estimated_wait_s,
                asyncio.get_running_loop().create_future(),
                outcome.limited,
            )
            self._follow(_Local(request, caller, outcome))
            return caller
        if isinstance(outcome, Admitted) and outcome.lease:
            self._leases[request.id] = request.cost
        return outcome

    def adopt(self, request: Request, waiting: Waiting) -> None:
        """A request waiting in Redis when Redis went away: settle it by the failure mode."""
        if waiting.future.done():
            return
        if self.mode != "local":
            waiting.future.set_result(self.settle(request.id))
            return
        task = asyncio.get_running_loop().create_task(self._adopt(request, waiting))
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, request: Request, waiting: Waiting) -> None:
        if waiting.future.done():
            return
        outcome = await (await self._backend()).acquire(request)
        if isinstance(outcome, Waiting):
            self._follow(_Local(request, waiting, outcome))
            return
        if isinstance(outcome, Admitted) and outcome.lease:
            self._leases[request.id] = request.cost
        if not waiting.future.done():
            waiting.future.set_result(outcome)

    def _follow(self, local: _Local) -> None:
        rid = local.request.id
        self._waiting[rid] = local

        def settled(future: asyncio.Future[Admitted | Reject]) -> None:
            if self._waiting.get(rid) is local:
                del self._waiting[rid]
            if rid in self._withdrawn or future.cancelled():
                self._withdrawn.discard(rid)
                return
            result = future.result()
            if isinstance(result, Admitted) and result.lease:
                self._leases[rid] = local.request.cost
            caller = local.caller.future
            if not caller.done():
                caller.set_result(result)
            elif caller.cancelled() or isinstance(caller.result(), Reject):
                self.release(rid)  # granted here after the caller had given up

        local.queued.future.add_done_callback(settled)

    async def cancel(self, waiting: Waiting) -> Admitted | Reject:
        local = self._waiting.get(waiting.request_id)
        if local is None or self._local is None:
            return waiting.future.result() if waiting.future.done() else UNAVAILABLE
        result = await self._local.cancel(local.queued)
        if isinstance(result, Admitted) and result.lease:
            self._leases[waiting.request_id] = local.request.cost
        if not waiting.future.done():
            waiting.future.set_result(result)
        return result

    def release(self, request_id: str) -> None:
        if request_id in self._leases:
            del self._leases[request_id]
            if self._local is not None:
                self._local.release(request_id)

    async def give_back(self) -> list[tuple[Request, Waiting]]:
        """Redis is back: take every waiter out of the local queue, unsettled, for Redis."""
        moved = []
        for rid, local in list(self._waiting.items()):
            if local.queued.future.done() or self._local is None:
                continue  # granted or rejected here already: it stays settled here
            self._withdrawn.add(rid)
            del self._waiting[rid]
            result = await self._local.cancel(local.queued)
            if isinstance(result, Reject):
                moved.append((local.request, local.caller))
                continue
            self._withdrawn.discard(rid)  # a grant won the race: the caller keeps it
            if result.lease:
                self._leases[rid] = local.request.cost
            if not local.caller.future.done():
                local.caller.future.set_result(result)
        return moved

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._local is not None:
            await self._local.stop()

    async def _backend(self) -> MemoryBackend:
        """The local budget: this process's share of the latest limits and fleet size, less
        what it still holds in Redis."""
        wanted = (self.limits, self.fleet, self._held())
        if self._local is None:
            self._local = MemoryBackend(share(*wanted), self._policy)
        elif self._applied != wanted:
            await self._local.set_limits(share(*wanted))
        self._applied = wanted
        return self._local


def share(limits: Limits, processes: int, held: int = 0) -> Limits:
    """One process's part of the fleet's limits, less the concurrency `held` in Redis by
    requests that still run. A learned limit's share is fixed at the last value learned:
    one process's samples must not steer the fleet's limit."""
    if limits.learned:
        limits = replace(limits, learned=False)
    if held and limits.concurrency is not None:
        part = limits.concurrency if processes <= 1 else math.floor(limits.concurrency / processes)
        return replace(share(limits, processes), concurrency=max(0, part - held))
    if processes <= 1:
        return limits
    return replace(
        limits,
        rate=None if limits.rate is None else limits.rate / processes,
        burst=max(1.0, limits.burst / processes),
        concurrency=None
        if limits.concurrency is None
        else max(1, math.floor(limits.concurrency / processes)),
        tenant_rate=None if limits.tenant_rate is None else limits.tenant_rate / processes,
        tenant_burst=max(1.0, limits.tenant_burst / processes),
    )
