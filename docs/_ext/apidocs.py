"""corun's docstrings in Sphinx, and the check that every public name has one.

Two jobs, so that the manual and the test suite enforce the same rule:

- `public_api()` and `missing_docstrings()` list every public name of the
  package (each name of `corun.__all__`, and for a class each public method,
  property and attribute it defines) and say which lack a docstring. They use
  only the standard library: tests/test_docs.py runs them on every CPython,
  without Sphinx.
- `setup()` makes this module a Sphinx extension that
  - renders corun's docstrings as what they are, plain prose in which
    `backticks` mark code, instead of reStructuredText: a `*args` or a
    `name_` in a docstring is text, not markup (see `plain_to_rst`);
  - resolves annotations written against a defining module
    (`corun.context.AioContext`) to the documented name (`corun.AioContext`),
    and shows type variables and standard-library types as plain text (the
    build has no network, so no intersphinx);
  - warns, so that a `-W` build fails, for every public name that has no
    docstring or that no reference page documents.

An attribute's docstring is a `#:` comment right above its assignment (in
the class body or as `self.name = ...` in a method), or a string right below
it: the two forms Sphinx's autodoc reads.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

# Members every class has, or exceptions inherit from BaseException: not corun's.
_INHERITED_FROM = (object, BaseException, Exception)


def _source_of(module: Any) -> str | None:
    """A module's source; for a compiled kernel module, its .py file (the source)."""
    if module is None:
        return None
    path = getattr(module, "__file__", None) or ""
    if path and not path.endswith(".py"):
        path = os.path.join(os.path.dirname(path), module.__name__.rpartition(".")[2] + ".py")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


