"""The Lua scheduler behind the Python scheduler's interface, on a fake clock.

Runs ``batch.lua`` (with ``lib.lua``) in a real redis-server, passing `now`
explicitly (the scripts' test-only clock override), and reads the grant lists
back as events. So the fake-clock scheduler tests run unchanged against the
rules the Redis backend executes.
"""

from __future__ import annotations

import itertools
from typing import cast

import redis

from throttle_mw.backends.redis.keys import hash_tag, state_key
from throttle_mw.backends.redis.protocol import acquire_tail, call_args, reply, static_args
from throttle_mw.backends.redis.scripts import source
from throttle_mw.priorities import RANK
from throttle_mw.scheduler import (
    Admit,
    Decision,
    Enqueue,
    Event,
    Evicted,
    Granted,
    Limits,
    Policy,
    Reject,
    Request,
    Snapshot,
    TenantSnapshot,
)

_PROCESS = "sim"
_prefixes = itertools.count()


class LuaScheduler:
    """Same methods as `throttle_mw.scheduler.Scheduler`, executed by Redis."""

    def __init__(self, client: redis.Redis, limits: Limits, policy: Policy, now: float) -> None:
        self._client = client
        self._limits = limits
        self._policy = policy
        self._tag = hash_tag(f"sim{next(_prefixes)}")
        self._key = state_key(self._tag)
        self._script = client.register_script(source("batch"))
        self._max_wait = dict(policy.max_wait_s)
        self._in_flight = 0
        self._leases: set[str] = set()
        self._waiting: set[str] = set()
        self._due: float | None = None
        self._tenants: set[str] = set()
        self.tick(now)  # start the state (and its measuring window) now, as Scheduler does

    # --- the scheduler's interface ---------------------------------------------------------

    def acquire(self, now: float, req: Request) -> tuple[Decision, list[Event]]:
        tail = acquire_tail(req, self._limits.weight(req.tenant), self._max_wait[req.priority])
        op = f"A|{req.id}|{tail}"
        self._tenants.add(req.tenant)
        result, events = self._call(now, [op])
        kind, *fields = result[0].split("|")
        if kind == "A":
            lease = fields[0] == "1"
            if lease:
                self._leases.add(req.id)
            return Admit(degraded=fields[1] == "1", lease=lease), events
        if kind == "Q":
            self._waiting.add(req.id)
            return Enqueue(deadline=float(fields[0]), estimated_wait_s=float(fields[1])), events
        return Reject(fields[0], float(fields[1])), events  # type: ignore[arg-type]

    def cancel(self, now: float, request_id: str) -> tuple[Reject | None, list[Event]]:
        result, events = self._call(now, [f"C|{request_id}"])
        kind, *fields = result[0].split("|")
        self._waiting.discard(request_id)
        if kind == "X":
            return Reject(fields[0], float(fields[1])), events  # type: ignore[arg-type]
        return None, events

    def release(self, now: float, request_id: str) -> list[Event]:
        if request_id not in self._leases:
            return []
        self._leases.discard(request_id)
        return self._call(now, [f"R|{request_id}"])[1]

    def tick(self, now: float) -> list[Event]:
        return self._call(now, ["T"])[1]

    def next_due(self, now: float) -> float | None:
        return self._due

    def set_limits(self, limits: Limits, now: float) -> list[Event]:
        self._limits = limits
        return self.tick(now)

    def snapshot(self, top: int = 10) -> Snapshot:
        tenants = self._client.zcard(f"{self._tag}:tenants")
        state = self._client.hgetall(self._key)
        queued: dict[str, int] = {
            p: int(state.get(f"n{rank}".encode(), b"0")) for p, rank in RANK.items()
        }
        top_list = cast(
            "list[tuple[bytes, float]]",
            self._client.zrevrange(f"{self._tag}:qlen", 0, top - 1, withscores=True),
        )
        busiest = tuple(TenantSnapshot(h.decode(), int(n) >> 32, 0.0) for h, n in top_list)
        tokens = state.get(b"tokens")
        return Snapshot(
            tokens=float(tokens) if tokens is not None and self._limits.rate else None,
            in_flight=int(float(state.get(b"inflight", b"0"))),
            queued_by_priority=queued,
            tenants=int(tenants),
            busiest=busiest,
            fair_rate=float(state.get(b"v_rate", b"0")),
        )

    @property
    def waiting(self) -> int:
        return int(float(self._client.hget(self._key, "waiting") or 0))

    @property
    def in_flight(self) -> int:
        return int(float(self._client.hget(self._key, "inflight") or 0))

    # --- plumbing -------------------------------------------------------------------------------

    def _call(self, now: float, ops: list[str]) -> tuple[list[str], list[Event]]:
        static = static_args(
            self._tag, _PROCESS, self._limits, self._policy, lease_ttl_s=3600, key_ttl_s=7200
        )
        args = call_args(static, repr(now), ops)
        key = f"{self._tag}:g:{_PROCESS}"
        pipe = self._client.pipeline(transaction=False)
        self._script(keys=[self._key], args=args, client=pipe)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        raw, messages, _ = pipe.execute()
        results = reply(raw)
        delay = results[len(ops)]
        self._due = now + float(delay) if delay else None
        return results[: len(ops)], self._events(messages)

    def _events(self, messages: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for raw in messages:
            kind, rid, *fields = raw.decode().split("|")
            self._waiting.discard(rid)
            if kind == "g":
                lease = fields[1] == "1"
                if lease:
                    self._leases.add(rid)
                events.append(Granted(rid, float(fields[0]), lease))
            else:
                events.append(Evicted(rid, Reject(fields[0], float(fields[1]))))  # type: ignore[arg-type]
        return events
