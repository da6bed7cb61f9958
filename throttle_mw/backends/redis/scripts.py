"""The Lua scripts, loaded from their ``.lua`` files and run with EVALSHA.

Each entry script gets ``lib.lua`` (the scheduler's rules) prepended. redis-py's
registered scripts call EVALSHA and reload the script after NOSCRIPT (a Redis
restart or ``SCRIPT FLUSH``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

ENTRY_SCRIPTS = ("batch", "renew", "leave", "snapshot")


@cache
def source(name: str) -> str:
    """The full text of an entry script: lib.lua followed by the entry file."""
    folder = resources.files(__package__).joinpath("scripts")
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    entry = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"{lib}\n-- ==== {name}.lua ====\n{entry}"


@dataclass(frozen=True)
class Scripts:
    batch: Any
    renew: Any
    leave: Any
    snapshot: Any

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(*(client.register_script(source(name)) for name in ENTRY_SCRIPTS))
