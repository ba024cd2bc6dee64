"""Queue: a FIFO data channel between coroutines and threads, on any context.

Not to be confused with CoQueue, QEMU's wait queue (coroutines waiting for
a condition, no data): Queue carries items, like queue.Queue and
asyncio.Queue, and works from coroutines on any context and from plain
threads at once.

Design. Items, waiting getters and waiting putters are three deques under
one tiny `threading.Lock`, never held across a switch, a wake or a syscall
(DESIGN.md). An item is handed straight to the first waiting getter, and a
waiting putter's item straight into the queue when a get makes room: the
waker commits under the lock with the waiter's `claim()` and wakes it with
`deliver()` after letting go. A waiter that gives up (timeout, cancel)
takes the same claim, so exactly one of them acts. If the waker won, the
operation is complete: the getter returns the item it was handed, the
putter returns, and a cancel that lost the race is raised at the
coroutine's next cancellation point. So no item is ever lost or duplicated,
whoever gives up when.

`close()` is end of stream (Python 3.13's `Queue.shutdown`): puts are
refused with QueueShutDown, gets return what is left, then raise it.

Threads: every method from any thread; `put`/`get` from coroutines (they
suspend) or plain threads (they block; a thread that owns an open context
runs its loop meanwhile).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar

from .sync import _caller
from .waiter import Waiter, wait_or_complete

T = TypeVar("T")


class QueueEmpty(Exception):
    """get_nowait() on an empty Queue, or get() that timed out."""


class QueueFull(Exception):
    """put_nowait() on a full Queue, or put() that timed out."""


class QueueShutDown(Exception):
    """put() on a closed Queue, or get() on a closed and empty one."""


# What a closing queue delivers to its waiters.
_SHUTDOWN: Any = object()


class Queue(Generic[T]):
    """A FIFO of items, bounded by `maxsize` (0: unbounded). Thread: any."""

    __slots__ = ("__weakref__", "_closed", "_getters", "_items", "_lock", "_putters", "maxsize")

    def __init__(self, maxsize: int = 0) -> None:
        # Invariants (under _lock): _getters has live waiters only while
        # _items is empty; _putters only while _items is full; a claimed
        # waiter has left its deque and is delivered exactly once.
        #: The bound given at creation: put() waits while qsize() >= maxsize; 0 or
        #: less: unbounded. Thread: any.
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._items: deque[T] = deque()
        self._getters: deque[Waiter] = deque()
        self._putters: deque[tuple[Waiter, T]] = deque()
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<Queue at {id(self):#x}{state} size={len(self._items)} maxsize={self.maxsize}, "
            f"{len(self._getters)} getting, {len(self._putters)} putting>"
        )

    def qsize(self) -> int:
        """How many items wait in the queue. Thread: any."""
        return len(self._items)

    def empty(self) -> bool:
        """Whether no item waits. Thread: any."""
        return not self._items

    def full(self) -> bool:
        """Whether a put() would wait. Thread: any."""
        return 0 < self.maxsize <= len(self._items)

    # -- put -------------------------------------------------------------------

    def _put_locked(self, item: T) -> Waiter | bool:
        """Under _lock: hand `item` to a getter (returned, to deliver), queue it (True),
        or report the queue full (False)."""
        if self._closed:
            raise QueueShutDown(f"put() on {self!r}")
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if getter.claim():
                return getter
        if self.maxsize <= 0 or len(self._items) < self.maxsize:
            self._items.append(item)
            return True
        return False

    def put_nowait(self, item: T) -> None:
        """Queue `item` or raise QueueFull. Thread: any."""
        while True:
            with self._lock:
                done = self._put_locked(item)
            if done is False:
                raise QueueFull(f"put_nowait() on {self!r}")
            if done is True or done.deliver(item):
                return
            # That getter can never run (its context closed): try again.

    def put(self, item: T, timeout: float | None = None) -> None:
        """Queue `item`, waiting while the queue is full; QueueFull after `timeout` seconds.

        A cancellation point in a coroutine when it has to wait; a put that
        completed is never undone. Coroutine or thread.
        """
        waiter = None
        while True:
            with self._lock:
                done = self._put_locked(item)
                if done is False and waiter is not None:
                    self._putters.append((waiter, item))
                    break
            if done is True:
                return
            if done is False:
                waiter = Waiter(_caller(), self)  # made outside the lock; then try again
                continue
            if done.deliver(item):
                return
            # That getter can never run (its context closed): try again.
        try:
            ok = wait_or_complete(waiter, timeout)
        except BaseException:
            self._drop_putter(waiter)
            raise
        if not ok:
            self._drop_putter(waiter)
            raise QueueFull(f"put() on {self!r} timed out after {timeout} s")
        if waiter.value is _SHUTDOWN:
            raise QueueShutDown(f"put() on {self!r}: it was closed")

    def _drop_putter(self, waiter: Waiter) -> None:
        with self._lock:
            for i, (w, _) in enumerate(self._putters):
                if w is waiter:
                    del self._putters[i]
                    return

    # -- get -------------------------------------------------------------------

    def _get_locked(self) -> tuple[bool, Any, Waiter | None]:
        """Under _lock: (True, item, putter to wake or None) or (False, None, None)."""
        items = self._items
        if not items:
            if self._closed:
                raise QueueShutDown(f"get() on {self!r}: it is closed and empty")
            return False, None, None
        item = items.popleft()
        putters = self._putters
        while putters:
            putter, pending = putters.popleft()
            if putter.claim():
                items.append(pending)  # its item takes the room we made
                return True, item, putter
        return True, item, None

    def get_nowait(self) -> T:
        """Take the first item or raise QueueEmpty. Thread: any."""
        with self._lock:
            ok, item, putter = self._get_locked()
        if not ok:
            raise QueueEmpty(f"get_nowait() on {self!r}")
        if putter is not None:
            putter.deliver(True)  # its item is queued either way
        return item  # type: ignore[no-any-return]

    def get(self, timeout: float | None = None) -> T:
        """Take the first item, waiting while there is none; QueueEmpty after `timeout` s.

        A cancellation point in a coroutine when it has to wait; an item
        handed to it is returned, never dropped. Coroutine or thread.
        """
        with self._lock:
            ok, item, putter = self._get_locked()
        if not ok:
            waiter = Waiter(_caller(), self)
            with self._lock:
                ok, item, putter = self._get_locked()
                if not ok:
                    self._getters.append(waiter)
            if not ok:
                return self._wait_get(waiter, timeout)
        if putter is not None:
            putter.deliver(True)  # its item is queued either way
        return item  # type: ignore[no-any-return]

    def _wait_get(self, waiter: Waiter, timeout: float | None) -> T:
        try:
            ok = wait_or_complete(waiter, timeout)
        except BaseException:
            self._drop_getter(waiter)
            raise
        if not ok:
            self._drop_getter(waiter)
            raise QueueEmpty(f"get() on {self!r} timed out after {timeout} s")
        item = waiter.value
        if item is _SHUTDOWN:
            raise QueueShutDown(f"get() on {self!r}: it is closed and empty")
        return item  # type: ignore[no-any-return]

    def _drop_getter(self, waiter: Waiter) -> None:
        with self._lock:
            try:
                self._getters.remove(waiter)
            except ValueError:
                pass  # claimed by a waker already

    # -- end of stream ---------------------------------------------------------

    def close(self) -> None:
        """End of stream: puts raise QueueShutDown; gets drain what is left, then raise it.

        Waiting putters and getters are woken with QueueShutDown. Idempotent.
        Thread: any.
        """
        with self._lock:
            self._closed = True
            woken = [w for w in self._getters if w.claim()]
            woken += [w for w, _ in self._putters if w.claim()]
            self._getters.clear()
            self._putters.clear()
        for waiter in woken:
            waiter.deliver(_SHUTDOWN)  # one that can never run needs no telling

    shutdown = close

    @property
    def closed(self) -> bool:
        """Whether close() was called. Thread: any."""
        return self._closed
