"""Per-thread state: the one piece of module-level mutable state in corun.

Each OS thread owns at most one open AioContext; `_tls.ctx` is it. The
running coroutine is not stored here: it is derived from the running greenlet
(see coroutine.py), so it can never disagree with what greenlet knows.

After os.fork() only the forking thread exists in the child. Its copy of the
thread-local still names the parent's context, which is unusable there, so
the child forgets it, and every context of the parent is marked inherited
(API.md, "Processes").
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from greenlet import getcurrent

if TYPE_CHECKING:
    from .context import AioContext


class _ThreadState(threading.local):
    # Class attribute: the default seen by every thread that never set it,
    # so the hot path reads `_tls.ctx` without a getattr default.
    ctx: AioContext | None = None


_tls = _ThreadState()

# Every open context of this process, for fork (and for inspection). Weak:
# a context that nobody holds is garbage collected (and its fds closed).
_contexts: weakref.WeakSet[AioContext] = weakref.WeakSet()


def _forget_contexts_after_fork() -> None:
    """In a fork child: no open context, not in a coroutine (API.md, "Processes")."""
    _tls.ctx = None
    for ctx in list(_contexts):
        ctx._after_fork_in_child()
    _contexts.clear()
    # Forked from inside a coroutine (multiprocessing's fork start method
    # does that): the child goes on in that coroutine's greenlet, but it is
    # no longer a corun coroutine there; without `co`, the greenlet reads as
    # a plain one everywhere (current_coroutine() is None, run() works).
    current = getcurrent()
    if getattr(current, "co", None) is not None:
        del current.co  # type: ignore[attr-defined]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_contexts_after_fork)
