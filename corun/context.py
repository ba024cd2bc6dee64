"""AioContext: an event loop owned by one thread, and the one door into it.

QEMU: util/async.c (aio_notify, aio_co_schedule, co_schedule_bh_cb,
aio_co_wake, aio_co_enter) and util/aio-posix.c (aio_poll).

Design. A context is three lock-free deques that any thread may append to -
one-shot callbacks and scheduled coroutines (`_ready`, one FIFO for both),
bottom halves (`_bh_q`, `_idle_q`) - plus timers, fd handlers and an eventfd. The
home thread runs `_pass()`, one full iteration of the loop and the only
place where work is run: it takes a snapshot of each deque (what arrives
meanwhile waits for the next pass), runs it, dispatches ready fds and
expired timers. Draining `_ready` is QEMU's `co_schedule_bh`: in QEMU a
bottom half drains the list; here the pass drains it directly whenever it
is non-empty, which is the same thing without the extra flag.

The one door in from other threads: append to a deque (a single atomic
operation), then `notify()`. notify() stores `_notified` and writes the
eventfd only if the loop announced it may sleep (`_notify_me`) and nobody
wrote since the loop last woke (the `_event_armed` test-and-set). A burst
onto a busy loop therefore costs no syscall; onto a sleeping loop, one.

Threads: `poll`, `add_*`/`remove_*` and `close` are for the home thread
(the thread that created the context); the rest is callable from any thread.
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import sys
import threading
import time as _time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from types import TracebackType
from typing import Any, TypeVar

from greenlet import greenlet

from . import _mode, _thread
from .bh import SCHEDULED, BottomHalf
from .coroutine import (
    _FINISHED,
    FATAL,
    Cancelled,
    Coroutine,
    _CoGreenlet,
    _defer,
    _enter,
    _finished,
    _KernelContext,
    _layer_above,
    _prepare,
    _release_quietly,
    _settle,
    _take_back,
    _unwind,
    current_coroutine,
)
from .fdhandler import HUP, READ, WRITE, Handler, fileno_of, make_poller
from .notifier import EventNotifier
from .timer import Timer, TimerList
from .watchdog import watch_stalls

T = TypeVar("T")

# Greenlet's primitives: see coroutine.py (bound the same way, for the same reason).
getcurrent: Callable[[], greenlet]
_switch: Callable[[greenlet], Any]
_greenlet_init: Callable[[], None]
globals().update(_mode.greenlet_primitives())
_greenlet_init()

# Compiled (Cython), functions have no Python frames: _running_a_pass()
# then counts passes instead of reading the stack.
_COMPILED = not __file__.endswith(".py")

logger = logging.getLogger("corun")

# Numbers for default names only; never read back.
_ctx_names = itertools.count(1)

_get_ident = threading.get_ident

# How long close() lets cancelled coroutines clean up before it gives up on
# them (and names them in a ResourceWarning), in seconds.
CLOSE_GRACE = 1.0

# How long idle bottom halves may wait (QEMU: 10 ms in aio_compute_timeout).
IDLE_BH_DELAY = 0.010

ExceptionHandler = Callable[["AioContext", BaseException, object], object]


class AioContext(_KernelContext):
    """An event-loop context owned by the calling thread. Thread: any."""

    def __init__(self, name: str | None = None) -> None:
        tls = _thread._tls
        _finish_interrupted_close(tls.ctx)
        if tls.ctx is not None:
            raise RuntimeError(
                f"thread {threading.current_thread().name!r} already owns {tls.ctx!r}; "
                "a thread owns at most one open context"
            )
        #: Its name (default "ctx-N"; an IOThread's context has the IOThread's
        #: name), shown in its repr and in error messages. Thread: any.
        self.name: str = name if name is not None else f"ctx-{next(_ctx_names)}"
        self._thread = threading.get_ident()
        self._thread_name = threading.current_thread().name
        # Invariants: _closed is set once, when close() starts; from then on
        # other threads are refused, while the home thread may queue work
        # until the drain ends (_draining). _released: the fds are closed.
        self._closed = False
        self._draining = False
        self._released = False
        self._close_done: threading.Event | None = None  # set once close() is over
        self._inherited = False  # True in a forked child: see _after_fork_in_child()
        self._interrupted = False  # a pass was left by an exception: see _recover()
        self._depth = 0  # passes under way (compiled only: see _running_a_pass)

        # Lock-free queues: any thread appends, the home thread pops.
        # call_soon() callbacks, as (cb, args) tuples, and scheduled coroutines.
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]] | Coroutine[Any]] = deque()
        self._bh_q: deque[BottomHalf] = deque()
        self._idle_q: deque[BottomHalf] = deque()
        self._timers = TimerList(self)

        # The notify protocol (see notify() and _pass()).
        # Invariants: _event_armed is held exactly from the notify() that
        # decides to write the eventfd until the loop has read it; so while
        # it is held the eventfd is (or is about to be) readable.
        try:
            self._setup()
            tls.ctx = self
            _thread._contexts.add(self)
        except BaseException:
            self._abort_setup()
            raise

    def _setup(self) -> None:
        """The part of __init__ that takes resources (undone by _abort_setup)."""
        self._notifier = EventNotifier()
        self._notify_fd = self._notifier.fileno()
        self._notify_me = False
        self._notified = False
        self._event_armed = threading.Lock()
        # Held around the eventfd write and around closing it, so that no
        # write can hit a closed (or reused) fd. Uncontended but for close().
        self._write_lock = threading.Lock()
        # Held by close() while it drains; see _late().
        self._close_lock = threading.Lock()

        try:
            self._poller = make_poller()
            # True when each wake-up is reported without reading the eventfd.
            self._notify_edge = self._poller.watch_notifier(self._notify_fd)
        except BaseException:
            self._notifier.close()
            raise
        self._fds: dict[int, list[Handler | None]] = {}
        # fds watched for good, edge-triggered, by corun sockets (net.py):
        # fd -> the watcher, whose readable()/writable() are its handlers.
        self._edge_fds: dict[int, Any] = {}
        # Main thread only: the signal module's wake-up fd (see _watch_signals).
        self._signal_socks: tuple[socket.socket, socket.socket] | None = None
        self._signal_fd = -1
        if threading.current_thread() is threading.main_thread():
            self._watch_signals()

        # Coroutines that started here and have not finished (for close()).
        self._live: set[Coroutine[Any]] = set()
        self._exc_handler: ExceptionHandler | None = None
        self._thread_pool: ThreadPoolExecutor | None = None
        self._thread_pool_size: int | None = None  # None: ThreadPoolExecutor's default
        # Greenlets of finished coroutines, for new ones (coroutine.POOL_SIZE).
        self._co_pool: list[_CoGreenlet] = []

        # Counters: written by the home thread only, except notify_writes,
        # which is written only while holding _event_armed.
        self._polls = 0
        self._pass_ended = 0  # _polls when the latest pass ended (see _pass)
        self._slow: float | None = None  # slow_callback_duration
        self._notify_writes = 0
        self._bh_calls = 0
        self._co_entered = 0
        self._co_scheduled = 0
        self._timers_fired = 0
        self._fd_events = 0

    def _abort_setup(self) -> None:
        """__init__ failed or was interrupted after taking resources: give them back.

        Whatever part exists: the signal wake-up fd, the epoll fd, the eventfd.
        """
        self._closed = True
        if _thread._tls.ctx is self:
            _thread._tls.ctx = None
        _thread._contexts.discard(self)
        if getattr(self, "_signal_socks", None) is not None:
            self._unwatch_signals()
        for part in ("_poller", "_notifier"):
            closer = getattr(getattr(self, part, None), "close", None)
            if closer is not None:
                closer()
        self._released = True

    def __repr__(self) -> str:
        if self._inherited:
            state = "inherited across fork"
        elif self._draining:
            state = "closing"
        else:
            state = "closed" if self._closed else "open"
        return f"<AioContext {self.name!r} {state} thread={self._thread_name!r}>"

    def __enter__(self) -> AioContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the door from any thread ------------------------------------------

    def notify(self) -> None:
        """Make a blocked or about-to-block poll() return (aio_notify). Thread: any.

        Pairs with _pass(): callers publish their work (append to a deque)
        before calling this; we store _notified and only then read
        _notify_me, while the loop stores _notify_me and only then reads
        the deques and _notified. So either the loop sees the work and does
        not sleep, or we see _notify_me and write the eventfd, which ends
        the sleep. _event_armed makes that write happen once per wake-up of
        the loop, however many producers race here.
        """
        self._notified = True
        try:
            if self._notify_me and self._event_armed.acquire(False):
                self._write_event()
        except BaseException:
            self._kick()
            raise

    def _submit(self, queue: deque[Any], item: Any) -> None:
        """The one door in from any thread: append `item`, then notify.

        All it does is one atomic append and, if the loop may be asleep, one
        eventfd write (notify(), inlined: this is the hot path of
        bh.schedule and remote timer changes; schedule() and call_soon()
        inline this in turn, keep them in step). Pairs with _pass():
        the item is published before _notified is stored and _notify_me read.
        """
        queue.append(item)
        self._notified = True
        try:
            if self._notify_me and self._event_armed.acquire(False):
                self._write_event()
        except BaseException:
            self._kick()
            raise
        if self._closed:
            self._late(queue, item)

    def _write_event(self) -> None:
        """Write the eventfd; called only by the one holder of _event_armed."""
        with self._write_lock:
            if not self._closed:
                self._notifier.set()
                self._notify_writes += 1

    def _kick(self) -> None:
        """A producer was interrupted around taking _event_armed (cold path).

        It may hold the arm with nothing written: then no later producer
        would write, and the loop could sleep through its work. So write
        anyway: at worst one spurious wake-up, which the loop tolerates (it
        releases the arm only if it is held). If even that write fails,
        disarm, so that the next producer tries again.
        """
        try:
            with self._write_lock:
                if not self._closed:
                    self._notifier.set()
        except BaseException:
            _release_quietly(self._event_armed)

    def _late(self, queue: deque[Any], item: Any) -> None:
        """A producer appended `item`, then saw the context closed.

        close() sets _closed, drains, then holds _close_lock for its last
        drain and the release of its resources; so once we hold the lock,
        `item` has either run (it is gone) or never will (it is still
        there): then we take it back and raise, so nothing is dropped
        silently. Only a producer racing close() ever waits here, at most
        once per producer thread, so close() is bounded.
        """
        if threading.get_ident() == self._thread:
            if self._draining:
                return  # close() runs on this thread and drains until empty
            queue.remove(item)  # pragma: no cover - the home thread checks first
            raise self._refusal(repr(item))
        done = self._close_done
        if done is not None and isinstance(item, Coroutine) and item._live_in is self:
            # A wake-up of its own coroutine that close() accepted while it
            # drains (see schedule()): the drain runs it unless it came after
            # the last one; only once close() is over can we tell.
            done.wait()
        with self._close_lock:
            try:
                queue.remove(item)
            except ValueError:
                return
        if isinstance(item, Coroutine):
            item._sched_where = None
            item._sched.release()
        elif isinstance(item, BottomHalf):
            item._queued.release()
        raise self._refusal(repr(item), "before it could run")

    def _refuses(self) -> bool:
        """Whether the calling thread may no longer queue work here (cold path).

        Called only once _closed is seen: other threads are refused from the
        moment close() starts; the home thread until its drain ends.
        """
        return not (self._draining and threading.get_ident() == self._thread)

    def _refusal(self, what: str, when: str = "") -> RuntimeError:
        """The error for queueing `what` on this closed (or inherited) context."""
        if self._inherited:
            return RuntimeError(
                f"cannot queue {what} on {self!r}: it was inherited across fork and "
                "belongs to the parent process; create a new context in the child"
            )
        if when:
            return RuntimeError(f"{self!r} closed {when}: {what} was not run")
        return RuntimeError(f"cannot queue {what}: {self!r} is closed")

    def schedule(self, co: Coroutine[Any]) -> None:
        """Queue `co` to be entered by this context's loop (aio_co_schedule). Thread: any.

        Lock-free. FIFO with other scheduled coroutines.
        """
        if co.done:
            raise RuntimeError(f"cannot schedule {co!r} on {self!r}: it has finished")
        bound = co._thread
        if bound is not None and bound != self._thread:
            raise RuntimeError(
                f"cannot schedule {co!r} on {self!r}: the coroutine is bound to another "
                "thread (a greenlet never changes threads); call into the context "
                "instead: ctx.spawn(fn).join() or ctx.call_sync(fn)"
            )
        if self._closed and self._refuses() and not (self._draining and co._live_in is self):
            # While it drains, close() still takes wake-ups of its own
            # coroutines from other threads (a hand-off to one that is
            # cleaning up after its cancel): there are only so many of them.
            raise self._refusal(repr(co))
        try:
            if not co._sched.acquire(False):
                raise RuntimeError(f"{co!r} is already scheduled in {co._where()}")
            co._sched_where = self
            co.ctx = self
            # _submit(), inlined (the hot path): see there.
            self._ready.append(co)
            self._notified = True
            try:
                if self._notify_me and self._event_armed.acquire(False):
                    self._write_event()
            except BaseException:
                self._kick()
                raise
            if self._closed:
                self._late(self._ready, co)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._unschedule_interrupted(co)
            raise

    def _unschedule_interrupted(self, co: Coroutine[Any]) -> None:
        """An interrupt hit schedule(co) between taking its flag and queueing it.

        The flag must not stay taken with the coroutine in no queue (it
        would never run, and every later wake would be refused). Taken and
        not yet marked (`_sched_where` None), or marked for us but not in
        the queue: give it back. Exact when the producer is the home thread
        (signals reach only the main thread: a main-thread context's own
        wakes); from another thread a pop by the loop could overlap, which
        the loop's release tolerates. Cold path.
        """
        where = co._sched_where
        if not co._sched.locked():
            return
        if where is None or (where is self and co not in self._ready.copy()):
            co._sched_where = None
            _release_quietly(co._sched)

    def enter(self, co: Coroutine[Any]) -> None:
        """Enter `co` here (aio_co_enter). Thread: any.

        From another thread: schedule(co). Inside a coroutine of this
        context: queue `co` to be entered right after the current coroutine
        yields or finishes. Otherwise: enter it now.
        """
        # "Not the caller's context": another thread, or closed.
        if _get_ident() != self._thread or self._closed:
            self.schedule(co)
            return
        me = getattr(getcurrent(), "co", None)
        if me is None:
            co._check_enterable("enter", self._thread)
            _enter(self, co, explicit=False)
        else:
            _defer(me, co)

    def spawn(
        self, fn: Callable[..., T], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> Coroutine[T]:
        """Create a Coroutine running fn(*args, **kwargs) and schedule it here. Thread: any."""
        co = Coroutine(fn, *args, name=name, **kwargs)
        self.schedule(co)
        return co

    def call_soon(self, cb: Callable[..., Any], /, *args: Any) -> None:
        """Run cb(*args) once at the next poll (aio_bh_schedule_oneshot). Thread: any."""
        if self._closed and self._refuses():
            raise self._refusal(f"call_soon({cb!r})")
        # _submit(), inlined (the hot path): see there.
        item = (cb, args)
        self._ready.append(item)
        self._notified = True
        try:
            if self._notify_me and self._event_armed.acquire(False):
                self._write_event()
        except BaseException:
            self._kick()
            raise
        if self._closed:
            self._late(self._ready, item)

    def call_sync(
        self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> T:
        """Run fn in this context's thread; return its result or raise its exception.

        A coroutine caller yields meanwhile, a plain thread blocks; from the
        home thread fn is just called. TimeoutError after `timeout` seconds
        (fn may still run later; its outcome is then dropped). Thread: any.
        """
        if threading.get_ident() == self._thread:
            if self._closed and self._refuses():
                raise self._refusal(f"call_sync({fn!r})")
            return fn(*args, **kwargs)
        Waiter = _layer_above.Waiter
        me = current_coroutine()
        if me is not None and me.ctx is None:
            raise RuntimeError(
                f"call_sync() from {me!r}, which has no context: {self!r} could never "
                "wake it; call from a plain thread or a coroutine on a context"
            )
        waiter = Waiter(me, ("call_sync", self, fn))
        outcome: list[Any] = []

        def run_there() -> None:
            # Whatever fn raises, SystemExit included, is the caller's alone.
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as exc:
                outcome.append((False, exc))
            waiter.fire()

        self.call_soon(run_there)
        if not waiter.wait(timeout):
            raise TimeoutError(f"call_sync({fn!r}) on {self!r} did not finish within {timeout} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def bh(self, cb: Callable[..., Any], /, *args: Any, name: str | None = None) -> BottomHalf:
        """A new, unscheduled BottomHalf (aio_bh_new). Thread: any."""
        return BottomHalf(self, cb, args, name)

    def timer(self, cb: Callable[..., Any], /, *args: Any) -> Timer:
        """A new, unarmed Timer whose callback runs here (aio_timer_new). Thread: any."""
        return Timer(self, cb, args)

    def call_later(self, delay: float, cb: Callable[..., Any], /, *args: Any) -> Timer:
        """A Timer armed to fire `delay` seconds from now. Thread: any."""
        timer = Timer(self, cb, args)
        timer.mod(_time.monotonic() + delay)
        return timer

    def call_at(self, when: float, cb: Callable[..., Any], /, *args: Any) -> Timer:
        """A Timer armed to fire at `when` on the time() clock. Thread: any."""
        timer = Timer(self, cb, args)
        timer.mod(when)
        return timer

    @staticmethod
    def time() -> float:
        """The monotonic clock timers use, in seconds (time.monotonic). Thread: any."""
        return _time.monotonic()

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Call handler(ctx, exc, origin) for exceptions escaping work run by the loop.

        None restores the default, which logs at ERROR on the `corun`
        logger. Thread: any.
        """
        if handler is not None and not callable(handler):
            raise TypeError(f"{self!r}: exception handler must be callable, got {handler!r}")
        self._exc_handler = handler

    def _report(self, exc: BaseException, origin: object) -> None:
        handler = self._exc_handler
        if handler is not None:
            try:
                handler(self, exc, origin)
                return
            except FATAL:
                raise
            except BaseException as handler_exc:
                logger.error(
                    "exception handler %r of %r failed", handler, self, exc_info=handler_exc
                )
        name = getattr(origin, "__qualname__", None) or repr(origin)
        logger.error("unhandled exception in %s (%r)", name, self, exc_info=exc)

    def coroutines(self) -> list[Coroutine[Any]]:
        """The live coroutines of this context: started and not finished, and
        those queued to start here. A snapshot. Thread: any.
        """
        live = self._live.copy()  # one C call: atomic against the home thread
        out = [co for co in live if not co.done]
        for item in self._ready.copy():
            if isinstance(item, Coroutine) and item not in live and not item.done:
                out.append(item)
        return out

    @property
    def slow_callback_duration(self) -> float | None:
        """The stall threshold in seconds, or None (off). Thread: any."""
        return self._slow

    @slow_callback_duration.setter
    def slow_callback_duration(self, seconds: float | None) -> None:
        self.set_slow_callback_duration(seconds)

    def set_slow_callback_duration(self, seconds: float | None) -> None:
        """Log a loop pass that runs longer than `seconds` (None: stop). Thread: any.

        asyncio's debug-mode warning, but told while the stall goes on: a
        watchdog thread sees the loop stuck in one pass (a coroutine step or
        callback that blocks it) and logs, once per stall, on the `corun`
        logger at WARNING, which coroutine runs and the stack of the loop's
        thread. It costs the loop nothing.
        """
        if seconds is not None:
            seconds = float(seconds)
            if not seconds > 0:
                raise ValueError(f"{self!r}: slow_callback_duration must be > 0, got {seconds}")
        self._slow = seconds
        watch_stalls(self, seconds)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters since the context was created. Thread: any."""
        return {
            "polls": self._polls,
            "notify_writes": self._notify_writes,
            "bh_calls": self._bh_calls,
            "co_entered": self._co_entered,
            "co_scheduled": self._co_scheduled,
            "timers_fired": self._timers_fired,
            "fd_events": self._fd_events,
        }

    # -- home thread ---------------------------------------------------------

    def _check_home(self, what: str) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                f"{self!r}.{what}() called from thread "
                f"{threading.current_thread().name!r}; only its home thread may"
            )

    def _check_poll(self) -> None:
        if self._closed:
            raise self._refusal("poll()") if self._inherited else RuntimeError(
                f"cannot poll {self!r}: it is closed"
            )
        if threading.get_ident() != self._thread:
            self._check_home("poll")
        if getattr(getcurrent(), "co", None) is not None:
            raise RuntimeError(
                f"{self!r}.poll() called inside {current_coroutine()!r}; a coroutine "
                "waits by yielding (join(), sleep(), locks), not by polling"
            )

    def poll(self, blocking: bool = True) -> bool:
        """Run ready work once; return True if anything but housekeeping ran (aio_poll).

        With blocking=True, first wait until there is something to do.
        Thread: home, outside coroutines.
        """
        self._check_poll()
        return self._pass(None if blocking else 0.0)

    def _has_work(self) -> bool:
        return bool(self._ready or self._bh_q or self._timers.inbox)

    def _pass(self, timeout: float | None) -> bool:
        """One full iteration of the loop: the only place where work runs.

        `timeout`: how long to wait for work at most (None: no limit; 0:
        do not wait).
        """
        self._depth += 1
        try:
            self._polls += 1
            if self._interrupted:
                self._recover()
            timers = self._timers
            if timers.inbox:
                timers.apply_inbox()
            if timeout != 0:
                if self._notified or self._ready or self._bh_q or timers.inbox:
                    timeout = 0.0
                else:
                    # Announce that we may sleep, then look again.
                    # Pairs with notify(): see there.
                    self._notify_me = True
                    if self._notified or self._ready or self._bh_q or timers.inbox:
                        timeout = 0.0
                    else:
                        deadline = timers.deadline()
                        if deadline is not None:
                            wait = max(deadline - _time.monotonic(), 0.0)
                            if timeout is None or wait < timeout:
                                timeout = wait
                        if self._idle_q and (timeout is None or timeout > IDLE_BH_DELAY):
                            timeout = IDLE_BH_DELAY
            events = self._poller.poll(timeout)
            self._notify_me = False
            # Accept the notification before looking at the queues: whatever is
            # published from now on sets _notified again (QEMU: aio_notify_accept).
            self._notified = False

            progress = False
            ready = None
            if events:
                for fd, mask in events:
                    if fd == self._signal_fd:
                        self._drain_signal_fd()
                    elif fd == self._notify_fd:
                        if not self._notify_edge:
                            self._notifier.test_and_clear()
                        # Pairs with notify(): this wake-up is consumed (the
                        # eventfd read, or its edge reported) before a new
                        # writer may arm it again. Already released only after
                        # an interrupted pass (see _recover). One line: see
                        # coroutine.py, "One-line try" (the pass's own except
                        # must see an exception raised at this line).
                        try: self._event_armed.release()  # noqa: E701
                        except RuntimeError:
                            pass
                    elif ready is None:
                        ready = [(fd, mask)]
                    else:
                        ready.append((fd, mask))

            if timers.inbox:
                timers.apply_inbox()
            # Snapshots: what this pass's work queues waits for the next pass.
            n_ready = len(self._ready)
            n_bh = len(self._bh_q)
            n_idle = len(self._idle_q)
            if n_ready:
                self._run_ready(n_ready)
                progress = True
            if n_bh and self._run_bhs(self._bh_q, n_bh):
                progress = True
            # An idle BH that was upgraded by schedule() while queued counts.
            if n_idle and self._run_bhs(self._idle_q, n_idle):
                progress = True
            if ready is not None and self._dispatch(ready):
                progress = True
            if timers._heap:
                n = timers.run_expired(_time.monotonic())
                if n:
                    self._timers_fired += n
                    progress = True
        except BaseException:
            # KeyboardInterrupt, SystemExit, or an exception a signal handler
            # raised: the next pass repairs what it may have left half done.
            self._interrupted = True
            self._pass_ended = self._polls
            raise
        finally:
            self._depth -= 1
        # Read by the stall watchdog (debug.py): in a pass while they differ.
        self._pass_ended = self._polls
        return progress

    def _recover(self) -> None:
        """Repair the notify state after a pass was interrupted. Thread: home.

        The interrupt may have landed after epoll reported the eventfd's
        edge and before the loop released _event_armed: then no producer
        would ever write the eventfd again, and the context would be deaf.
        So release it, and do not sleep before looking at the queues. A
        producer that still holds it and writes later only causes one
        spurious wake-up, which _pass tolerates.
        """
        self._interrupted = False
        self._notify_me = False
        self._notified = True
        _release_quietly(self._event_armed)

    def _run_bhs(self, queue: deque[BottomHalf], n: int) -> bool:
        """Run the first `n` bottom halves of `queue`; True if a non-idle one ran.

        Interrupt safety as in _run_ready: a BH taken but not called is put
        back with its mode (see coroutine.py, "Interrupt safety").
        """
        progress = False
        bh = started = released = cleared = None
        mode = 0
        try:
            for bh in islice(iter(queue.popleft, None), n):
                # Pairs with BottomHalf._enqueue: release first, then read the
                # mode; see bh.py for why no schedule is lost.
                (released := bh)._queued.release()
                mode = bh._mode
                if not mode:
                    continue  # cancelled or deleted
                cleared = bh
                bh._mode = 0
                if mode == SCHEDULED:
                    progress = True
                self._bh_calls += 1
                # One line: see coroutine.py, "One-line try".
                try: (started := bh)._cb(*bh._args)  # noqa: E701
                except FATAL:
                    raise
                except BaseException as exc:
                    self._report(exc, bh._cb)
        except IndexError:
            pass  # a nested poll() ran the rest
        except BaseException:
            if bh is not None and started is not bh:
                if cleared is bh and not bh._mode:
                    bh._mode = mode
                if released is not bh or bh._queued.acquire(False):
                    queue.appendleft(bh)
            raise
        return progress

    def _run_ready(self, n: int) -> None:
        """Run `call_soon` callbacks and enter scheduled coroutines, in FIFO order.

        The coroutine half is QEMU's co_schedule_bh_cb. Both kinds share one
        deque, so work that one thread submits runs in submission order
        whatever its kind (a call_sync() after a spawn() runs after the
        coroutine has started). Interrupted anywhere, an item taken but not
        started goes back to the front (see coroutine.py, "Interrupt safety").
        """
        current = getcurrent()
        item: Any = None
        started: object = None
        released: object = None
        try:
            for item in islice(iter(self._ready.popleft, None), n):
                if item.__class__ is tuple:
                    self._bh_calls += 1
                    # One line: see coroutine.py, "One-line try".
                    try: (started := item)[0](*item[1])  # noqa: E701
                    except FATAL:
                        raise
                    except BaseException as exc:
                        self._report(exc, item[0])
                    continue
                # The markers take `item`, untyped, not `co`: compiled, a
                # walrus from a typed variable into an untyped one would read
                # the field off the wrong C type (Cython 3.x).
                co = item
                self._co_scheduled += 1
                co._sched_where = None
                if co.done:
                    (released := item)._sched.release()
                    self._report(
                        RuntimeError(f"{co!r} was scheduled on {self!r} but finished first"), co
                    )
                    continue
                try: g = _prepare(self, co, current)  # noqa: E701
                except Exception as exc:  # could not even be entered (lost a race)
                    (released := item)._sched.release()
                    self._report(exc, co)
                    continue
                co._caller = current
                # Pairs with schedule(): from here on a producer may schedule
                # co again, even before it yields (it is entered after that).
                # (Released already only by an interrupted schedule(): see
                # _unschedule_interrupted.)
                try: (released := item)._sched.release()  # noqa: E701
                except RuntimeError:
                    pass
                result = _switch((started := item)._greenlet)
                if result is _FINISHED:
                    _finished(self, co, g)
                if co.done or co._wakeups is not None:
                    _settle(self, co, current, False)
        except IndexError:
            pass  # a nested poll() ran the rest
        except BaseException as exc:
            if isinstance(item, Coroutine):
                if started is item:
                    _unwind(self, item, True, exc)
                elif _take_back(item, released):
                    item._sched_where = self
                    self._ready.appendleft(item)
            elif item is not None and started is not item:
                self._ready.appendleft(item)
            raise
        # A traceback taken in this pass (a callback's exception, kept by a
        # handler or a log record) keeps this frame alive: let it not keep
        # the last coroutine too, whose unretrieved exception is reported
        # only once it is collected.
        item = co = started = released = None

    def _dispatch(self, ready: list[tuple[int, int]]) -> bool:
        ran = False
        fds = self._fds
        for fd, mask in ready:
            handlers = fds.get(fd)
            if handlers is None:
                continue
            if mask & HUP and len(handlers) > 2:
                handlers[2][0]()  # type: ignore[index]  # a corun socket's hangup()
            if mask & READ:
                h = handlers[0]
                if h is not None:
                    ran = True
                    self._fd_events += 1
                    try:
                        h[0](*h[1])
                    except FATAL:
                        raise
                    except BaseException as exc:
                        self._report(exc, h[0])
            if mask & WRITE:
                # Re-read: the reader may have removed or replaced the writer.
                h = handlers[1] if fds.get(fd) is handlers else None
                if h is not None:
                    ran = True
                    self._fd_events += 1
                    try:
                        h[0](*h[1])
                    except FATAL:
                        raise
                    except BaseException as exc:
                        self._report(exc, h[0])
        return ran

    def _set_handler(self, fd: Any, index: int, handler: Handler | None, what: str) -> bool:
        self._check_home(what)
        if self._closed and self._refuses():
            raise self._refusal(f"{what}({fd!r})")
        n = fileno_of(fd)
        if n == self._notify_fd:
            raise ValueError(f"{self!r}: fd {n} is the context's own notifier")
        if n in self._edge_fds:
            raise RuntimeError(
                f"{self!r}.{what}({fd!r}): fd {n} belongs to {self._edge_fds[n]!r}; "
                "use that socket's methods, or close it first"
            )
        handlers = self._fds.get(n)
        if handlers is None:
            if handler is None:
                return False
            handlers = [None, None]
        had = handlers[index] is not None
        other = handlers[1 - index]
        events = (READ if (handler if index == 0 else other) is not None else 0) | (
            WRITE if (handler if index == 1 else other) is not None else 0
        )
        # Poller first: if it rejects the fd (closed, a regular file), the
        # handler table stays as it was and no ghost handler is left behind.
        self._poller.set(n, events)
        handlers[index] = handler
        if events:
            self._fds[n] = handlers
        else:
            del self._fds[n]
        return had

    def _watch_edge(self, fd: int, watcher: Any) -> bool:
        """Watch `fd` for good, edge-triggered; False if the poller cannot. Thread: home.

        `watcher.readable()`/`.writable()` run on every change of readiness.
        A stale registration of the same fd number (closed underneath us) is
        closed first (its waiters get EBADF), so a reused fd is never taken
        for the old one.
        """
        if fd in self._edge_fds or fd in self._fds:
            self.notify_closing(fd)
        if not self._poller.watch_edge(fd):
            return False
        self._edge_fds[fd] = watcher
        self._fds[fd] = [(watcher.readable, ()), (watcher.writable, ()), (watcher.hangup, ())]
        return True

    def _unwatch_edge(self, fd: int, watcher: Any) -> None:
        """Stop watching `fd` (before it is closed). Thread: home."""
        if self._edge_fds.get(fd) is watcher:
            del self._edge_fds[fd]
            self._fds.pop(fd, None)
            if not self._closed or self._draining:
                self._poller.set(fd, 0)

    def notify_closing(self, fd: Any) -> None:
        """`fd` is about to be closed: wake whoever waits on it here, forget it.

        Every coroutine waiting on it on this context (a corun socket's
        recv/send/accept/connect, wait_readable/wait_writable) is woken with
        OSError(EBADF), and every registration of it is removed, so a new
        fd with the same number is never taken for this one. trio's
        notify_closing. Thread: home.
        """
        self._check_home("notify_closing")
        n = fileno_of(fd)
        watcher = self._edge_fds.pop(n, None)
        handlers = self._fds.pop(n, None)
        if watcher is not None:
            watcher.closing()
        elif handlers is not None:
            for h in handlers:
                closing = getattr(h[0], "__self__", None) if h is not None else None
                if closing is not None and hasattr(closing, "closing"):
                    closing.closing()
        if (watcher is not None or handlers is not None) and not self._released:
            self._poller.set(n, 0)

    def add_reader(self, fd: Any, cb: Callable[..., Any], /, *args: Any) -> None:
        """Call cb(*args) whenever fd is readable; replaces an earlier reader. Thread: home."""
        if not callable(cb):
            raise TypeError(f"{self!r}.add_reader(): callback {cb!r} is not callable")
        self._set_handler(fd, 0, (cb, args), "add_reader")

    def add_writer(self, fd: Any, cb: Callable[..., Any], /, *args: Any) -> None:
        """Call cb(*args) whenever fd is writable; replaces an earlier writer. Thread: home."""
        if not callable(cb):
            raise TypeError(f"{self!r}.add_writer(): callback {cb!r} is not callable")
        self._set_handler(fd, 1, (cb, args), "add_writer")

    def remove_reader(self, fd: Any) -> bool:
        """Remove the reader of fd; return whether there was one. Thread: home."""
        return self._set_handler(fd, 0, None, "remove_reader")

    def remove_writer(self, fd: Any) -> bool:
        """Remove the writer of fd; return whether there was one. Thread: home."""
        return self._set_handler(fd, 1, None, "remove_writer")

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Run what is queued, cancel what is suspended, then release the resources.

        From the moment it starts, other threads are refused (so close is
        bounded however busy they are); the home thread may still queue
        work, which the drain runs, until nothing is queued. Then every
        coroutine still suspended here is cancelled (one parked in a bare
        yield_() too: nothing could wake it after close) and the loop runs
        for up to `grace` seconds while they clean up; those still not done
        are named in a ResourceWarning. Afterwards every call that would
        queue work here raises. Idempotent. Thread: home, outside coroutines.
        """
        if self._closed:
            return
        self._check_home("close")
        if getattr(getcurrent(), "co", None) is not None:
            raise RuntimeError(f"{self!r}.close() called inside {current_coroutine()!r}")
        if self._running_a_pass():
            raise RuntimeError(
                f"{self!r}.close() called from work its own loop is running; close it "
                "after poll() returns (for an IOThread: t.stop() or t.join())"
            )
        # Pairs with _submit(): a producer that appended before it could see
        # _closed is either drained here or takes its item back in _late().
        done = self._close_done = threading.Event()
        try:
            self._closed = True
            self._draining = True
            self._drain()
            self._cancel_suspended(grace)
            with self._close_lock:
                self._drain()  # what raced in before its producer saw _closed
                self._draining = False
                self._release_resources()
        finally:
            if not self._released:  # interrupted: no more work runs here
                self._closed = True
                self._draining = False
                self._abandon_queued()
                self._release_resources()
            done.set()
        suspended = [co for co in self._live if not co.done]
        self._live.clear()
        if suspended:
            names = ", ".join(sorted(co.name for co in suspended))
            warnings.warn(
                f"{self!r} closed with {len(suspended)} suspended coroutine(s): {names}",
                ResourceWarning,
                stacklevel=2,
            )

    def _running_a_pass(self) -> bool:
        """Whether the caller runs inside one of this context's passes (cold path).

        Read off the stack rather than kept in a counter, which an
        interrupt could leave wrong; compiled, passes have no frames, and
        no interrupt can land between the counting and its try.
        """
        if _COMPILED:
            return self._depth > 0
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code is _PASS_CODE and frame.f_locals.get("self") is self:
                return True
            frame = frame.f_back  # type: ignore[assignment]
        return False

    def _cancel_suspended(self, grace: float) -> None:
        """close(): cancel the coroutines still suspended here; let them clean up.

        Cancelled again each round while they wait again (a cleanup that
        catches Cancelled), until all are done or `grace` seconds passed.
        """
        deadline = _time.monotonic() + max(grace, 0.0)
        while True:
            suspended = [co for co in self._live if not co.done]
            remaining = deadline - _time.monotonic()
            if not suspended or remaining <= 0:
                return
            for co in suspended:
                if co._cancel is not None or co._caller is not None:
                    continue  # cancelled already (not yet raised), or running
                co.cancel()
                if co._abort is None and not co._sched.locked():
                    # A bare yield_(): nothing can legitimately wake it now.
                    self.schedule(co)
            # Deliver, let them run, then give timers (a clean-up's sleep)
            # up to 10 ms before the next round: a coroutine that keeps
            # catching Cancelled is cancelled again at most every 10 ms.
            self._drain()
            self._pass(min(remaining, 0.010))

    def _drain(self) -> None:
        while self._has_work() or self._idle_q:
            self._pass(0.0)

    def _get_thread_pool(self) -> ThreadPoolExecutor:
        """This context's worker pool for run_in_thread(), made on first use. Thread: home."""
        pool = self._thread_pool
        if pool is None:
            self._check_home("run_in_thread")
            if self._closed:
                raise RuntimeError(f"cannot run_in_thread() on {self!r}: it is closed")
            pool = self._thread_pool = ThreadPoolExecutor(
                self._thread_pool_size, thread_name_prefix=f"{self.name}-worker"
            )
        return pool

    def set_thread_pool_size(self, max_workers: int) -> None:
        """How many worker threads run_in_thread() may use on this context.

        The default is concurrent.futures' (min(32, CPUs + 4)); block I/O
        with deep queues wants more, CPU-bound work fewer. QEMU: the
        IOThread's thread-pool-max. Calls already submitted finish in the
        old workers, which then exit; new calls go to a pool of the new
        size. Thread: home (from elsewhere, `ctx.call_sync(ctx.set_thread_pool_size, n)`).
        """
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(
                f"{self!r}.set_thread_pool_size(): max_workers must be an int, "
                f"got {max_workers!r}"
            )
        if max_workers < 1:
            raise ValueError(
                f"{self!r}.set_thread_pool_size(): max_workers must be >= 1, got {max_workers}"
            )
        self._check_home("set_thread_pool_size")
        if self._closed:
            raise RuntimeError(f"cannot set_thread_pool_size() on {self!r}: it is closed")
        if max_workers == self._thread_pool_size:
            return
        self._thread_pool_size = max_workers
        old, self._thread_pool = self._thread_pool, None
        if old is not None:
            old.shutdown(wait=False)  # queued and running calls still finish

    def _watch_signals(self) -> None:
        """Make a signal wake a blocked poll() of the main thread's context.

        A signal's Python handler runs only when the main thread runs Python
        code; one that arrives just before the loop blocks in epoll would
        wait there until the next timer or wake-up, and Ctrl-C would seem
        ignored. Like asyncio, point the signal module's wake-up fd at a
        socket the loop watches: the C-level handler writes a byte, epoll
        returns, and the Python handler runs at once. Left alone if someone
        else (another loop, the application) has set a wake-up fd already.
        """
        try:
            rsock, wsock = socket.socketpair()
        except OSError:
            return
        try:
            rsock.setblocking(False)
            wsock.setblocking(False)
            previous = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
            if previous != -1:
                signal.set_wakeup_fd(previous)  # not ours to replace
                raise ValueError
            self._poller.set(rsock.fileno(), READ)
            self._signal_socks = (rsock, wsock)
            self._signal_fd = rsock.fileno()
        except BaseException as exc:
            if self._signal_socks is None:
                # Not published: never leave the wake-up fd pointing at a
                # socket we are about to close (asked, not guessed: an
                # interrupt may have landed right after set_wakeup_fd).
                try:
                    current = signal.set_wakeup_fd(-1)
                    if current != wsock.fileno():
                        signal.set_wakeup_fd(current)
                except ValueError:
                    pass
                rsock.close()
                wsock.close()
            if isinstance(exc, (OSError, ValueError)):
                return
            raise

    def _drain_signal_fd(self) -> None:
        socks = self._signal_socks
        if socks is None:
            return
        try:
            while socks[0].recv(4096):
                pass
        except OSError:
            pass  # drained (BlockingIOError) or closing

    def _unwatch_signals(self) -> None:
        socks = self._signal_socks
        if socks is None:
            return
        self._signal_socks = None
        self._signal_fd = -1
        try:
            current = signal.set_wakeup_fd(-1)
            if current != socks[1].fileno():
                signal.set_wakeup_fd(current)  # replaced meanwhile: not ours
        except ValueError:
            pass  # not the main thread (a fork child's copy): nothing was ours
        for sock in socks:
            sock.close()

    def _abandon_queued(self) -> None:
        """close() was interrupted: what is still queued will never run here.

        Coroutines queued to start or resume finish as cancelled, so that
        their joiners are told rather than left waiting. Cold path.
        """
        dropped: list[object] = []
        while True:
            try:
                item = self._ready.popleft()
            except IndexError:
                break
            if isinstance(item, Coroutine):
                if not item.done:
                    item._sched_where = None
                    _release_quietly(item._sched)
                    item._exc_owned = True
                    item._finish(None, Cancelled(f"{self!r} was closed before it could run"))
            else:
                dropped.append(item[0])
        for queue in (self._bh_q, self._idle_q):
            dropped.extend(bh for bh in queue if bh._mode)
            queue.clear()
        if dropped:
            # No producer is left to hand them back to: at least say so.
            logger.error(
                "%r: close() was interrupted; %d accepted callback(s) never ran: %s",
                self,
                len(dropped),
                ", ".join(getattr(cb, "__qualname__", None) or repr(cb) for cb in dropped),
            )

    def _release_resources(self) -> None:
        """Give everything back. Each step may be repeated: an interrupted
        release is finished by close()'s finally."""
        if self._released:
            return
        self._unwatch_signals()
        _thread._contexts.discard(self)
        pool = self._thread_pool
        if pool is not None and not self._inherited:
            # Workers still running finish on their own; their wake-ups then
            # find the context closed and are reported by concurrent.futures.
            pool.shutdown(wait=False)
        if _thread._tls.ctx is self:
            _thread._tls.ctx = None
        self._co_pool.clear()
        self._fds.clear()
        self._edge_fds.clear()
        self._poller.close()
        with self._write_lock:
            self._notifier.close()
        self._released = True

    def __del__(self) -> None:
        # Never closed, and its thread is gone: at least give the fds back,
        # and say so, as an unclosed socket does. No work runs here.
        if getattr(self, "_released", True):
            return
        if not getattr(self, "_inherited", False) and getattr(self, "_poller", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=1)
        self._closed = True
        self._released = True
        for part in ("_poller", "_notifier"):
            closer = getattr(getattr(self, part, None), "close", None)
            if closer is not None:
                closer()

    def _after_fork_in_child(self) -> None:
        """This process is a fork child: the context belongs to the parent.

        Nothing here may touch what the parent's loop relies on: the
        eventfd and the epoll set are shared with the parent, so the child
        never writes or modifies them; it only closes its own copies of the
        fds. The locks may have been held by threads that do not exist
        here: they are replaced. From now on every call that would queue
        work raises, and close()/join() are quiet no-ops.
        """
        self._inherited = True
        self._closed = True
        self._draining = False
        self._released = True
        self._notify_me = False
        self._event_armed = threading.Lock()
        self._write_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._thread_pool = None
        self._co_pool.clear()
        self._fds.clear()
        self._live.clear()
        # The wake-up fd socket pair is shared with the parent: stop using it.
        self._unwatch_signals()
        for close in (self._poller.close, self._notifier.close):
            try:
                close()
            except OSError:
                pass


