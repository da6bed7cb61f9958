"""Every Python block of README.md and docs/*.md runs against the real package.

Each block runs alone in a fresh interpreter (tests/support/doc_blocks.py), as
a reader would paste it into a file: executed, then every app it defines gets
its lifespan and one request per route, none of which may be answered 5xx,
and an app with `ThrottleMiddleware` must really throttle. The environment is
a deployment's: no ``THROTTLE_*`` variable but ``THROTTLE_RATE=80`` (blocks
that say "reads THROTTLE_* from the environment" need a budget). New files
under docs/ are picked up by themselves. A block marked
``<!-- fragment: why -->`` is only compiled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.doc_blocks import Block, python_blocks
from tests.support.servers import REPO_ROOT, child_env

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]


def test_the_documents_have_blocks_to_run() -> None:
    assert len(DOCUMENTS) >= 2
    runnable = [b for b in BLOCKS if b.fragment is None]
    assert len(runnable) >= 6
    assert {b.path.name for b in runnable} >= {"README.md", "operations.md"}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_the_block_runs(block: Block, tmp_path: Path) -> None:
    if block.fragment is not None:
        compile(block.code, block.name, "exec")
        return
    script = tmp_path / "example.py"
    script.write_text(block.code)
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.doc_blocks", str(script)],
        env=child_env({"THROTTLE_RATE": "80"}),
        cwd=tmp_path,  # not the repo: the block sees the installed package, as a reader does
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{block.name} failed:\n{block.code}\n{done.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, app in report["apps"].items():
        answers = app["answers"]
        failed = [a for a in answers if a["status"] >= 500]
        assert failed == [], f"{block.name}: {name} answered {failed}\n{done.stderr[-3000:]}"
        if app["throttle"]:
            assert any(a["throttled"] for a in answers), f"{block.name}: {name} never throttled"


def test_extraction_follows_fences_and_the_fragment_marker(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n"
        "```python\nx = 1\n```\n"
        "```sh\necho no\n```\n"
        "<!-- fragment: the loop body only -->\n"
        "```py\nawait step()\n```\n"
        "````python\n```\nprint('inner fence')\n````\n"
    )
    blocks = python_blocks(doc)
    assert [(b.line, b.code, b.fragment) for b in blocks] == [
        (2, "x = 1\n", None),
        (9, "await step()\n", "the loop body only"),
        (12, "```\nprint('inner fence')\n", None),
    ]
