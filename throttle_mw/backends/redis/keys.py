"""The key layout of one budget in Redis, written once for Python and Lua.

Every key of a budget starts with its hash tag ``{prefix}`` (one Redis Cluster
slot) and is that tag plus a suffix from `SUFFIX`. The scripts get `SUFFIX`
and the layout numbers below as generated Lua (see ``scripts.py``), and build
key names from the one tag they are given; Python builds them with `Keys`.
Tenant ids never reach a key as text, only as a fixed-length digest.

===============  ======  ==========================================================
key              type    holds
===============  ======  ==========================================================
P:s              hash    budget state: tokens, in flight, virtual clock, fair-rate
                         window, queue counts, the fleet's tick claim (store.lua)
P:cfg            hash    live limits set with ``throttle-mw set``; override callers'
P:w, P:wn        hash    live tenant weights by digest, and the names behind them
P:t:<h>          hash    tenant h: finish tag, weight, cap bucket, queued cost by rank,
                         state, its member in P:active, name
P:q:<h>          zset    tenant h's waiting requests, score rank * RANK_SPAN + seq
P:r              hash    waiting request id -> its fields (protocol.WAITER_FIELDS)
P:active         zset    tenants in line by finish tag; member "<seq>|<h>" (ties go
                         in activation order)
P:capped         zset    tenants held by their own rate cap, by when they may go
P:qlen           zset    tenants by (waiting requests, latest push):
                         score n * PUSH_SPAN + seq mod PUSH_SPAN (longest queue first)
P:dl             zset    waiting request id -> deadline
P:tenants        zset    tenant h -> last seen (idle expiry, max tenants)
P:leases, P:lc   zset,   lease (request id) -> expiry; lease -> "cost|process"
                 hash
P:g:<proc>       list    grants and evictions for the process that queued them
P:rc:<proc>      list    the process's latest lease-less admissions (retries)
P:procs          zset    process -> heartbeat expiry
===============  ======  ==========================================================
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Final

#: Suffix of each key after the budget's hash tag; per-tenant and per-process keys
#: end with the tenant digest or process id.
SUFFIX: Final = MappingProxyType(
    {
        "state": ":s",
        "cfg": ":cfg",
        "weights": ":w",
        "weight_names": ":wn",
        "tenant": ":t:",
        "queue": ":q:",
        "waiters": ":r",
        "active": ":active",
        "capped": ":capped",
        "qlen": ":qlen",
        "deadlines": ":dl",
        "tenants": ":tenants",
        "leases": ":leases",
        "lease_costs": ":lc",
        "grants": ":g:",
        "recent": ":rc:",
        "procs": ":procs",
    }
)

#: A waiting request's score in its tenant's queue: rank * RANK_SPAN + sequence number,
#: so the most urgent, oldest request comes first.
RANK_SPAN: Final = 1e13
#: Digits of the activation sequence number in an active-line member ("<seq>|<h>").
MEMBER_SEQ_DIGITS: Final = 16
#: A process's grant list outlives its last write by this long (then the process is gone).
GRANTS_TTL_S: Final = 60.0
#: A key's TTL is pushed out again once this fraction of it (1/TTL_REFRESHES) has passed,
#: not on every call.
TTL_REFRESHES: Final = 4
#: Lease-less admissions remembered per process, so a retried acquire is answered.
RECENT_KEPT: Final = 256


def hash_tag(prefix: str) -> str:
    """``{prefix}``: every key of the budget lands in one Redis Cluster slot."""
    return "{" + prefix + "}"


def tenant_digest(tenant: str) -> str:
    """A fixed-length digest: raw tenant text never becomes part of a key."""
    return hashlib.blake2b(tenant.encode("utf-8"), digest_size=12).hexdigest()


class Keys:
    """Key names of one budget, for the Python side (the CLI, the backend, tests)."""

    def __init__(self, prefix: str) -> None:
        self.tag = hash_tag(prefix)
        self.state = self.tag + SUFFIX["state"]
        self.cfg = self.tag + SUFFIX["cfg"]
        self.weights = self.tag + SUFFIX["weights"]
        self.weight_names = self.tag + SUFFIX["weight_names"]
        self.tenants = self.tag + SUFFIX["tenants"]
        self.qlen = self.tag + SUFFIX["qlen"]
        self.procs = self.tag + SUFFIX["procs"]

    def grants(self, process: str) -> str:
        return self.tag + SUFFIX["grants"] + process

    def tenant(self, tenant: str) -> str:
        return self.tag + SUFFIX["tenant"] + tenant_digest(tenant)
