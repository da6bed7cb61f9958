"""batch.lua's wire format: its arguments, its operations and its reply.

The script's header documents the format; this is the one place that writes it
(the backend, and the tests that run the script as a scheduler).
"""

from __future__ import annotations

from ...priorities import RANK
from ...scheduler import Limits, Policy, Request
from .keys import tenant_digest

#: One operation, its fields joined with "|".
Op = str

_FLAGS = {(False, False): 0, (True, False): 1, (True, True): 3, (False, True): 3}
_RETRY = 4


def static_args(
    tag: str,
    process: str,
    limits: Limits,
    policy: Policy,
    *,
    lease_ttl_s: float,
    key_ttl_s: float,
) -> list[str]:
    """ARGV[1..15]: the same for every call of a process; ARGV[1] (the test clock) is ""."""

    def opt(value: float | None) -> str:
        return "" if value is None else repr(value)

    return [
        "",
        tag,
        process,
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
        repr(lease_ttl_s),
        repr(key_ttl_s),
    ]


def call_args(static: list[str], now: str, ops: list[Op]) -> list[str]:
    """The whole ARGV of one call: the static part with `now`, then the operations."""
    args = list(static)
    args[0] = now
    args.append(str(len(ops)))
    args.append("\n".join(ops))
    return args


def acquire_tail(request: Request, weight: float, max_wait_s: float) -> str:
    """An acquire op after ``A|id|``: what stays the same for a tenant's route."""
    flags = _FLAGS[(request.sheddable, request.degradable)]
    return (
        f"{tenant_digest(request.tenant)}|{request.tenant}|{weight!r}|"
        f"{RANK[request.priority]}|{request.cost}|{flags}|{max_wait_s!r}"
    )


def as_retry(op: Op) -> Op:
    """An acquire op marked as a retry: answered from what exists, never done twice."""
    if op[0] != "A":
        return op
    fields = op.split("|")
    fields[7] = str(int(fields[7]) | _RETRY)
    return "|".join(fields)


def reply(raw: bytes | str) -> list[str]:
    """One line per operation, then the tick delay and the count of live processes."""
    return (raw.decode() if isinstance(raw, bytes) else str(raw)).split("\n")
