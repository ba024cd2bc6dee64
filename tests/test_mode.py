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
from typing import Any

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


def compiled_kernel_usable() -> bool:
    """What a child without CORUN_PURE_PYTHON should load: built, fresh, GIL on."""
    return _mode.GIL_ENABLED and all(
        _mode._has_extension(name) and not _mode._stale(name) for name in _mode.KERNEL
    )


def test_a_stale_build_is_not_loaded(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # An editable install edited since it was built: the .so is older than
    # the .py (or the .pxd), and would run the old code.
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in _mode.KERNEL:
        (tmp_path / f"{name}.py").write_text("")
        (tmp_path / f"{name}{suffix}").write_text("")
        os.utime(tmp_path / f"{name}.py", (1000, 1000))
        os.utime(tmp_path / f"{name}{suffix}", (2000, 2000))
    monkeypatch.setattr(_mode, "_HERE", str(tmp_path))
    monkeypatch.setattr(_mode, "PURE_PYTHON_REQUESTED", False)
    monkeypatch.setattr(_mode, "GIL_ENABLED", True)
    assert _mode.pure_reason() is None
    os.utime(tmp_path / "context.py", (3000, 3000))
    # Installed (no Cython .c file next to it): file times mean nothing.
    assert _mode.pure_reason() is None
    for name in _mode.KERNEL:
        (tmp_path / f"{name}.c").write_text("")  # built in place
    assert "compiled context older than the source" in (_mode.pure_reason() or "")
    os.utime(tmp_path / "context.py", (1000, 1000))
    (tmp_path / "coroutine.pxd").write_text("")
    os.utime(tmp_path / "coroutine.pxd", (3000, 3000))
    assert "compiled coroutine older" in (_mode.pure_reason() or "")


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
    for value in ("0", ""):
        compiled, *files = run_child(value)
        assert compiled == str(compiled_kernel_usable())


@pytest.mark.timeout(60)
def test_without_the_variable_the_compiled_kernel_loads_when_built() -> None:
    compiled, *files = run_child(None)
    assert compiled == str(compiled_kernel_usable())
    assert all(is_extension(f) == (compiled == "True") for f in files), files
