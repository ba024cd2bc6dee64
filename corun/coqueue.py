"""CoQueue: a FIFO wait queue of coroutines.

QEMU: util/qemu-coroutine-lock.c (qemu_co_queue_wait, qemu_co_queue_next,
qemu_co_queue_restart_all, qemu_co_enter_next).

Design. The queue is a deque of suspended coroutines: `append` from any
thread and `popleft` are atomic, so waiting and waking need no other lock
and are safe from any number of threads. A waiter queues itself *before*
it releases the lock it was given and only then yields. A waker pops it
and calls `wake()`, which restarts it on its own home context; if the
waker runs in another thread and gets there before the waiter has yielded,
`wake()` schedules it and the loop enters it after the yield. So a wake-up
can never fall between "checked the condition" and "started waiting".

Threads: `wait` from coroutines; `next`, `restart_all`, `enter_next`,
`empty`, `len` from any thread.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from .comutex import CoMutex, _expire, _me, _report_dead_waiter, _timer_on_home
from .context import wake
from .coroutine import Cancelled, _suspend, checkpoint, park

if TYPE_CHECKING:
    from .coroutine import Coroutine


class Lockable(Protocol):
    def acquire(self) -> Any: ...
    def release(self) -> Any: ...


class CoQueue:
    """Coroutines waiting for a condition, woken in FIFO order. Thread: any."""

    __slots__ = ("__weakref__", "_waiters")

    def __init__(self) -> None:
        # Invariants: every coroutine in _waiters has queued itself in
        # wait() and is suspended or about to yield; it leaves the deque
        # only through a popleft that is followed by exactly one wake().
        self._waiters: deque[Coroutine[Any]] = deque()

    def __repr__(self) -> str:
        return f"<CoQueue at {id(self):#x}, {len(self._waiters)} waiting>"

    def wait(self, lock: Lockable | None = None, timeout: float | None = None) -> bool:
        """Queue self, release `lock` while waiting, re-acquire it before returning.

        Returns True when woken, False after `timeout` seconds. A
        cancellation point: a cancelled waiter leaves the queue (a wake-up
        that raced the cancel is passed on to the next waiter), re-acquires
        `lock` and raises Cancelled. Coroutine only.
        """
        co = _me(self, "wait")
        if isinstance(lock, CoMutex) and lock.holder is not co:
            raise RuntimeError(f"{co!r} waits on {self!r} with {lock!r}, which it does not hold")
        checkpoint(co)
        waiters = self._waiters
        withdrawn: list[bool] = []

        def withdraw() -> bool:
            # Home thread (a cancel or the timeout): leave the queue, unless
            # a waker popped us first; then its wake-up is on the way.
            try:
                waiters.remove(co)
            except ValueError:
                return False
            withdrawn.append(True)
            return True

        # Armed first (it cannot fire before we park: it runs in our loop).
        timer = None
        if timeout is not None:
            timer = _timer_on_home(co, self, timeout, _expire, co, withdraw, [])
        waiters.append(co)
        if lock is not None:
            try:
                lock.release()
            except BaseException:
                if timer is not None:
                    timer.cancel()
                try:
                    waiters.remove(co)
                except ValueError:
                    _suspend(co)  # a waker popped us already: take its wake-up
                raise
        try:
            park(co, withdraw, self)
        except Cancelled:
            if not withdrawn:
                self.next()  # we were popped by a waker: pass its wake-up on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if lock is not None:
                if isinstance(lock, CoMutex):
                    lock._acquire_shielded(co)
                else:
                    lock.acquire()
        return not withdrawn

    def next(self) -> bool:
        """Wake the first waiter; False if there is none. Thread: any."""
        while True:
            try:
                co = self._waiters.popleft()
            except IndexError:
                return False
            if self._wake(co):
                return True

    def _wake(self, co: Coroutine[Any]) -> bool:
        try:
            wake(co)
        except RuntimeError as exc:
            # Its context was closed while it waited: skip it, loudly.
            _report_dead_waiter(self, co, exc)
            return False
        return True

    def restart_all(self) -> int:
        """Wake every coroutine waiting now; return how many. Thread: any."""
        waiters = self._waiters
        woken = 0
        # Only those waiting now: a woken coroutine may queue itself again.
        for _ in range(len(waiters)):
            try:
                co = waiters.popleft()
            except IndexError:
                break
            if self._wake(co):
                woken += 1
        return woken

    def enter_next(self, lock: Lockable | None = None) -> bool:
        """Like next(), but release `lock` around the wake-up. Thread: any."""
        # A loop, not recursion: any number of waiters may be dead.
        while True:
            try:
                co = self._waiters.popleft()
            except IndexError:
                return False
            if lock is not None:
                try:
                    lock.release()
                except BaseException:
                    self._waiters.appendleft(co)  # not woken: keep its place
                    raise
            try:
                woken = self._wake(co)
            finally:
                if lock is not None:
                    lock.acquire()
            if woken:
                return True

    def empty(self) -> bool:
        """Whether no coroutine waits. Thread: any."""
        return not self._waiters

    def __len__(self) -> int:
        return len(self._waiters)
