"""Timers: callbacks that run in a context's thread at a deadline.

QEMU: util/qemu-timer.c (timer_new, timer_mod, timer_del, timerlist_run_timers).

Design. Each context keeps its armed timers in a heap of
`(when, seq, timer)` entries owned by its home thread. `seq` comes from one
counter per context, taken at every `mod()`/`cancel()`: it orders equal
deadlines by their latest `mod()`, and it makes "the latest call wins"
exact when calls come from several threads. A heap entry is live while
`timer._entry` is that entry; re-arming or cancelling just replaces or
clears `_entry` and the stale entry is dropped when it reaches the top
(or when stale entries outnumber live ones).

From the home thread `mod()`/`cancel()` act on the heap at once. From any
other thread they append `(timer, when, seq)` to a lock-free inbox and
notify the loop, which applies the inbox at the start of its next pass
(pairs with `AioContext._pass`). `timer.when` and `timer.pending` are
stored by the caller at once, so they read right in the calling thread.

Threads: `mod`, `cancel`, `when`, `pending` from any thread; the callback
runs in the context's thread.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, Any

from .coroutine import FATAL

if TYPE_CHECKING:
    from .context import AioContext

_Entry = tuple[float, int, "Timer"]


class Timer:
    """A callback armed for a deadline on its context's `time()` clock. Thread: any."""

    __slots__ = ("_ctx", "_cb", "_args", "_when", "_entry", "_seq")

    def __init__(self, ctx: AioContext, cb: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if not callable(cb):
            raise TypeError(f"{ctx!r}.timer() needs a callable, got {cb!r}")
        self._ctx = ctx
        self._cb = cb
        self._args = args
        self._when: float | None = None
        self._entry: _Entry | None = None
        self._seq = -1  # seq of the latest mod()/cancel() applied to the heap

    def __repr__(self) -> str:
        name = getattr(self._cb, "__qualname__", repr(self._cb))
        state = f"when={self._when:.6f}" if self._when is not None else "unarmed"
        return f"<Timer {name} {state} ctx={self._ctx.name!r}>"

    @property
    def pending(self) -> bool:
        """Whether the timer is armed. Thread: any."""
        return self._when is not None

    @property
    def when(self) -> float | None:
        """The deadline on the `ctx.time()` clock, or None. Thread: any."""
        return self._when

    def mod(self, when: float) -> None:
        """(Re)arm to fire at `when` (timer_mod). Thread: any."""
        when = float(when)
        if when != when:
            raise ValueError(f"{self!r}.mod(): deadline is NaN")
        ctx = self._ctx
        if ctx._closed and ctx._refuses():
            raise ctx._refusal(repr(self))
        ctx._timers.change(self, when)

    def cancel(self) -> None:
        """Disarm (timer_del); no effect if not armed, or once the context closed. Thread: any."""
        if not self._ctx._closed:
            try:
                self._ctx._timers.change(self, None)
                return
            except RuntimeError:
                pass  # the context closed meanwhile: nothing will fire
        self._when = None
        self._entry = None


class TimerList:
    """The armed timers of one context. Thread: see each method."""

    __slots__ = ("_ctx", "_heap", "_stale", "_seq", "inbox")

    def __init__(self, ctx: AioContext) -> None:
        self._ctx = ctx
        self._heap: list[_Entry] = []
        self._stale = 0
        # next() on itertools.count is a single atomic operation.
        self._seq = itertools.count()
        # (timer, when or None, seq) from other threads; applied by the home thread.
        self.inbox: deque[tuple[Timer, float | None, int]] = deque()

    def change(self, timer: Timer, when: float | None) -> None:
        """Arm (when) or disarm (None) `timer`. Thread: any."""
        seq = next(self._seq)
        timer._when = when
        ctx = self._ctx
        if threading.get_ident() == ctx._thread:
            self._apply(timer, when, seq)
            return
        # AioContext._pass applies the inbox before it computes its timeout.
        ctx._submit(self.inbox, (timer, when, seq))

    def _apply(self, timer: Timer, when: float | None, seq: int) -> None:
        if seq < timer._seq:
            # A later mod()/cancel() was applied already; repair when/pending,
            # which this call's caller may have stored after it.
            entry = timer._entry
            timer._when = entry[0] if entry is not None else None
            return
        timer._seq = seq
        if timer._entry is not None:
            self._stale += 1
        if when is None:
            timer._entry = None
        else:
            entry = (when, seq, timer)
            timer._entry = entry
            heappush(self._heap, entry)
            if self._stale > 32 and self._stale * 2 > len(self._heap):
                self._compact()
        timer._when = when

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[2]._entry is e]
        heapify(self._heap)
        self._stale = 0

    def apply_inbox(self) -> None:
        """Apply what other threads asked for, in their order. Thread: home."""
        inbox = self.inbox
        for _ in range(len(inbox)):
            # Applied, then removed: interrupted in between, the change is
            # applied again, which is harmless (same seq, same outcome).
            timer, when, seq = inbox[0]
            self._apply(timer, when, seq)
            inbox.popleft()

    def deadline(self) -> float | None:
        """The earliest live deadline, or None. Thread: home."""
        heap = self._heap
        while heap:
            entry = heap[0]
            if entry[2]._entry is entry:
                return entry[0]
            heappop(heap)
            self._stale -= 1
        return None

    def run_expired(self, now: float) -> int:
        """Run the timers due at `now`; return how many ran. Thread: home.

        A timer armed during this call (a callback re-arming itself for
        `now` or earlier) waits for the next pass, so a pass always ends.
        """
        heap = self._heap
        if not heap or heap[0][0] > now:
            return 0
        marker = next(self._seq)
        ran = 0
        ctx = self._ctx
        entry = started = None
        try:
            while heap:
                entry = heap[0]
                if entry[0] > now or entry[1] > marker:
                    break
                timer = entry[2]
                if timer._entry is not entry:
                    heappop(heap)
                    self._stale -= 1
                    continue
                heappop(heap)
                timer._entry = None
                timer._when = None
                ran += 1
                # One line: see coroutine.py, "One-line try".
                try: (started := entry)[2]._cb(*timer._args)  # noqa: E701
                except FATAL:
                    raise
                except BaseException as exc:
                    ctx._report(exc, timer._cb)
        except BaseException:
            if entry is not None and started is not entry:
                self._restore(entry)
            raise
        return ran

    def _restore(self, entry: _Entry) -> None:
        """An interrupt took `entry` off the heap before its callback ran: re-arm it.

        Unless a later mod()/cancel() was applied meanwhile (then that wins).
        """
        timer = entry[2]
        if timer._seq != entry[1]:
            return
        timer._entry = entry
        timer._when = entry[0]
        if not any(e is entry for e in self._heap):
            heappush(self._heap, entry)
