"""run_in_thread(): run blocking code in a worker thread from a coroutine.

QEMU: util/thread-pool.c (thread_pool_submit_co).

Design. Each context owns a bounded `concurrent.futures.ThreadPoolExecutor`,
created on first use by its home thread and shut down when the context
closes. The coroutine submits the call, attaches a completion callback to
the future and yields; the callback queues the wake-up on the home
context's loop (QEMU's completion bottom half), which restarts the
coroutine. Its result or exception is then returned or raised in the
coroutine. Like thread_pool_submit_co, the coroutine always yields, even
when `fn` finished before the callback was attached (the callback then
runs inline, and the loop can only run the wake-up after we yielded).

A cancellation point: cancel() wakes the coroutine with Cancelled at once;
a call already running in its worker cannot be stopped: it finishes there
and its outcome is dropped (a call still queued never runs).

Threads: coroutines only.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from greenlet import getcurrent

from .coroutine import Cancelled, checkpoint
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
    checkpoint(co)
    future: Future[T] = ctx._get_thread_pool().submit(fn, *args, **kwargs)
    waiter = Waiter(co, ("run_in_thread", fn))
    # Runs in the worker, or inline here if fn is already done; either way
    # the home thread's loop fires the waiter only after we park in wait().
    # (Once a cancel has withdrawn the waiter, there is nobody to tell.)
    future.add_done_callback(lambda _: waiter.claimed() or ctx.call_soon(waiter.fire))
    try:
        waiter.wait()
    except Cancelled:
        # fn cannot be stopped once it runs: it finishes in its worker and
        # its result or exception is dropped.
        future.cancel()
        raise
    return future.result()