# Looked up at run time: compiled, AioContext._pass is a C method (and unused).
_PASS_CODE = getattr(AioContext, "_pass").__code__  # noqa: B009


def _finish_interrupted_close(ctx: AioContext | None) -> None:
    """A thread's context whose close() was interrupted: finish releasing it."""
    if ctx is not None and ctx._closed and not ctx._draining:
        ctx._release_resources()
        if _thread._tls.ctx is ctx:
            _thread._tls.ctx = None


def wake(co: Coroutine[Any]) -> None:
    """Restart `co` on its home context (aio_co_wake). Thread: any.

    From another thread this schedules it there; on the home thread it is
    `co.ctx.enter(co)`. A coroutine with no context can only be woken from
    the thread it is bound to.
    """
    ctx = co.ctx
    if ctx is not None:
        if _get_ident() != ctx._thread:
            ctx.schedule(co)  # the common cross-thread case, one call shorter
        else:
            ctx.enter(co)
        return
    ident = threading.get_ident()
    if co._thread != ident:
        raise RuntimeError(
            f"cannot wake {co!r}: it has no home context, and it is not bound to the "
            "calling thread; schedule it on a context instead"
        )
    me = current_coroutine()
    if me is None:
        co._check_enterable("wake", ident)
        _enter(None, co, explicit=False)
    else:
        _defer(me, co)


def current_context() -> AioContext | None:
    """The open context owned by the calling thread, or None. Thread: any."""
    ctx = _thread._tls.ctx
    if ctx is not None and ctx._closed and not ctx._draining:
        return None  # a close() that was interrupted left it behind
    return ctx
