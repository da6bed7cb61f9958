"""`xdist_group` kept on pytest 9.2, whose node ids pytest-xdist 3.8 can no longer suffix.

With `--dist loadgroup`, pytest-xdist sends the tests of one `xdist_group` to one worker
by appending `@<group>` to each one's node id in the worker (`item._nodeid`). pytest 9.2
reads a node's id from `item._id` instead, so that suffix is lost: every test is then a
group of its own, tests/test_soak.py's two soaks may run at once on the two workers (the
group exists so that two fleets of four servers never do), and they start last, in
collection order, which leaves one worker alone with both for their last ~50 s
(docs/performance.md, `cifast2`). Here the suffix is put where pytest reads it, after
pytest-xdist's own attempt and only where it did not take; a group then also goes out
first, as pytest-xdist hands out its largest groups first. Upstream: pytest-xdist issue
#1386 (fix proposed in #1388); drop this module once a release carries it.
"""

from __future__ import annotations

import pytest


def group_of(item: pytest.Item) -> str | None:
    """The item's group as pytest-xdist names it (several joined by `_`), or None."""
    names = {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }
    return "_".join(sorted(names)) if names else None


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own suffixing (xdist.remote)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set in workers of --dist loadgroup
        return
    for item in items:
        group = group_of(item)
        if group is None or item.nodeid.endswith(f"@{group}"):
            continue
        # Only a pytest that reads `_id` gets here (9.2 does); it has _pytest.nodeid.
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{item.nodeid}@{group}")
