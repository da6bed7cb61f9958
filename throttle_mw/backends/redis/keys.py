"""The key layout of one budget in Redis, written once for Python and Lua.

Every key of a budget starts with its hash tag ``{prefix}`` (one Redis Cluster
slot) and is that tag plus a suffix from `SUFFIX`. The scripts get `SUFFIX`
and the layout numbers below as generated Lua (see ``scripts.py``), and build
key names from the one tag they are given; Python builds them with `Keys`.
Tenant ids never reach a key as text, only as a fixed-length digest.

===============  ======  ===========================================================  ======
key              type    holds                                                        TTL
===============  ======  ===========================================================  ======
P:s              hash    budget state: tokens, in flight, virtual clock, fair-rate    T
                         window, queue counts, the fleet's tick claim, whether the
                         lease keys hold their anchor; most numbers packed in one
                         field, ``nums`` (store.lua's layout); ``lv``: which reading
                         of P:cfg and P:w is current (LIVE_STAMP); ``gn``: the
                         write that last changed those fields (GENERATION: a full
                         call takes the state it kept by it)
P:cfg            hash    live limits set with ``throttle-mw set``; override callers'  live
                         limits. A learned limit and its state (learner.py) too
P:w, P:wn        hash    live tenant weights by digest, and the names behind them     live
P:T              hash    every tenant of the budget, by digest h: its state in one    kept+T
                         text, TENANT_FIELDS (finish tag, weight, cap bucket, queued
                         cost by rank, state, its member's sequence number in
                         P:active, its queue's next TTL refresh, its lone waiter)
                         joined with SEP,
                         then its name; '' for a default. A tenant has no TTL of its
                         own: it leaves by the idle sweep, the max_tenants bound or
                         the sweep for strays (store.lua, call.sweep_strays). An
                         anchor field (ENCODING_ANCHOR, value '') keeps it a
                         hashtable (no linear search per tenant in a compact hash)
P:q:<h>          zset    tenant h's waiting requests, score rank * RANK_SPAN + seq    kept+T
                         (seq 0 for the one moved there from q1); only from its
                         second waiter: a tenant's lone waiter is its field q1 in
                         P:T (store.lua's enqueue), the key made when a second joins
P:r              hash    waiting request id -> its fields (protocol.WAITER_FIELDS)    T
P:active         zset    tenants in line by finish tag; member "<seq>|<h>" (ties go   T
                         in activation order)
P:capped         zset    tenants held by their own rate cap, by when they may go      T
P:qlen           zset    tenants by (waiting requests, latest push):                  T
                         score n * PUSH_SPAN + seq mod PUSH_SPAN (longest queue first)
P:dl             zset    waiting request id -> deadline                               T
P:tenants        zset    idle tenant h -> last seen, in whole microseconds (idle      kept+T
                         expiry, max tenants); a tenant with waiters is off it until
                         its queue empties. An anchor member (IDLE_ANCHOR, score
                         +inf) keeps the key, and its TTL, when the last tenant
                         leaves it: readers count with ZCOUNT -inf (+inf
P:leases, P:lc   zset,   lease (request id) -> expiry; a lease of a cost other than   T
                 hash    1 -> its cost (P:s's packed ``lk`` counts those); with 16+
                         in flight, an anchor member (LEASE_ANCHOR, score +inf)
                         keeps both in their big encodings (store.lua)
P:g:<proc>       list    grants and evictions for the process that queued them        T
P:rc:<proc>      list    the process's latest lease-less admissions (retries)         T
P:procs          zset    process -> heartbeat expiry                                  T
P:pl             zset    process -> until when it may hold a pool: a lease of rate    T
                         tokens (its expiry, ratelease.lua) or kept concurrency
                         slots (its heartbeat's, renew.lua); told on its grant list
                         when someone starts waiting (store.lua's signal_waiting);
                         once a signal had more than SIGNAL_BATCH to tell, an
                         anchor member (LEASE_ANCHOR, score 0: never live) keeps
                         it in its big encoding; lapsed registrations (a process
                         killed) are dropped by any heartbeat (renew.lua)
P:pn             zset    P:pl's members by name (all scored 0): a signal walks it     T
                         SIGNAL_BATCH (scripts.py) names a call from P:s's cursor
                         (SIGNAL_CURSOR), store.lua's signal_next
P:lw             list    window summaries of a learned limit, since its last step     live
                         (learner.py, which sets the TTLs of these three on each write)
P:lq             list    how many of a pushed summary's requests waited for the       live
                         limit (``token|n``, n > 0), beside P:lw: its wire text
                         cannot carry it (learner.py)
P:lstep          string  the fleet's claim on the learned limit's current step        window
===============  ======  ===========================================================  ======

Nothing a budget writes lives forever: a budget nobody uses any more leaves
Redis on its own. The TTL column is how long a key outlives its last use:

- T, the state TTL: the longest maximum wait, the deadline grace and the lease
  TTL (``backend.key_ttl_s``). By then every waiter is past its deadline and
  every lease has lapsed, so nothing in the state is live any more.
- kept+T: as long more as an idle tenant is kept, for what describes tenants (P:T
  and P:tenants with the budget-wide keys, a tenant's queue with its tenant): the
  longer of ``THROTTLE_TENANT_IDLE`` and, with a per-tenant rate cap, the time an
  empty cap takes to refill (tenant_burst / tenant_rate, the limits in force on the
  call: store.lua's ``call.kept_s``, which core.lua's forget_idle keeps a tenant
  by). Only idle+T, a capped tenant's keys could lapse while it is still kept, and
  it come back with a full cap. A live change makes every TTL's refresh due at the
  next call (live.lua), and one of a tenant cap keeps these keys as long as the live
  limits until then: a keep lengthened live reaches them before the old one lapses.
- live: ``THROTTLE_LIVE_LIMITS_TTL`` (a week by default): live limits outlive
  restarts, even of the whole fleet, as ``throttle-mw set`` promises, but not a
  budget nobody uses any more.

A TTL is set when a key is created and pushed out again once 1/TTL_REFRESHES of
it has passed (the budget-wide keys all at once, by batch.lua's ``save``; a
tenant's keys with the tenant), never by a PEXPIRE per key per call: a call
refreshes only the keys it may have created (Redis drops a key that empties, and
its TTL with it). The grant lists get theirs on every write, the heartbeat
refreshes P:procs, and, while a process holds leases, P:leases, P:lc and P:s,
so a request that runs longer than T keeps its lease.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Any, Final

from ...priorities import PRIORITIES

#: Suffix of each key after the budget's hash tag; per-tenant and per-process keys
#: end with the tenant digest or process id.
SUFFIX: Final = MappingProxyType(
    {
        "state": ":s",
        "cfg": ":cfg",
        "weights": ":w",
        "weight_names": ":wn",
        "tenant_hash": ":T",
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
        "pools": ":pl",
        "pools_names": ":pn",
        "learn_windows": ":lw",
        "learn_waited": ":lq",
        "learn_step": ":lstep",
    }
)

#: A waiting request's score in its tenant's queue: rank * RANK_SPAN + sequence number,
#: so the most urgent, oldest request comes first.
RANK_SPAN: Final = 1e13
#: Digits of the activation sequence number in an active-line member ("<seq>|<h>").
MEMBER_SEQ_DIGITS: Final = 16
#: A key's TTL is pushed out again once this fraction of it (1/TTL_REFRESHES) has passed,
#: not on every call.
TTL_REFRESHES: Final = 4
#: The TTL of each budget-wide key (the table above), by kind: "state" (T), "tenant"
#: (kept+T) or "live".
KEY_TTL: Final = MappingProxyType(
    {
        "state": "state",
        "cfg": "live",
        "weights": "live",
        "weight_names": "live",
        "waiters": "state",
        "active": "state",
        "capped": "state",
        "qlen": "state",
        "deadlines": "state",
        "tenants": "tenant",
        "tenant_hash": "tenant",
        "leases": "state",
        "lease_costs": "state",
        "procs": "state",
    }
)
#: A tenant's values in its field of P:T, in this order, joined with protocol.SEP, then
#: its name (the rest of the text): finish tag, weight, cap bucket and its time, waiting
#: requests, their cost by rank (c0..), state, the sequence number of its member in
#: P:active, its queue's next TTL refresh, its one waiter if its queue is that alone (q1:
#: the waiter's rank, one digit, then its id; P:q:<h> holds two or more). '' is a value's
#: default (weight 1, counts 0, idle, no member, 0, none) or unset (the cap). (store.lua's
#: load_tenant and save_tenant.)
TENANT_FIELDS: Final = (
    "f",
    "w",
    "cap",
    "cap_at",
    "n",
    *(f"c{rank}" for rank in range(len(PRIORITIES))),
    "st",
    "am",
    "xp",
    "q1",
)


#: P:tenants's anchor member (score +inf; no tenant digest looks like it): added with every
#: full call's ZADD of an idle tenant, so the list no longer empties (and loses its TTL)
#: when its last tenant starts waiting. A ZADD adds it again where it is missing (a key
#: made anew, or written by an older build): a PEXPIRE is due only when every member of
#: that ZADD was new (store.lua, call.flush_idle). Readers that count tenants skip it.
IDLE_ANCHOR: Final = "~idle~"
#: Lease-less admissions remembered per process, so a retried acquire is answered.
RECENT_KEPT: Final = 256
#: P:s's field naming the reading of the live limits and weights (P:cfg, P:w) a script
#: last made: a call that finds the stamp of the reading its loaded library remembers
#: reads neither key (store.lua, load_limits_stamped). Whoever changes P:cfg or P:w
#: deletes it afterwards (`Keys.live_changed`); the next call reads both and stamps anew.
LIVE_STAMP: Final = "lv"
#: P:s's field naming the write that last changed the state a full call keeps (store.lua,
#: "The state as the last full call of this library left it"): its packed numbers or any
#: of its plain fields (``inflight``, ``waiting``, ``tk_by``, ``ep``, ``lv``, the counts by
#: rank). A full call of a loaded library that keeps its state and leaves requests waiting
#: (a saturated budget's: the next call is a full one too) writes a stamp no other library
#: writes (Redis's TIME when the library first stamped, in microseconds, then a number it
#: counts up per call) and keeps it; the next full call reads this field alone and,
#: finding that stamp, takes the kept state without reading the others (and writes no
#: stamp: it stays while that library is the only writer and someone waits). Every other
#: write of those fields clears it ('' or deleted) with its write: a full call that keeps
#: nothing or leaves nobody waiting, ratelease.lua, live.lua, `Keys.live_changed`, an
#: operator or a test by hand. So a stamp is only there while someone waits, and fast.lua's
#: calls, which write only while nobody waits, neither read nor clear it. (No older build
#: clears it: 0.1.0 is the first release, and a build without it must not share a budget
#: with this one.)
GENERATION: Final = "gn"
#: P:s's field with when the budget last told the processes that may hold a pool that
#: someone waits (store.lua, call.signal_waiting): read and written only on that
#: transition, so no other call pays for it (not one of the packed numbers).
SIGNALED: Final = "sg"
#: P:s's field with where the signal's round under way goes on in P:pn: a ZRANGEBYLEX
#: bound after the last name taken (store.lua, call.signal_next): read only while a round
#: is under way (the packed ``sk``), written by each call of a round that leaves names.
SIGNAL_CURSOR: Final = "sc"
#: P:s's field with where the sweep of P:T for stray tenants goes on (an HSCAN cursor;
#: store.lua, call.sweep_strays): read and written once per idle sweep, absent while a
#: pass is not under way.
TENANT_CURSOR: Final = "tc"


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
        self.tenant_hash = self.tag + SUFFIX["tenant_hash"]
        self.qlen = self.tag + SUFFIX["qlen"]
        self.procs = self.tag + SUFFIX["procs"]
        self.pools = self.tag + SUFFIX["pools"]
        self.pools_names = self.tag + SUFFIX["pools_names"]
        self.leases = self.tag + SUFFIX["leases"]
        self.lease_costs = self.tag + SUFFIX["lease_costs"]
        self.learn_windows = self.tag + SUFFIX["learn_windows"]
        self.learn_waited = self.tag + SUFFIX["learn_waited"]
        self.learn_step = self.tag + SUFFIX["learn_step"]

    def live_changed(self, pipe: Any) -> None:
        """Queue on `pipe`, after a change to P:cfg or P:w, the deletion of the state's
        LIVE_STAMP: the scripts read the live limits and weights again on their next call.
        With it the state's GENERATION: a full call's kept state holds the stamp deleted.
        (HDEL: a budget without state gets no key from it.)"""
        pipe.hdel(self.state, LIVE_STAMP, GENERATION)

    def grants(self, process: str) -> str:
        return self.tag + SUFFIX["grants"] + process
