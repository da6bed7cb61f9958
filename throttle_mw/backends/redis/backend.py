"""The Redis backend: one budget for every worker and replica of an app.

Decisions are made atomically in Redis by ``batch.lua`` (the scheduler's rules in
Lua, on Redis' clock). This module is the call path: operations go through the
batcher (one script call for every operation ready), replies and grant
messages are decoded by ``protocol.py``, grants reach the process where a
request waits through its grant list (``grants.py``), and concurrency slots are
leases that this process renews while it holds them. Connecting is in
``connection.py``; what happens when Redis fails and comes back, in
``recovery.py``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from ...scheduler import Admit, Enqueue, Granted, LeaseKey, Limits, Reject, Request, Snapshot
from ...scheduler.limit import InFlight, LimitState, Sample
from ...settings import HEARTBEAT_MIN_S, Settings
from ..base import NOT_AT_ONCE, Admitted, FastPath, Outcome, RequestIds, Waiting
from . import connection, diagnose, protocol
from .admin import Budget
from .batcher import Batcher
from .fallback import Fallback
from .grants import BLOCK_S, GrantListener
from .keys import Keys
from .learner import FleetLearner
from .protocol import AlreadyAdmitted, Op
from .ratepool import AUTO_LEASE_S, RatePool
from .recovery import Recovery, Waiter
from .scripts import DEADLINE_GRACE_S, Scripts
from .slotpool import SlotPool

logger = logging.getLogger("throttle_mw.redis")

_TAILS = 4096  # cached op tails (tenant x priority x cost x flags)
#: Grant messages that arrived before their acquire's reply, kept at most.
_EARLY = 1024
#: Seconds of clean-up allowed at shutdown.
_STOP_TIMEOUT_S = 2.0
#: Request ids in one leave operation at most (batch.lua splits them all on each call).
_LEAVE_IDS = 512
_SHUTTING_DOWN = Reject("shutting_down", 1.0)
_new_tuple = tuple.__new__


def key_ttl_s(settings: Settings) -> float:
    """T, the state TTL of keys.py: how long a budget's keys outlive their last use. By
    then every waiter is past its deadline and grace and every lease has lapsed."""
    return max(settings.max_wait_s.values()) + DEADLINE_GRACE_S + settings.lease_ttl_s


def rate_pool(settings: Settings) -> RatePool | None:
    """THROTTLE_RATE_LEASE's pool: T seconds, ``auto`` (AUTO_LEASE_S, and leases only
    while they pay), or none (0)."""
    lease = settings.rate_lease_s
    if lease == "auto":
        return RatePool(AUTO_LEASE_S, auto=True)
    return RatePool(lease) if lease else None


def _leasable(limits: Limits) -> bool:
    """Limits whose admissions a lease of rate tokens may make: a rate alone."""
    return limits.rate is not None and limits.concurrency is None and limits.tenant_rate is None


def _keepable(limits: Limits) -> int | None:
    """The concurrency limit whose slots may be kept (``THROTTLE_KEEP_SLOTS``): a
    concurrency budget alone; None: no slot is kept."""
    if limits.rate is not None or limits.tenant_rate is not None:
        return None
    return limits.concurrency


def _undo_if_answered(answer: asyncio.Future[str], undo: Callable[[str], None]) -> None:
    """A caller cancelled while awaiting the batcher's `answer`: if the answer was already
    in (set, then the caller's task cancelled before it ran: asyncio throws the
    cancellation in and the result is lost), undo it here. The batcher undoes only the
    answers whose future it finds done, i.e. cancelled before the answer came."""
    if answer.done() and not answer.cancelled() and answer.exception() is None:
        undo(answer.result())


def _refused(exc: BaseException) -> bool:
    """A call that failed before anything was sent: its connection refused (redis-py
    raises its ConnectionError from the OSError of the connect). Any other failure may
    come after Redis ran the call, or will run it (a timeout)."""
    return isinstance(exc, ConnectionRefusedError) or isinstance(
        exc.__cause__, ConnectionRefusedError
    )


def _raised(before: int | None, after: int | None) -> bool:
    """Kept slots admitted under concurrency limit `before` stay within `after` (the same
    or higher: a learned limit growing, a live raise); None: not kept under it (a rate
    added, no concurrency, no reply yet). Anything else gives them back."""
    return before is not None and after is not None and after >= before


class RedisBackend(Recovery):
    """A budget shared through Redis; see the module docstring."""

    def __init__(self, settings: Settings, *, now: Any = None) -> None:
        if not settings.redis_url:
            raise ValueError("RedisBackend needs THROTTLE_REDIS_URL")
        self._limits = settings.limits()
        #: The limits in force as the latest batch reply told them, and that reply's line.
        self._in_force = self._limits
        self._in_force_line = ""
        #: The concurrency limit whose slots may be kept as the latest reply stated it
        #: (`_keepable`): a reply raising it leaves the kept slots kept.
        self._kept_under: int | None = None
        #: `_keepable` of the limits in force (`_in_force`), kept beside them: read per release.
        self._keep_limit = _keepable(self._in_force)
        self._policy = policy = settings.policy()
        fallback = Fallback(settings.failure_mode, self._limits, policy, held=self._held_cost)
        self._init_recovery(settings, fallback)
        self._keys = Keys(settings.key_prefix)
        self.process = RequestIds().token
        self._now = now  # tests only: a callable giving the script's clock
        #: Grant messages that beat their acquire's reply, by request id.
        self._early: dict[str, Granted | Reject] = {}
        self._tails: dict[tuple[str, str, int, bool, bool], str] = {}
        #: Leases this process holds in Redis (renewed by the heartbeat), by request id:
        #: (cost, a loop time by which Redis had surely given or renewed it).
        self._leases: dict[str, tuple[int, float]] = {}
        #: The epoch of the budget's state in Redis, as the latest batch reply told it, and
        #: when (time.monotonic): see `_known_epoch`.
        self._epoch = ""
        self._epoch_at = -float("inf")
        #: A state older than this may have expired unused (half of keys.py's T).
        self._quiet_s = key_ttl_s(settings) / 2
        #: The grant listener's BLPOP out longer than this gets no answer (`_on_trailer`).
        self._overdue_s = BLOCK_S + settings.redis_timeout_s
        self._clients: connection.Clients | None = None
        self._scripts: Scripts | None = None
        self._budget: Budget | None = None
        self._batcher = None
        self._listener: GrantListener | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._learner = FleetLearner(
            self._keys,
            settings.limit_config(),
            process=self.process,
            # (never shorter than the state's: a live override lapses with its bucket)
            live_ttl_s=max(settings.live_limits_ttl_s, key_ttl_s(settings)),
        )
        #: This process's requests in the app over time (the middleware brackets each
        #: learning request): the in flight its window summaries report.
        self.flight: InFlight = self._learner.flight
        self._learning_task: asyncio.Task[None] | None = None
        #: THROTTLE_RATE_LEASE: this process's lease of rate tokens (None: off), and its
        #: renewal call while one is out.
        self._pool = rate_pool(settings)
        self._lease_task: asyncio.Task[None] | None = None
        self._lease_timer: asyncio.TimerHandle | None = None
        #: THROTTLE_KEEP_SLOTS: this process's kept slots (None: off); the kept lease each
        #: request admitted from the pool runs on, by request id; the timer for the oldest
        #: and when it fires (inf: none).
        self._slots = SlotPool(settings.keep_slots_s) if settings.keep_slots_s else None
        self._share_slots()
        self._borrowed: dict[LeaseKey, str] = {}
        #: The fast path's lease keys (`fast_path`): the keys of `_borrowed` it makes.
        self._lease_keys = itertools.count(1)
        self._slots_timer: asyncio.TimerHandle | None = None
        self._slots_timer_at = float("inf")
        #: The event loop's clock (set at `start`): what the pool's times are read on.
        self._loop_time: Callable[[], float] = time.monotonic
        #: Until when (loop time) this process is in P:pl as one that may keep slots (its
        #: heartbeat registered it): it keeps none after, so it is told when someone waits.
        self._keeper_until = -float("inf")
        self._tick: asyncio.TimerHandle | None = None
        self._tick_at = 0.0
        self._started = False
        self._closing = False
        self._static = protocol.static_args(
            self._keys.tag,
            self.process,
            self._limits,
            credit_s=policy.credit_s,
            queue_limit=policy.queue_limit,
            tenant_queue_limit=policy.tenant_queue_limit,
            tenant_idle_s=policy.tenant_idle_s,
            max_tenants=policy.max_tenants,
            lease_ttl_s=settings.lease_ttl_s,
            key_ttl_s=key_ttl_s(settings),
            live_limits_ttl_s=settings.live_limits_ttl_s,
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._closing = False
        self._loop_time = asyncio.get_running_loop().time
        settings = self._settings
        logger.info(
            "throttle_mw: shared budget in Redis at %s (failure mode %r)",
            self.endpoint,
            settings.failure_mode,
        )
        self._clients = clients = connection.connect(settings)
        self._scripts = Scripts(clients.calls)
        self._budget = Budget(
            clients.calls,
            settings.key_prefix,
            self._scripts,
            live_limits_ttl_s=settings.live_limits_ttl_s,
        )
        self._batcher = Batcher(self._call, self._on_trailer, self._generation)
        self._batcher.start()
        self._listener = GrantListener(
            clients.grants,
            self._keys.grants(self.process),
            self._on_message,
            self._listener_back,
            self._listener_lost,
            endpoint=self.endpoint,
        )
        self._listener.start()
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        self._learning_task = asyncio.get_running_loop().create_task(self._learn_loop())
        # The only await, last: with --lifespan off the first requests call start() at
        # once, and those that find it started must find everything in place.
        await self._ping(clients)

    async def stop(self) -> None:
        if not self._started:
            return
        await self._leave_queue()
        await self._fallback.stop()
        for timer in (self._tick, self._settle, self._lease_timer, self._slots_timer):
            if timer is not None:
                timer.cancel()
        self._slots_timer, self._slots_timer_at = None, float("inf")
        for task in list(self._tasks):
            task.cancel()
        self._closing = True  # see GrantListener.stop: a cancel alone may be swallowed
        for background in (self._renewer, self._learning_task):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        if self._listener is not None:
            await self._listener.stop()
        await self._give_back_lease()
        if self._slots is not None:
            self._slots.drain()  # (still in self._leases: the leave below gives them back)
        try:
            assert self._scripts is not None
            # The leases, and the orphans, which may still be queued or hold a lease: a
            # leave takes them out of both (directly: the timers are gone, see above).
            ids = [*self._leases, *self._orphans]
            if ids:
                await asyncio.wait_for(self._leave(ids, self._call_one), _STOP_TIMEOUT_S)
            await asyncio.wait_for(
                self._scripts.leave(
                    keys=[self._keys.state], args=protocol.leave_args(self._keys.tag, self.process)
                ),
                _STOP_TIMEOUT_S,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning(
                "throttle_mw: could not clean up in Redis at %s (%s)",
                self.endpoint,
                type(exc).__name__,
            )
        if self._batcher is not None:
            await self._batcher.close()
        if self._clients is not None:
            for client in self._clients:
                await client.aclose()
        self._started = False

    async def _leave_queue(self) -> None:
        """Shutting down: this process's waiters leave the queue together (batch.lua's
        leave: a few calls, not one cancel each) and are told so; the capacity they held
        up goes to the other processes' waiters at once. A grant that crossed the
        shutdown is given back in the same calls."""
        # By tenant: a leave's commands go by tenant (its queue, its state).
        waiters = sorted(self._waiters.values(), key=lambda waiter: waiter.request.tenant)
        self._waiters.clear()
        ids = [waiter.request.id for waiter in waiters]
        if ids and self._batcher is not None and self._breaker.allow():
            try:
                await asyncio.wait_for(self._leave(ids, self._batcher.submit), _STOP_TIMEOUT_S)
                ids = []
            except (RedisError, OSError, TimeoutError) as exc:
                if not isinstance(exc, TimeoutError):
                    self._on_failure(exc)
        self._orphans.update(ids)  # not known to have left: stop() tries once more
        for waiter in waiters:
            if not waiter.waiting.future.done():
                waiter.waiting.future.set_result(_SHUTTING_DOWN)

    @staticmethod
    async def _leave(ids: list[str], send: Callable[[Op], Awaitable[str]]) -> None:
        """Leave operations for `ids` until the script has taken them all (each call
        takes what its work allows, `protocol.decode_left`), _LEAVE_IDS at most each."""
        while ids:
            taken = protocol.decode_left(await send(protocol.leave_op(ids[:_LEAVE_IDS])))
            ids = ids[max(1, taken) :]

    async def _call_one(self, op: Op) -> str:
        """One operation in a call of its own, not through the batcher."""
        return (await self._call([op], False))[0]

    async def _ping(self, clients: connection.Clients) -> None:
        """Say at start-up whether Redis answers, and if not why, in fixed words (a wrong
        URL, password or CA is plain to see; no Redis text, no password). Information only:
        the failure mode applies until it answers (the breaker opens and probes it)."""
        started = time.perf_counter()
        try:
            if self._settings.redis_cluster:
                await connection.initialize(clients)  # the slot map now, not in a request
            await clients.calls.ping()
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning(
                "throttle_mw: Redis at %s cannot be used at start-up: %s; failure mode %r "
                "until it can",
                self.endpoint,
                diagnose.describe(exc),
                self._settings.failure_mode,
            )
            self._breaker.failure()
            self._watch()
            return
        logger.info(
            "throttle_mw: Redis at %s answered in %.1f ms",
            self.endpoint,
            (time.perf_counter() - started) * 1000.0,
        )

    # --- the backend contract --------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The limits in force as this process last learned them (from every batch reply;
        in failure mode `local`, the last ones seen before Redis went away)."""
        return self._in_force

    @property
    def learning(self) -> bool:
        """The limit in force is the fleet's learned one (this process's settings, or a
        live ``throttle-mw set --concurrency auto``)."""
        return self._in_force.learned

    @property
    def learned(self) -> LimitState | None:
        return self._learner.state if self._in_force.learned else None

    def observe(self, sample: Sample) -> None:
        self._learner.observe(sample)

    def decide_now(self, request: Request) -> None:
        """Decisions about the shared budget always need a round trip to Redis."""

    async def acquire(self, request: Request) -> Outcome:
        if not self._started:
            await self.start()
        if not self._breaker.allow():
            return await self._fallback.acquire(request)
        started = asyncio.get_running_loop().time()
        held = self.admit_here(started, request.id, request.tenant, request.cost)
        if held is not None:
            return _new_tuple(Admitted, (request.id, 0.0, False, held, False))
        return await self._acquire_in_redis(request, started)

    def admit_here(self, now: float, key: LeaseKey, tenant: str, cost: int) -> bool | None:
        """A request admitted by this process without a call: from its lease of rate
        tokens (False: it holds no lease) or on a kept slot (True: that lease, released
        by `key`, see `_borrowed`); None: declined, to Redis (`acquire_rest`). Tries
        nothing before `start` or while the breaker is open (the failure mode decides).
        `now` is the loop's time; `key` the request's id, or the fast path's number."""
        if not self._started or not self._breaker.closed:
            return None
        queue_empty = not self._waiters
        pool = self._pool
        if pool is not None:
            local = pool.take(now, cost, queue_empty, tenant)
            if pool.due(now):
                self._renew_lease(now)
            if local:
                return False
        slots = self._slots
        if slots is not None:
            lease = slots.take(now, cost, queue_empty, len(self._leases))
            if lease is not None:
                self._borrowed[key] = lease
                return True
        return None

    async def acquire_rest(self, request: Request) -> Outcome:
        """`acquire` for a request `admit_here` declined just now (the fast path): to
        Redis without trying this process's pools again (a second take would count the
        request twice in the lease's rate). Not started or the breaker open: `admit_here`
        tried nothing, so the whole of `acquire`."""
        if not self._started or not self._breaker.allow():
            return await self.acquire(request)
        return await self._acquire_in_redis(request, asyncio.get_running_loop().time())

    def fast_path(self) -> FastPath | None:
        """For a caller that decides every request itself (the middleware, `FastPath`):
        `admit_here` with the loop's clock and lease keys of this backend's (numbers,
        unique however many middlewares share it), the rest as `decide_now` (None) and
        `acquire_rest`. None when nothing is admitted here (no lease of rate tokens, no
        kept slots), or for a subclass that acquires or releases its own way."""
        kind = type(self)
        if (self._pool is None and self._slots is None) or (
            kind.acquire is not RedisBackend.acquire or kind.release is not RedisBackend.release
        ):
            return None
        return FastPath(
            asyncio.get_running_loop().time,
            self._lease_keys,
            self.admit_here,
            NOT_AT_ONCE,
            self.decide_now,
            self.acquire_rest,
        )

    async def _acquire_in_redis(self, request: Request, started: float) -> Outcome:
        """An acquire operation through the batcher (`started`: the loop's time)."""
        assert self._batcher is not None
        op = self._acquire_op(request)
        undo = functools.partial(self._undo_acquire, request.id)
        answer = self._batcher.submit(op, undo, functools.partial(self._fate_unknown, request.id))
        try:
            result = await answer
        except (RedisError, OSError) as exc:
            self._orphans.add(request.id)  # it may have run before the reply was lost
            self._on_failure(exc)
            return await self._fallback.acquire(request)
        except asyncio.CancelledError:
            _undo_if_answered(answer, undo)
            raise
        self._succeeded()
        return self._outcome(request, result, started)

    async def cancel(self, waiting: Waiting) -> Admitted | Reject:
        rid = waiting.request_id
        if self._fallback.owns(rid):
            return await self._fallback.cancel(waiting)
        waiter = self._waiters.pop(rid, None)
        if waiting.future.done():
            return self._resolved(waiting)
        result = await self._cancel_in_redis(rid, waiter)
        if not waiting.future.done():
            waiting.future.set_result(result)
        return result

    def release(self, request_id: LeaseKey) -> None:
        if self._borrowed:
            request_id = self._borrowed.pop(request_id, request_id)  # (its kept lease)
        if not isinstance(request_id, str):
            return  # a fast path's key released again: ignored, as any second release
        # A lease the pool may keep was admitted by Redis (never the failure mode's).
        slots = self._slots
        if slots is not None and self._keep(slots, request_id):
            return
        if self._fallback.owns(request_id):
            self._fallback.release(request_id)
        elif request_id in self._leases:
            self._release_in_redis(request_id)
            if self._breaker.is_open:
                self._fallback.held_changed()  # its share of the local budget is free

    async def snapshot(self) -> Snapshot:
        if not self._started:
            await self.start()
        assert self._budget is not None
        return await self._budget.snapshot(self._limits, top=10, now=self._clock())

    async def set_limits(self, limits: Limits) -> None:
        """Store live limits in Redis: every process follows from its next call."""
        if not self._started:
            await self.start()
        assert self._budget is not None
        assert self._batcher is not None
        await self._budget.set_limits(limits)
        self._limits = self._in_force = self._fallback.limits = limits
        self._keep_limit = _keepable(limits)
        self._share_slots()
        await self._batcher.submit(protocol.TICK)  # dispatch now: a raised limit admits waiters

    # --- the call path -------------------------------------------------------------------------

    def _clock(self) -> str:
        return "" if self._now is None else repr(float(self._now()))

    async def _call(self, ops: Sequence[Op], retry: bool) -> list[str]:
        """One script call: release.lua for a release alone (most releases), else batch.lua."""
        assert self._scripts is not None
        keys = [self._keys.state]
        rid = protocol.lone_release(ops)
        if rid is not None:
            args = protocol.release_args(self._static, self._clock(), self._known_epoch(), rid)
            return protocol.split_reply(await self._scripts.release(keys=keys, args=args))
        if retry:
            ops = [protocol.as_retry(op) for op in ops]
        args = protocol.call_args(self._static, self._clock(), list(ops), self._known_epoch())
        return protocol.split_reply(await self._scripts.batch(keys=keys, args=args))

    def _generation(self) -> int:
        """The breaker's generation: the batcher's stamp of each call (`Breaker.failure`)."""
        return self._breaker.generation

    def _known_epoch(self) -> str:
        """The epoch to tell a call: a caller that knew one and finds no state starts the
        reclaim grace (store.lua). Not after a long silence with nothing held: then the
        state may simply have expired unused (keys.py's T), and nobody holds a lease."""
        if self._epoch and (
            self._leases
            or self._waiters
            or self._fallback.holds
            or time.monotonic() - self._epoch_at < self._quiet_s
        ):
            return self._epoch
        return ""

    def _held_cost(self) -> int:
        """The concurrency this process holds in Redis (the failure mode `local` counts it
        in this process's share while Redis is away)."""
        return sum(cost for cost, _ in self._leases.values())

    def _acquire_op(self, request: Request, max_wait_s: float | None = None) -> Op:
        """An acquire operation; its tenant and route parts are cached (this runs per request)."""
        if max_wait_s is not None:
            return protocol.acquire_op(request.id, self._op_tail(request, max_wait_s))
        key = (
            request.tenant,
            request.priority,
            request.cost,
            request.sheddable,
            request.degradable,
        )
        tail = self._tails.get(key)
        if tail is None:
            tail = self._op_tail(request, self._settings.max_wait_s[request.priority])
            if len(self._tails) >= _TAILS:
                self._tails.clear()
            self._tails[key] = tail
        return protocol.acquire_op(request.id, tail)

    def _op_tail(self, request: Request, max_wait_s: float) -> str:
        return protocol.acquire_tail(request, self._limits.weight(request.tenant), max_wait_s)

    def _outcome(self, request: Request, result: str, started: float) -> Outcome:
        decision = protocol.decode_acquire(result)
        if type(decision) is Admit:
            if decision.lease:
                self._leases[request.id] = (request.cost, started)
                slots = self._slots
                if slots is not None:
                    slots.admitted(started, request.id, request.cost, started, len(self._leases))
            return _new_tuple(Admitted, (request.id, 0.0, decision.degraded, decision.lease, False))
        if type(decision) is Enqueue:
            loop = asyncio.get_running_loop()
            deadline = started + self._settings.max_wait_s[request.priority]
            waiting = Waiting(
                request.id,
                deadline,
                decision.estimated_wait_s,
                loop.create_future(),
                decision.limited,
            )
            self._waiters[request.id] = Waiter(request, waiting, started)
            self._deliver_early(request.id)
            return waiting
        assert isinstance(decision, Reject)
        return decision

    async def _cancel_in_redis(self, rid: str, waiter: Waiter | None) -> Admitted | Reject:
        if self._batcher is None or not self._breaker.allow():
            self._orphans.add(rid)
            return self._fallback.settle(rid)
        undo = functools.partial(self._undo_cancel, rid)
        answer = self._batcher.submit(
            protocol.cancel_op(rid), undo, functools.partial(self._fate_unknown, rid)
        )
        try:
            result = await answer
        except (RedisError, OSError) as exc:
            self._on_failure(exc)
            self._orphans.add(rid)
            return self._fallback.settle(rid)
        except asyncio.CancelledError:
            _undo_if_answered(answer, undo)
            raise
        self._succeeded()
        decoded = protocol.decode_cancel(result)
        if isinstance(decoded, AlreadyAdmitted):
            if decoded.lease:
                if waiter is None:
                    self._leases[rid] = (1, asyncio.get_running_loop().time())
                else:
                    self._leases[rid] = (waiter.request.cost, waiter.started)
            return Admitted(rid, 0.0, False, decoded.lease)
        return decoded if decoded is not None else Reject("expired", 1.0)

    def _resolved(self, waiting: Waiting) -> Admitted | Reject:
        if waiting.future.cancelled():
            return Reject("expired", 1.0)
        return waiting.future.result()

    # --- undoing what nobody waits for ----------------------------------------------------------

    def _undo_acquire(self, rid: str, result: str) -> None:
        if protocol.is_lease(result):
            self._release_in_redis(rid)
        elif protocol.is_queued(result) and self._batcher is not None:
            # Nobody awaits this cancel: its future is done at once, so the batcher hands
            # its answer (a lease, if a release granted the slot first) to `_undo_cancel`
            # and its failure to `_fate_unknown`, not to a future nobody reads.
            self._batcher.submit(
                protocol.cancel_op(rid),
                functools.partial(self._undo_cancel, rid),
                functools.partial(self._fate_unknown, rid),
            ).cancel()

    def _undo_cancel(self, rid: str, result: str) -> None:
        if protocol.is_lease(result):
            self._release_in_redis(rid)

    def _release_in_redis(self, rid: str) -> None:
        """Give a lease back in Redis (the same id may be waiting locally meanwhile)."""
        self._leases.pop(rid, None)
        if self._batcher is None or not self._breaker.allow():
            self._orphans.add(rid)
            return
        self._batcher.send(protocol.release_op(rid), functools.partial(self._release_failed, rid))

    async def _probe(self) -> None:
        """The breaker's probe: a tick, a script call like any other (its reply closes the
        breaker and tells the state's epoch, `_on_trailer`)."""
        assert self._batcher is not None
        await self._batcher.submit(protocol.TICK)

    def _release_failed(self, rid: str, exc: BaseException) -> None:
        self._orphans.add(rid)  # given back once Redis is back
        self._on_failure(exc)

    #: An acquire or a cancel whose call failed after its caller was cancelled (an outer
    #: timeout): it may have run, or run yet, and nobody holds what it took. Without this
    #: a lease it took stayed in Redis, renewed by nobody, until the lease TTL lapsed.
    _fate_unknown = _release_failed

    # --- grants, ticks, renewals ------------------------------------------------------------------

    def _on_message(self, message: str) -> None:
        if message == protocol.WAITS:
            self._someone_waits()
            return
        event = protocol.decode_message(message)
        rid = event.id
        waiter = self._waiters.pop(rid, None)
        if waiter is None:
            if isinstance(event, Granted) and event.lease and rid in self._orphans:
                self._orphans.discard(rid)  # granted after we gave up on it: give it back
                self._release_in_redis(rid)
            elif rid not in self._orphans:
                # Its acquire's reply may not have been read yet: keep it for that.
                self._early[rid] = event if isinstance(event, Granted) else event.reject
                if len(self._early) > _EARLY:
                    del self._early[next(iter(self._early))]
            return
        self._settle_waiter(waiter, event if isinstance(event, Granted) else event.reject)

    def _settle_waiter(self, waiter: Waiter, result: Granted | Reject) -> None:
        """Resolve a waiter with its grant or its rejection."""
        future = waiter.waiting.future
        if future.done():
            return
        if isinstance(result, Reject):
            future.set_result(result)
            return
        rid = waiter.request.id
        if result.lease:
            self._leases[rid] = (waiter.request.cost, waiter.started)
        waited = asyncio.get_running_loop().time() - waiter.started
        future.set_result(Admitted(rid, waited, False, result.lease))

    def _someone_waits(self) -> None:
        """Someone started waiting for the budget in Redis while this process may hold a
        pool (store.lua's call.signal_waiting): the lease's unspent tokens go back at once
        (a renewal that wants none), the kept slots too (as a reply saying someone waits
        does), so the waiter is admitted from them by Redis's dispatch. A message missed
        (the listener reconnecting) only delays this to the next reply, or T."""
        if self._closing or not self._breaker.allow():
            return
        pool = self._pool
        if pool is not None:
            pool.waits()
            now = asyncio.get_running_loop().time()
            if pool.due(now):
                self._renew_lease(now)
        if self._slots is not None:
            self._heard(False)

    def _deliver_early(self, rid: str) -> None:
        result = self._early.pop(rid, None)
        if result is None:
            return
        waiter = self._waiters.pop(rid, None)
        if waiter is not None:
            self._settle_waiter(waiter, result)

    def _on_trailer(self, lines: list[str]) -> None:
        self._epoch_at = now = time.monotonic()
        listener = self._listener
        if listener is not None and listener.sent_at and now - listener.sent_at > self._overdue_s:
            # Redis answers here, but not the grant listener's BLPOP, out longer than Redis
            # takes to answer it: its connection alone is gone (no answer, no reset).
            listener.kick("its BLPOP is overdue while Redis answers other calls")
        if not lines:
            # release.lua's short reply: the state is of the epoch this process knows, no
            # tick is due (nobody waits); the processes and limits come with the next reply.
            self._succeeded()
            if self._slots is not None:
                self._heard(True)
            return
        trailer = protocol.trailer(lines)
        if trailer.epoch != self._epoch:
            if self._slots is not None and self._epoch:
                self._forget_slots()  # (lapsed with the state: not reclaimed)
            self._new_epoch(trailer.epoch)
            pool = self._pool
            if pool is not None and pool.epoch and pool.epoch != trailer.epoch:
                pool.drop()  # its tokens were of the state that is gone
        # Any call that went through says Redis is back (the probe's, or one that was out).
        self._succeeded()
        if trailer.next_tick_s is not None:
            self._schedule_tick(trailer.next_tick_s)
        self._fallback.fleet = max(1, trailer.processes)
        if trailer.limits != self._in_force_line:  # a string compare: this runs per call
            self._in_force_line = trailer.limits
            limits = protocol.decode_limits(trailer.limits, self._limits.weights)
            self._in_force = self._fallback.limits = limits
            self._keep_limit = _keepable(limits)
            if self._pool is not None and not _leasable(limits):
                self._pool.drop()  # a live change to limits decided per request in Redis
            if self._slots is not None:
                under, self._kept_under = self._kept_under, _keepable(limits)
                if not _raised(under, self._kept_under):
                    self._give_back_slots(self._slots.drain())  # (a lower limit: not over it)
        if self._slots is not None:
            self._slots.share(self._fallback.fleet, self._keep_limit)
            self._heard(trailer.next_tick_s is None)

    def _schedule_tick(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, delay)
        if self._tick is not None and self._tick_at <= at:
            return
        if self._tick is not None:
            self._tick.cancel()
        self._tick_at = at
        self._tick = loop.call_at(at, self._send_tick)

    def _send_tick(self) -> None:
        self._tick = None
        if self._batcher is None or not self._breaker.allow():
            return
        future = self._batcher.submit(protocol.TICK)
        future.add_done_callback(self._after_tick)

    def _after_tick(self, future: asyncio.Future[str]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._on_failure(future.exception())
        elif not future.cancelled():
            self._succeeded()

    def _renewed(self, epoch: str) -> None:
        """The heartbeat saw the budget's state (its epoch, "" for none). The same one: this
        process's known epoch is fresh. Another, or none while this process holds something:
        Redis lost it, and a tick now makes the state anew (with its grace) and tells the
        epoch (`_new_epoch` reclaims). None while nothing is held: it may have expired unused,
        so a call that makes it anew starts no grace."""
        if not self._epoch or epoch == self._epoch:
            if epoch:
                self._epoch_at = time.monotonic()
            return
        holds = self._leases or self._waiters or self._fallback.holds
        if epoch or holds:
            if self._batcher is not None:
                self._batcher.submit(protocol.TICK).add_done_callback(self._after_tick)
        else:
            self._epoch_at = -float("inf")

    # --- leases of rate tokens (THROTTLE_RATE_LEASE; ratepool.py) --------------------------

    def _renew_lease(self, now: float) -> None:
        """Start a renewal of this process's lease in the background: no request waits
        for it (those that find the pool empty meanwhile go to Redis as without leases)."""
        if self._closing or self._scripts is None or self._pool is None:
            return
        self._pool.renewing = True  # (before the task runs: one renewal at a time)
        self._lease_task = asyncio.get_running_loop().create_task(self._lease_call(now, True))

    async def _lease_call(self, sent: float, wants_more: bool) -> None:
        """One ratelease.lua call: the unspent tokens back, a new lease if `wants_more`."""
        pool = self._pool
        assert pool is not None
        assert self._scripts is not None
        limits = self._in_force
        final = not wants_more or not _leasable(limits)
        yielding = pool.yielding  # (someone waits: everything goes back, `_someone_waits`)
        returned, epoch, wants = pool.renewal(sent, self._fallback.fleet, limits.burst, final=final)
        if not returned and not wants and not pool.sending:
            pool.skip(sent)  # (a share of the burst below one token: no lease, no call)
            return
        args = protocol.ratelease_args(
            self._static,
            self._clock(),
            epoch,
            pool.held,
            wants,
            pool.lease_s,
            pool.sending,
            self._limits.weight,
        )
        generation = self._breaker.generation
        try:
            raw = await self._scripts.ratelease(keys=[self._keys.state], args=args)
            lease = protocol.decode_ratelease(raw)
        except (RedisError, OSError) as exc:
            pool.failed(unsent=_refused(exc))
            # (drops the lease: its tokens lapse, its charges stay; sent before the breaker
            # last closed, it opens nothing: `Breaker.failure`)
            self._on_failure(exc, generation)
            return
        except Exception:  # a reply this version cannot read, a bug: no lease, as without
            pool.renewing = False
            pool.drop()
            logger.exception("throttle_mw: a lease of rate tokens failed")
            return
        pool.granted(
            sent,
            lease.taken,
            lease.epoch,
            kept=lease.kept,
            generation=lease.generation,
            until=lease.until,
            charged=lease.charged,
        )
        self._succeeded()
        if yielding and returned and self._batcher is not None and self._breaker.allow():
            # The tokens are back in the bucket; a tick dispatches the waiter from them now
            # (ratelease.lua does not dispatch: it reads only the state's hot fields).
            self._batcher.submit(protocol.TICK).add_done_callback(self._after_tick)
        if pool.yielding and not self._closing:
            now = asyncio.get_running_loop().time()
            if pool.due(now):  # someone started waiting while the call was out: give back
                self._renew_lease(now)
                return
        if (lease.taken or pool.pending) and not self._closing:
            # Old before it is spent: renewed then (or its tokens given back), not lapsed;
            # admissions not charged yet go with that renewal, whatever comes meanwhile.
            if self._lease_timer is not None:
                self._lease_timer.cancel()
            loop = asyncio.get_running_loop()
            at = max(pool.old_at, pool.retry_at, loop.time())
            self._lease_timer = loop.call_at(at, self._lease_aged)

    def _lease_aged(self) -> None:
        self._lease_timer = None
        pool = self._pool
        if pool is not None and self._breaker.allow():
            now = asyncio.get_running_loop().time()
            if pool.due(now):
                self._renew_lease(now)

    async def _give_back_lease(self) -> None:
        """Shutting down: the unspent tokens of this process's lease go back."""
        pool, task = self._pool, self._lease_task
        if pool is None or self._scripts is None:
            return
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)
        now = asyncio.get_running_loop().time()
        if ((pool.tokens and now < pool.expires_at) or pool.pending) and self._breaker.allow():
            try:
                await asyncio.wait_for(self._lease_call(now, False), _STOP_TIMEOUT_S)
            except TimeoutError:
                pool.drop()
        pool.drop()

    def _on_failure(self, exc: BaseException | None = None, sent: int | None = None) -> None:
        if not self._breaker.old(sent):  # (else old news: Redis answered since)
            if self._pool is not None:
                self._pool.fault()  # Redis is away: the failure mode applies, not the lease
            if self._slots is not None:
                # Redis is away: given back once it is back (as any lease not known released).
                self._orphans.update(self._forget_slots())
        super()._on_failure(exc, sent)

    @property
    def rate_lease(self) -> RatePool | None:
        """This process's lease of rate tokens and its counters (None: no leases)."""
        return self._pool

    # --- kept concurrency slots (THROTTLE_KEEP_SLOTS; slotpool.py) ----------------------

    def _keep(self, slots: SlotPool, lease: str) -> bool:
        """A request finished on `lease`: keep its slot for the next one (True), or not
        (the pool forgets it: released in Redis if this process holds it there). Not
        while closing, while this process has waiters, with the breaker open, or when
        this process is not in P:pl (it would not be told when someone waits). Aged
        slots go back by the timer (`_schedule_slots`), not here: nothing is scanned."""
        now = self._loop_time()
        if (
            now < self._keeper_until
            and not self._waiters
            and not self._closing
            and self._breaker.closed
            and lease in self._leases
        ):
            if not slots.keep(now, lease):
                return False
            if slots.due_at < self._slots_timer_at:
                self._schedule_slots()  # (this slot ages before the timer: sooner)
            return True
        slots.let_go(lease)
        return False

    def _share_slots(self) -> None:
        """The pool's share of the limit follows the fleet's size and the limit in force
        (told at each change: `keep` reads it per release)."""
        if self._slots is not None:
            self._slots.share(self._fallback.fleet, self._keep_limit)

    def _heard(self, quiet: bool) -> None:
        """A reply said whether anyone waits for the budget: if so, the kept slots go back."""
        assert self._slots is not None
        self._give_back_slots(self._slots.heard(asyncio.get_running_loop().time(), quiet))

    def _give_back_slots(self, leases: list[str]) -> None:
        """Release kept slots in Redis (the batcher sends those ready together)."""
        for lease in leases:
            self._release_in_redis(lease)

    def _forget_slots(self, lease: str | None = None) -> list[str]:
        """Forget slots without a call (a fault, a new epoch, gone from Redis): the kept ones
        dropped, running ones not kept at their release (`SlotPool.forget`)."""
        assert self._slots is not None
        leases = self._slots.forget(lease)
        for each in leases:
            self._leases.pop(each, None)
        return leases

    def _schedule_slots(self) -> None:
        """The timer at the pool's `next_at` (a pending one for later is moved sooner)."""
        if self._slots_timer is not None:
            self._slots_timer.cancel()
        self._slots_timer, self._slots_timer_at = None, float("inf")
        slots = self._slots
        at = slots.next_at if slots is not None else None
        if at is not None and not self._closing:
            self._slots_timer = asyncio.get_running_loop().call_at(at, self._slots_aged)
            self._slots_timer_at = at

    def _slots_aged(self) -> None:
        self._slots_timer, self._slots_timer_at = None, float("inf")
        assert self._slots is not None
        self._give_back_slots(self._slots.aged(asyncio.get_running_loop().time()))
        self._schedule_slots()

    @property
    def kept_slots(self) -> SlotPool | None:
        """This process's kept concurrency slots and their counters (None: not kept)."""
        return self._slots

    async def _learn_loop(self) -> None:
        """Push this process's latency summaries; take the fleet's step when it is due
        (learner.py). The first push comes at once: it stores the limit to start from."""
        learner = self._learner
        while not self._closing:
            sent = self._breaker.generation
            try:
                if self.learning and self._breaker.allow():
                    assert self._clients is not None
                    await learner.flush(self._clients.calls)
                    # Redis answered: if the breaker opened meanwhile, it is back.
                    self._succeeded()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._on_failure(exc, sent)
            await asyncio.sleep(learner.interval_s)

    async def _renew_loop(self) -> None:
        """The heartbeat: renew this process's leases and learn how many processes are live."""
        lease_ttl_s = self._settings.lease_ttl_s
        keys_ttl_s = key_ttl_s(self._settings)
        period = max(HEARTBEAT_MIN_S, min(lease_ttl_s / 3.0, 5.0))
        loop = asyncio.get_running_loop()
        while True:
            generation = self._breaker.generation  # (the beat's stamp: `Breaker.failure`)
            try:
                if self._breaker.allow():
                    assert self._scripts is not None
                    leases = list(self._leases)
                    sent = loop.time()
                    args = protocol.renew_args(
                        self._clock(),
                        self._keys.tag,
                        self.process,
                        lease_ttl_s,
                        keys_ttl_s,
                        leases,
                        keeps=self._slots is not None,
                    )
                    if self._slots is not None:
                        # In P:pl from this call on (a margin: Redis's clock counts from
                        # later); kept slots only until then. (A slot kept before this call
                        # reaches Redis may miss a message that someone waits: the next
                        # reply, or T, gives it back, as without the message.)
                        self._keeper_until = sent + lease_ttl_s * 0.9
                    raw = await self._scripts.renew(keys=[self._keys.state], args=args)
                    renewed = protocol.decode_renew(raw)
                    self._fallback.fleet = max(1, renewed.processes)
                    self._share_slots()
                    for rid, there in zip(leases, renewed.held, strict=False):
                        held = self._leases.get(rid)
                        if there and held is not None:  # it lasts a TTL from `sent`
                            self._leases[rid] = (held[0], sent)
                        elif not there and self._slots is not None:
                            # It lapsed in Redis (kept or running): not kept, now or at its
                            # release (its slot may be another process's now).
                            self._forget_slots(rid)
                    self._renewed(renewed.epoch)
                    if renewed.tick and self._batcher is not None:
                        # A lease lapsed and no tick may be due here (the process that
                        # claimed it died, or nobody waits): this one expires it, dispatches.
                        self._batcher.submit(protocol.TICK).add_done_callback(self._after_tick)
                    self._succeeded()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._on_failure(exc, generation)
            except Exception:  # a reply this version cannot read, a bug: beat on regardless
                # A heartbeat that stopped would let this process's leases lapse while its
                # requests still run, and the fleet admit on top of them.
                logger.exception("throttle_mw: the heartbeat failed; it goes on")
            if self._closing:
                return
            await asyncio.sleep(period if not self._breaker.is_open else 0.25)
