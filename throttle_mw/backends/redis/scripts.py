"""The Lua scripts: generated constants and ``.lua`` files, run as Redis functions.

The code is the constants it shares with Python, generated here from their
Python definitions (so no scheduler constant is spelled in a ``.lua`` file),
then the state layer (``store.lua``), the twins of the scheduler's rules
(``window.lua``, ``core.lua``), the fast path of a one-operation call
(``fast.lua``), and the entry scripts (``batch``, ``release``, ``renew``,
``leave``, ``snapshot``, ``live``, ``ratelease``). Where the server has functions (Redis
7+, Valkey) it is loaded once as a library and each entry script is a function called with
FCALL; elsewhere (Redis 6.2) each entry script is sent with the shared code in
front of it and run with EVALSHA (redis-py reloads it after NOSCRIPT).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, Final, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...priorities import PRIORITIES
from ...scheduler import AUTO, constants
from ...scheduler.limit import LimitConfig
from . import keys, protocol

logger = logging.getLogger("throttle_mw.redis")

ENTRY_SCRIPTS = ("batch", "release", "renew", "leave", "snapshot", "live", "ratelease")
#: The shared files, in load order.
LIBRARY = ("store", "window", "core", "fast")
#: Entry scripts another entry script runs, by the one that runs them: release.lua goes on
#: as batch.lua wherever its lean release gives up. Such an entry is also a function of the
#: shared code, ``call.entry.<name>(KEYS, ARGV)`` (store.lua): the library registers that
#: function, and an EVAL of the caller carries it.
CALLED: Final[Mapping[str, tuple[str, ...]]] = {"release": ("batch",)}
#: First line of every script run by EVAL: Dragonfly refuses keys a script does not declare
#: (ours derive them from the one declared key) unless told; elsewhere a plain comment.
DRAGONFLY_FLAGS: Final = "--!df flags=allow-undeclared-keys"
#: NOSCRIPT or "Function not found" means nothing ran, so trying again is always safe.
#: Each retry needs the code lost again between its load and the call (a flush or a
#: failover in a storm of them: flushes every 3 ms made one call meet three); the bound stops
#: a server that never keeps it (a proxy sending the load elsewhere) after a few loads.
_ATTEMPTS = 6

# --- the parameters of the steps that exist only in Lua (scheduler README, "Lua only") ---

#: A waiter's own process cancels it at its deadline; the script drops it only this
#: much later (its process died), so the two never race.
DEADLINE_GRACE_S: Final = 1.0
#: A process that does not hold the fleet's tick claim ticks this much after the claimed
#: time, in case the claimant died.
TICK_SLACK_S: Final = 0.05
#: Idle tenants are swept once a period (the scheduler's constant: Python sweeps so too),
#: this many at a time (every call while a backlog is left).
SWEEP_PERIOD_S: Final = constants.SWEEP_PERIOD_S
SWEEP_BATCH: Final = 32
#: An idle sweep that counts more tenants in P:T than on the idle list and waiting walks
#: this many fields of P:T from a cursor, dropping those neither on the list nor waiting
#: (store.lua, call.sweep_strays): a tenant whose idle-list entry was lost is gone within
#: some |P:T| / STRAY_BATCH sweeps.
STRAY_BATCH: Final = 64
#: Tenants beyond max_tenants read at most per call (more than a call of WORK_US creates).
EXCESS_BATCH: Final = 64
#: Expired leases and overdue waiters taken out per call at most.
EXPIRY_BATCH: Final = 256
#: Dispatch admits at most this many waiters in one operation (a bound on one call's
#: work); if more could go, the caller is told to tick again at once.
DISPATCH_LIMIT: Final = 32
#: A batch call stops taking on operations once its work reaches a bound (fast.lua's
#: call.work_check, after WORK_CHECK operations, then every WORK_CHECK to WORK_STRIDE
#: operations): the rest are answered "deferred" and sent again in the next call, so no
#: call holds Redis for long (a batch is bounded by its work, not only by its count). Two
#: bounds: WORK_UNITS counted (an operation taken 1, a tenant it made MADE_UNITS more:
#: commands per call bounded whatever the clock says), and WORK_US (microseconds, by the work
#: clock: os.clock where the server has it, else Redis's TIME, fast.lua's clock_us; from the
#: call's start) of what it ran and what is left after its loop (the idle list,
#: the drops, the write-back: they grow with what was taken), that rest charged in
#: advance at AFTER_SHARE of the call's time so far.
WORK_UNITS: Final = 128
MADE_UNITS: Final = 3
WORK_US: Final = 500
AFTER_SHARE: Final = 0.5
WORK_CHECK: Final = 2
#: While nobody waits, the next check comes after as many operations as would take half
#: the work left at the call's rate so far (fast.lua's call.work_check), at most
#: WORK_STRIDE. (8 before: a call of 32 new tenants that the clock does not stop checked
#: 4 times, 2 now; a check is a TIME and an HSET.)
WORK_STRIDE: Final = 16
#: A leave (a process shutting down, batch.lua) takes its ids this many at a time, one
#: command per key for all of them, and stops once it has run LEAVE_US (microseconds, by
#: the work clock, as WORK_US; checked after each chunk): the call's dispatch and writes come after,
#: and the whole call stays well under a millisecond.
LEAVE_CHUNK: Final = 16
LEAVE_US: Final = 500
#: Key prefixes whose key names a loaded library keeps built (budgets per Redis, in practice).
KEYS_CACHE_MAX: Final = 64
#: Processes' key names a loaded library keeps built per key prefix (store.lua,
#: call.recent_key), before starting afresh.
NAMES_MAX: Final = 1024
#: The lease keys' anchor (store.lua, anchor_leases): longer than Redis lets an entry of
#: its compact encodings be (zset-/hash-max-listpack-value, 64 bytes by default), set once
#: this many leases are in flight.
LEASE_ANCHOR: Final = "~anchor~" + "~" * 1016
LEASE_ANCHOR_AT: Final = 16
#: P:T's anchor field (store.lua, call.flush_tenants: put by every HSET of tenants),
#: longer than hash-max-listpack-value allows (64 bytes by default): the hash of tenants is
#: a hashtable from its first tenant, so a tenant's HGET and HSET do not grow with the
#: tenants, whatever Redis's encodings are set to. Never a tenant's digest (hex).
ENCODING_ANCHOR: Final = "~tenants~" + "~" * 119
#: A budget tells the processes that may hold a pool (P:pl) that someone waits at most
#: once this often (store.lua, call.signal_waiting: RPUSH and PEXPIRE per process, ~2N
#: commands in one call): at a budget's edge (nobody waiting, someone, nobody, ... on
#: successive calls) a fleet of N processes would otherwise pay 2N commands per opening.
#: A transition left untold within it only delays a pool taken since the last signal to
#: its process's next reply or its T (the default kept slots' T, THROTTLE_KEEP_SLOTS);
#: the bound is exact regardless (tokens and slots are counted out in Redis).
SIGNAL_GAP_S: Final = 0.1
#: One script call tells this many of those processes at most (store.lua,
#: call.signal_next, some 19,000 instructions each: 1,000 at once would hold Redis
#: for about 2 ms); a signal walks P:pl's members by name (P:pn) from a cursor, this
#: many a call, the following calls that leave someone waiting (or the next openings)
#: going on: N processes are all told within ceil(N / SIGNAL_BATCH) such calls.
SIGNAL_BATCH: Final = 32
#: The live processes a batch call reports (its trailer) are counted at most this often
#: per budget (batch.lua, live_processes), and at once when a call registers its process.
PROCS_RECOUNT_S: Final = 1.0
#: A full batch call takes the live limits by the state's stamp (keys.LIVE_STAMP) as the
#: fast path does while the loaded library read {prefix}:cfg less than this long ago, and
#: reads it again after (store.lua, limits_by_stamp): a live override that expires on its
#: own is seen that late at most by a budget whose calls are all full (saturated).
LIVE_REREAD_S: Final = 1.0
#: A process's recent admissions list grows this far past keys.RECENT_KEPT before it is
#: trimmed back (store.lua, save): one trim per RECENT_SLACK admissions, not one each.
RECENT_SLACK: Final = 64
#: Values a script passes to one command by unpack() at most (Lua's C stack takes a few
#: thousand): renew.lua's leases go in chunks of this many.
UNPACK_MAX: Final = 500
#: Texts whose numbers a loaded library remembers (store.lua, tonum), and whole numbers
#: whose texts it remembers (num), before starting afresh.
NUMBERS_MAX: Final = 1024
#: Whole numbers below this (in magnitude) are written with %d (store.lua, num): the same
#: text as NUMBER_FORMAT's 17 significant digits gives them.
INTEGER_TEXT_MAX: Final = 1e15
#: A budget state made anew while a process still knew the old one (Redis restarted empty,
#: a failover to an empty replica) admits nothing new for this long: the processes reclaim
#: the leases they hold first (store.lua, "A state made anew"). Every process is back within
#: its breaker's and grant listener's pauses after a short outage (0.1-0.4 s).
RECLAIM_GRACE_S: Final = 0.5


def _lua(value: object) -> str:
    """A Python constant as a Lua literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_lua(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


#: Every constant the scripts use, by its Lua name, from where Python defines it.
SHARED: Final[Mapping[str, object]] = {
    # the scheduler's rules (throttle_mw/scheduler/constants.py, priorities.py)
    "EPS": constants.EPS,
    "WINDOW": constants.WINDOW_S,
    "STALE_WINDOWS": constants.STALE_WINDOWS,
    "PUSH_SPAN": constants.PUSH_SPAN,
    "RESERVE_DIVISOR": constants.RESERVE_DIVISOR,
    "CAP_BLAME_SHARE": constants.CAP_BLAME_SHARE,
    "IDLE": constants.IDLE,
    "ACTIVE": constants.ACTIVE,
    "CAPPED": constants.CAPPED,
    "NRANK": len(PRIORITIES),
    "PRIORITIES": PRIORITIES,
    # the key layout (keys.py)
    "KEY": dict(keys.SUFFIX),
    "RANK_SPAN": keys.RANK_SPAN,
    "MEMBER_SEQ_DIGITS": keys.MEMBER_SEQ_DIGITS,
    "KEY_TTL": dict(keys.KEY_TTL),
    "RECENT_KEPT": keys.RECENT_KEPT,
    "TTL_REFRESHES": keys.TTL_REFRESHES,
    "LIVE_STAMP": keys.LIVE_STAMP,
    # the wire format (protocol.py)
    "SEP": protocol.SEP,
    "LINE": protocol.LINE,
    "NUMBER_FORMAT": protocol.NUMBER_FORMAT,
    "OP": dict(protocol.OP),
    "FLAG": dict(protocol.FLAG),
    "REPLY": dict(protocol.REPLY),
    "MESSAGE": dict(protocol.MESSAGE),
    "ACQUIRE_FIELDS": protocol.ACQUIRE_FIELDS,
    "WAITER_FIELDS": protocol.WAITER_FIELDS,
    "TENANT_FIELDS": keys.TENANT_FIELDS,
    "OFF": protocol.OFF,
    "AUTO": AUTO,
    "LEARNED": protocol.LEARNED,
    # the learned limit's start (scheduler/limit), until the fleet has learned one
    "LEARN_INITIAL": LimitConfig().initial,
    # the Lua-only steps (this module), in one table: a Lua function (EVAL runs the
    # library and its entry script as one) may have at most 200 locals
    "TUNING": {
        "DEADLINE_GRACE": DEADLINE_GRACE_S,
        "TICK_SLACK": TICK_SLACK_S,
        "SWEEP_PERIOD": SWEEP_PERIOD_S,
        "SWEEP_BATCH": SWEEP_BATCH,
        "STRAY_BATCH": STRAY_BATCH,
        "TENANT_CURSOR": keys.TENANT_CURSOR,
        "EXCESS_BATCH": EXCESS_BATCH,
        "EXPIRY_BATCH": EXPIRY_BATCH,
        "DISPATCH_LIMIT": DISPATCH_LIMIT,
        "WORK_UNITS": WORK_UNITS,
        "MADE_UNITS": MADE_UNITS,
        "WORK_US": WORK_US,
        "AFTER_SHARE": AFTER_SHARE,
        "WORK_CHECK": WORK_CHECK,
        "WORK_STRIDE": WORK_STRIDE,
        "LEAVE_CHUNK": LEAVE_CHUNK,
        "LEAVE_US": LEAVE_US,
        "KEYS_CACHE_MAX": KEYS_CACHE_MAX,
        "NAMES_MAX": NAMES_MAX,
        "LEASE_ANCHOR": LEASE_ANCHOR,
        "ENCODING_ANCHOR": ENCODING_ANCHOR,
        "LEASE_ANCHOR_AT": LEASE_ANCHOR_AT,
        "SIGNAL_GAP": SIGNAL_GAP_S,
        "SIGNAL_BATCH": SIGNAL_BATCH,
        "SIGNALED": keys.SIGNALED,  # (a field's name: here, not a local of its own)
        "SIGNAL_CURSOR": keys.SIGNAL_CURSOR,
        "GENERATION": keys.GENERATION,
        "IDLE_ANCHOR": keys.IDLE_ANCHOR,
        "NUMBERS_MAX": NUMBERS_MAX,
        "INTEGER_TEXT_MAX": INTEGER_TEXT_MAX,
        "PROCS_RECOUNT": PROCS_RECOUNT_S,
        "LIVE_REREAD": LIVE_REREAD_S,
        "RECENT_SLACK": RECENT_SLACK,
        "UNPACK_MAX": UNPACK_MAX,
        "RECLAIM_GRACE": RECLAIM_GRACE_S,
    },
    # units
    "MS_PER_S": 1000,
    "US_PER_S": 1_000_000,
}


def constants_lua() -> str:
    """The generated head of every script: one ``local`` per shared constant."""
    lines = ["-- Generated from Python by throttle_mw/backends/redis/scripts.py: do not edit."]
    lines += [f"local {name} = {_lua(value)}" for name, value in SHARED.items()]
    return "\n".join(lines)


def _part(name: str) -> str:
    return resources.files(__package__).joinpath("scripts", f"{name}.lua").read_text("utf-8")


def _entry_function(name: str) -> str:
    """An entry script as a function of the shared code (CALLED)."""
    return f"-- ==== {name}.lua ====\ncall.entry.{name} = function(KEYS, ARGV)\n{_part(name)}\nend"


def _called() -> set[str]:
    return {called for names in CALLED.values() for called in names}


@cache
def source(name: str) -> str:
    """The full text of an entry script, as EVAL runs it."""
    parts = [DRAGONFLY_FLAGS, constants_lua()]
    for part in LIBRARY:
        parts += [f"-- ==== {part}.lua ====", _part(part)]
    parts += [_entry_function(called) for called in CALLED.get(name, ())]
    parts += [f"-- ==== {name}.lua ====", _part(name)]
    return "\n".join(parts)


class Library(NamedTuple):
    """The scripts as one Redis function library (Redis 7+, Valkey)."""

    name: str
    text: str
    #: The function registered for each entry script.
    functions: Mapping[str, str]


@cache
def library() -> Library:
    """The library: loaded once per server, so the shared code is not run on every call.

    Its name carries a digest of its text: processes of different throttle_mw versions
    sharing one Redis (during a deploy) each load and call their own.
    """
    shared = "\n".join([constants_lua(), *(f"-- ==== {p}.lua ====\n{_part(p)}" for p in LIBRARY)])
    # Its locals outlive a call (store.lua, "The line as the last call left it").
    shared += "\ncall.lasting = true"
    entries = {name: _part(name) for name in ENTRY_SCRIPTS}
    digest = hashlib.sha1((shared + "".join(entries.values())).encode()).hexdigest()[:12]
    name = f"throttle_mw_{digest}"
    functions = {entry: f"{name}_{entry}" for entry in ENTRY_SCRIPTS}
    called = _called()
    registered = [
        f"{_entry_function(entry)}\nredis.register_function('{fn}', call.entry.{entry})"
        if entry in called
        else f"redis.register_function('{fn}', function(KEYS, ARGV)\n{text}\nend)"
        for entry, text in entries.items()
        for fn in (functions[entry],)
    ]
    return Library(name, "\n".join([f"#!lua name={name}", shared, *registered]), functions)


def _error(exc: RedisError, *needles: str) -> bool:
    text = str(exc).lower()
    return any(needle in text for needle in needles)


#: How servers and clients say there are no functions for us: Redis 6.2 ("unknown
#: command"), an ACL ("NOPERM"), redis-py's cluster client, which checks commands against
#: the server's list before sending them ("... doesn't exist in Redis commands").
_NO_FUNCTIONS = ("unknown command", "noperm", "doesn't exist in redis commands")


class Scripts:
    """The entry scripts on one client: FCALL where the server has functions, else EVALSHA.

    Functions keep the shared code loaded (EVAL runs all of it on every call: defining
    its functions costs more Redis CPU than most calls' work). Where FCALL or FUNCTION is
    unknown (Redis 6.2) or not allowed (an ACL, a managed service), the scripts go by
    EVALSHA instead, for good. A library or script gone after a restart, a failover or a
    flush is loaded again and the call repeated: nothing ran.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        #: None until the first call tells; then whether FCALL is in use.
        self._functions: bool | None = None
        self._evalsha = {name: client.register_script(source(name)) for name in ENTRY_SCRIPTS}
        self.batch = Script(self, "batch")
        self.release = Script(self, "release")
        self.renew = Script(self, "renew")
        self.leave = Script(self, "leave")
        self.snapshot = Script(self, "snapshot")
        self.live = Script(self, "live")
        self.ratelease = Script(self, "ratelease")

    @property
    def uses_functions(self) -> bool | None:
        return self._functions

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        for attempt in range(_ATTEMPTS):
            last = attempt == _ATTEMPTS - 1
            if self._functions is not False:
                try:
                    function = library().functions[name]
                    return await self._client.fcall(function, len(keys), *keys, *args)
                except (RedisConnectionError, RedisTimeoutError):
                    raise
                except RedisError as exc:
                    if _error(exc, "function not found") and not last:
                        await self._load()
                        continue
                    if not _error(exc, *_NO_FUNCTIONS):
                        raise
                    self._no_functions(exc)
            try:
                return await self._evalsha[name](keys=keys, args=args)
            except NoScriptError:
                if last:
                    raise  # flushed again between redis-py's reload and its EVALSHA
        raise AssertionError("unreachable")

    async def _load(self) -> None:
        try:
            await self._client.function_load(library().text)
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except RedisError as exc:
            if _error(exc, "already exists"):
                return  # another process loaded it first
            if not _error(exc, *_NO_FUNCTIONS):
                raise
            self._no_functions(exc)
        else:
            if self._functions is None:
                self._functions = True

    def _no_functions(self, exc: RedisError) -> None:
        if self._functions is not False:
            logger.info("throttle_mw: Redis has no functions for us (%s); using EVALSHA", exc)
        self._functions = False


class Script:
    """One entry script of `Scripts`, called with its keys and arguments."""

    def __init__(self, scripts: Scripts, name: str) -> None:
        self._scripts = scripts
        self._name = name

    async def __call__(self, *, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._scripts.call(self._name, keys, args)
