"""corun.compiled: which kernel runs (corun/_mode.py), and that it is the one loaded.

The suite runs in both modes (CI: once as installed, once with
CORUN_PURE_PYTHON=1); these tests check that the flag tells the truth in
whichever mode runs, and start a child process for the other one.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys

import pytest

import corun
from corun import _mode

KERNEL_MODULES = [sys.modules[f"corun.{name}"] for name in _mode.KERNEL]


def is_extension(path: str) -> bool:
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_compiled_says_which_files_are_loaded() -> None:
    files = [module.__file__ or "" for module in KERNEL_MODULES]
    if corun.compiled:
        assert all(is_extension(f) for f in files), files
    else:
        assert all(f.endswith(".py") for f in files), files
    assert isinstance(corun.compiled, bool)


def test_compiled_follows_the_environment_and_the_build() -> None:
    assert corun.compiled == (_mode.pure_reason() is None)
    if os.environ.get("CORUN_PURE_PYTHON", "") not in ("", "0"):
        assert not corun.compiled
        assert _mode.pure_reason() == "CORUN_PURE_PYTHON is set"
    if not _mode.GIL_ENABLED:
        assert not corun.compiled  # free-threaded: always pure Python


def test_one_kind_of_module_for_the_whole_kernel() -> None:
    # Never a mix: the compiled modules share C types, and a pure module
    # would not pass them.
    kinds = {is_extension(module.__file__ or "") for module in KERNEL_MODULES}
    assert len(kinds) == 1, [m.__file__ for m in KERNEL_MODULES]


def test_the_pure_python_finder_answers_only_for_the_kernel() -> None:
    finder = _mode._PureKernelFinder
    assert finder.find_spec("corun.sync") is None
    assert finder.find_spec("json") is None
    spec = finder.find_spec("corun.coroutine")
    assert spec is not None and spec.origin is not None and spec.origin.endswith("coroutine.py")


def run_child(pure: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop("CORUN_PURE_PYTHON", None)
    if pure is not None:
        env["CORUN_PURE_PYTHON"] = pure
    code = (
        "import corun, sys\n"
        "print(corun.compiled)\n"
        f"for name in {list(_mode.KERNEL)!r}:\n"
        "    print(sys.modules['corun.' + name].__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.timeout(60)
def test_corun_pure_python_forces_the_py_files() -> None:
    compiled, *files = run_child("1")
    assert compiled == "False"
    assert all(f.endswith(".py") for f in files), files
    # "0" and "" mean: not forced.
    built = all(_mode._has_extension(name) for name in _mode.KERNEL)
    for value in ("0", ""):
        compiled, *files = run_child(value)
        assert compiled == str(built and _mode.GIL_ENABLED)


@pytest.mark.timeout(60)
def test_without_the_variable_the_compiled_kernel_loads_when_built() -> None:
    compiled, *files = run_child(None)
    built = all(_mode._has_extension(name) for name in _mode.KERNEL)
    assert compiled == str(built and _mode.GIL_ENABLED)
    assert all(is_extension(f) == (compiled == "True") for f in files), files
