"""The mypyc experiment (`tools/mypyc_build.py`) stays out of the default install.

Every test runs on pure Python, and this file fails if a compiled module was
left beside the sources. With ``TEST_EXPECT_COMPILED=1`` (measuring the
experiment: build, then run the hot path's tests) it fails instead unless
every module the tool compiles really imports from its extension, so such a
run cannot pass on pure Python by accident.
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
