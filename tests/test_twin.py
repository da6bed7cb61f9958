"""The scheduler's two implementations stay side by side, and share their constants.

`throttle_mw/scheduler/core.py` and `window.py` are the reference; `core.lua` and
`window.lua` repeat them function for function, in the same order, each Lua
function pointing to its Python twin. Functions on one side only are named in
the scheduler README ("Only in Python", "Only in Lua"). Constants are generated
into the scripts from Python, so no `.lua` file spells one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest

from throttle_mw.backends.redis.scripts import SHARED, constants_lua
from throttle_mw.scheduler.types import Reason

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = ROOT / "throttle_mw" / "scheduler"
SCRIPTS = ROOT / "throttle_mw" / "backends" / "redis" / "scripts"
LUA_ONLY_MARKER = "-- --- only in Lua"


def python_methods(path: Path, cls: str) -> list[str]:
    """The methods of `cls` in definition order, without leading underscores; no
    properties, no dunders."""
    tree = ast.parse(path.read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    names = []
    for node in body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
            continue
        if any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list):
            continue
        names.append(node.name.lstrip("_"))
    return names


def lua_functions(text: str) -> list[tuple[str, str]]:
    """(name, first line of the comment block above it) of every function in `text`."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"(?:local )?function (\w+)\(", line)
        if match:
            start = i
            while start > 0 and lines[start - 1].startswith("--"):
                start -= 1
            found.append((match.group(1), lines[start] if start < i else ""))
    return found


def readme_table(heading: str) -> list[str]:
    """The function names in the first column of the table under `heading`."""
    text = (SCHEDULER / "README.md").read_text()
    section = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)


def test_core_lua_has_the_python_rules_in_the_same_order() -> None:
    python = python_methods(SCHEDULER / "core.py", "Scheduler")
    python_only = readme_table("Only in Python")
    text = (SCRIPTS / "core.lua").read_text()
    twins_part, lua_only_part = text.split(LUA_ONLY_MARKER, 1)
    helpers = {"reject"}  # builds a decision table: Python constructs Reject directly
    twins = [(n, c) for n, c in lua_functions(twins_part) if n not in helpers]

    assert set(python_only) <= set(python), "README names a Python-only method that is gone"
    assert [n for n, _ in twins] == [n for n in python if n not in python_only]
    for name, comment in twins:
        python_name = (
            name
            if name in ("acquire", "cancel", "release", "tick", "next_due", "lease_tokens")
            else ("_" + name)
        )
        assert comment.startswith(f"-- Scheduler.{python_name}"), (
            f"core.lua's {name} lacks its pointer to Scheduler.{python_name}"
        )
    assert [n for n, _ in lua_functions(lua_only_part)] == readme_table("Only in Lua")


def test_the_state_layer_s_lua_only_steps_are_listed() -> None:
    """store.lua's steps for a state made anew (Redis lost it) are the README's table."""
    text = (SCRIPTS / "store.lua").read_text()
    part = text.split("-- --- a state made anew", 1)[1].split("\n-- ---", 1)[0]
    assert [n for n, _ in lua_functions(part)] == readme_table("Only in Lua: a state made anew")


def test_window_lua_has_the_python_window() -> None:
    python = python_methods(SCHEDULER / "window.py", "FairRateWindow")
    lua = lua_functions((SCRIPTS / "window.lua").read_text())
    assert [n for n, _ in lua] == [f"window_{n}" for n in python]
    for (name, comment), method in zip(lua, python, strict=True):
        assert comment.startswith(f"-- FairRateWindow.{method}"), name


def numbers_in(lua: str) -> list[str]:
    """Numeric literals in Lua source, outside comments and strings."""
    code = re.sub(r"--.*", "", lua)
    code = re.sub(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", "''", code)
    code = re.sub(r"\[\d+\]", "[]", code)  # table indexes (ARGV[17], vals[3])
    return re.findall(r"(?<![\w.])(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])", code)


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.lua")), ids=lambda p: p.name)
def test_no_scheduler_constant_is_written_in_a_lua_file(path: Path) -> None:
    """Only table indexes and small whole numbers (argument positions, steps) may be
    literals; every scheduler constant comes from the generated head."""
    lua = path.read_text()
    assert [n for n in numbers_in(lua) if "." in n or "e" in n.lower() or int(n) > 16] == []
    # Tenant states are IDLE, ACTIVE, CAPPED, never their numbers.
    assert re.findall(r"\.st\s*(?:==|~=|=)\s*\d", lua) == []


def test_the_generated_constants_are_the_python_ones() -> None:
    head = constants_lua()
    for name in SHARED:
        assert re.search(rf"^local {name} = ", head, flags=re.MULTILINE), name
    assert "local EPS = 1e-06" in head
    assert "local PUSH_SPAN = 4294967296" in head


def test_every_reason_in_lua_is_a_reason_python_knows() -> None:
    lua = (SCRIPTS / "core.lua").read_text()
    used = set(re.findall(r"reject\('(\w+)'", lua)) | set(re.findall(r"reason = '(\w+)'", lua))
    assert used
    assert used <= set(get_args(Reason))
