"""The Python code blocks of the documentation: found, then run as a reader would run them.

`python_blocks` extracts every fenced block whose info string starts with
``python`` (or ``py``, ``python3``). A block is run on its own, in a fresh
interpreter (``python -m tests.support.doc_blocks FILE``): executed as a
script, then every ASGI app it defines at top level (a Starlette or FastAPI
instance) is started with its lifespan and sent one request per route and
method, path parameters filled in with ``1``. The result goes to stdout as
one JSON object for the test to judge.

A block that is deliberately a fragment (it cannot run alone, and making it
whole would hide its point) is marked by ``<!-- fragment: why -->`` on the line
right before its fence; it is only compiled. Keep such blocks rare.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_INFO = frozenset({"python", "py", "python3"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_FRAGMENT = re.compile(r"^\s*<!--\s*fragment:\s*(?P<why>\S.*?)\s*-->\s*$")
_PARAM = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class Block:
    """One fenced Python block: where it starts (1-based line of its fence) and its code."""

    path: Path
    line: int
    code: str
    #: Why it is a fragment (only compiled), or None: it must run.
    fragment: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """Every fenced Python block of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            if _closes(_FENCE.match(lines[i]), fence):
                break
            body.append(lines[i])
            i += 1
        i += 1  # past the closing fence
        words = info.split()
        if words and words[0].lower() in PYTHON_INFO:
            marker = _FRAGMENT.match(lines[start - 1]) if start else None
            why = marker["why"] if marker else None
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n", why))
    return blocks


def _closes(line: re.Match[str] | None, fence: str) -> bool:
    """A closing fence: the same character, at least as long, and no info string."""
    if line is None or line["info"].strip():
        return False
    return line["fence"][0] == fence[0] and len(line["fence"]) >= len(fence)


# --- run in a fresh interpreter ---------------------------------------------------------------


def _apps(namespace: dict[str, Any]) -> dict[str, Any]:
    from starlette.applications import Starlette

    return {name: v for name, v in namespace.items() if isinstance(v, Starlette)}


def _requests(app: Any) -> list[tuple[str, str]]:
    """(method, path) for every route with a path and methods, parameters filled in."""
    from starlette.routing import Route

    found = []
    for route in app.routes:
        if isinstance(route, Route):
            path = _PARAM.sub("1", route.path)
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    found.append((method, path))
    return found or [("GET", "/")]


def _has_throttle(app: Any) -> bool:
    from throttle_mw import ThrottleMiddleware

    return any(m.cls is ThrottleMiddleware for m in getattr(app, "user_middleware", ()))


def run(path: Path) -> dict[str, Any]:
    """Execute the block in `path` and exercise the apps it defines."""
    from starlette.testclient import TestClient

    namespace = runpy.run_path(str(path), run_name="__doc_block__")
    report: dict[str, Any] = {"apps": {}}
    for name, app in _apps(namespace).items():
        answers = []
        with TestClient(app, raise_server_exceptions=False) as client:
            for method, url in _requests(app):
                response = client.request(method, url)
                timing = ",".join(response.headers.get_list("server-timing"))
                answers.append(
                    {
                        "method": method,
                        "path": url,
                        "status": response.status_code,
                        "throttled": "throttle;dur=" in timing,
                    }
                )
        report["apps"][name] = {"throttle": _has_throttle(app), "answers": answers}
    return report


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
