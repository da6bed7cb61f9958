"""mypyc's class hint, importable without mypy installed.

The package is pure Python; `tools/mypyc_build.py` may compile its hot path.
A compiled class refuses interpreted subclasses unless it allows them, and
subclassing `ThrottleMiddleware`, `MemoryBackend` or `Scheduler` must keep
working in both builds. Without mypy the hint is a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:
    try:
        from mypy_extensions import mypyc_attr
    except ImportError:  # pure Python, mypy not installed: nothing to tell mypyc

        def mypyc_attr(*attrs, **kwattrs):
            return lambda cls: cls


__all__ = ["mypyc_attr"]
