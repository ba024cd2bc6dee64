"""Cancellation scopes: a time limit (or a cancel from anywhere) around a block.

QEMU: qemu_co_timeout (util/qemu-co-timeout.c) puts a deadline on one
coroutine call; asyncio.timeout and trio's cancel scopes put one on a block.

Design. A scope belongs to the coroutine that enters it. It arms a timer on
that coroutine's home context; when the timer fires, or when anyone calls
`scope.cancel()` from any thread, the scope cancels its coroutine with
`co.cancel()`, so Cancelled is raised at the coroutine's next cancellation
point inside the block. At the block's exit the scope withdraws its own
request (`co.uncancel()`, asyncio's counting): if no other request is
outstanding, the Cancelled that reaches the exit is the scope's own and it
is turned into TimeoutError (`timeout`) or swallowed (`move_on_after`);
otherwise it propagates, so an inner scope never swallows an outer scope's
expiry or an explicit `co.cancel()`. A request that was not raised yet when
the block ended is withdrawn with it.

Threads: enter and leave in the coroutine; `cancel()` from any thread.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent

from .coroutine import Cancelled

if TYPE_CHECKING:
    from .coroutine import Coroutine
    from .timer import Timer


class CancelScope:
    """Cancels the block it guards after `seconds`, or when cancel() is called.

    `raise_timeout`: at the exit, turn the scope's own cancellation into
    TimeoutError (`timeout()`) instead of leaving the block quietly
    (`move_on_after()`). Made by timeout() and move_on_after(). Thread:
    entered and left in one coroutine (which needs a context); cancel()
    from any thread.
    """

    __slots__ = (
        "_claim",
        "_co",
        "_entered",
        "_fired",
        "_raise_timeout",
        "_seconds",
        "_timer",
        "cancelled_caught",
    )

    def __init__(self, seconds: float, *, raise_timeout: bool) -> None:
        seconds = float(seconds)
        if seconds != seconds:
            raise ValueError("a cancellation scope's delay is NaN")
        self._seconds = seconds
        self._raise_timeout = raise_timeout
        self._co: Coroutine[Any] | None = None
        self._timer: Timer | None = None
        self._entered = False
        self._fired = False
        # Taken once: by the first of expiry/cancel() (which cancels the
        # coroutine) or by the exit (after which nothing may cancel).
        self._claim = threading.Lock()
        #: True once the block was left because of this scope's own cancellation
        #: (its deadline, or cancel()). Thread: any.
        self.cancelled_caught = False

    def __repr__(self) -> str:
        state = "fired" if self._fired else ("active" if self._entered else "idle")
        who = f" in {self._co.name!r}" if self._co is not None else ""
        return f"<CancelScope {self._seconds} s {state}{who}>"

    def __enter__(self) -> CancelScope:
        co: Coroutine[Any] | None = getattr(getcurrent(), "co", None)
        if co is None:
            raise RuntimeError(f"{self!r} entered outside a coroutine")
        if self._entered:
            raise RuntimeError(f"{self!r} cannot be entered twice")
        ctx = co.ctx
        if ctx is None:
            raise RuntimeError(f"{self!r} needs a context: {co!r} has none")
        self._co = co
        self._entered = True
        if self._seconds != float("inf"):
            self._timer = ctx.call_later(max(self._seconds, 0.0), self.cancel)
        return self

    def cancel(self) -> None:
        """Cancel the block now (no effect once it has fired or ended). Thread: any."""
        if self._co is None or not self._claim.acquire(False):
            return
        self._fired = True
        self._co.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        co = self._co
        assert co is not None  # set by __enter__
        if self._timer is not None:
            self._timer.cancel()
        if self._claim.acquire(False):
            return False  # never fired, and now it never will
        # Fired: withdraw our request. If none other is outstanding, a
        # Cancelled reaching us is ours (and one not raised yet is dropped).
        if co.uncancel() > 0 or exc_type is None or not issubclass(exc_type, Cancelled):
            return False
        self.cancelled_caught = True
        if self._raise_timeout:
            raise TimeoutError(f"{co!r}: the block timed out after {self._seconds} s") from exc
        return True


def timeout(seconds: float) -> CancelScope:
    """`with timeout(s):` cancels the block after `s` seconds and raises TimeoutError.

    asyncio.timeout semantics. Coroutine only.
    """
    return CancelScope(seconds, raise_timeout=True)


def move_on_after(seconds: float) -> CancelScope:
    """`with move_on_after(s) as scope:` cancels the block after `s` seconds, quietly.

    trio semantics: the block is left and `scope.cancelled_caught` says so.
    Coroutine only.
    """
    return CancelScope(seconds, raise_timeout=False)
