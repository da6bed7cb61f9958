"""The Redis backend: one budget for every worker and replica of an app.

Decisions are made atomically in Redis by ``batch.lua`` (the scheduler's rules in
Lua, on Redis' clock). Grants reach the process where a request waits through
its grant list; concurrency slots are leases that this process renews while it
holds them. When Redis is unreachable or slow, `THROTTLE_FAILURE_MODE` decides
(see ``fallback.py``). A circuit breaker keeps a dead Redis from being hammered
and brings the shared budget back within about a second of its return.

Requests waiting in Redis when it fails keep waiting for `SETTLE_S`: a blip (a
restart, a failover) costs them nothing, as they are submitted again once Redis
answers. If Redis is still away after that, the failure mode settles them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ...scheduler import Limits, Reject, Request, Snapshot, TenantSnapshot
from ...settings import Settings
from .. import limits_from_settings, policy_from_settings
from ..base import Admitted, Outcome, RequestIds, Waiting
from . import protocol
from .batcher import Batcher
from .breaker import Breaker
from .fallback import Fallback
from .grants import BLOCK_S, GrantListener
from .keys import grants_key, hash_tag, state_key
from .protocol import Op
from .scripts import Scripts

logger = logging.getLogger("throttle_mw.redis")

_TAILS = 4096  # cached op tails (tenant x priority x cost x flags)


POOL_SIZE = 16
#: How long requests waiting in Redis wait out a Redis failure before the failure mode
#: settles them (a restart or a failover is over by then).
SETTLE_S = 1.0
#: Grant messages that arrived before their acquire's reply, kept at most.
_EARLY = 1024


@dataclass(eq=False)
class _Waiter:
    request: Request
    waiting: Waiting
    started: float


class RedisBackend:
    """A budget shared through Redis; see the module docstring."""

    def __init__(self, settings: Settings, *, now: Any = None) -> None:
        if not settings.redis_url:
            raise ValueError("RedisBackend needs THROTTLE_REDIS_URL")
        self._settings = settings
        self._limits = limits_from_settings(settings)
        self._policy = policy_from_settings(settings)
        self._tag = hash_tag(settings.key_prefix)
        self._state_key = state_key(self._tag)
        self.process = RequestIds().token
        self._now = now  # tests only: a callable giving the script's clock
        self._breaker = Breaker()
        self._fallback = Fallback(settings.failure_mode, self._limits, self._policy)
        self._waiters: dict[str, _Waiter] = {}
        self._early: dict[str, str] = {}
        self._tails: dict[
            tuple[str, str, int, bool, bool], str
        ] = {}  # grant messages that beat their acquire's reply
        self._leases: set[str] = set()
        self._orphans: set[str] = set()  # ids to clean up in Redis once it is back
        self._settle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: Any = None
        self._listen_client: Any = None
        self._scripts: Scripts | None = None
        self._batcher: Batcher | None = None
        self._listener: GrantListener | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._tick_at = 0.0
        self._started = False
        self._closing = False
        self._static = protocol.static_args(
            self._tag,
            self.process,
            self._limits,
            self._policy,
            lease_ttl_s=settings.lease_ttl_s,
            key_ttl_s=max(settings.max_wait_s.values()) + 60.0,
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._closing = False
        self._client, self._listen_client = self._connect()
        if self._settings.redis_cluster:
            # Learn the slot map now, not in the first request (it takes a few round trips).
            try:
                for client in (self._client, self._listen_client):
                    await client.initialize()
            except (RedisError, OSError) as exc:
                self._on_failure(exc)
        self._scripts = Scripts.register(self._client)
        self._batcher = Batcher(self._call, self._on_trailer)
        self._batcher.start()
        self._listener = GrantListener(
            self._listen_client,
            grants_key(self._tag, self.process),
            self._on_message,
            self._succeeded,
            self._on_failure,
        )
        self._listener.start()
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def stop(self) -> None:
        if not self._started:
            return
        for waiter in list(self._waiters.values()):
            await self.cancel(waiter.waiting)
        await self._fallback.stop()
        for timer in (self._tick, self._settle):
            if timer is not None:
                timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._closing = True  # see GrantListener.stop: a cancel alone may be swallowed
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self._listener is not None:
            await self._listener.stop()
        try:
            assert self._scripts is not None
            # Orphans may still be queued or hold a lease: take them out of both.
            ops = [f"R|{lease}" for lease in self._leases]
            ops += [f"{op}|{rid}" for rid in self._orphans for op in ("C", "R")]
            if ops:
                await asyncio.wait_for(self._call(ops, False), 2.0)
            await asyncio.wait_for(
                self._scripts.leave(keys=[self._state_key], args=[self._tag, self.process]), 2.0
            )
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("throttle_mw: could not clean up in Redis (%s)", type(exc).__name__)
        if self._batcher is not None:
            await self._batcher.close()
        for client in (self._client, self._listen_client):
            if client is not None:
                await client.aclose()
        self._started = False

    def _connect(self) -> tuple[Any, Any]:
        s = self._settings
        assert s.redis_url is not None
        timeout = s.redis_timeout_s
        no_retry = Retry(NoBackoff(), 0)
        client: Any
        listen: Any
        if s.redis_cluster:
            client = RedisCluster.from_url(
                s.redis_url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=no_retry,
                max_connections=POOL_SIZE,
            )
            listen = RedisCluster.from_url(
                s.redis_url,
                socket_timeout=BLOCK_S + timeout + 1.0,
                socket_connect_timeout=timeout,
                retry=no_retry,
            )
            return client, listen
        pool = BlockingConnectionPool.from_url(
            s.redis_url,
            max_connections=POOL_SIZE,
            timeout=timeout,  # a full pool waits this long rather than failing at once
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=no_retry,
        )
        client = Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        listen = Redis.from_url(
            s.redis_url,
            socket_timeout=BLOCK_S + timeout + 1.0,
            socket_connect_timeout=timeout,
            retry=no_retry,
            single_connection_client=True,
        )
        return client, listen

    # --- the backend contract --------------------------------------------------------------

    def decide_now(self, request: Request) -> None:
        """Decisions about the shared budget always need a round trip to Redis."""

    async def acquire(self, request: Request) -> Outcome:
        if not self._started:
            await self.start()
        if not self._breaker.allow():
            return await self._fallback.acquire(request)
        assert self._batcher is not None
        started = asyncio.get_running_loop().time()
        op = self._acquire_op(request)
        try:
            result = await self._batcher.submit(op, lambda r: self._undo_acquire(request.id, r))
        except (RedisError, OSError) as exc:
            self._orphans.add(request.id)  # it may have run before the reply was lost
            self._on_failure(exc)
            return await self._fallback.acquire(request)
        self._succeeded()
        return self._outcome(request, result, started)

    async def cancel(self, waiting: Waiting) -> Admitted | Reject:
        rid = waiting.request_id
        if self._fallback.owns(rid):
            return await self._fallback.cancel(waiting)
        self._waiters.pop(rid, None)
        if waiting.future.done():
            return self._resolved(waiting)
        result = await self._cancel_in_redis(rid)
        if not waiting.future.done():
            waiting.future.set_result(result)
        return result

    def release(self, request_id: str) -> None:
        if self._fallback.owns(request_id):
            self._fallback.release(request_id)
        elif request_id in self._leases:
            self._release_in_redis(request_id)

    async def snapshot(self) -> Snapshot:
        if not self._started:
            await self.start()
        assert self._scripts is not None
        s = self._static
        raw = await self._scripts.snapshot(
            keys=[self._state_key], args=[self._clock(), self._tag, *s[3:8], 10]
        )
        data = json.loads(raw)
        busiest = data.get("busiest") or []
        return Snapshot(
            tokens=data.get("tokens"),
            in_flight=int(data["in_flight"]),
            queued_by_priority={k: int(v) for k, v in data["queued_by_priority"].items()},
            tenants=int(data["tenants"]),
            busiest=tuple(TenantSnapshot(b["tenant"], int(b["queued"]), 0.0) for b in busiest),
            fair_rate=float(data.get("fair_rate") or 0.0),
        )

    async def set_limits(self, limits: Limits) -> None:
        """Store live limits in Redis: every process follows from its next call."""
        if not self._started:
            await self.start()
        fields = {
            "rate": "none" if limits.rate is None else repr(limits.rate),
            "burst": repr(limits.burst),
            "concurrency": "none" if limits.concurrency is None else str(limits.concurrency),
            "tenant_rate": "none" if limits.tenant_rate is None else repr(limits.tenant_rate),
            "tenant_burst": repr(limits.tenant_burst),
        }
        await self._client.hset(f"{self._tag}:cfg", mapping=fields)
        self._limits = self._fallback.limits = limits
        assert self._batcher is not None
        await self._batcher.submit("T")  # dispatch now: a raised limit admits waiters

    # --- talking to Redis ---------------------------------------------------------------------

    def _clock(self) -> str:
        return "" if self._now is None else repr(float(self._now()))

    async def _call(self, ops: Sequence[Op], retry: bool) -> list[str]:
        assert self._scripts is not None
        if retry:
            ops = [protocol.as_retry(op) for op in ops]
        args = protocol.call_args(self._static, self._clock(), list(ops))
        return protocol.reply(await self._scripts.batch(keys=[self._state_key], args=args))

    def _acquire_op(self, request: Request, max_wait_s: float | None = None) -> Op:
        """``A|id|<tenant and request parts>``: the parts are cached, this runs per request."""
        if max_wait_s is not None:
            return f"A|{request.id}|{self._op_tail(request, max_wait_s)}"
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
        return "A|" + request.id + "|" + tail

    def _op_tail(self, request: Request, max_wait_s: float) -> str:
        return protocol.acquire_tail(request, self._limits.weight(request.tenant), max_wait_s)

    def _outcome(self, request: Request, result: str, started: float) -> Outcome:
        kind, *fields = result.split("|")
        if kind == "A":
            lease = fields[0] == "1"
            if lease:
                self._leases.add(request.id)
            return Admitted(request.id, 0.0, fields[1] == "1", lease)
        if kind == "Q":
            loop = asyncio.get_running_loop()
            deadline = started + self._settings.max_wait_s[request.priority]
            waiting = Waiting(request.id, deadline, float(fields[1]), loop.create_future())
            self._waiters[request.id] = _Waiter(request, waiting, started)
            early = self._early.pop(request.id, None)
            if early is not None:
                self._on_message(early)
            return waiting
        return Reject(fields[0], float(fields[1]))  # type: ignore[arg-type]

    async def _cancel_in_redis(self, rid: str) -> Admitted | Reject:
        if self._batcher is None or not self._breaker.allow():
            self._orphans.add(rid)
            return self._fallback.settle(rid)
        try:
            result = await self._batcher.submit(f"C|{rid}", lambda r: self._undo_cancel(rid, r))
        except (RedisError, OSError) as exc:
            self._on_failure(exc)
            self._orphans.add(rid)
            return self._fallback.settle(rid)
        self._succeeded()
        kind, *fields = result.split("|")
        if kind == "X":
            return Reject(fields[0], float(fields[1]))  # type: ignore[arg-type]
        if kind == "G":
            lease = fields[0] == "1"
            if lease:
                self._leases.add(rid)
            return Admitted(rid, 0.0, False, lease)
        return Reject("expired", 1.0)

    def _resolved(self, waiting: Waiting) -> Admitted | Reject:
        if waiting.future.cancelled():
            return Reject("expired", 1.0)
        return waiting.future.result()

    # --- undoing what nobody waits for ----------------------------------------------------------

    def _undo_acquire(self, rid: str, result: str) -> None:
        if result.startswith("A|1"):
            self._release_in_redis(rid)
        elif result.startswith("Q|") and self._batcher is not None:
            self._batcher.submit(f"C|{rid}", lambda r: self._undo_cancel(rid, r))

    def _undo_cancel(self, rid: str, result: str) -> None:
        if result.startswith("G|1"):
            self._release_in_redis(rid)

    def _release_in_redis(self, rid: str) -> None:
        """Give a lease back in Redis (the same id may be waiting locally meanwhile)."""
        self._leases.discard(rid)
        if self._batcher is None or not self._breaker.allow():
            self._orphans.add(rid)
            return
        self._batcher.send(f"R|{rid}", functools.partial(self._release_failed, rid))

    def _release_failed(self, rid: str, exc: BaseException) -> None:
        self._orphans.add(rid)  # given back once Redis is back
        self._on_failure(exc)

    # --- grants, ticks, renewals ------------------------------------------------------------------

    def _on_message(self, message: str) -> None:
        kind, rid, *fields = message.split("|")
        waiter = self._waiters.pop(rid, None)
        if waiter is None:
            if kind == "g" and fields[1] == "1" and rid in self._orphans:
                self._orphans.discard(rid)  # granted after we gave up on it: give it back
                self._release_in_redis(rid)
            elif rid not in self._orphans:
                # Its acquire's reply may not have been read yet: keep it for that.
                self._early[rid] = message
                if len(self._early) > _EARLY:
                    del self._early[next(iter(self._early))]
            return
        if waiter.waiting.future.done():
            return
        if kind == "g":
            lease = fields[1] == "1"
            if lease:
                self._leases.add(rid)
            waited = asyncio.get_running_loop().time() - waiter.started
            waiter.waiting.future.set_result(Admitted(rid, waited, False, lease))
        else:
            waiter.waiting.future.set_result(Reject(fields[0], float(fields[1])))  # type: ignore[arg-type]

    def _on_trailer(self, trailer: list[str]) -> None:
        # Any call that went through may have been the breaker's probe: report it back.
        self._succeeded()
        if len(trailer) >= 2:
            if trailer[0]:
                self._schedule_tick(float(trailer[0]))
            self._fallback.fleet = max(1, int(trailer[1]))

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
        future = self._batcher.submit("T")
        future.add_done_callback(self._after_tick)

    def _after_tick(self, future: asyncio.Future[str]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._on_failure(future.exception())
        elif not future.cancelled():
            self._succeeded()

    # --- Redis lost and back ---------------------------------------------------------------------

    def _succeeded(self) -> None:
        """A call to Redis went through: if the breaker was open, Redis is back."""
        if not self._breaker.is_open:
            return
        self._breaker.success()
        logger.info("throttle_mw: Redis is back; the shared budget decides again")
        self._recovered()

    def _recovered(self) -> None:
        """Clean up orphans, re-submit every waiter, and bring the local queue back to Redis."""
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if self._batcher is None:
            return
        for rid in list(self._orphans):
            # Whatever it became meanwhile, take it out of the queue and give back its
            # lease: both operations are idempotent.
            self._orphans.discard(rid)
            for cleanup in (f"C|{rid}", f"R|{rid}"):
                self._batcher.submit(cleanup, functools.partial(self._undo_cancel, rid))
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
            waiter = _Waiter(request, waiting, started)
            self._waiters[request.id] = waiter
            op = self._acquire_op(request, max(0.0, waiting.deadline - loop.time()))
            future = self._batcher.submit(op, functools.partial(self._undo_acquire, request.id))
            future.add_done_callback(functools.partial(self._after_resubmit, waiter))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _after_resubmit(self, waiter: _Waiter, future: asyncio.Future[str]) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self._on_failure(future.exception())  # away again: its waiters settle in time
            return
        rid = waiter.request.id
        if waiter.waiting.future.done() or self._waiters.get(rid) is not waiter:
            return
        result = future.result()
        if result.startswith("Q|"):
            early = self._early.pop(rid, None)  # queued: the caller keeps its handle
            if early is not None:
                self._on_message(early)
            return
        del self._waiters[rid]
        outcome = self._outcome(waiter.request, result, waiter.started)
        assert not isinstance(outcome, Waiting)
        waiter.waiting.future.set_result(outcome)

    async def _renew_loop(self) -> None:
        period = max(0.2, min(self._settings.lease_ttl_s / 3.0, 5.0))
        while True:
            try:
                if self._breaker.allow():
                    assert self._scripts is not None
                    live = await self._scripts.renew(
                        keys=[self._state_key],
                        args=[
                            self._clock(),
                            self._tag,
                            self.process,
                            repr(self._settings.lease_ttl_s),
                            repr(self._settings.lease_ttl_s),
                            *self._leases,
                        ],
                    )
                    self._fallback.fleet = max(1, int(live))
                    self._succeeded()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._on_failure(exc)
            if self._closing:
                return
            await asyncio.sleep(period if not self._breaker.is_open else 0.25)

    # --- failure modes --------------------------------------------------------------------

    def _on_failure(self, exc: BaseException | None = None) -> None:
        first = not self._breaker.is_open
        self._breaker.failure()
        if first:
            logger.warning(
                "throttle_mw: Redis unavailable (%s); failure mode %r",
                type(exc).__name__ if exc is not None else "connection lost",
                self._settings.failure_mode,
            )
        if self._waiters and self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(SETTLE_S, self._settle_waiters)

    def _settle_waiters(self) -> None:
        """Redis is still away: whoever waits in it is decided by the failure mode now."""
        self._settle = None
        if not self._breaker.is_open:
            return  # back in time: the waiters were submitted again
        for rid, waiter in list(self._waiters.items()):
            self._waiters.pop(rid, None)
            self._orphans.add(rid)
            self._fallback.adopt(waiter.request, waiter.waiting)
