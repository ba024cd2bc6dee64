"""CoMutex: a coroutine mutex that works across contexts and threads.

QEMU: util/qemu-coroutine-lock.c (qemu_co_mutex_lock/unlock, after OSv's
lock-free mutex).

Design. QEMU's mutex keeps a count of lockers, a lock-free stack of waiters
that the unlocker reverses into FIFO order, and a handoff/sequence protocol
for a locker that is halfway in while the holder unlocks. Python gives us
neither fetch-and-add nor compare-and-swap, but it gives two atomic
operations that carry the same algorithm:

- `_taken`, a threading.Lock used only with `acquire(False)`: an atomic
  test-and-set. It is the "count is not zero" bit: held while the mutex
  has an owner, never waited on.
- `_waiters`, a deque: `append` from any thread and `popleft` are atomic,
  so it is already the FIFO that QEMU builds out of its stack.

Direct hand-off: an owner that gives the mutex up while coroutines wait
does not release `_taken`; it pops the first waiter, makes it the holder
and wakes it on its home context. The mutex stays locked throughout, so no
newcomer can barge in, and `locked()` stays True until the next owner runs.

The "halfway in" race (QEMU's handoff dance) is the pair (locker: publish
in `_waiters`, then try `_taken`) / (unlocker: release `_taken`, then look
at `_waiters`). Whoever of the two wins `_taken` afterwards owns the mutex
and, by the invariant below, serves the head of the queue. A locker that
loses simply yields: the winner will hand the mutex on. Only the owner of
`_taken` ever pops, so pops never race.

Spinning. QEMU spins briefly when the holder runs in another thread,
rather than queue (a queued waiter costs a cross-thread wake-up at every
hand-off from then on, and hand-offs then chain into a convoy). A spin must
never starve the holder: with more IOThreads than cores the holder may be
the one waiting for a processor. So each try first gives the processor
away: under the GIL, `time.sleep(0)` (which also lets go of the GIL, the
only way the holder can progress) for 3 tries; on free-threaded builds,
`os.sched_yield()` for at most `_SPIN_SECONDS`, and a spinner only reads
the lock while the holder has it, so it does not pull the lock's cache
line away from the holder at every try (see `_spin`).

Threads: acquire/release from coroutines on any context; `locked()` and
`holder` from anywhere.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from greenlet import greenlet

from . import _mode
from .context import wake
from .coroutine import Cancelled, _report, _suspend, checkpoint, held_locks, park

if TYPE_CHECKING:
    from .coroutine import Coroutine
    from .timer import Timer

# Greenlet's primitives: see coroutine.py (bound the same way, for the same reason).
getcurrent: Callable[[], greenlet]
_greenlet_init: Callable[[], None]
globals().update(_mode.greenlet_primitives())
_greenlet_init()

# How long a locker retries before it queues, when the holder runs in
# another thread (see "Spinning" above). Measured with 2, 5 and 8 IOThreads
# hammering one mutex on 2 cores (tools/bench.py --cases mutex).
# Under the GIL: 3 tries, each after a time.sleep(0) (on Linux that sleeps
# for the timer slack, about 50-70 us). 0 tries collapses into
# a hand-off convoy with one cross-thread wake-up per lock (about 15x
# slower); 1 to 10 are all alike.
# Free-threaded: tries for up to 200 us, each after an os.sched_yield().
# Plain retries (no yield) starved a preempted holder as soon as IOThreads
# outnumbered cores (5 on 2 cores: 0.05x the GIL build's rate); yielding
# ones run at the rate of an uncontended mutex whatever the number of
# IOThreads, and a budget of 0.2 to 5 ms made no measurable difference.
_GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()
_SPINS = 3
_SPIN_SECONDS = 200e-6
_yield_processor = os.sched_yield if hasattr(os, "sched_yield") else lambda: time.sleep(0)


def _me(lock: object, what: str) -> Coroutine[Any]:
    co: Coroutine[Any] | None = getattr(getcurrent(), "co", None)
    if co is None:
        raise RuntimeError(f"{lock!r}.{what}() called outside a coroutine")
    return co


def _report_dead_waiter(lock: object, co: Coroutine[Any], exc: RuntimeError) -> None:
    """`co` waited for `lock` but can never be woken: tell the waker's context."""
    me = getattr(getcurrent(), "co", None)
    _report(
        me.ctx if me is not None else None,
        RuntimeError(f"{lock!r} skipped {co!r}, which can never be woken: {exc}"),
        co,
    )


def _unlink_held(co: Coroutine[Any], mutex: CoMutex) -> None:
    """Remove `mutex` from the middle of co's chain (non-LIFO release)."""
    node = co._held
    while node is not None:
        if node._next_held is mutex:
            node._next_held = mutex._next_held
            return
        node = node._next_held


