"""Run a module as if some packages were not installed (an install without an extra).

``python -m tests.support.without redis -m uvicorn app:app ...`` runs uvicorn in a
fresh interpreter where ``import redis`` (and ``redis.*``) fails exactly as it
does where redis-py is missing, although it is installed in this environment:
a finder placed first on ``sys.meta_path`` answers every such import with
``ModuleNotFoundError``. Only this process is affected, so run servers with one
worker (no child interpreters).
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class HiddenPackages(importlib.abc.MetaPathFinder):
    """Fails the import of the named top-level packages and everything under them."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None  # not ours: the normal finders look for it


def main(argv: Sequence[str]) -> None:
    """``NAME[,NAME...] -m MODULE [ARGS...]``."""
    if len(argv) < 3 or argv[1] != "-m":
        raise SystemExit("usage: python -m tests.support.without NAME[,NAME...] -m MODULE [ARGS]")
    names = [name for name in argv[0].split(",") if name]
    loaded = [m for m in sys.modules if m.partition(".")[0] in names]
    if loaded:
        raise SystemExit(f"already imported before they could be hidden: {', '.join(loaded)}")
    sys.meta_path.insert(0, HiddenPackages(names))
    module = argv[2]
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
