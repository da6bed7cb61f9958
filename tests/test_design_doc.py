"""The project explains itself: every reference to its design document resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A mention of the design document: a Markdown link target or a path in prose.
MENTION = re.compile(r"(?:\]\()?((?:[\w.-]+/)*design\.md)", re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".lua", ".yml", ".toml"))]


def test_every_design_md_reference_resolves_to_a_file_in_the_repository() -> None:
    mentions = 0
    for path in tracked_text_files():
        if not path.exists():
            continue  # deleted in the working tree
        for match in MENTION.finditer(path.read_text(encoding="utf-8")):
            target = match.group(1)
            is_link = match.group(0).startswith("](")
            resolved = (path.parent if is_link else ROOT) / target
            assert resolved.is_file(), f"{path.relative_to(ROOT)} refers to {target}"
            mentions += 1
    assert mentions >= 10  # the story is cited from the demo, the bench and the tests
    assert (ROOT / "docs/design.md").is_file()