def held_by(co: Coroutine[Any]) -> list[CoMutex]:
    """The CoMutexes `co` holds, latest first."""
    return [lock for lock in held_locks(co) if isinstance(lock, CoMutex)]


def _expire(co: Coroutine[Any], withdraw: Callable[[], bool], expired: list[bool]) -> None:
    """A wait's timeout (home thread, from the loop): withdraw `co` and resume it."""
    if withdraw():
        expired.append(True)
        ctx = co.ctx
        if ctx is not None:
            ctx.enter(co)


def _timer_on_home(co: Coroutine[Any], waitable: object, timeout: float, *cb: Any) -> Timer:
    """Arm cb on co's home context in `timeout` seconds (a wait's timeout)."""
    ctx = co.ctx
    if ctx is None:
        raise RuntimeError(f"{co!r} waits on {waitable!r} with a timeout, which needs a context")
    return ctx.call_later(max(timeout, 0.0), *cb)


class CoMutex:
    """A FIFO coroutine mutex with direct hand-off. Thread: any (coroutines only lock)."""

    __slots__ = ("__weakref__", "_next_held", "_taken", "_waiters", "holder")

    def __init__(self) -> None:
        # Invariants:
        # - _taken is held exactly while the mutex has an owner, including
        #   the time between a hand-off and the new owner running.
        # - Only the coroutine that holds _taken pops _waiters; when it finds
        #   _waiters non-empty it hands the mutex to the head instead of
        #   releasing _taken.
        # - A coroutine in _waiters is woken exactly once, by the hand-off
        #   that makes it the holder, unless it withdraws itself first (a
        #   cancel or a timeout: remove() and popleft() decide who wins).
        self._taken = threading.Lock()
        self._waiters: deque[Coroutine[Any]] = deque()
        #: The Coroutine that holds the mutex (or is being handed it), or None.
        #: Thread: any.
        self.holder: Coroutine[Any] | None = None
        # The mutex the holder acquired before this one and still holds:
        # the coroutine's held mutexes form a chain through here, from
        # Coroutine._held, with no allocation per acquire.
        self._next_held: CoMutex | None = None

    def __repr__(self) -> str:
        if not self._taken.locked():
            state = "unlocked"
        else:
            holder = self.holder
            state = f"locked by {holder.name!r}" if holder is not None else "locked"
        return f"<CoMutex at {id(self):#x} {state}, {len(self._waiters)} waiting>"

    def locked(self) -> bool:
        """Whether the mutex has an owner (or one is being handed it). Thread: any."""
        return self._taken.locked()

    def acquire(self, timeout: float | None = None) -> bool:
        """Lock the mutex, yielding while another coroutine holds it; return True.

        With `timeout`, give up after that many seconds and return False
        (like threading.Lock). A cancellation point when it has to wait: a
        cancelled waiter leaves the queue, and a hand-off that raced the
        cancel is passed on to the next waiter. Coroutine only.
        """
        # Compiled, g and co are typed: see yield_() in coroutine.py.
        try:
            g: Any = getcurrent()
            co: Coroutine[Any] | None = g.co
        except (AttributeError, TypeError):
            co = None
        if co is None:
            raise RuntimeError(f"{self!r}.acquire() called outside a coroutine")
        if self.holder is co:
            raise RuntimeError(f"{co!r} tried to acquire {self!r}, which it already holds")
        if not self._waiters and self._taken.acquire(False):
            self.holder = co
        elif not self._acquire_slow(co, timeout, True):
            return False
        # Push onto the coroutine's chain of held mutexes (see release()).
        self._next_held = co._held
        co._held = self
        return True

    # `with mutex:` calls these directly (one Python call each way, not two);
    # like threading.Lock, `with mutex as x` binds True.
    __enter__ = acquire

    def _acquire_shielded(self, co: Coroutine[Any]) -> None:
        """acquire() for corun's own short critical sections: not a cancellation point.

        A pending Cancelled stays pending for the caller's next wait.
        """
        if self.holder is co:
            raise RuntimeError(f"{co!r} tried to acquire {self!r}, which it already holds")
        if not self._waiters and self._taken.acquire(False):
            self.holder = co
        else:
            self._acquire_slow(co, None, False)
        self._next_held = co._held
        co._held = self

    def _acquire_slow(self, co: Coroutine[Any], timeout: float | None, cancellable: bool) -> bool:
        holder = self.holder
        if holder is not None and holder._thread != co._thread and self._spin(co):
            return True
        if cancellable:
            checkpoint(co)  # before we publish ourselves
        if timeout is not None and co.ctx is None:
            raise RuntimeError(f"{co!r} waits on {self!r} with a timeout, which needs a context")
        waiters = self._waiters
        waiters.append(co)
        # Pairs with release(): we publish ourselves, then try _taken; an
        # unlocker releases _taken, then looks at _waiters. So either it
        # sees us and hands the mutex on, or we win _taken here.
        if self._taken.acquire(False):
            while True:
                head = waiters.popleft()  # never empty: we are in it
                if head is co:
                    self.holder = co
                    return True
                # Others were first: serve them, then wait for our turn.
                if self._hand_off(head):
                    break
        return self._wait_for_hand_off(co, timeout, cancellable)

    def _spin(self, co: Coroutine[Any]) -> bool:
        """Retry for a moment while the holder runs in another thread; True if we won.

        Gives up early once the holder is a coroutine of our own thread (it
        cannot run before we yield). Never takes the mutex past a queued
        waiter: that one is served first.
        """
        taken = self._taken
        waiters = self._waiters
        if _GIL_ENABLED:
            for _ in range(_SPINS):
                time.sleep(0)  # lets go of the GIL: the holder's only chance to run
                if not waiters and taken.acquire(False):
                    self.holder = co
                    return True
                holder = self.holder
                if holder is not None and holder._thread == co._thread:
                    return False
            return False
        deadline = time.perf_counter() + _SPIN_SECONDS
        tries = 0
        while True:
            # Let a holder that waits for a processor have ours.
            _yield_processor()
            # locked() is one load. Reading `holder` takes a reference to the
            # holder's Coroutine (an atomic write to an object its thread
            # keeps using), so that check is made every 16 tries only.
            if not taken.locked():
                if not waiters and taken.acquire(False):
                    self.holder = co
                    return True
            elif not tries & 15:
                holder = self.holder
                if holder is not None and holder._thread == co._thread:
                    return False
            tries += 1
            if time.perf_counter() > deadline:
                return False

    def _wait_for_hand_off(
        self, co: Coroutine[Any], timeout: float | None, cancellable: bool
    ) -> bool:
        waiters = self._waiters

        def withdraw() -> bool:
            # Home thread (a cancel or the timeout): leave the queue, unless
            # a hand-off popped us first; then its wake-up is on the way.
            try:
                waiters.remove(co)
            except ValueError:
                return False
            return True

        expired: list[bool] = []
        timer = None
        if timeout is not None:
            timer = _timer_on_home(co, self, timeout, _expire, co, withdraw, expired)
        try:
            while True:
                if cancellable:
                    park(co, withdraw, self)
                else:
                    _suspend(co, self)
                if self.holder is co:
                    return True
                if expired:
                    return False
                # Not the hand-off that made us the holder: a stray wake()
                # from outside the mutex. Not an assert: under `python -O`
                # that would let us in beside the holder.
                _report(
                    co.ctx,
                    RuntimeError(
                        f"{co!r} was woken while waiting for {self!r}, which it does not "
                        "hold yet: a wake() that was not the mutex's hand-off; it goes on "
                        "waiting"
                    ),
                    co,
                )
        except Cancelled:
            if self.holder is co:
                self._hand_on()  # a hand-off raced the cancel: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def release(self, exc_type: object = None, exc: object = None, tb: object = None) -> None:
        """Unlock, handing the mutex to the first waiter if any. Coroutine only (holder).

        (The arguments are __exit__'s, which this is too.)
        """
        try:
            g: Any = getcurrent()
            co: Coroutine[Any] | None = g.co
        except (AttributeError, TypeError):
            co = None
        if co is None:
            raise RuntimeError(f"{self!r}.release() called outside a coroutine")
        if self.holder is not co:
            raise RuntimeError(
                f"{co!r} tried to release {self!r}, which it does not hold "
                f"(holder: {self.holder!r})"
            )
        # Pop from the chain of held mutexes; usually we are its top.
        if co._held is self:
            co._held = self._next_held
        else:
            _unlink_held(co, self)
        self._next_held = None
        waiters = self._waiters
        if not waiters:
            self.holder = None
            self._taken.release()
            # Pairs with _acquire_slow(): see there.
            if not waiters or not self._taken.acquire(False):
                return
            # We own it again and somebody waits: hand it on.
        self._hand_on()

    def _hand_on(self) -> None:
        """Give the mutex (held, by us) to the first waiter that can run, or unlock it."""
        waiters = self._waiters
        while True:
            if waiters:
                if self._hand_off(waiters.popleft()):
                    return
                continue
            self.holder = None
            self._taken.release()
            # Pairs with _acquire_slow(): see there.
            if not waiters or not self._taken.acquire(False):
                return

    def _hand_off(self, head: Coroutine[Any]) -> bool:
        """Make `head` the holder and wake it; False if it can never run."""
        self.holder = head
        try:
            wake(head)
        except RuntimeError as exc:
            # Its context was closed while it waited: it cannot take the
            # mutex. Report it where the releaser runs; serve the next one.
            self.holder = None
            _report_dead_waiter(self, head, exc)
            return False
        return True

    __exit__ = release
