"""Builds corun's compiled kernel when it can; pyproject.toml holds the metadata.

The kernel modules (corun/_mode.py: KERNEL) are compiled with Cython in
pure-Python mode: the .py file is the source, the .pxd file next to it adds
C types, and greenlet's C API (greenlet/greenlet.h) does the switching. The
build is optional: without Cython or a C compiler, on a free-threaded
CPython, on another implementation, with CORUN_PURE_PYTHON=1, or if
compiling fails, corun installs as pure Python, with no error. It is all or
nothing: a partial build is removed (corun would not load it anyway).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL = ("coroutine", "context", "comutex")  # keep in step with corun/_mode.py


def _why_pure() -> str | None:
    if os.environ.get("CORUN_PURE_PYTHON", "") not in ("", "0"):
        return "CORUN_PURE_PYTHON is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} is not CPython"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "free-threaded CPython"
    return None


def _say(message: str) -> None:
    print(f"corun: {message}", file=sys.stderr)


def _extensions() -> list[Extension]:
    reason = _why_pure()
    if reason is not None:
        _say(f"pure-Python kernel ({reason})")
        return []
    try:
        import greenlet
        from Cython.Build import cythonize
    except ImportError as exc:
        _say(f"pure-Python kernel (cannot compile: {exc})")
        return []
    # greenlet ships greenlet/greenlet.h inside its package directory.
    include = os.path.dirname(os.path.dirname(os.path.abspath(greenlet.__file__)))
    modules = [
        Extension(f"corun.{name}", [f"corun/{name}.py"], include_dirs=[include])
        for name in KERNEL
    ]
    try:
        return cythonize(  # type: ignore[no-any-return]
            modules,
            compiler_directives={
                "language_level": 3,
                "annotation_typing": False,  # types come from the .pxd files only
                "auto_pickle": False,
                "embedsignature": True,
            },
            quiet=True,
        )
    except Exception as exc:  # Cython refused the sources: stay pure
        _say(f"pure-Python kernel (Cython failed: {exc})")
        _remove_stale()
        return []


def _remove_stale() -> None:
    """Remove extensions an earlier in-place build left: they would be out of date."""
    import importlib.machinery

    for name in KERNEL:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join("corun", name + suffix)
            if os.path.exists(path):
                os.remove(path)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._give_up(exc)

    def build_extensions(self) -> None:
        try:
            super().build_extensions()
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        _say(f"pure-Python kernel (compiling failed: {exc})")
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            if os.path.exists(path):
                os.remove(path)
        _remove_stale()


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
