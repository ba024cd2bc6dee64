"""Per-thread state: the one piece of module-level mutable state in corun.

Each OS thread owns at most one open AioContext; `_tls.ctx` is it. The
running coroutine is not stored here: it is derived from the running greenlet
(see coroutine.py), so it can never disagree with what greenlet knows.

After os.fork() only the forking thread exists in the child. Its copy of the
thread-local still names the parent's context, which is unusable there, so
the child forgets it (API.md, "Processes").
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import AioContext


class _ThreadState(threading.local):
    # Class attribute: the default seen by every thread that never set it,
    # so the hot path reads `_tls.ctx` without a getattr default.
    ctx: AioContext | None = None


_tls = _ThreadState()


def _forget_contexts_after_fork() -> None:
    _tls.ctx = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_contexts_after_fork)
