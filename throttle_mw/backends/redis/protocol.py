"""The wire format of every script, in one place: calls in, typed values out.

Each script's header documents its arguments and reply; this module is the only
code that writes or reads them: the backend, the live-limits tool and the
tests that run the scripts as a scheduler all go through it. The codes and
separators below reach the Lua side as generated constants (``scripts.py``),
so neither side spells them twice.

A call of one release alone goes to release.lua instead (`lone_release`, `release_args`):
its reply is that release's line, and the trailer only when the script went the full way
(`split_reply`).

Replies of batch.lua decode into the scheduler's own types: an acquire into
`Admit`, `Enqueue` or `Reject`, a grant-list message into `Granted` or
`Evicted`, exactly what `throttle_mw.scheduler.Scheduler` returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple, cast

from ...priorities import PRIORITIES, RANK
from ...scheduler import (
    AUTO,
    Admit,
    Enqueue,
    Evicted,
    Granted,
    HeldLease,
    LeaseCharge,
    LeaseGrant,
    Limits,
    Reason,
    Reject,
    Request,
    Snapshot,
    TenantSnapshot,
)
from .keys import TENANT_FIELDS, tenant_digest

#: Joins the fields of an operation, a reply line or a message.
SEP: Final = "|"
#: Joins the operations of one call, and the lines of its reply.
LINE: Final = "\n"
#: How the scripts write numbers: enough digits for Python to read back the same float.
NUMBER_FORMAT: Final = "%.17g"

#: batch.lua's operations.
OP: Final = MappingProxyType(
    {"acquire": "A", "release": "R", "cancel": "C", "tick": "T", "reclaim": "K", "leave": "L"}
)
#: Bits of an acquire's flags field.
FLAG: Final = MappingProxyType({"sheddable": 1, "degradable": 2, "retry": 4})
#: The first field of each reply line of batch.lua.
REPLY: Final = MappingProxyType(
    {
        "admitted": "A",  # A|lease|degraded
        "queued": "Q",  # Q|deadline|wait_s|limited (1: queued for the concurrency limit)
        "rejected": "J",  # J|reason|retry_after_s
        "released": "R",
        "cancelled": "X",  # X|reason|wait_s: it left the queue
        "already_admitted": "G",  # G|lease: a cancel that came too late
        "unknown": "N",  # a cancel of a request not waiting (gone already)
        "ticked": "T",
        "deferred": "D",  # not run: the call had done its share of work; send it again
        "reclaimed": "K",  # K|1: registered again; K|0: nothing to do
        "left": "L",  # L|n: a leave took the first n of its ids out (the rest: send again)
    }
)
#: The first field of each message on a process's grant list. ``waiting`` is a message of
#: its own, without fields: someone started waiting for the budget while this process may
#: hold a pool (a lease of rate tokens, kept concurrency slots): give it back at once
#: (store.lua's call.signal_waiting, backend.py's `_someone_waits`).
MESSAGE: Final = MappingProxyType(
    {"granted": "g", "evicted": "r", "waiting": "w"}
)  # g|id|waited_s|lease
#: The whole message that says someone waits (no request id: for the process).
WAITS: Final = MESSAGE["waiting"]
#: The fields of an acquire operation, joined with SEP.
ACQUIRE_FIELDS: Final = (
    "op",
    "id",
    "tenant_digest",
    "tenant",
    "weight",
    "rank",
    "cost",
    "flags",
    "max_wait_s",
)
_FLAGS_FIELD = ACQUIRE_FIELDS.index("flags")
#: The fields of a waiting request in P:r, joined with SEP.
WAITER_FIELDS: Final = ("tenant", "cost", "rank", "process", "deadline", "enqueued_at")

#: One operation of a batch call.
Op = str
TICK: Final[Op] = OP["tick"]

_ADMITTED, _QUEUED, _CANCELLED, _LATE = (
    REPLY["admitted"],
    REPLY["queued"],
    REPLY["cancelled"],
    REPLY["already_admitted"],
)
_ACQUIRE = OP["acquire"] + SEP
_RELEASE = OP["release"] + SEP
#: The reply line of an operation the script left for the next call (batch.lua's work bound).
DEFERRED: Final = REPLY["deferred"]
#: A reclaim's reply when it registered the lease.
RECLAIMED: Final = REPLY["reclaimed"] + SEP + "1"
_new_tuple = tuple.__new__


class AlreadyAdmitted(NamedTuple):
    """A cancel that lost the race with a grant: the request was admitted."""

    lease: bool


class Trailer(NamedTuple):
    """The last four lines of a batch reply."""

    #: Seconds until this process should send a tick, or None: only an arrival or a
    #: release can change anything.
    next_tick_s: float | None
    #: Processes with a live heartbeat.
    processes: int
    #: The limits in force, as sent (`decode_limits`). The same line call after call
    #: until someone changes them: compare it with the last one before decoding it.
    limits: str
    #: The budget state's epoch: made anew whenever its state is (a Redis restarted empty,
    #: a failover to an empty replica): a process that knew another one reclaims.
    epoch: str


# --- batch.lua: arguments and operations -----------------------------------------------


def limit_args(limits: Limits) -> list[str]:
    """rate, burst, concurrency, tenant_rate, tenant_burst ("" = unset; a concurrency of
    AUTO: the fleet's learned limit)."""
    return [
        _optional(limits.rate),
        repr(limits.burst),
        AUTO if limits.learned else _optional(limits.concurrency),
        _optional(limits.tenant_rate),
        repr(limits.tenant_burst),
    ]


def static_args(
    tag: str,
    process: str,
    limits: Limits,
    *,
    credit_s: float,
    queue_limit: int,
    tenant_queue_limit: int,
    tenant_idle_s: float,
    max_tenants: int,
    lease_ttl_s: float,
    key_ttl_s: float,
    live_limits_ttl_s: float,
) -> list[str]:
    """ARGV[1..4] of batch.lua: the same for every call of a process; ARGV[1] (the
    test clock) is "" (Redis TIME). ARGV[4] is the limits and the policy in one argument,
    joined with SEP (each argument costs Redis about a microsecond per call, and the
    script parses this one only when it changes). The TTLs are keys.py's T and live."""
    policy = [
        *limit_args(limits),
        repr(credit_s),
        str(queue_limit),
        str(tenant_queue_limit),
        repr(tenant_idle_s),
        str(max_tenants),
        repr(lease_ttl_s),
        repr(key_ttl_s),
        repr(live_limits_ttl_s),
    ]
    return ["", tag, process, SEP.join(policy)]


def call_args(static: list[str], now: str, ops: list[Op], epoch: str = "") -> list[str]:
    """The whole ARGV of one call: the static part with `now`, the epoch the caller knew
    ("" if none, or none worth a grace: `RedisBackend._known_epoch`), the operations."""
    args = list(static)
    args[0] = now
    args.append(epoch)
    args.append(str(len(ops)))
    args.append(LINE.join(ops))
    return args


def acquire_tail(request: Request, weight: float, max_wait_s: float) -> str:
    """An acquire op after ``A|id|``: what stays the same for a tenant's route."""
    flags = (FLAG["sheddable"] if request.sheddable or request.degradable else 0) | (
        FLAG["degradable"] if request.degradable else 0
    )
    return SEP.join(
        (
            tenant_digest(request.tenant),
            request.tenant,
            repr(weight),
            str(RANK[request.priority]),
            str(request.cost),
            str(flags),
            repr(max_wait_s),
        )
    )


def acquire_op(request_id: str, tail: str) -> Op:
    # Concatenation: this runs once per request.
    return _ACQUIRE + request_id + SEP + tail


def release_op(request_id: str) -> Op:
    return OP["release"] + SEP + request_id


def tenant_state(raw: bytes | str) -> dict[str, str]:
    """A tenant's field of P:T taken apart (the CLI's and the tests' reading; the scripts
    read it themselves): its values by keys.TENANT_FIELDS' names ('' at a default) and
    ``name``."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    values = text.split(SEP, len(TENANT_FIELDS))
    return {**dict(zip(TENANT_FIELDS, values, strict=False)), "name": values[-1]}


def lone_release(ops: Sequence[Op]) -> str | None:
    """The request id of a call that is one release and nothing else (release.lua's), or
    None (batch.lua's call)."""
    if len(ops) == 1 and ops[0].startswith(_RELEASE):
        return ops[0][len(_RELEASE) :]
    return None


def release_args(static: list[str], now: str, epoch: str, request_id: str) -> list[str]:
    """ARGV of release.lua: batch.lua's first five (`call_args`: its full call needs
    them), then the request id; no operation to split, and most often a reply of one line."""
    args = list(static)
    args[0] = now
    args.append(epoch)
    args.append(request_id)
    return args


def cancel_op(request_id: str) -> Op:
    return OP["cancel"] + SEP + request_id


def leave_op(request_ids: Iterable[str]) -> Op:
    """A process shutting down: its waiters among `request_ids` leave the queue, and the
    others give back a lease if they hold one (batch.lua's leave). The script takes as
    many as its work allows and says how many (`decode_left`): send the rest again."""
    return SEP.join((OP["leave"], *request_ids))


def decode_left(line: str) -> int:
    """How many of a leave's ids the script took out (from the first)."""
    kind, count = line.split(SEP)
    if kind != REPLY["left"]:
        raise ValueError(f"not a leave's reply: {line!r}")
    return int(count)


def reclaim_op(request_id: str, cost: int, epoch: str) -> Op:
    """Register again a lease this process holds (its request still runs) that a budget
    state made anew has lost. `epoch`: the state it was held in ("" for a lease of the
    failure mode's, never in Redis). Idempotent; see store.lua's `reclaim`."""
    return SEP.join((OP["reclaim"], request_id, str(cost), epoch))


def as_retry(op: Op) -> Op:
    """An acquire op marked as a retry: answered from what exists, never done twice."""
    if op[0] != OP["acquire"]:
        return op
    fields = op.split(SEP)
    fields[_FLAGS_FIELD] = str(int(fields[_FLAGS_FIELD]) | FLAG["retry"])
    return SEP.join(fields)


# --- batch.lua: replies ------------------------------------------------------------------


def split_reply(raw: bytes | str) -> list[str]:
    """One line per operation, then the four lines of the `Trailer`; release.lua's reply
    may be its line alone (the release taken out with nobody waiting, in the state of the
    epoch the caller knew: nothing in a trailer it needs)."""
    return (raw.decode() if isinstance(raw, bytes) else str(raw)).split(LINE)


def trailer(lines: list[str]) -> Trailer:
    """The trailer: the reply's lines after one per operation."""
    delay, processes, limits, epoch = lines[-4:]
    return Trailer(float(delay) if delay else None, int(processes), limits, epoch)


def decode_limits(line: str, weights: Mapping[str, float]) -> Limits:
    """The trailer's limits in force (`LIVE_LIMITS`, joined with SEP), with a process's
    own tenant weights (live weights stay in Redis)."""
    rate, burst, concurrency, tenant_rate, tenant_burst, learned = line.split(SEP)
    return Limits(
        rate=float(rate) if rate else None,
        burst=float(burst),
        concurrency=int(float(concurrency)) if concurrency else None,
        weights=weights,
        tenant_rate=float(tenant_rate) if tenant_rate else None,
        tenant_burst=float(tenant_burst),
        learned=learned == AUTO,
    )


def decode_acquire(line: str) -> Admit | Enqueue | Reject:
    """An acquire's reply line, as the scheduler's decision (``waited_s`` is 0)."""
    # (At most three fields: a queued reply's wait and flag stay in `second`.)
    kind, first, second = line.split(SEP, 2)
    if kind == _ADMITTED:
        return _new_tuple(Admit, (0.0, second == "1", first == "1"))
    if kind == _QUEUED:
        wait, limited = second.split(SEP)
        return _new_tuple(Enqueue, (float(first), float(wait), limited == "1"))
    return _new_tuple(Reject, (cast(Reason, first), float(second)))


def decode_cancel(line: str) -> Reject | AlreadyAdmitted | None:
    """A cancel's reply: the rejection to send if it left the queue; `AlreadyAdmitted`
    if a grant won the race; None if it was not waiting any more."""
    kind, *fields = line.split(SEP)
    if kind == _CANCELLED:
        return Reject(cast(Reason, fields[0]), float(fields[1]))
    if kind == _LATE:
        return AlreadyAdmitted(fields[0] == "1")
    return None


def is_lease(line: str) -> bool:
    """Does an acquire or cancel reply say the request now holds a lease?"""
    return line.startswith((_ADMITTED + SEP + "1", _LATE + SEP + "1"))


def is_queued(line: str) -> bool:
    return line.startswith(_QUEUED)


def decode_message(raw: bytes | str) -> Granted | Evicted:
    """A message from the grant list: a queued request was admitted, or left the queue.
    (The message that someone waits, `WAITS`, is told apart before: `is_waits`.)"""
    text = raw.decode() if isinstance(raw, bytes) else raw
    kind, request_id, first, second = text.split(SEP)
    if kind == MESSAGE["granted"]:
        return Granted(request_id, float(first), second == "1")
    return Evicted(request_id, Reject(cast(Reason, first), float(second)))


def is_waits(raw: bytes | str) -> bool:
    """Is a grant-list message the one that says someone started waiting (`WAITS`)?"""
    return raw == WAITS or raw == WAITS.encode()


# --- renew.lua, leave.lua -------------------------------------------------------------------


def renew_args(
    now: str,
    tag: str,
    process: str,
    lease_ttl_s: float,
    key_ttl_s: float,
    leases: Iterable[str],
    *,
    keeps: bool = False,
) -> list[str]:
    """ARGV of renew.lua: the heartbeat lasts as long as the leases it renews; the keys
    they live in, for the state TTL (keys.py's T); `keeps`: this process may keep
    concurrency slots until the heartbeat lapses (registered in P:pl, to be told when
    someone starts waiting)."""
    flag = "1" if keeps else "0"
    ttl, keys_ttl = repr(lease_ttl_s), repr(key_ttl_s)
    return [now, tag, process, ttl, ttl, keys_ttl, flag, *leases]


class Renewed(NamedTuple):
    """renew.lua's reply."""

    #: Processes with a live heartbeat.
    processes: int
    #: The epoch of the budget's state ("": it has none).
    epoch: str
    #: Per lease id sent, in order: did Redis have it?
    held: tuple[bool, ...]
    #: A lease lapsed (its process died): tick, it is expired (and what waits dispatched).
    tick: bool = False


def decode_renew(raw: Any) -> Renewed:
    live, epoch, held, tick = (x.decode() if isinstance(x, bytes) else x for x in raw)
    return Renewed(int(live), str(epoch), tuple(c == "1" for c in str(held)), str(tick) == "1")


def leave_args(tag: str, process: str) -> list[str]:
    return [tag, process]


# --- ratelease.lua ---------------------------------------------------------------------------


def charges_arg(charges: Sequence[LeaseCharge], weight: Callable[[str], float]) -> str:
    """A renewal's charges (ratelease.lua's ARGV[14]): one per LINE, each the tenant's
    digest, its name and its weight as its acquire would send them (`acquire_tail`), the
    cost admitted from leases and the last admission's cost, joined with SEP."""
    return LINE.join(
        SEP.join(
            (tenant_digest(c.tenant), c.tenant, repr(weight(c.tenant)), str(c.cost), str(c.last))
        )
        for c in charges
    )


def ratelease_args(
    static: list[str],
    now: str,
    epoch: str,
    held: HeldLease,
    wants: int,
    lease_s: float,
    charges: Sequence[LeaseCharge] = (),
    weight: Callable[[str], float] = lambda tenant: 1.0,
) -> list[str]:
    """ARGV of ratelease.lua: batch.lua's first four (`static_args`: the limits in force are
    the caller's unless live ones win), the epoch of the caller's last lease, its unspent
    tokens given back, the tokens it wants, its kept tokens, that lease's generation,
    expiry (Redis's time, as the grant gave it) and size, the new lease's life, and the
    admissions from its leases to charge to their tenants (their number, `charges_arg`;
    `weight`: a tenant's weight as its acquire sends it)."""
    args = list(static)
    args[0] = now
    args += [
        epoch,
        str(held.returned),
        str(wants),
        str(held.kept),
        str(held.generation),
        repr(held.until),
        str(held.size),
        repr(lease_s),
        str(len(charges)),
        charges_arg(charges, weight),
    ]
    return args


class RateLease(NamedTuple):
    """ratelease.lua's reply."""

    #: Tokens taken out of the bucket for the caller's new lease.
    taken: int
    #: Redis's time of the call, in seconds.
    now: float
    #: The epoch of the budget's state ("": none yet).
    epoch: str
    #: The kept tokens of the last lease that still count (fewer: they lapse).
    kept: int = 0
    #: The new lease's generation (0: none) and expiry (Redis's time).
    generation: int = 0
    until: float = 0.0
    #: The charges taken (charged, or dropped as another state's): the rest, if any, are
    #: sent again with the next renewal (the call's work bound).
    charged: int = 0

    @property
    def grant(self) -> LeaseGrant:
        return LeaseGrant(self.taken, self.kept, self.generation, self.until)


def decode_ratelease(raw: Any) -> RateLease:
    taken, now, epoch, kept, generation, until, charged = (
        x.decode() if isinstance(x, bytes) else x for x in raw
    )
    return RateLease(
        int(taken), float(now), str(epoch), int(kept), int(generation), float(until), int(charged)
    )


# --- snapshot.lua ---------------------------------------------------------------------------


def snapshot_args(now: str, tag: str, limits: Limits, top: int) -> list[str]:
    """ARGV of snapshot.lua: `limits` are the caller's (live overrides win in the script)."""
    return [now, tag, *limit_args(limits), str(top)]


def decode_snapshot(raw: bytes | str) -> Snapshot:
    """snapshot.lua's JSON answer, with the limits in force."""
    data: dict[str, Any] = json.loads(raw)
    force = data["limits"]
    limits = Limits(
        rate=force.get("rate"),
        burst=float(force["burst"]),
        concurrency=None if force.get("concurrency") is None else int(force["concurrency"]),
        tenant_rate=force.get("tenant_rate"),
        tenant_burst=float(force["tenant_burst"]),
        learned=bool(force.get("learned")),
    )
    queued = data["queued_by_priority"]
    return Snapshot(
        tokens=data.get("tokens"),
        in_flight=int(data["in_flight"]),
        queued_by_priority={p: int(queued[p]) for p in PRIORITIES},
        tenants=int(data["tenants"]),
        busiest=tuple(
            TenantSnapshot(b["tenant"], int(b["queued"]), 0.0) for b in data.get("busiest") or ()
        ),
        fair_rate=float(data.get("fair_rate") or 0.0),
        processes=int(data["processes"]),
        limits=limits,
    )


# --- live limits: the P:cfg hash -----------------------------------------------------------

#: The live limits, as fields of P:cfg; a rate or the concurrency may be switched off.
LIVE_LIMITS: Final = ("rate", "burst", "concurrency", "tenant_rate", "tenant_burst")
NULLABLE: Final = frozenset({"rate", "concurrency", "tenant_rate"})
#: A live limit switched off.
OFF: Final = "none"
#: P:cfg's field holding the fleet's learned concurrency limit (learner.py writes it; the
#: scripts read it when the concurrency in force is AUTO).
LEARNED: Final = "learned"


def encode_live_limits(limits: Limits) -> dict[str, str]:
    """Every limit of `limits` as P:cfg fields (a learned concurrency as AUTO)."""
    fields = {
        name: OFF if value is None else (repr(value) if isinstance(value, float) else str(value))
        for name in LIVE_LIMITS
        for value in (getattr(limits, name),)
    }
    if limits.learned:
        fields["concurrency"] = AUTO
    return fields


def live_args(
    now: str,
    tag: str,
    nonce: str,
    live_ttl_ms: int,
    changes: Mapping[str, str],
    *,
    everything: bool = False,
) -> list[str]:
    """ARGV of live.lua: P:cfg's fields to change (a value "" deletes one; `everything`:
    P:cfg deleted first), `nonce` names the new live stamp."""
    args = [now, tag, nonce, str(live_ttl_ms), "1" if everything else ""]
    for name, value in changes.items():
        args += [name, value]
    return args


def decode_live_limits(raw: Mapping[str, str]) -> dict[str, float | str | None]:
    """The overridden limits only (None: switched off; AUTO: learned)."""
    return {
        k: None if raw[k] == OFF else (AUTO if raw[k] == AUTO else float(raw[k]))
        for k in LIVE_LIMITS
        if k in raw
    }


def _optional(value: float | None) -> str:
    return "" if value is None else repr(value)
