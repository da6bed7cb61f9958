"""The Lua scripts: generated constants and ``.lua`` files, run with EVALSHA.

Each entry script (``batch``, ``renew``, ``leave``, ``snapshot``) is sent as one
text: the constants it shares with Python, generated here from their Python
definitions (so no scheduler constant is spelled in a ``.lua`` file), then the
state layer (``store.lua``), the twins of the scheduler's rules
(``window.lua``, ``core.lua``), then the entry file itself.

redis-py's registered scripts call EVALSHA and reload the script after NOSCRIPT
(a Redis restart or ``SCRIPT FLUSH``); `Script` goes once more round that loop
if the cache is flushed again between the reload and the EVALSHA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

from redis.exceptions import NoScriptError

from ...priorities import PRIORITIES
from ...scheduler import constants
from . import keys, protocol

ENTRY_SCRIPTS = ("batch", "renew", "leave", "snapshot")
#: The shared files, in load order.
LIBRARY = ("store", "window", "core")
#: NOSCRIPT means the script did not run, so trying again is always safe.
_ATTEMPTS = 3

# --- the parameters of the steps that exist only in Lua (scheduler README, "Lua only") ---

#: A waiter's own process cancels it at its deadline; the script drops it only this
#: much later (its process died), so the two never race.
DEADLINE_GRACE_S: Final = 1.0
#: A process that does not hold the fleet's tick claim ticks this much after the claimed
#: time, in case the claimant died.
TICK_SLACK_S: Final = 0.05
#: Idle tenants are swept once a period, this many at a time (every call while a
#: backlog is left).
SWEEP_PERIOD_S: Final = 1.0
SWEEP_BATCH: Final = 32
#: Tenants beyond max_tenants dropped at most per call.
EXCESS_BATCH: Final = 1024
#: Expired leases and overdue waiters taken out per call at most.
EXPIRY_BATCH: Final = 256
#: Dispatch admits at most this many waiters in one call (a bound on one call's work).
DISPATCH_LIMIT: Final = 10_000


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
    "OFF": protocol.OFF,
    # the Lua-only steps (this module)
    "DEADLINE_GRACE": DEADLINE_GRACE_S,
    "TICK_SLACK": TICK_SLACK_S,
    "SWEEP_PERIOD": SWEEP_PERIOD_S,
    "SWEEP_BATCH": SWEEP_BATCH,
    "EXCESS_BATCH": EXCESS_BATCH,
    "EXPIRY_BATCH": EXPIRY_BATCH,
    "DISPATCH_LIMIT": DISPATCH_LIMIT,
    # units
    "MS_PER_S": 1000,
    "US_PER_S": 1_000_000,
}


def constants_lua() -> str:
    """The generated head of every script: one ``local`` per shared constant."""
    lines = ["-- Generated from Python by throttle_mw/backends/redis/scripts.py: do not edit."]
    lines += [f"local {name} = {_lua(value)}" for name, value in SHARED.items()]
    return "\n".join(lines)


@cache
def source(name: str) -> str:
    """The full text of an entry script, as Redis runs it."""
    folder = resources.files(__package__).joinpath("scripts")
    parts = [constants_lua()]
    for part in (*LIBRARY, name):
        parts.append(f"-- ==== {part}.lua ====")
        parts.append(folder.joinpath(f"{part}.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


class Script:
    """A registered script whose calls never fail on NOSCRIPT."""

    def __init__(self, client: Any, name: str) -> None:
        self._script = client.register_script(source(name))

    async def __call__(self, *, keys: Sequence[str], args: Sequence[Any]) -> Any:
        for _ in range(_ATTEMPTS - 1):
            try:
                return await self._script(keys=keys, args=args)
            except NoScriptError:
                pass  # flushed again between redis-py's reload and its EVALSHA
        return await self._script(keys=keys, args=args)


@dataclass(frozen=True)
class Scripts:
    batch: Script
    renew: Script
    leave: Script
    snapshot: Script

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(*(Script(client, name) for name in ENTRY_SCRIPTS))
