"""sleep() and CoSleep: suspend a coroutine for a while.

QEMU: util/qemu-coroutine-sleep.c (qemu_co_sleep_ns,
qemu_co_sleep_ns_wakeable, qemu_co_sleep_wake).

Design. A sleeping coroutine counts as scheduled: it takes its own
`_sched` flag (the test-and-set that schedule() uses), so scheduling or
waking it meanwhile is the same clear error as double scheduling. A timer
on its home context ends the sleep: the callback drops the flag and enters
the coroutine (it runs in the home thread, outside any coroutine).

CoSleep adds a wake-up from anywhere. The timer and `wake()` race for a
one-shot claim (a non-blocking Lock acquire); the winner drops the flag
and wakes the coroutine, the loser does nothing, so a second wake is a
no-op and a wake after the timer is too.

Both are cancellation points: a cancel() withdraws the sleep (the timer,
or CoSleep's claim) and raises Cancelled in the sleeper.

Threads: `sleep` from coroutines; `CoSleep.wake` from any thread.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent

from .context import wake
from .coroutine import checkpoint, park

if TYPE_CHECKING:
    from .context import AioContext
    from .coroutine import Coroutine


def _sleeper(where: object) -> tuple[Coroutine[Any], AioContext]:
    co: Coroutine[Any] | None = getattr(getcurrent(), "co", None)
    if co is None:
        raise RuntimeError(f"{where} called outside a coroutine")
    ctx = co.ctx
    if ctx is None:
        raise RuntimeError(f"{where} needs a context: {co!r} has none")
    return co, ctx


def _take_sched(co: Coroutine[Any], where: object) -> None:
    if not co._sched.acquire(False):
        raise RuntimeError(f"{co!r} is already scheduled in {co._where()}")
    co._sched_where = where


def _drop_sched(co: Coroutine[Any]) -> None:
    co._sched_where = None
    co._sched.release()


def _drop_sched_and_wake(co: Coroutine[Any]) -> None:
    _drop_sched(co)
    wake(co)


def sleep(seconds: float) -> None:
    """Suspend the current coroutine for `seconds` (0 just yields to the loop).

    QEMU: qemu_co_sleep_ns. Coroutine only.
    """
    co, ctx = _sleeper("sleep()")
    checkpoint(co)
    if seconds <= 0:
        ctx.schedule(co)
        park(co, None, "sleep(0)")  # a schedule cannot be withdrawn: Cancelled on resume
        return
    _take_sched(co, "sleep()")
    try:
        timer = ctx.call_later(seconds, _drop_sched_and_wake, co)
    except BaseException:
        _drop_sched(co)  # no timer (bad `seconds`, closed context): not asleep
        raise

    def abort() -> bool:
        # Home thread, like the timer's callback: if we run, it has not.
        timer.cancel()
        _drop_sched(co)
        return True

    park(co, abort, timer)


class _Nap:
    __slots__ = ("claim", "co")

    def __init__(self, co: Coroutine[Any]) -> None:
        self.co = co
        self.claim = threading.Lock()

    def end(self) -> None:
        if self.claim.acquire(False):
            _drop_sched_and_wake(self.co)


class CoSleep:
    """A sleep that another thread or coroutine can cut short. Thread: any."""

    __slots__ = ("__weakref__", "_nap")

    def __init__(self) -> None:
        # Invariant: _nap is the current sleeper's one-shot claim, or None.
        self._nap: _Nap | None = None

    def __repr__(self) -> str:
        nap = self._nap
        who = f"sleeping: {nap.co.name!r}" if nap is not None else "idle"
        return f"<CoSleep at {id(self):#x} {who}>"

    def sleep(self, seconds: float) -> None:
        """Sleep for `seconds` or until wake(), whichever comes first. Coroutine only."""
        co, ctx = _sleeper(f"{self!r}.sleep()")
        checkpoint(co)
        if self._nap is not None:
            raise RuntimeError(f"{co!r}: {self!r} already has a sleeper")
        _take_sched(co, self)
        nap = _Nap(co)
        try:
            timer = ctx.call_later(max(seconds, 0.0), nap.end)
        except BaseException:
            _drop_sched(co)  # no timer (bad `seconds`, closed context): not asleep
            raise
        # Published after the flag is taken: pairs with wake(), which can
        # only end a nap it can see.
        self._nap = nap

        def abort() -> bool:
            # The one-shot claim decides against a racing wake() or timer.
            if not nap.claim.acquire(False):
                return False
            _drop_sched(co)
            return True

        try:
            park(co, abort, self)
        finally:
            self._nap = None
            timer.cancel()

    def wake(self) -> None:
        """End the current sleep early; no effect if nobody sleeps. Thread: any."""
        nap = self._nap
        if nap is not None:
            nap.end()
