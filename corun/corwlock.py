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

Cancellation and timeouts. rdlock() and wrlock() are cancellation points
and take a timeout. A ticket carries a one-shot claim: the admission that
counts it takes the claim, and so does its owner when it gives up (a
cancel, a timeout); whoever wins acts. An owner that lost the race was
admitted: it gives the counted hold back. upgrade() is not a cancellation
point (see there).

Threads: every method is for coroutines, on any context.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .comutex import CoMutex, _expire, _me, _report_dead_waiter, _timer_on_home
from .context import wake
from .coroutine import Cancelled, _report, _suspend, checkpoint, park

if TYPE_CHECKING:
    from .coroutine import Coroutine


class _Ticket:
    """One coroutine waiting for a read or the write hold."""

    __slots__ = ("claim", "co", "reader")

    def __init__(self, reader: bool, co: Coroutine[Any]) -> None:
        self.reader = reader
        self.co = co
        # Taken once: by the admission that counts the ticket's hold, or by
        # its owner withdrawing it (a cancel, a timeout). Whoever wins acts.
        self.claim = threading.Lock()


class CoRwLock:
    """Readers share, a writer is exclusive, FIFO so writers do not starve. Thread: any."""

    __slots__ = ("__weakref__", "_mutex", "_owners", "_readers", "_tickets", "_writer")

    def __init__(self) -> None:
        # Invariants (all under _mutex):
        # - _owners > 0: that many read holds, _writer is None;
        #   _owners == -1: _writer holds it; _owners == 0: free.
        # - sum(_readers.values()) == max(_owners, 0).
        # - A ticket leaves _tickets only when _owners already counts it, or
        #   once it is withdrawn (its claim taken by its owner).
        self._mutex = CoMutex()
        self._owners = 0
        self._tickets: deque[_Ticket] = deque()
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

    def _admit_first(self) -> Coroutine[Any] | None:
        """Count and remove the first ticket if it can go in now (under _mutex)."""
        tickets = self._tickets
        while tickets:
            ticket = tickets[0]
            if ticket.claim.locked():
                tickets.popleft()  # withdrawn by its owner
                continue
            if not (self._owners >= 0 if ticket.reader else self._owners == 0):
                return None
            if not ticket.claim.acquire(False):
                tickets.popleft()  # withdrawn just now
                continue
            tickets.popleft()
            co = ticket.co
            if ticket.reader:
                self._owners += 1
                self._readers[co] = self._readers.get(co, 0) + 1
            else:
                self._owners = -1
                self._writer = co
            return co
        return None

    def _drop_hold(self, co: Coroutine[Any]) -> None:
        """Undo one read hold, or the write hold, of `co` (under _mutex)."""
        if self._writer is co:
            self._writer = None
            self._owners = 0
        else:
            count = self._readers.pop(co, 1)
            if count > 1:
                self._readers[co] = count - 1
            self._owners -= 1

    def _wake_one_and_unlock(self) -> None:
        """Admit the first ticket if it can go in, then release _mutex.

        A ticket whose coroutine can never run (its context closed) is
        skipped: the hold counted for it is undone and the next ticket is
        tried, in a loop, however many such tickets there are.
        """
        while True:
            co = self._admit_first()
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
            self._mutex._acquire_shielded(_me(self, "unlock"))
            self._drop_hold(co)

    def _wait(self, co: Coroutine[Any], ticket: _Ticket, timeout: float | None) -> bool:
        """Wait until `ticket` is admitted (True) or `timeout` passes (False).

        Called with _mutex held and the ticket queued; releases _mutex. A
        cancellation point unless the ticket is an upgrade's.
        """
        withdrawn: list[bool] = []

        def withdraw() -> bool:
            # Home thread (a cancel or the timeout). Losing the claim means
            # an admission counted us already: its wake-up is on the way.
            if not ticket.claim.acquire(False):
                return False
            withdrawn.append(True)
            return True

        timer = None
        if timeout is not None:
            try:
                timer = _timer_on_home(co, self, timeout, _expire, co, withdraw, [])
            except BaseException:
                self._tickets.remove(ticket)
                self._mutex.release()
                raise
        self._mutex.release()
        try:
            while True:
                park(co, withdraw, self)
                if withdrawn:
                    break
                if ticket.claim.locked():
                    return True  # admitted and counted by whoever woke us
                _report(
                    co.ctx,
                    RuntimeError(
                        f"{co!r} was woken while waiting for {self!r} before it was let in: "
                        "a wake() that was not the lock's; it goes on waiting"
                    ),
                    co,
                )
        except Cancelled:
            self._give_up(co, ticket, withdrawn)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._give_up(co, ticket, withdrawn)
        return False

    def _give_up(self, co: Coroutine[Any], ticket: _Ticket, withdrawn: list[bool]) -> None:
        """`co` stops waiting (cancel, timeout): undo its ticket or the hold it got."""
        self._mutex._acquire_shielded(co)
        if withdrawn:
            try:
                self._tickets.remove(ticket)
            except ValueError:
                pass  # dropped already by an admission that saw it withdrawn
        else:
            self._drop_hold(co)  # admitted: the hold was counted for us
        # Whoever can go in now (readers behind a withdrawn writer...) goes.
        self._wake_one_and_unlock()

    def rdlock(self, timeout: float | None = None) -> bool:
        """Take a read hold, waiting behind any queued writer.

        Returns True, or False after `timeout` seconds. A cancellation point
        when it has to wait. Coroutine only.
        """
        co = _me(self, "rdlock")
        checkpoint(co)
        self._mutex._acquire_shielded(co)
        if self._writer is co:
            self._mutex.release()
            raise RuntimeError(f"{co!r} tried to rdlock {self!r}, which it holds for writing")
        if self._owners == 0 or (self._owners > 0 and not self._tickets):
            self._owners += 1
            self._readers[co] = self._readers.get(co, 0) + 1
            self._mutex.release()
            return True
        ticket = _Ticket(True, co)
        self._tickets.append(ticket)
        if not self._wait(co, ticket, timeout):
            return False
        # Admitted (and counted) by whoever woke us; let the next reader in.
        self._mutex._acquire_shielded(co)
        self._wake_one_and_unlock()
        return True

    def wrlock(self, timeout: float | None = None) -> bool:
        """Take the write hold, waiting for every earlier holder and ticket.

        Returns True, or False after `timeout` seconds. A cancellation point
        when it has to wait. Coroutine only.
        """
        co = _me(self, "wrlock")
        checkpoint(co)
        self._mutex._acquire_shielded(co)
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
            return True
        ticket = _Ticket(False, co)
        self._tickets.append(ticket)
        return self._wait(co, ticket, timeout)

    def unlock(self) -> None:
        """Drop this coroutine's read or write hold. Coroutine only."""
        co = _me(self, "unlock")
        self._mutex._acquire_shielded(co)
        if self._writer is not co and co not in self._readers:
            self._mutex.release()
            raise RuntimeError(f"{co!r} tried to unlock {self!r}, which it does not hold")
        self._drop_hold(co)
        self._wake_one_and_unlock()

    def upgrade(self) -> None:
        """Turn this coroutine's read hold into the write hold. Coroutine only.

        If others hold or wait for the lock, queue at the tail. Not a
        cancellation point: it gives up its read hold to queue, and a
        cancelled upgrade would leave its caller holding nothing; a pending
        Cancelled is raised at the next wait.
        """
        co = _me(self, "upgrade")
        self._mutex._acquire_shielded(co)
        if self._readers.get(co) != 1:
            self._mutex.release()
            raise RuntimeError(
                f"{co!r} tried to upgrade {self!r}: it must hold exactly one read hold"
            )
        del self._readers[co]
        self._owners -= 1
        if self._owners == 0 and not self._tickets:
            self._owners = -1
            self._writer = co
            self._mutex.release()
            return
        ticket = _Ticket(False, co)
        self._tickets.append(ticket)
        co_admitted = self._admit_first()  # others may go first; we may even be first
        self._mutex.release()
        if co_admitted is co:
            return
        if co_admitted is not None:
            wake(co_admitted)
        # Suspend first: an admission may count us (take the claim) before
        # we get here, and its wake-up is still to come.
        _suspend(co, self)
        while not ticket.claim.locked():
            _report(
                co.ctx,
                RuntimeError(
                    f"{co!r} was woken while upgrading {self!r} before it was let in: "
                    "a wake() that was not the lock's; it goes on waiting"
                ),
                co,
            )
            _suspend(co, self)

    def downgrade(self) -> None:
        """Turn this coroutine's write hold into a read hold, letting queued readers in.

        Coroutine only.
        """
        co = _me(self, "downgrade")
        self._mutex._acquire_shielded(co)
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
