"""The manual's promises: every public name has a docstring and a reference page,
and every example in docs/examples/ runs and prints what its page shows.

The docstring check is docs/_ext/apidocs.py's, the one the strict Sphinx build
(`sphinx-build -W -n`, in .ci/run) also runs; here it needs no Sphinx, so it
runs on every Python the suite runs on.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import corun

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))


def _apidocs():
    spec = importlib.util.spec_from_file_location("apidocs", DOCS / "_ext" / "apidocs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_docstring() -> None:
    assert _apidocs().missing_docstrings() == []


def test_the_check_sees_methods_properties_and_attributes() -> None:
    names = dict(_apidocs().public_api())
    # A method, a property, a slot attribute, a plain attribute, an alias.
    for name in (
        "corun.CoMutex.acquire",
        "corun.Timer.pending",
        "corun.CoMutex.holder",
        "corun.IOThread.name",
        "corun.Queue.shutdown",
    ):
        assert name in names
    assert not any(name.split(".")[-1].startswith("_") for name in names)


def test_docstrings_are_plain_prose_that_renders_as_written() -> None:
    to_rst = _apidocs().plain_to_rst
    assert to_rst("Run fn(*args, **kwargs) in a thread.") == (
        "Run fn(\\*args, \\*\\*kwargs) in a thread."
    )
    assert to_rst("`with lock.reader():` holds") == "``with lock.reader():`` holds"
    assert to_rst("a bare yield_ is not") == "a bare yield\\_ is not"
    assert to_rst("yield_() and `fn(*a)`") == "yield_() and ``fn(*a)``"


def _documented_in_reference() -> set[str]:
    directive = re.compile(r"^\.\. auto(?:class|function|exception):: (\w+)", re.M)
    found: set[str] = set()
    for page in (DOCS / "reference").glob("*.rst"):
        found.update(directive.findall(page.read_text()))
    return found


def test_every_public_name_has_a_reference_page() -> None:
    missing = sorted(set(corun.__all__) - _documented_in_reference())
    assert missing == [], f"add them to a page of docs/reference/: {missing}"


def test_every_example_is_on_a_page() -> None:
    pages = "".join(p.read_text() for p in DOCS.rglob("*.rst"))
    for example in EXAMPLES:
        assert f"examples/{example.name}" in pages, example.name


def _expected_output(example: Path) -> list[str] | None:
    """The lines after `# Output:` at the end of an example, or None if it has none."""
    lines = example.read_text().splitlines()
    if "# Output:" not in lines:
        return None
    return [line[2:] for line in lines[lines.index("# Output:") + 1 :]]


@pytest.mark.timeout(120)
def test_examples_print_what_their_pages_show() -> None:
    assert EXAMPLES
    for example in EXAMPLES:
        # `python docs/examples/queue.py` would import itself as `queue`.
        assert example.stem not in getattr(sys, "stdlib_module_names", ()), example.name
    # A few at a time: each takes a fraction of a second, mostly interpreter start.
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(_run_example, EXAMPLES) if f is not None]
    assert not failures, "\n\n".join(failures)


def _run_example(example: Path) -> str | None:
    """Run `example`; None if it exits 0 and prints its `# Output:` lines, else why not."""
    try:
        proc = subprocess.run(
            [sys.executable, str(example)], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        return f"{example.name}: timed out\n{exc.stdout}{exc.stderr}"
    if proc.returncode != 0:
        return f"{example.name}: exit {proc.returncode}\n{proc.stderr}"
    expected = _expected_output(example)
    if expected is not None and proc.stdout.splitlines() != expected:
        return f"{example.name}: printed\n{proc.stdout}\ninstead of\n" + "\n".join(expected)
    return None
