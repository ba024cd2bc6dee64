"""Event, Semaphore, BoundedSemaphore: for coroutines and plain threads alike.

QEMU has no such objects (its users build them from CoMutex and CoQueue);
these follow threading's and asyncio's names and meanings, and work from
coroutines on any context and from plain threads at once.

Design. Each waiter, coroutine or thread, is a one-shot `Waiter` in a
deque. A waker commits to a waiter with `claim()` and wakes it with
`deliver()`; a waiter that gives up (timeout, cancel) takes the same claim,
so exactly one of them acts. What cannot be done with single atomic
operations (a semaphore's count against its waiters) is done under a tiny
`threading.Lock` that is never held across a switch, a wake or a syscall
(DESIGN.md): wakes happen after it is released.

A semaphore hands a released permit straight to the first waiter (FIFO, no
barging). If that waiter is cancelled after the permit reached it, the
acquire completes and the cancel is raised at its next cancellation point,
so no permit is lost or counted twice.

Threads: every method from any thread; the waits from coroutines (they
suspend) or plain threads (they block; a thread that owns an open context
runs its loop meanwhile).
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent

from .coroutine import checkpoint
from .waiter import Waiter, wait_or_complete

if TYPE_CHECKING:
    from .coroutine import Coroutine


def _caller() -> Coroutine[Any] | None:
    co: Coroutine[Any] | None = getattr(getcurrent(), "co", None)
    if co is not None:
        checkpoint(co)
    return co


class Event:
    """A flag that coroutines and threads can wait for. Thread: any."""

    __slots__ = ("__weakref__", "_flag", "_waiters")

    def __init__(self) -> None:
        # Invariants: a waiter is in _waiters until set() pops it or it
        # withdraws; set() stores _flag before it pops, wait() publishes its
        # waiter before it reads _flag, so no waiter sleeps through a set().
        self._flag = False
        self._waiters: deque[Waiter] = deque()

    def __repr__(self) -> str:
        state = "set" if self._flag else "unset"
        return f"<Event at {id(self):#x} {state}, {len(self._waiters)} waiting>"

    def is_set(self) -> bool:
        """Whether the flag is set. Thread: any."""
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter. Thread: any."""
        self._flag = True
        waiters = self._waiters
        while True:
            try:
                waiter = waiters.popleft()
            except IndexError:
                return
            if waiter.claim():
                waiter.deliver(True)  # one that can never run needs no telling

    def clear(self) -> None:
        """Reset the flag. Thread: any."""
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set; True, or False after `timeout` seconds.

        A cancellation point in a coroutine. Coroutine or thread.
        """
        if self._flag:
            return True
        waiter = Waiter(_caller(), self)
        self._waiters.append(waiter)
        # Pairs with set(): we published the waiter, then read the flag.
        try:
            if waiter.wait(timeout, lambda: self._flag):
                return True
        except BaseException:
            _discard(self._waiters, waiter)
            raise
        _discard(self._waiters, waiter)
        return self._flag


def _discard(waiters: deque[Waiter], waiter: Waiter) -> None:
    try:
        waiters.remove(waiter)
    except ValueError:
        pass  # popped by a waker already


class Semaphore:
    """A counter of permits; acquire() waits while there is none. Thread: any."""

    __slots__ = ("__weakref__", "_lock", "_value", "_waiters")

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError(f"Semaphore initial value must be >= 0, got {value}")
        # Invariants (under _lock): _value > 0 implies no live waiter in
        # _waiters; a released permit goes either to _value or, claimed, to
        # exactly one waiter.
        self._lock = threading.Lock()
        self._value = value
        self._waiters: deque[Waiter] = deque()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} at {id(self):#x} value={self._value}, "
            f"{len(self._waiters)} waiting>"
        )

    def locked(self) -> bool:
        """Whether acquire() would wait. Thread: any."""
        return self._value == 0

    @property
    def value(self) -> int:
        """Permits available now. Thread: any."""
        return self._value

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a permit, waiting while there is none; False after `timeout` seconds.

        A cancellation point in a coroutine when it has to wait. Coroutine
        or thread.
        """
        with self._lock:
            if self._value > 0 and not self._waiters:
                self._value -= 1
                return True
        waiter = Waiter(_caller(), self)
        with self._lock:
            if self._value > 0 and not self._waiters:
                self._value -= 1
                return True
            self._waiters.append(waiter)
        try:
            if wait_or_complete(waiter, timeout):
                return True
        except BaseException:
            self._withdraw(waiter)
            raise
        self._withdraw(waiter)
        return False

    def _withdraw(self, waiter: Waiter) -> None:
        """A waiter gave up; if a permit reached it anyway, release it again."""
        with self._lock:
            _discard(self._waiters, waiter)
        if waiter.delivered():
            self.release()

    def release(self) -> None:
        """Give a permit back: to the first waiter, or to the count. Thread: any."""
        while True:
            with self._lock:
                if not self._waiters:
                    self._check_release()
                    self._value += 1
                    return
                waiter = self._waiters.popleft()
                if not waiter.claim():
                    continue  # it timed out or was cancelled meanwhile
            # Outside the lock: a wake may write an eventfd.
            if waiter.deliver(True):
                return
            # It can never run (its context closed): the permit goes on.

    def _check_release(self) -> None:
        """Hook for BoundedSemaphore (called under _lock)."""

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class BoundedSemaphore(Semaphore):
    """A Semaphore whose release() refuses to go above its initial value. Thread: any."""

    __slots__ = ("_bound",)

    def __init__(self, value: int = 1) -> None:
        super().__init__(value)
        self._bound = value

    def _check_release(self) -> None:
        if self._value >= self._bound:
            raise ValueError(f"{self!r} released too many times")
