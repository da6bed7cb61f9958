"""The Redis backend: one budget for every worker and replica of an app.

Decisions are made atomically in Redis by ``batch.lua`` (the scheduler's rules in
Lua, on Redis' clock). Grants reach the process where a request waits through
its grant list; concurrency slots are leases that this process renews while it
holds them. When Redis is unreachable or slow, `THROTTLE_FAILURE_MODE` decides:
``open`` admits, ``closed`` rejects with 503, ``local`` enforces this process's
share of the budget in memory. A circuit breaker keeps a dead Redis from being
hammered and brings the shared budget back within about a second of its return.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ...priorities import RANK
from ...scheduler import Limits, Reject, Request, Snapshot, TenantSnapshot
from ...settings import Settings
from .. import limits_from_settings, policy_from_settings
from ..base import Admitted, Outcome, RequestIds, Waiting
from ..memory import MemoryBackend
from .batcher import Batcher, Op
from .breaker import Breaker
from .grants import BLOCK_S, GrantListener
from .keys import grants_key, hash_tag, state_key, tenant_digest
from .scripts import Scripts

logger = logging.getLogger("throttle_mw.redis")

_FLAGS = {(False, False): 0, (True, False): 1, (True, True): 3, (False, True): 3}
_RETRY = 4
POOL_SIZE = 16


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
        self._waiters: dict[str, _Waiter] = {}
        self._leases: set[str] = set()
        self._orphans: set[str] = set()  # ids to clean up in Redis once it is back
        self._local: MemoryBackend | None = None
        self._local_ids: set[str] = set()
        self._fleet = 1
        self._client: Any = None
        self._listen_client: Any = None
        self._scripts: Scripts | None = None
        self._batcher: Batcher | None = None
        self._listener: GrantListener | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._tick_at = 0.0
        self._started = False
        self._static = self._static_args()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._client, self._listen_client = self._connect()
        self._scripts = Scripts.register(self._client)
        self._batcher = Batcher(self._call, self._on_trailer)
        self._batcher.start()
        self._listener = GrantListener(
            self._listen_client,
            grants_key(self._tag, self.process),
            self._on_message,
            self._on_reconnect,
            self._on_failure,
        )
        self._listener.start()
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def stop(self) -> None:
        if not self._started:
            return
        for waiter in list(self._waiters.values()):
            await self.cancel(waiter.waiting)
        if self._local is not None:
            await self._local.stop()
        if self._tick is not None:
            self._tick.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self._listener is not None:
            await self._listener.stop()
        try:
            assert self._scripts is not None
            releases = [("R", lease) for lease in (self._leases | self._orphans)]
            if releases:
                await asyncio.wait_for(self._call(releases, False), 2.0)
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
        )
        client = Redis(connection_pool=pool, retry=no_retry)
        listen = Redis.from_url(
            s.redis_url,
            socket_timeout=BLOCK_S + timeout + 1.0,
            socket_connect_timeout=timeout,
            retry=no_retry,
            single_connection_client=True,
        )
        return client, listen

    # --- the backend contract --------------------------------------------------------------

    async def acquire(self, request: Request) -> Outcome:
        if not self._started:
            await self.start()
        if not self._breaker.allow():
            return await self._fallback(request)
        assert self._batcher is not None
        started = asyncio.get_running_loop().time()
        op = self._acquire_op(request)
        try:
            result = await self._batcher.submit(op, lambda r: self._undo_acquire(request.id, r))
        except (RedisError, OSError) as exc:
            self._on_failure(exc)
            return await self._fallback(request)
        self._breaker.success()
        return self._outcome(request, result, started)

    async def cancel(self, waiting: Waiting) -> Admitted | Reject:
        rid = waiting.request_id
        if rid in self._local_ids:
            self._local_ids.discard(rid)
            assert self._local is not None
            return await self._local.cancel(waiting)
        self._waiters.pop(rid, None)
        if waiting.future.done():
            return self._resolved(waiting)
        result = await self._cancel_in_redis(rid)
        if not waiting.future.done():
            waiting.future.set_result(result)
        return result

    def release(self, request_id: str) -> None:
        if request_id in self._local_ids:
            self._local_ids.discard(request_id)
            if self._local is not None:
                self._local.release(request_id)
            return
        if request_id not in self._leases:
            return
        self._leases.discard(request_id)
        if self._batcher is None or not self._breaker.allow():
            self._orphans.add(request_id)
            return
        future = self._batcher.submit(("R", request_id))
        future.add_done_callback(lambda f: self._after_release(request_id, f))

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

    # --- talking to Redis ---------------------------------------------------------------------

    def _static_args(self) -> list[str]:
        s, limits, policy = self._settings, self._limits, self._policy

        def opt(value: float | None) -> str:
            return "" if value is None else repr(value)

        key_ttl = max(s.max_wait_s.values()) + 60.0
        return [
            "",  # now: set per call
            self._tag,
            self.process,
            opt(limits.rate),
            repr(limits.burst),
            opt(limits.concurrency),
            opt(limits.tenant_rate),
            repr(limits.tenant_burst),
            repr(policy.credit_s),
            str(policy.queue_limit),
            str(policy.tenant_queue_limit),
            repr(policy.tenant_idle_s),
            str(policy.max_tenants),
            repr(s.lease_ttl_s),
            repr(key_ttl),
        ]

    def _clock(self) -> str:
        return "" if self._now is None else repr(float(self._now()))

    async def _call(self, ops: Sequence[Op], retry: bool) -> list[str]:
        assert self._scripts is not None
        args: list[str] = list(self._static)
        args[0] = self._clock()
        args.append(str(len(ops)))
        for op in ops:
            if retry and op[0] == "A":
                op = (*op[:7], str(int(op[7]) | _RETRY), op[8])
            args.extend(op)
        raw = await self._scripts.batch(keys=[self._state_key], args=args)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in raw]

    def _acquire_op(self, request: Request) -> Op:
        weight = self._limits.weight(request.tenant)
        return (
            "A",
            request.id,
            tenant_digest(request.tenant),
            request.tenant,
            repr(weight),
            str(RANK[request.priority]),
            str(request.cost),
            str(_FLAGS[(request.sheddable, request.degradable)]),
            repr(self._settings.max_wait_s[request.priority]),
        )

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
            return waiting
        return Reject(fields[0], float(fields[1]))  # type: ignore[arg-type]

    async def _cancel_in_redis(self, rid: str) -> Admitted | Reject:
        if self._batcher is None or not self._breaker.allow():
            self._orphans.add(rid)
            return self._unavailable(rid)
        try:
            result = await self._batcher.submit(("C", rid), lambda r: self._undo_cancel(rid, r))
        except (RedisError, OSError) as exc:
            self._on_failure(exc)
            self._orphans.add(rid)
            return self._unavailable(rid)
        self._breaker.success()
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
            self._leases.add(rid)
            self.release(rid)
        elif result.startswith("Q|") and self._batcher is not None:
            self._batcher.submit(("C", rid), lambda r: self._undo_cancel(rid, r))

    def _undo_cancel(self, rid: str, result: str) -> None:
        if result.startswith("G|1"):
            self._leases.add(rid)
            self.release(rid)

    def _after_release(self, rid: str, future: asyncio.Future[str]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._orphans.add(rid)
            self._on_failure(exc)

    # --- grants, ticks, renewals ------------------------------------------------------------------

    def _on_message(self, message: str) -> None:
        kind, rid, *fields = message.split("|")
        waiter = self._waiters.pop(rid, None)
        if waiter is None:
            if kind == "g" and fields[1] == "1" and rid in self._orphans:
                self._leases.add(rid)  # granted after we gave up on it: give it back
                self._orphans.discard(rid)
                self.release(rid)
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
        if len(trailer) >= 2:
            if trailer[0]:
                self._schedule_tick(float(trailer[0]))
            self._fleet = max(1, int(trailer[1]))

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
        future = self._batcher.submit(("T",))
        future.add_done_callback(self._after_tick)

    def _after_tick(self, future: asyncio.Future[str]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._on_failure(future.exception())
        elif not future.cancelled():
            self._breaker.success()

    def _on_reconnect(self) -> None:
        """Redis is back (or was restarted): re-submit every waiter, clean up orphans."""
        if self._batcher is None:
            return
        for waiter in list(self._waiters.values()):
            op = self._acquire_op(waiter.request)
            retry = (*op[:7], str(int(op[7]) | _RETRY), op[8])
            future = self._batcher.submit(retry)
            future.add_done_callback(functools.partial(self._after_resubmit, waiter))
        for rid in list(self._orphans):
            # Whatever it became meanwhile, take it out of the queue and give back its
            # lease: both operations are idempotent.
            self._orphans.discard(rid)
            for op in (("C", rid), ("R", rid)):
                self._batcher.submit(op, functools.partial(self._undo_cancel, rid))

    def _after_resubmit(self, waiter: _Waiter, future: asyncio.Future[str]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if waiter.waiting.future.done() or self._waiters.get(waiter.request.id) is not waiter:
            return
        outcome = self._outcome(waiter.request, future.result(), waiter.started)
        if isinstance(outcome, Waiting):
            self._waiters[waiter.request.id] = waiter  # still queued: keep the first handle
            return
        self._waiters.pop(waiter.request.id, None)
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
                    self._fleet = max(1, int(live))
                    was_open = self._breaker.is_open
                    self._breaker.success()
                    if was_open:
                        self._on_reconnect()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._on_failure(exc)
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
            self._fail_waiters()

    def _fail_waiters(self) -> None:
        """Redis is gone: settle everyone waiting in it now, per the failure mode."""
        for rid, waiter in list(self._waiters.items()):
            self._waiters.pop(rid, None)
            self._orphans.add(rid)
            if not waiter.waiting.future.done():
                waiter.waiting.future.set_result(self._unavailable(rid))

    def _unavailable(self, rid: str) -> Admitted | Reject:
        if self._settings.failure_mode == "open":
            return Admitted(rid, unthrottled=True)
        return Reject("unavailable", 1.0)

    async def _fallback(self, request: Request) -> Outcome:
        mode = self._settings.failure_mode
        if mode == "open":
            return Admitted(request.id, unthrottled=True)
        if mode == "closed":
            return Reject("unavailable", 1.0)
        local = self._local_backend()
        outcome = await local.acquire(request)
        if isinstance(outcome, Waiting) or (isinstance(outcome, Admitted) and outcome.lease):
            self._local_ids.add(request.id)
        return outcome

    def _local_backend(self) -> MemoryBackend:
        """This process's share of the budget (by the last known fleet size)."""
        if self._local is None:
            self._local = MemoryBackend(_share(self._limits, self._fleet), self._policy)
        return self._local


def _share(limits: Limits, processes: int) -> Limits:
    """One process's part of the fleet's limits."""
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
