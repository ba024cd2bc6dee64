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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _thread
from . import context as _context
from .coroutine import Cancelled, park, register_waiter

if TYPE_CHECKING:
    from .context import AioContext
    from .coroutine import Coroutine

_PENDING: Any = object()
TIMEOUT: Any = object()
FD_CLOSED: Any = object()  # delivered by closing(): the awaited fd is being closed


class Waiter:
    """One wake-up for `co` (or, if `co` is None, for the calling thread)."""

    __slots__ = ("_claim", "_latch", "_loop", "co", "value", "what")

    def __init__(self, co: Coroutine[Any] | None, what: object = None) -> None:
        self.co = co
        self.what = what  # what is waited for, for corun.dump()
        self.value: Any = _PENDING
        self._claim = threading.Lock()
        self._latch: threading.Lock | None = None
        # A plain thread that owns an open context keeps running its loop
        # while it waits (as join() does), or work for it would stall.
        self._loop: AioContext | None = None
        if co is None:
            self._latch = threading.Lock()
            self._latch.acquire()
            self._loop = _thread._tls.ctx

    def fire(self, value: Any = None) -> bool:
        """Deliver the wake-up with `value` unless someone did already. Thread: any.

        RuntimeError if the waiter's coroutine can never be woken (its
        context is closed).
        """
        if not self._claim.acquire(False):
            return False
        self._wake(value)
        return True

    def claim(self) -> bool:
        """Win the right to wake this waiter (then call deliver()); False if taken. Thread: any.

        Lets a waker commit to a waiter under its own short lock and wake it
        after letting go of that lock.
        """
        return self._claim.acquire(False)

    def deliver(self, value: Any = None) -> bool:
        """Wake the waiter with `value`, after a successful claim(). Thread: any.

        False if its coroutine can never be woken (its context is closed):
        then it never sees `value`, and the waker must give it to someone
        else.
        """
        try:
            self._wake(value)
        except RuntimeError:
            return False
        return True

    def _wake(self, value: Any) -> None:
        # value is stored before the wake-up is published: the woken side
        # reads it only after wake()/release(), which pair with this store.
        self.value = value
        co = self.co
        if co is not None:
            try:
                _context.wake(co)
            except RuntimeError:
                self.value = _PENDING  # never seen: not delivered
                raise
        else:
            self._latch.release()  # type: ignore[union-attr]
            loop = self._loop
            if loop is not None:
                loop.notify()  # its thread runs its loop while it waits: see wait()

    def closing(self) -> None:
        """The fd this waiter waits on is being closed (AioContext.notify_closing)."""
        self.fire(FD_CLOSED)

    def claimed(self) -> bool:
        """Whether a fire() or cancel() has already acted. Thread: any."""
        return self._claim.locked()

    def delivered(self) -> bool:
        """Whether a waker (not a timeout, not a cancel) delivered a value. Thread: any."""
        value = self.value
        return value is not _PENDING and value is not TIMEOUT

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
            return self._wait_thread(timeout)
        # A pending cancel: withdraw and raise, unless a fire() already won
        # the claim (its wake-up is on the way): then park to absorb it, and
        # park() raises the Cancelled.
        if co._cancel is not None and self.cancel():
            raise co._take_cancel()
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
            park(co, self.cancel, self.what)
        finally:
            if timer is not None:
                timer.cancel()
        return self.value is not TIMEOUT

    def _wait_thread(self, timeout: float | None) -> bool:
        latch = self._latch
        assert latch is not None  # co is None
        if timeout is not None and timeout >= threading.TIMEOUT_MAX:
            timeout = None  # longer than the OS can wait for: as good as forever
        loop = self._loop
        if loop is not None and not loop._closed:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not latch.acquire(False):
                if deadline is None:
                    loop._pass(None)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self.cancel():
                        return False
                    latch.acquire()  # a fire() won the race: it is releasing
                    break
                loop._pass(remaining)
        elif timeout is None:
            latch.acquire()
        elif not latch.acquire(timeout=max(timeout, 0.0)):
            if self.cancel():
                return False
            latch.acquire()  # a fire() won the race: it is releasing
        return self.value is not TIMEOUT


register_waiter(Waiter)


def wait_or_complete(waiter: Waiter, timeout: float | None) -> bool:
    """waiter.wait(), except that a cancel that lost the race to a waker is deferred.

    If a waker had already delivered (an item, a permit), the operation is
    complete: it returns True and the Cancelled stays pending, raised at the
    coroutine's next cancellation point, so nothing handed over is lost or
    handed twice. Coroutine or plain thread.
    """
    try:
        return waiter.wait(timeout)
    except Cancelled as exc:
        co = waiter.co
        if co is None or not waiter.delivered():
            raise
        co._defer_cancel(exc)
        return True
