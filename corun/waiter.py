"""Waiter: a one-shot wake-up that several events may race to deliver.

A coroutine (or a plain thread) that waits for "whichever comes first" -
a coroutine finishing or a timeout, an fd becoming ready or a timeout, a
CoSleep wake or its timer - publishes one Waiter to every event source and
then suspends. The first `fire()` wins an atomic claim (a non-blocking
`Lock.acquire`, the test-and-set of DESIGN.md) and delivers the wake-up;
every later `fire()` is a no-op. The waiter itself can withdraw with
`cancel()`, which takes the same claim, so exactly one party ever acts.

A coroutine waiter is woken with `wake()`, so it resumes on its own home
context whoever fires. A thread waiter blocks on a latch (a held Lock that
`fire()` releases).

Thread: `fire()` and `cancel()` from any thread; `wait()` by the waiter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import context as _context
from .coroutine import checkpoint, park

if TYPE_CHECKING:
    from .coroutine import Coroutine

_PENDING: Any = object()
TIMEOUT: Any = object()


class Waiter:
    """One wake-up for `co` (or, if `co` is None, for the calling thread)."""

    __slots__ = ("_claim", "_latch", "co", "value")

    def __init__(self, co: Coroutine[Any] | None) -> None:
        self.co = co
        self.value: Any = _PENDING
        self._claim = threading.Lock()
        self._latch: threading.Lock | None = None
        if co is None:
            self._latch = threading.Lock()
            self._latch.acquire()

    def fire(self, value: Any = None) -> bool:
        """Deliver the wake-up with `value` unless someone did already. Thread: any."""
        if not self._claim.acquire(False):
            return False
        # value is stored before the wake-up is published: the woken side
        # reads it only after wake()/release(), which pair with this store.
        self.value = value
        co = self.co
        if co is not None:
            _context.wake(co)
        else:
            self._latch.release()  # type: ignore[union-attr]
        return True

    def claimed(self) -> bool:
        """Whether a fire() or cancel() has already acted. Thread: any."""
        return self._claim.locked()

    def cancel(self) -> bool:
        """Withdraw: True if no fire() happened and none will act. Thread: any."""
        return self._claim.acquire(False)

    def wait(self, timeout: float | None = None, ready: Callable[[], bool] | None = None) -> bool:
        """Suspend until fired; False on timeout.

        `ready`, if given, is checked once after the waiter was published: if
        the awaited event already happened the waiter withdraws (or, if a
        fire() got in first, absorbs its wake-up). Thread: the waiter's.
        """
        co = self.co
        if ready is not None and ready():
            if self.cancel():
                return True
            timeout = None  # a fire() won the claim: its wake-up is on the way
        if co is None:
            assert self._latch is not None
            if timeout is not None and timeout >= threading.TIMEOUT_MAX:
                timeout = None  # longer than the OS can wait for: as good as forever
            if timeout is None:
                self._latch.acquire()
            elif not self._latch.acquire(timeout=max(timeout, 0.0)):
                if self.cancel():
                    return False
                self._latch.acquire()  # a fire() won the race: it is releasing
            return self.value is not TIMEOUT
        checkpoint(co)
        timer = None
        if timeout is not None:
            ctx = co.ctx
            if ctx is None:
                raise RuntimeError(f"{co!r} has no context: a timeout needs one")
            timer = ctx.call_later(max(timeout, 0.0), self.fire, TIMEOUT)
        # Exactly one fire() wins the claim and wakes us exactly once, so one
        # park absorbs it. The timer can only fire after we park: it runs in
        # this thread's loop. A cancel() takes the claim (self.cancel) and
        # wakes us itself; if a fire() won, its wake-up resumes us. Either
        # way park() raises Cancelled.
        try:
            park(co, self.cancel)
        finally:
            if timer is not None:
                timer.cancel()
        return self.value is not TIMEOUT
