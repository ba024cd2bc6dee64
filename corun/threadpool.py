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


class _Call:
    """fn(*args, **kwargs) for a worker, which lets go of them before it reports.

    concurrent.futures' work item keeps its arguments until the worker
    moves on, after the future is done: by then the coroutine may have
    resumed and dropped its own references, and the last one goes in the
    worker. For a large buffer that matters: glibc frees it into the arena
    of the thread that made it, from the worker, and trims that arena's
    heap; the next buffer of that size faults every page back in. Writing
    1 GiB in 2 MiB buffers that way cost ~100k-150k minor faults and
    ~0.3-0.9 s of kernel time against ~1.8k faults and ~0.1 s (see
    CHANGELOG). Dropping our references here, before the worker completes
    the future, leaves the last one to the caller, on the home thread.
    """

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        fn, args, kwargs = self.fn, self.args, self.kwargs
        del self.fn, self.args, self.kwargs
        return fn(*args, **kwargs)


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
    future: Future[T] = ctx._get_thread_pool().submit(_Call(fn, args, kwargs))
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
