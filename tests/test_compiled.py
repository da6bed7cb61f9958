"""The optional mypyc build of the hot path (`tools/mypyc_build.py`).

The default install is pure Python and every test runs against it. CI builds
the compiled modules and runs the hot path's tests again with
``TEST_EXPECT_COMPILED=1``: then this file fails unless every module the
tool compiles really imports from its extension, so that run cannot pass on
pure Python by accident. Without the variable it checks that the tool and
the package agree on which modules those are.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECT_COMPILED = os.environ.get("TEST_EXPECT_COMPILED") == "1"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mypyc_build", ROOT / "tools" / "mypyc_build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names() -> list[str]:
    return [path.removesuffix(".py").replace("/", ".") for path in _tool().MODULES]


def test_the_compiled_modules_exist_as_python_sources() -> None:
    for path in _tool().MODULES:
        assert (ROOT / path).is_file(), path


@pytest.mark.skipif(not EXPECT_COMPILED, reason="TEST_EXPECT_COMPILED=1 not set")
def test_hot_path_imports_the_compiled_modules() -> None:
    for name in _names():
        origin = importlib.import_module(name).__file__ or ""
        assert origin.endswith(".so"), f"{name} is pure Python here: {origin}"


@pytest.mark.skipif(EXPECT_COMPILED, reason="the compiled run")
def test_default_install_is_pure_python() -> None:
    for name in _names():
        origin = importlib.import_module(name).__file__ or ""
        assert origin.endswith(".py"), f"{name} is compiled here: {origin}"
