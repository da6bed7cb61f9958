"""The Lua scheduler behind the Python scheduler's interface, on a fake clock.

Runs ``batch.lua`` (with the rules in ``core.lua``) in a real redis-server, passing `now`
explicitly (the scripts' test-only clock override), and reads the grant lists
back as events. A release goes by ``release.lua``, as the backend sends a release alone
(with the epoch of the last trailer, as the backend tells the one it knows). So the
fake-clock scheduler tests run unchanged against the rules the Redis backend executes.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import redis

from throttle_mw.backends.redis import protocol
from throttle_mw.backends.redis.keys import Keys, tenant_digest
from throttle_mw.backends.redis.scripts import ENTRY_SCRIPTS, library, source
from throttle_mw.scheduler import (
    Admit,
    Decision,
    Enqueue,
    Event,
    Granted,
    HeldLease,
    LeaseCharge,
    LeaseGrant,
    Limits,
    Policy,
    Reject,
    Request,
    Snapshot,
)

_PROCESS = "sim"


def redis_version(client: redis.Redis) -> tuple[int, ...]:
    version = str(client.info("server")["redis_version"])
    return tuple(int(part) for part in version.split(".")[:2])


_prefixes = itertools.count()
_nonces = itertools.count()


class LuaScheduler:
    """Same methods as `throttle_mw.scheduler.Scheduler`, executed by Redis."""

    def __init__(
        self,
        client: redis.Redis,
        limits: Limits,
        policy: Policy,
        now: float,
        *,
        functions: bool | None = None,
        key_ttl_s: float = 7200.0,
    ) -> None:
        """`functions`: call the scripts as a function library (FCALL) or by EVALSHA;
        None: as production does, functions where the server has them. `key_ttl_s`: T,
        the state TTL the calls pass (backend.key_ttl_s)."""
        self._client = client
        if functions is None:
            functions = redis_version(client) >= (7, 0)
        self._functions = functions
        if functions:
            client.function_load(library().text, replace=True)
        self._limits = limits
        #: The limits every call passes (the processes' own): a live change leaves them.
        self._given = limits
        self._policy = policy
        keys = Keys(f"sim{next(_prefixes)}")
        self._tag = keys.tag
        self._keys = keys
        self._key = keys.state
        self._evalsha = {name: client.register_script(source(name)) for name in ENTRY_SCRIPTS}
        self._now = now
        self._max_wait = dict(policy.max_wait_s)
        self._in_flight = 0
        self._leases: set[str] = set()
        self._waiting: set[str] = set()
        self._due: float | None = None
        self._tenants: set[str] = set()
        #: The last trailer (a release's short reply has none), and the last reply's lines.
        self.trailer: protocol.Trailer
        self.reply: list[str] = []
        #: The epoch a release tells release.lua it knows (None: the last trailer's).
        self.known_epoch: str | None = None
        #: The lease TTL the calls pass (the policy's lease_ttl_s): a test may change it.
        self.lease_ttl_s = 3600.0
        #: The process the calls are made for: a test may change it (another process of the
        #: fleet, on the same budget: `joined`).
        self.process = _PROCESS
        #: The live limits' TTL the calls and live changes pass (THROTTLE_LIVE_LIMITS_TTL).
        self.live_ttl_s = 7200.0
        #: T, the state TTL the calls pass: a test may change it.
        self.key_ttl_s = key_ttl_s
        self.tick(now)  # start the state (and its measuring window) now, as Scheduler does

    def joined(self, process: str) -> LuaScheduler:
        """Another process of the fleet on this budget (its calls under `process`)."""
        other = copy.copy(self)
        other.process = process
        other._leases, other._waiting, other._tenants = set(), set(), set()
        return other

    # --- the scheduler's interface ---------------------------------------------------------

    def acquire(self, now: float, req: Request) -> tuple[Decision, list[Event]]:
        weight, max_wait = self._limits.weight(req.tenant), self._max_wait[req.priority]
        op = protocol.acquire_op(req.id, protocol.acquire_tail(req, weight, max_wait))
        self._tenants.add(req.tenant)
        result, events = self._call(now, [op])
        decision = protocol.decode_acquire(result[0])
        if isinstance(decision, Admit) and decision.lease:
            self._leases.add(req.id)
        if isinstance(decision, Enqueue):
            self._waiting.add(req.id)
        return decision, events

    def acquire_in_full(self, now: float, req: Request) -> Decision:
        """The same acquire in a call with a tick after it: batch.lua's full call, never
        fast.lua's (a call of two operations)."""
        weight, max_wait = self._limits.weight(req.tenant), self._max_wait[req.priority]
        op = protocol.acquire_op(req.id, protocol.acquire_tail(req, weight, max_wait))
        result, _ = self._call(now, [op, protocol.TICK])
        decision = protocol.decode_acquire(result[0])
        if isinstance(decision, Admit) and decision.lease:
            self._leases.add(req.id)
        return decision

    def cancel(self, now: float, request_id: str) -> tuple[Reject | None, list[Event]]:
        result, events = self._call(now, [protocol.cancel_op(request_id)])
        self._waiting.discard(request_id)
        decoded = protocol.decode_cancel(result[0])
        return (decoded if isinstance(decoded, Reject) else None), events

    def release(self, now: float, request_id: str) -> list[Event]:
        if request_id not in self._leases:
            return []
        self._leases.discard(request_id)
        return self._call(now, [protocol.release_op(request_id)], "release")[1]

    def lone_release(self, now: float, request_id: str) -> list[str]:
        """A release by release.lua, held or not: its whole reply."""
        self._leases.discard(request_id)
        self._call(now, [protocol.release_op(request_id)], "release")
        return self.reply

    def tick(self, now: float) -> list[Event]:
        return self._call(now, [protocol.TICK])[1]

    def batch(self, now: float, ops: list[str]) -> list[str]:
        """One script call of several operations (protocol's ops): their replies."""
        return self._call(now, ops)[0]

    def renew(self, now: float, request_ids: list[str]) -> protocol.Renewed:
        """renew.lua, the heartbeat: the leases' expiries pushed out to now + the lease TTL."""
        args = protocol.renew_args(
            repr(now), self._tag, self.process, self.lease_ttl_s, 7200, request_ids
        )
        return protocol.decode_renew(self._run("renew", args, self._client))

    def next_due(self, now: float) -> float | None:
        return self._due

    def lease_tokens(
        self,
        now: float,
        lease_s: float,
        held: HeldLease,
        wants: int,
        charges: Sequence[LeaseCharge] = (),
        *,
        epoch: str | None = None,
    ) -> LeaseGrant:
        """ratelease.lua: `charges` charged to their tenants, the last lease `held` (taken
        in `epoch`; None: the state's own, as the last trailer told it) out of the count,
        its returned tokens back, up to `wants` leased for `lease_s`."""
        self._now = now
        static = self._static_args()
        known = self.trailer.epoch if epoch is None else epoch
        args = protocol.ratelease_args(
            static, repr(now), known, held, wants, lease_s, charges, self._limits.weight
        )
        self.lease = protocol.decode_ratelease(self._run("ratelease", args, self._client))
        return self.lease.grant

    def set_limits(self, limits: Limits, now: float) -> list[Event]:
        """The processes' own limits changed (a redeploy), from this call on."""
        self._limits = self._given = limits
        return self.tick(now)

    def live_change(self, now: float, changes: dict[str, str], *, everything: bool = False) -> None:
        """A live change by live.lua at `now` (as `Budget.set` and `Budget.reset` make
        it: P:cfg's fields, "" deleting one), and no call after it."""
        args = protocol.live_args(
            repr(now),
            self._tag,
            f"n{next(_nonces)}",
            int(self.live_ttl_s * 1000),
            changes,
            everything=everything,
        )
        self._run("live", args, self._client)

    def set_live_limits(self, limits: Limits, now: float) -> list[Event]:
        """`Scheduler.set_limits` the way the Redis backend makes it: every limit a live
        override (`Budget.set_limits`), then a tick at the same time (the Python twin
        dispatches at once)."""
        self._limits = limits
        self.live_change(now, protocol.encode_live_limits(limits))
        return self.tick(now)

    def snapshot(self, top: int = 10) -> Snapshot:
        args = protocol.snapshot_args(repr(self._now), self._tag, self._given, top)
        return protocol.decode_snapshot(self._run("snapshot", args, self._client))

    def fairness(self, tenants: Sequence[str]) -> tuple[dict[str, float], float, float]:
        """The tenants' finish tags (absent: not made), the virtual clock and the open
        window's cost, as `python_fairness` reads them from a `Scheduler`."""
        tags = {}
        for name in tenants:
            text = self._client.hget(self._keys.tenant_hash, tenant_digest(name))
            if text is not None:
                tags[name] = float(protocol.tenant_state(text)["f"])
        raw: Any = self._client.hget(self._key, "nums")
        packed = raw.decode().split(protocol.SEP)
        return tags, float(packed[2]), float(packed[5] or 0)

    @property
    def waiting(self) -> int:
        return int(float(self._client.hget(self._key, "waiting") or 0))

    @property
    def in_flight(self) -> int:
        return int(float(self._client.hget(self._key, "inflight") or 0))

    # --- plumbing -------------------------------------------------------------------------------

    def _static_args(self) -> list[str]:
        """batch.lua's first ARGV (every entry script's that takes the limits): this
        scheduler's tag, process, limits and policy."""
        pol = self._policy
        return protocol.static_args(
            self._tag,
            self.process,
            self._given,
            credit_s=pol.credit_s,
            queue_limit=pol.queue_limit,
            tenant_queue_limit=pol.tenant_queue_limit,
            tenant_idle_s=pol.tenant_idle_s,
            max_tenants=pol.max_tenants,
            lease_ttl_s=self.lease_ttl_s,
            key_ttl_s=self.key_ttl_s,
            live_limits_ttl_s=self.live_ttl_s,
        )

    def _call(
        self, now: float, ops: list[str], entry: str = "batch"
    ) -> tuple[list[str], list[Event]]:
        self._now = now
        static = self._static_args()
        if entry == "release":
            (op,) = ops
            rid = protocol.lone_release(ops)
            assert rid is not None, op
            known = self.trailer.epoch if self.known_epoch is None else self.known_epoch
            args = protocol.release_args(static, repr(now), known, rid)
        else:
            args = protocol.call_args(static, repr(now), ops)
        key = f"{self._tag}:g:{self.process}"
        pipe = self._client.pipeline(transaction=False)
        self._run(entry, args, pipe)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        raw, messages, _ = pipe.execute()
        results = protocol.split_reply(raw)
        self.reply = results  # the last call's, whole
        if len(results) > len(ops):
            self.trailer = protocol.trailer(results)  # the last call's
            delay = self.trailer.next_tick_s
            self._due = None if delay is None else now + delay
        else:  # release.lua's short reply: nobody waits, nothing due
            self._due = None
        return results[: len(ops)], self._events(messages)

    def _run(self, name: str, args: list[str], client: Any) -> Any:
        if self._functions:
            return client.fcall(library().functions[name], 1, self._key, *args)
        return self._evalsha[name](keys=[self._key], args=args, client=client)

    def _events(self, messages: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for raw in messages:
            if protocol.is_waits(raw):
                continue  # (someone waits: for a process's pools, none here)
            event = protocol.decode_message(raw)
            self._waiting.discard(event.id)
            if isinstance(event, Granted) and event.lease:
                self._leases.add(event.id)
            events.append(event)
        return events
