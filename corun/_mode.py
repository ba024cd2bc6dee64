"""Which build of corun's kernel runs: compiled (Cython) or pure Python.

The hot modules (`KERNEL`) are plain Python files that setup.py may also
compile with Cython, in pure-Python mode: the .py file is the one source,
a .pxd file next to it declares C types for its classes and functions, and
the extension module lands next to the .py file under the same name. Python
imports an extension module in preference to a .py file of the same name,
so a compiled build runs compiled.

Pure Python is chosen instead, for all of the kernel at once, when:
- the environment variable CORUN_PURE_PYTHON is set (to anything but "" or
  "0"): CI runs the suite both ways from one install;
- the interpreter runs without the GIL (free-threaded builds): the compiled
  kernel, like the C code of greenlet, relies on the GIL;
- not every kernel module has an extension next to it (a partial build);
- an extension is older than its .py or .pxd file (a checkout edited
  since `pip install -e .` built it: the compiled code would be stale).
Then a finder placed first on sys.meta_path loads those modules from their
.py files. It is installed when corun/__init__.py imports this module, before
anything else, and only ever answers for `corun.<kernel module>`.

Greenlet's primitives: compiled code calls greenlet's C API
(`_greenlet.pxd`); the pure modules bind the same names to greenlet's own
functions with `greenlet_primitives()`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from greenlet import getcurrent, greenlet

# The modules setup.py compiles, lowest layer first.
KERNEL = ("coroutine", "context", "comutex")

_HERE = os.path.dirname(os.path.abspath(__file__))

#: Whether the interpreter runs with the GIL (False on a free-threaded build
#: with the GIL off).
GIL_ENABLED: bool = getattr(sys, "_is_gil_enabled", lambda: True)()

#: Whether CORUN_PURE_PYTHON asks for the pure-Python kernel.
PURE_PYTHON_REQUESTED: bool = os.environ.get("CORUN_PURE_PYTHON", "") not in ("", "0")


def _extension(name: str) -> str | None:
    """The path of the compiled `name` next to its .py file, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.exists(path):
            return path
    return None


def _has_extension(name: str) -> bool:
    return _extension(name) is not None


def _stale(name: str) -> bool:
    """Whether the compiled `name` is older than its .py or .pxd (an edited checkout).

    Only for a build in place (`pip install -e .`), which leaves Cython's .c
    file next to the .py file: an installed wheel has none, and its files
    carry the times they were unpacked at, in no useful order.
    """
    built = _extension(name)
    if built is None or not os.path.exists(os.path.join(_HERE, name + ".c")):
        return False
    try:
        when = os.path.getmtime(built)
        return any(
            os.path.getmtime(source) > when
            for source in (os.path.join(_HERE, name + ext) for ext in (".py", ".pxd"))
            if os.path.exists(source)
        )
    except OSError:
        return False


def pure_reason() -> str | None:
    """Why the pure-Python kernel is forced, or None if the compiled one may load."""
    if PURE_PYTHON_REQUESTED:
        return "CORUN_PURE_PYTHON is set"
    if not GIL_ENABLED:
        return "the GIL is disabled (free-threaded build)"
    missing = [name for name in KERNEL if not _has_extension(name)]
    if missing:
        return "not compiled" if len(missing) == len(KERNEL) else f"{missing} not compiled"
    stale = [name for name in KERNEL if _stale(name)]
    if stale:
        # An editable install whose sources changed since the build: the
        # compiled modules would run the old code.
        return f"compiled {', '.join(stale)} older than the source (rebuild: pip install -e .)"
    return None


class _PureKernelFinder:
    """Loads the kernel modules from their .py files (see the module docstring)."""

    @staticmethod
    def find_spec(
        fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in KERNEL:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_HERE, name + ".py"))


def choose() -> None:
    """Force pure Python if it must be; run when this module is imported (first, by corun)."""
    if pure_reason() is not None and _PureKernelFinder not in sys.meta_path:
        sys.meta_path.insert(0, _PureKernelFinder)


def is_compiled() -> bool:
    """Whether the kernel modules that are loaded are compiled ones (all of them)."""
    loaded = [sys.modules.get(f"{__package__}.{name}") for name in KERNEL]
    return all(
        module is not None and not (getattr(module, "__file__", None) or "").endswith(".py")
        for module in loaded
    )


def _no_op() -> None:
    pass


def greenlet_primitives() -> dict[str, Any]:
    """The pure-Python binding of the names compiled modules cimport from _greenlet.pxd."""
    return {"getcurrent": getcurrent, "_switch": greenlet.switch, "_greenlet_init": _no_op}


choose()
