"""run(): the asyncio.run of corun.

Creates a context in the calling thread, runs `fn` as a coroutine there
until it finishes, closes the context, returns the result (or raises the
exception). The exception is the caller's, so it does not also go to the
context's exception handler.

Thread: any thread without an open context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from . import _thread
from .context import AioContext
from .coroutine import Coroutine

T = TypeVar("T")


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) as a coroutine on a new context in this thread.

    Thread: any thread without an open context.
    """
    existing = _thread._tls.ctx
    if existing is not None and existing._closed and not existing._draining:
        existing = None  # a close() that was interrupted: AioContext() finishes it
    if existing is not None:
        raise RuntimeError(
            f"run() cannot be called from a thread that owns an open context ({existing!r})"
        )
    with AioContext(f"run:{getattr(fn, '__qualname__', 'fn')}") as ctx:
        co = Coroutine(fn, *args, **kwargs)
        co._exc_owned = True
        ctx.schedule(co)
        while not co.done:
            ctx._pass(None)
        return co.result()
