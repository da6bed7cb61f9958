"""The Lua scripts, loaded from their ``.lua`` files and run with EVALSHA.

Each entry script gets ``lib.lua`` (the scheduler's rules) prepended. redis-py's
registered scripts call EVALSHA and reload the script after NOSCRIPT (a Redis
restart or ``SCRIPT FLUSH``); `Script` goes once more round that loop if the
cache is flushed again between the reload and the EVALSHA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

ENTRY_SCRIPTS = ("batch", "renew", "leave", "snapshot")
#: NOSCRIPT means the script did not run, so trying again is always safe.
_ATTEMPTS = 3


@cache
def source(name: str) -> str:
    """The full text of an entry script: lib.lua followed by the entry file."""
    folder = resources.files(__package__).joinpath("scripts")
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    entry = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"--!df flags=allow-undeclared-keys\n{lib}\n-- ==== {name}.lua ====\n{entry}"


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