def _attribute_docs(cls: type) -> dict[str, str | None]:
    """Public attributes that `cls`'s own source assigns, with their doc (or None).

    Reads the class body (`name: T = ...` / `#:` comments) and `self.name = ...`
    in its methods, as Sphinx's analyzer does.
    """
    source = _source_of(sys.modules.get(cls.__module__))
    if source is None:
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    found: dict[str, str | None] = {}

    def comment_above(node: ast.stmt) -> str | None:
        doc: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            doc.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        return " ".join(doc) or None

    def visit(body: list[ast.stmt], in_method: bool) -> None:
        for i, node in enumerate(body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_method:
                if any(
                    isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
                ) and not node.name.startswith("_"):
                    # Compiled, a property is a getset descriptor without its
                    # docstring: keep the source's.
                    found[node.name] = ast.get_docstring(node)
                visit(node.body, True)
                continue
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if in_method:
                    if not (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        continue
                    name = target.attr
                elif isinstance(target, ast.Name):
                    name = target.id
                else:
                    continue
                if name.startswith("_") or name == "self":
                    continue
                doc = comment_above(node)
                if doc is None and i + 1 < len(body):
                    after = body[i + 1]
                    if (
                        isinstance(after, ast.Expr)
                        and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)
                    ):
                        doc = after.value.value
                if found.get(name) is None:
                    found[name] = doc
            # Attributes set in `if`/`try`/`with` blocks of a method.
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    visit(inner, in_method)
                elif isinstance(inner, list):
                    for handler in inner:
                        if isinstance(handler, ast.ExceptHandler):
                            visit(handler.body, in_method)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            visit(node.body, False)
            break
    return found


def _own_members(cls: type) -> Iterator[tuple[str, str | None]]:
    """(name, doc) of the public members `cls` defines itself."""
    attrs = _attribute_docs(cls)
    seen = set()
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        seen.add(name)
        if type(value).__name__ == "getset_descriptor" and not value.__doc__:
            # A compiled (Cython) property or field: documented in the source.
            yield name, attrs.get(name)
            continue
        if type(value).__name__ == "member_descriptor" or not (
            callable(value) or isinstance(value, (property, staticmethod, classmethod))
        ):
            # A slot, or a plain class attribute: documented by a comment.
            slots = getattr(cls, "__slots__", ())
            doc = slots.get(name) if isinstance(slots, dict) else None
            yield name, doc or attrs.get(name)
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        yield name, inspect.getdoc(value)
    for name, doc in attrs.items():
        if name not in seen and not any(name in vars(base) for base in cls.__mro__[1:]):
            yield name, doc


def _with_private_bases(cls: type) -> list[type]:
    """`cls` and the private classes of corun in its MRO."""
    return [cls] + [
        base
        for base in cls.__mro__[1:]
        if base.__module__.startswith("corun.") and base.__name__.startswith("_")
    ]


def public_api() -> list[tuple[str, str | None]]:
    """(qualified name, docstring or None) of every public name of corun."""
    import corun

    out: list[tuple[str, str | None]] = []
    for name in corun.__all__:
        obj = getattr(corun, name)
        own_doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
        out.append((f"corun.{name}", own_doc))
        if inspect.isclass(obj) and obj not in _INHERITED_FROM:
            # With the private corun bases it is built on (Coroutine's
            # _CoroutineBase: see corun/coroutine.py), which it documents.
            for cls in _with_private_bases(obj):
                for member, doc in _own_members(cls):
                    out.append((f"corun.{name}.{member}", doc))
    return out


def missing_docstrings() -> list[str]:
    """The public names whose docstring is missing or empty."""
    return [name for name, doc in public_api() if not (doc and doc.strip())]


# -- plain prose -> reStructuredText -------------------------------------------

# A `code` span, a *, a |, or a word ending in _ (a reST reference otherwise).
_SPAN = re.compile(r"(`[^`]+`)|(\*|\|)|(\b\w+_)(?=[\s.,;:!?)'\"]|$)")


def plain_to_rst(line: str) -> str:
    """One line of a plain-prose docstring as reST that renders the same text.

    `code` becomes a literal; `*`, `|` and a trailing `_` are escaped. Bullet
    lists ("- item") and paragraphs already mean the same in both.
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return f"`{m.group(1)}`"  # ``code``: a literal, whatever the default role
        if m.group(2):
            return "\\" + m.group(2)
        return m.group(3)[:-1] + "\\_"

    return _SPAN.sub(sub, line)


def _process_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    module = getattr(obj, "__module__", None) or ""
    if not (name.startswith("corun.") or module.startswith("corun")):
        return
    lines[:] = [plain_to_rst(line) for line in lines]


# -- references in signatures ----------------------------------------------------

_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"collections", "types"}


def _missing_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve what autodoc writes for annotations; leave real typos alone."""
    if node.get("refdomain") != "py":
        return None
    target: str = node.get("reftarget", "")
    parts = target.split(".")
    import corun

    if parts[0] == "corun" and len(parts) >= 3:
        # corun.context.AioContext -> corun.AioContext (the documented name).
        short = parts[-1]
        if short in corun.__all__:
            domain = env.get_domain("py")
            return domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], f"corun.{short}", node, contnode
            )
        if short in _PLAIN_TEXT:
            return contnode
    stdlib = parts[0] in _STDLIB and (len(parts) > 1 or node.get("reftype") == "mod")
    if target in _PLAIN_TEXT or stdlib:
        return contnode  # a type variable, a private helper type, the standard library
    return None


# Names that annotations use but the manual does not document.
_PLAIN_TEXT = frozenset({"T", "Lockable", "ExceptionHandler"})


# -- the check -------------------------------------------------------------------


def _check(app: Any, env: Any) -> None:
    from sphinx.util import logging

    log = logging.getLogger("corun.apidocs")
    documented = set(env.get_domain("py").objects)
    for name, doc in public_api():
        if not (doc and doc.strip()):
            log.warning("%s has no docstring", name, type="corun", subtype="docstring")
        elif name not in documented:
            log.warning(
                "%s is not documented by any reference page (docs/reference/)",
                name,
                type="corun",
                subtype="reference",
            )


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("missing-reference", _missing_reference)
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
