"""wait_readable() / wait_writable(): suspend a coroutine until an fd is ready.

QEMU: the yield-until-ready pattern of io/channel.c (qio_channel_yield),
built on aio_set_fd_handler.

Design. The coroutine installs a one-shot Waiter as the fd's reader (or
writer) on its home context, and, with a timeout, a timer; then it yields.
Whichever fires first wins the Waiter's claim and wakes it; the handler and
the timer are removed before returning. The handler runs in the home
thread outside coroutines, so the wake-up enters the coroutine directly.

Threads: coroutines only; the fd must not have another handler in the same
direction on that context meanwhile.
"""

from __future__ import annotations

import errno
from typing import Any

from greenlet import getcurrent

from . import _thread
from .fdhandler import fileno_of
from .waiter import FD_CLOSED, Waiter


def _wait_fd(fd: Any, timeout: float | None, index: int, what: str) -> bool:
    co = getattr(getcurrent(), "co", None)
    if co is None:
        raise RuntimeError(f"{what}() called outside a coroutine")
    ctx = co.ctx
    if ctx is None:
        raise RuntimeError(f"{what}() needs a context: {co!r} has none")
    n = fileno_of(fd)
    handlers = ctx._fds.get(n)
    if handlers is not None and handlers[index] is not None:
        raise RuntimeError(
            f"{what}({fd!r}) in {co!r}: {ctx!r} already has a "
            f"{'reader' if index == 0 else 'writer'} for fd {n}"
        )
    waiter = Waiter(co, (what, n))
    ctx._set_handler(n, index, (waiter.fire, (True,)), what)
    try:
        ok = waiter.wait(timeout)
        if waiter.value is FD_CLOSED:
            raise OSError(errno.EBADF, f"{what}(): fd {n} was closed while {co!r} waited on it")
        return ok
    finally:
        if not ctx._closed:
            ctx._set_handler(n, index, None, what)


def wait_readable(fd: Any, timeout: float | None = None) -> bool:
    """Suspend until `fd` is readable: True, or False after `timeout` seconds.

    Coroutine only.
    """
    return _wait_fd(fd, timeout, 0, "wait_readable")


def wait_writable(fd: Any, timeout: float | None = None) -> bool:
    """Suspend until `fd` is writable: True, or False after `timeout` seconds.

    Coroutine only.
    """
    return _wait_fd(fd, timeout, 1, "wait_writable")


def notify_closing(fd: Any) -> None:
    """`fd` is about to be closed: wake the coroutines of this thread's context that
    wait on it (OSError EBADF) and forget its registrations (trio's notify_closing).

    See AioContext.notify_closing. Thread: home (of the calling thread's context).
    """
    ctx = _thread._tls.ctx
    if ctx is None:
        raise RuntimeError("notify_closing() called from a thread that owns no open context")
    ctx.notify_closing(fd)
