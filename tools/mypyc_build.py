"""Compile the in-memory hot path with mypyc, in place: an experiment, not a build we ship.

    python tools/mypyc_build.py          # build: a .so beside each module below
    python tools/mypyc_build.py --clean  # back to pure Python
    python tools/mypyc_build.py --check  # exit 1 unless every module below is compiled

``pip install -e .`` (and every wheel) is pure Python; this builds C
extensions beside the sources of an editable checkout, which Python imports
in preference to the ``.py`` files, so that `bench/instructions.py` and
`bench/throughput.py` can measure them. Needs ``mypy`` (the ``dev`` extra:
it brings mypyc) and a C compiler. Each module is compiled alone, so each
extension stays inside the package (no shared ``*__mypyc`` library at the top
level). Always ``--clean`` afterwards.

Not supported, because it does not pay here: 25 % fewer instructions per
request than pure Python, but more cache misses, and fewer requests per
second under wrk (README, "The in-memory hot path"). Compiled classes also
refuse interpreted subclasses (``tests/test_learned_limit.py`` subclasses
`MemoryBackend`), so those tests fail on this build.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Compiled, in this order; a module's dependencies before it.
MODULES = (
    "throttle_mw/scheduler/state.py",
    "throttle_mw/scheduler/window.py",
    "throttle_mw/scheduler/core.py",
    "throttle_mw/backends/memory.py",
    "throttle_mw/asgi/middleware.py",
)


def _extensions() -> list[Path]:
    return [
        path
        for module in MODULES
        for pattern in (".*.so", "__mypyc.*.so")
        for path in (ROOT / module).parent.glob(Path(module).stem + pattern)
    ]


def clean() -> None:
    for path in _extensions():
        path.unlink()
        print(f"removed {path.relative_to(ROOT)}")


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    clean()
    with tempfile.TemporaryDirectory(prefix="throttle-mypyc-") as tmp:
        # Built from a directory holding only a link to the package: setuptools must not
        # read this project's pyproject.toml (hatchling's, not setuptools').
        (Path(tmp) / "throttle_mw").symlink_to(ROOT / "throttle_mw")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            for module in MODULES:
                setup(
                    name="throttle_mw_compiled",
                    ext_modules=mypycify([module], opt_level="3"),
                    script_args=["-q", "build_ext", "--inplace", "--build-temp", "build"],
                )
        finally:
            os.chdir(cwd)
    for path in _extensions():
        print(f"built {path.relative_to(ROOT)}")


def check() -> bool:
    """Whether every module in `MODULES` imports from its compiled extension."""
    sys.path.insert(0, str(ROOT))
    ok = True
    for module in MODULES:
        name = module.removesuffix(".py").replace("/", ".")
        origin = importlib.import_module(name).__file__ or ""
        compiled = origin.endswith(".so")
        ok = ok and compiled
        print(f"{name}: {'compiled' if compiled else 'pure Python'} ({origin})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--clean", action="store_true", help="remove the compiled modules")
    group.add_argument("--check", action="store_true", help="fail unless all are compiled")
    args = parser.parse_args(argv)
    if args.clean:
        clean()
        return 0
    if args.check:
        return 0 if check() else 1
    build()
    return 0 if check() else 1


if __name__ == "__main__":
    raise SystemExit(main())
