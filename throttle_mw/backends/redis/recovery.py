"""Redis lost and back: the failure mode, orphaned requests, and re-submission.

A circuit breaker (``breaker.py``) keeps a dead Redis from being hammered and
brings the shared budget back within about a second of its return: while it
is open no call goes to Redis but the probe that `_probe_loop` makes when its
pause is over. While Redis is away, `THROTTLE_FAILURE_MODE` decides
(``fallback.py``).

Requests waiting in Redis when it fails keep waiting for `SETTLE_S`: a blip (a
restart, a failover) costs them nothing, as they are submitted again once Redis
answers. If Redis is still away after that, the failure mode settles them.
Requests whose fate in Redis is unknown (a call failed after it may have run)
are *orphans*: once Redis is back they are taken out of the queue and their
leases given back, idempotently.

Redis back *empty* (restarted without its data, a failover to an empty replica)
has lost the leases of requests that still run. Every batch reply carries the
epoch of the budget's state, made anew with it: a process that sees a new one
reclaims the leases it holds (`_new_epoch`), and the state admits nothing new
for a short grace meanwhile (store.lua, "A state made anew"), so the fleet does
not admit a second budget's worth on top of what runs. While Redis is away, a
process that holds leases probes it every `HOLDING_PROBE_S`, well within that
grace, so it is back in time to reclaim them. Leases this process's
failure mode admitted while Redis was away are registered too, as far as the
limit has room for them.

The grant listener's own connection failing (dropped by a proxy, `CLIENT KILL`,
an idle timeout) is not Redis failing: the listener reconnects by itself, and
one PING on the call path's connections decides whether Redis is away
(`_listener_lost`); only then does the breaker open for everyone. Once the
listener is back, the waiters are submitted again (a grant popped just as its
connection died would be lost otherwise).

`Recovery` is the half of `RedisBackend` that does this; the backend
(``backend.py``) is the other half, the call path. It shares the backend's
record of this process's requests and calls back into it for the few things
recovery needs from the call path (the hooks at the end of the class).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from ...scheduler import Request
from ...settings import Settings, redis_endpoint
from ..base import Outcome, Waiting
from . import connection, protocol
from .batcher import UNANSWERED, Batcher
from .breaker import Breaker
from .fallback import Fallback
from .grants import GrantListener
from .protocol import Op

logger = logging.getLogger("throttle_mw.redis")

#: How long requests waiting in Redis wait out a Redis failure before the failure mode
#: settles them (a restart or a failover is over by then).
SETTLE_S = 1.0
#: While the breaker is open, a process that holds leases probes at least this often: if
#: Redis comes back empty, it must reclaim them within the grace in which the new state
#: admits nothing (scripts.RECLAIM_GRACE_S, 0.5 s), or the fleet admits on top of them.
HOLDING_PROBE_S = 0.25


@dataclass(eq=False)
class Waiter:
    """A request of this process waiting in Redis."""

    request: Request
    waiting: Waiting
    started: float


class Recovery:
    """Failure handling and recovery of `RedisBackend` (see the module docstring)."""

    _settings: Settings
    #: Which Redis (scheme, host, port, db; no credentials): every log line about it says.
    endpoint: str
    _breaker: Breaker
    _fallback: Fallback
    _batcher: Batcher | None
    #: This process's requests waiting in Redis, by id.
    _waiters: dict[str, Waiter]
    #: Ids whose state in Redis is unknown: taken out of queue and leases once it is back.
    _orphans: set[str]
    _settle: asyncio.TimerHandle | None
    _tasks: set[asyncio.Task[None]]
    #: Leases held in Redis: (cost, a loop time by which Redis had given or renewed it).
    _leases: dict[str, tuple[int, float]]
    _epoch: str
    _clients: connection.Clients | None
    #: A check that the grant listener's failure asked for is running (`_listener_lost`).
    _checking: bool
    #: `_probe_loop` is running.
    _probing: bool
    _listener: GrantListener | None

    def _init_recovery(self, settings: Settings, fallback: Fallback) -> None:
        self._settings = settings
        assert settings.redis_url is not None
        self.endpoint = redis_endpoint(settings.redis_url, cluster=settings.redis_cluster)
        self._breaker = Breaker()
        self._fallback = fallback
        self._waiters = {}
        self._orphans = set()
        self._settle = None
        self._tasks = set()
        self._checking = False
        self._probing = False

    # --- Redis lost -----------------------------------------------------------------------

    def _on_failure(self, exc: BaseException | None = None, sent: int | None = None) -> None:
        """A call to Redis failed: open the breaker; waiters settle if it stays away. A call
        sent before the breaker last closed (`sent`: the breaker's generation as it was
        sent; `Breaker.failure`) is old news: nothing (the batcher sends its own such calls
        again, `Batcher._send`)."""
        if self._breaker.old(sent):
            self._breaker.failure(sent)  # (counted: `stale`)
            return
        first = not self._breaker.is_open
        self._breaker.failure()
        if first:
            logger.warning(
                "throttle_mw: Redis at %s unavailable (%s); failure mode %r",
                self.endpoint,
                type(exc).__name__ if exc is not None else "connection lost",
                self._settings.failure_mode,
            )
        self._watch()
        if self._waiters and self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(SETTLE_S, self._settle_waiters)

    def _watch(self) -> None:
        """The breaker is open: make sure someone probes it."""
        if self._breaker.is_open and not self._probing:
            self._probing = True
            self._spawn(self._probe_loop())

    async def _probe_loop(self) -> None:
        """While the breaker is open: one probe when its pause is over, and again after
        each that failed (its pause timed from its send: `Breaker.probing`, so a probe
        that hung for a Redis timeout is followed at once if the pause is over). The only
        caller that probes, so never two at once. A process that
        holds leases probes at least every HOLDING_PROBE_S (to reclaim them in time)."""
        try:
            while self._breaker.is_open:
                wait = self._breaker.until_probe()
                if self._leases:
                    wait = min(wait, HOLDING_PROBE_S)
                await asyncio.sleep(wait)
                if not self._breaker.is_open:
                    return  # another call that was out came back: Redis is back
                sent = self._breaker.probing()  # (the next pause runs from this send)
                try:
                    await self._probe()
                except asyncio.CancelledError:
                    raise
                except Exception:  # whatever it was, Redis did not answer: probe again
                    # (unless another call closed the breaker meanwhile: old news)
                    self._breaker.probe_failed(sent)
                    continue
                self._succeeded()
        finally:
            self._probing = False

    def _listener_lost(self, exc: BaseException) -> None:
        """The grant listener's connection failed; it reconnects by itself. Is Redis away
        too? One PING on the call path's connections says (no breaker for everyone just
        because one connection was dropped). Already open: the breaker's probes say."""
        if self._breaker.is_open or self._checking or self._clients is None:
            return
        self._checking = True
        self._spawn(self._check(exc))

    async def _check(self, lost: BaseException) -> None:
        sent = self._breaker.generation
        try:
            assert self._clients is not None
            await self._clients.calls.ping()
        except (RedisError, OSError) as exc:
            self._on_failure(exc, sent)
        else:
            logger.info(
                "throttle_mw: Redis at %s answers; only the grant listener's connection"
                " was lost (%s), it reconnects",
                self.endpoint,
                type(lost).__name__,
            )
        finally:
            self._checking = False

    def _settle_waiters(self) -> None:
        """Redis is still away: whoever waits in it is decided by the failure mode now."""
        self._settle = None
        if not self._breaker.is_open:
            return  # back in time: the waiters were submitted again
        for rid, waiter in list(self._waiters.items()):
            self._waiters.pop(rid, None)
            self._orphans.add(rid)
            self._fallback.adopt(waiter.request, waiter.waiting)

    # --- Redis back -------------------------------------------------------------------------

    def _succeeded(self) -> None:
        """A call to Redis went through: if the breaker was open, Redis is back."""
        if not self._breaker.is_open:
            return
        self._breaker.success()
        logger.info(
            "throttle_mw: Redis at %s is back; the shared budget decides again", self.endpoint
        )
        self._recovered()

    def _listener_back(self) -> None:
        """The grant listener reads again after a failure. Grants pushed meanwhile wait in
        its list, but one popped as the connection died is lost: every waiter is asked
        about again (idempotent). If the breaker was open, Redis is back (`_recovered`
        does the same and more)."""
        if self._breaker.is_open:
            self._succeeded()
        elif self._batcher is not None:
            self._resubmit()

    def _recovered(self) -> None:
        """Clean up orphans, re-submit every waiter, and bring the local queue back to Redis."""
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if self._batcher is None:
            return
        if self._listener is not None:
            # A BLPOP sent before Redis answered again may be on a connection a partition
            # left half-open (no answer, no RST): grants would go unheard until its socket
            # timeout. The listener reconnects now; its waiters are asked again.
            self._listener.kick()
        for rid in list(self._orphans):
            # Whatever it became meanwhile, take it out of the queue and give back its
            # lease: both operations are idempotent.
            self._orphans.discard(rid)
            for cleanup in (protocol.cancel_op(rid), protocol.release_op(rid)):
                future = self._batcher.submit(cleanup, functools.partial(self._undo_cancel, rid))
                future.add_done_callback(functools.partial(self._after_cleanup, rid))
        # What the failure mode admitted still runs: count it in Redis, if there is room.
        for rid, cost in self._fallback.lease_costs():
            future = self._batcher.submit(protocol.reclaim_op(rid, cost, ""))
            future.add_done_callback(functools.partial(self._after_adopt, rid, cost))
        # Any reply tells the state's epoch: a process holding leases learns at once
        # whether they were lost (`_new_epoch`), even with nothing else to send.
        self._batcher.submit(protocol.TICK).add_done_callback(self._report)
        self._resubmit()

    def _resubmit(self) -> None:
        """Every waiter again: still queued (or admitted) in Redis, it is answered from
        that; gone with a restart, it queues again for what is left of its wait."""
        assert self._batcher is not None
        loop = asyncio.get_running_loop()
        for waiter in list(self._waiters.values()):
            # Idempotent: still queued (or admitted) in Redis, it is answered from that;
            # gone with a restart, it queues again for what is left of its wait.
            left = max(0.0, waiter.waiting.deadline - loop.time())
            future = self._batcher.submit(protocol.as_retry(self._acquire_op(waiter.request, left)))
            future.add_done_callback(functools.partial(self._after_resubmit, waiter))
        self._spawn(self._readmit_local())

    async def _readmit_local(self) -> None:
        """Local waiters (failure mode `local`) wait in Redis again, for what is left of it."""
        assert self._batcher is not None
        loop = asyncio.get_running_loop()
        for request, waiting in await self._fallback.give_back():
            started = waiting.deadline - self._settings.max_wait_s[request.priority]
            waiter = Waiter(request, waiting, started)
            self._waiters[request.id] = waiter
            op = self._acquire_op(request, max(0.0, waiting.deadline - loop.time()))
            future = self._batcher.submit(op, functools.partial(self._undo_acquire, request.id))
            future.add_done_callback(functools.partial(self._after_resubmit, waiter))

    def _after_cleanup(self, rid: str, future: asyncio.Future[str]) -> None:
        """An orphan's cleanup got no answer (a call out before Redis answered again timed
        out, and took the calls queued behind it along): its fate in Redis is still unknown,
        so it stays an orphan, cleaned up once Redis answers again; else a lease left in
        Redis would hold its slot until the lease TTL."""
        exc = None if future.cancelled() else future.exception()
        if not isinstance(exc, UNANSWERED):
            return  # done, or Redis answered with an error: nothing to try again
        self._orphans.add(rid)
        self._on_failure(exc)

    def _after_adopt(self, rid: str, cost: int, future: asyncio.Future[str]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # it stays the failure mode's
        if future.result() != protocol.RECLAIMED:
            return  # no room: it runs uncounted, and is released locally
        if self._fallback.owns(rid):
            self._fallback.release(rid)  # Redis counts it now: released there when done
            self._leases[rid] = (cost, asyncio.get_running_loop().time())
        else:
            self._release_in_redis(rid)  # it finished meanwhile

    # --- Redis back empty ---------------------------------------------------------------------

    def _new_epoch(self, epoch: str) -> None:
        """A batch reply told a new epoch: if this process knew another one, the state it
        held its leases in is gone. Reclaim those, and queue the waiters again."""
        known, self._epoch = self._epoch, epoch
        if not known or self._batcher is None:
            return  # the first reply this process sees
        now = asyncio.get_running_loop().time()
        ttl = self._settings.lease_ttl_s
        ops = []
        for rid, (cost, since) in list(self._leases.items()):
            if since + ttl <= now:
                # It may have expired in the lost state before it was lost: never
                # resurrect it (the request runs on uncounted, as an expired lease does).
                del self._leases[rid]
            else:
                ops.append(protocol.reclaim_op(rid, cost, known))
        logger.log(
            logging.WARNING if ops or self._waiters else logging.INFO,
            "throttle_mw: the budget's state in Redis at %s is new (restarted empty?);"
            " reclaiming %d leases and %d waiting requests",
            self.endpoint,
            len(ops),
            len(self._waiters),
        )
        futures = [self._batcher.submit(op) for op in ops]
        for future in futures:
            future.add_done_callback(self._report)
        if futures:
            futures[0].add_done_callback(functools.partial(self._reclaim_failed, known, epoch))
        if not self._breaker.is_open:
            self._resubmit()  # else `_recovered` does, once the breaker closes

    def _reclaim_failed(self, known: str, epoch: str, future: asyncio.Future[str]) -> None:
        """The reclaims may not have run: the next reply telling `epoch` reclaims again
        (they are idempotent)."""
        failed = future.cancelled() or future.exception() is not None
        if failed and self._epoch == epoch:
            self._epoch = known

    def _report(self, future: asyncio.Future[str]) -> None:
        """A call made for recovery failed: Redis is away again (the breaker says so)."""
        if not future.cancelled() and future.exception() is not None:
            self._on_failure(future.exception())

    def _after_resubmit(self, waiter: Waiter, future: asyncio.Future[str]) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self._on_failure(future.exception())  # away again: its waiters settle in time
            return
        rid = waiter.request.id
        if waiter.waiting.future.done() or self._waiters.get(rid) is not waiter:
            return
        result = future.result()
        if protocol.is_queued(result):
            self._deliver_early(rid)  # queued: the caller keeps its handle
            return
        del self._waiters[rid]
        outcome = self._outcome(waiter.request, result, waiter.started)
        assert not isinstance(outcome, Waiting)
        waiter.waiting.future.set_result(outcome)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- what recovery needs from the call path (backend.py) --------------------------------

    def _acquire_op(self, request: Request, max_wait_s: float | None = None) -> Op:
        raise NotImplementedError

    def _outcome(self, request: Request, result: str, started: float) -> Outcome:
        raise NotImplementedError

    def _undo_acquire(self, rid: str, result: str) -> None:
        raise NotImplementedError

    def _undo_cancel(self, rid: str, result: str) -> None:
        raise NotImplementedError

    def _release_in_redis(self, rid: str) -> None:
        raise NotImplementedError

    def _deliver_early(self, rid: str) -> None:
        """A grant message for `rid` that beat its acquire's reply: deliver it now."""
        raise NotImplementedError

    async def _probe(self) -> None:
        """One call to Redis that says whether it is back (raises if not)."""
        raise NotImplementedError
