"""CoRwLock: a fair reader-writer lock for coroutines.

QEMU: util/qemu-coroutine-lock.c (qemu_co_rwlock_*), the ticket version.

Design. The state - `_owners` (number of readers, or -1 for a writer) and
a FIFO of tickets (who waits, and for reading or writing) - is protected
by an internal CoMutex, so it is safe across contexts and threads. A new
reader gets in at once only if no ticket waits (so a queued writer is not
starved by readers arriving after it); a writer only if nobody holds the
lock. Whoever makes the lock available wakes the first ticket if it can
go in, and counts it in `_owners` before the wake, so nobody can sneak in
between. A woken reader wakes the next ticket in turn, so a run of queued
readers enters together.

Threads: every method is for coroutines, on any context.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .comutex import CoMutex, _me, _report_dead_waiter
from .context import wake
from .coroutine import yield_

if TYPE_CHECKING:
    from .coroutine import Coroutine


class CoRwLock:
    """Readers share, a writer is exclusive, FIFO so writers do not starve. Thread: any."""

    __slots__ = ("__weakref__", "_mutex", "_owners", "_readers", "_tickets", "_writer")

    def __init__(self) -> None:
        # Invariants (all under _mutex):
        # - _owners > 0: that many read holds, _writer is None;
        #   _owners == -1: _writer holds it; _owners == 0: free.
        # - sum(_readers.values()) == max(_owners, 0).
        # - A ticket leaves _tickets only when _owners already counts it.
        self._mutex = CoMutex()
        self._owners = 0
        self._tickets: deque[tuple[bool, Coroutine[Any]]] = deque()
        self._readers: dict[Coroutine[Any], int] = {}
        self._writer: Coroutine[Any] | None = None

    def __repr__(self) -> str:
        if self._owners > 0:
            state = f"{self._owners} reader(s)"
        elif self._owners < 0:
            writer = self._writer
            state = f"written by {writer.name!r}" if writer is not None else "write-locked"
        else:
            state = "free"
        return f"<CoRwLock at {id(self):#x} {state}, {len(self._tickets)} waiting>"

    def _wake_one_and_unlock(self) -> None:
        """Admit the first ticket if it can go in, then release _mutex.

        A ticket whose coroutine can never run (its context closed) is
        skipped: the hold counted for it is undone and the next ticket is
        tried, in a loop, however many such tickets there are.
        """
        while True:
            co = None
            if self._tickets:
                is_reader, candidate = self._tickets[0]
                if is_reader:
                    if self._owners >= 0:
                        self._owners += 1
                        self._readers[candidate] = self._readers.get(candidate, 0) + 1
                        co = candidate
                elif self._owners == 0:
                    self._owners = -1
                    self._writer = candidate
                    co = candidate
            if co is not None:
                self._tickets.popleft()
            self._mutex.release()
            if co is None:
                return
            try:
                wake(co)
                return
            except RuntimeError as exc:
                # Its context was closed while it waited: it never takes the
                # hold we counted for it; undo that and admit the next one.
                _report_dead_waiter(self, co, exc)
            self._mutex.acquire()
            if self._writer is co:
                self._writer = None
                self._owners = 0
            else:
                count = self._readers.pop(co, 1)
                if count > 1:
                    self._readers[co] = count - 1
                self._owners -= 1

    def rdlock(self) -> None:
        """Take a read hold, waiting behind any queued writer. Coroutine only."""
        co = _me(self, "rdlock")
        self._mutex.acquire()
        if self._writer is co:
            self._mutex.release()
            raise RuntimeError(f"{co!r} tried to rdlock {self!r}, which it holds for writing")
        if self._owners == 0 or (self._owners > 0 and not self._tickets):
            self._owners += 1
            self._readers[co] = self._readers.get(co, 0) + 1
            self._mutex.release()
            return
        self._tickets.append((True, co))
        self._mutex.release()
        yield_()
        # Admitted (and counted) by whoever woke us; let the next reader in.
        self._mutex.acquire()
        self._wake_one_and_unlock()

    def wrlock(self) -> None:
        """Take the write hold, waiting for every earlier holder and ticket. Coroutine only."""
        co = _me(self, "wrlock")
        self._mutex.acquire()
        if self._writer is co or co in self._readers:
            self._mutex.release()
            raise RuntimeError(
                f"{co!r} tried to wrlock {self!r}, which it already holds "
                "(use upgrade() to turn a read hold into a write hold)"
            )
        if self._owners == 0:
            self._owners = -1
            self._writer = co
            self._mutex.release()
            return
        self._tickets.append((False, co))
        self._mutex.release()
        yield_()

    def unlock(self) -> None:
        """Drop this coroutine's read or write hold. Coroutine only."""
        co = _me(self, "unlock")
        self._mutex.acquire()
        if self._writer is co:
            self._writer = None
            self._owners = 0
        else:
            count = self._readers.get(co)
            if count is None:
                self._mutex.release()
                raise RuntimeError(f"{co!r} tried to unlock {self!r}, which it does not hold")
            if count == 1:
                del self._readers[co]
            else:
                self._readers[co] = count - 1
            self._owners -= 1
        self._wake_one_and_unlock()

    def upgrade(self) -> None:
        """Turn this coroutine's read hold into the write hold. Coroutine only.

        If others hold or wait for the lock, queue at the tail.
        """
        co = _me(self, "upgrade")
        self._mutex.acquire()
        if self._readers.get(co) != 1:
            self._mutex.release()
            raise RuntimeError(
                f"{co!r} tried to upgrade {self!r}: it must hold exactly one read hold"
            )
        if self._owners == 1 and not self._tickets:
            del self._readers[co]
            self._owners = -1
            self._writer = co
            self._mutex.release()
            return
        del self._readers[co]
        self._owners -= 1
        self._tickets.append((False, co))
        self._wake_one_and_unlock()
        yield_()

    def downgrade(self) -> None:
        """Turn this coroutine's write hold into a read hold, letting queued readers in.

        Coroutine only.
        """
        co = _me(self, "downgrade")
        self._mutex.acquire()
        if self._writer is not co:
            self._mutex.release()
            raise RuntimeError(f"{co!r} tried to downgrade {self!r}, which it does not write")
        self._writer = None
        self._owners = 1
        self._readers[co] = 1
        self._wake_one_and_unlock()

    @contextmanager
    def reader(self) -> Iterator[CoRwLock]:
        """`with lock.reader():` holds a read lock for the block. Coroutine only."""
        self.rdlock()
        try:
            yield self
        finally:
            self.unlock()

    @contextmanager
    def writer(self) -> Iterator[CoRwLock]:
        """`with lock.writer():` holds the write lock for the block. Coroutine only."""
        self.wrlock()
        try:
            yield self
        finally:
            self.unlock()
