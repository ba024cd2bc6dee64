"""run_in_thread(): run blocking code in a worker thread from a coroutine.

QEMU: util/thread-pool.c (thread_pool_submit_co).

Design. Each context owns a bounded `concurrent.futures.ThreadPoolExecutor`,
created on first use by its home thread and shut down when the context
closes. The coroutine submits the call, attaches a one-shot Waiter to the
future and yields; the worker's completion fires the Waiter, which wakes
the coroutine on its home context. Its result or exception is then
returned or raised in the coroutine.

Threads: coroutines only.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from greenlet import getcurrent

from .waiter import Waiter

T = TypeVar("T")


def run_in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) in a worker thread; suspend until it returns.

    Returns its result or raises its exception. Coroutine only.
    """
    co = getattr(getcurrent(), "co", None)
    if co is None:
        raise RuntimeError("run_in_thread() called outside a coroutine")
    ctx = co.ctx
    if ctx is None:
        raise RuntimeError(f"run_in_thread() needs a context: {co!r} has none")
    future: Future[T] = ctx._get_thread_pool().submit(fn, *args, **kwargs)
    waiter = Waiter(co)
    future.add_done_callback(lambda _: waiter.fire())
    waiter.wait()
    return future.result()
