"""Session-wide checks.

With ``CORUN_REQUIRE_NO_GIL=1`` (set by ``.ci/freethreaded``) the session
fails unless it runs on a free-threaded CPython with the GIL off from start
to end: an extension module that does not declare free-threading support
turns the GIL back on when it is imported, and a suite that then passes
proves nothing about free-threading. Checked at the start, after collection
(every test module and what it imports is loaded by then) and at the end.
"""

from __future__ import annotations

import os
import sys

import pytest

_REQUIRE_NO_GIL = os.environ.get("CORUN_REQUIRE_NO_GIL", "") not in ("", "0")


def _gil_enabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def _check_no_gil(when: str) -> None:
    if _REQUIRE_NO_GIL and _gil_enabled():
        raise pytest.UsageError(
            f"CORUN_REQUIRE_NO_GIL is set but the GIL is on {when} "
            f"({sys.version}; PYTHON_GIL={os.environ.get('PYTHON_GIL')!r})"
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    _check_no_gil("at the start of the session")


def pytest_collection_finish(session: pytest.Session) -> None:
    _check_no_gil("after collecting the tests")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _REQUIRE_NO_GIL and _gil_enabled():
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        print(
            "\nCORUN_REQUIRE_NO_GIL is set but the GIL was on at the end of the session",
            file=sys.stderr,
        )
