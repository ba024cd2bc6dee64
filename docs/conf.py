"""Sphinx configuration for corun's manual.

Why Sphinx (and not MkDocs with mkdocstrings): it is what corun's peers use
(CPython's asyncio and threading pages, greenlet, gevent, trio), autodoc
reads corun's docstrings and its `#:` attribute comments as they are, and
`sphinx-build -n -W` turns every unresolved cross-reference into an error,
which is what lets CI keep the manual honest. The only other dependency is
the Furo theme. See docs/README.md for how to build it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Document the .py sources, which are the kernel's source of truth: compiled,
# its classes are extension types whose fields autodoc sees as bare
# descriptors (see corun/_mode.py).
os.environ["CORUN_PURE_PYTHON"] = "1"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))  # apidocs: docstrings, references, the check
sys.path.insert(0, str(HERE.parent))  # document the checkout, installed or not

import corun  # noqa: E402

project = "corun"
author = "the corun authors"
copyright = "the corun authors"
release = corun.__version__
version = release

extensions = ["sphinx.ext.autodoc", "apidocs"]

exclude_patterns = ["_build", "README.md"]
templates_path: list[str] = []

# Docstrings are plain prose in which `backticks` mark code (apidocs renders
# them so); in the hand-written pages too, `x` is code, and references are
# spelled out (:class:`CoMutex`, :func:`sleep`).
default_role = "literal"

# Every cross-reference must resolve (sphinx-build -n). Annotations that
# name a type variable or the standard library are shown as text by apidocs.
nitpicky = True

autodoc_typehints = "signature"  # short docstrings read best with types inline
autodoc_member_order = "bysource"  # the order the modules explain things in
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True
autodoc_default_options = {"members": True}
python_use_unqualified_type_names = True
add_module_names = False

html_theme = "furo"
html_title = f"corun {release}"
html_static_path: list[str] = []
