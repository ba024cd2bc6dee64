"""Coroutines: greenlets with a home AioContext.

QEMU: util/qemu-coroutine.c (create, enter, yield, self, entered) and the
coroutine half of util/async.c (`qemu_aio_coroutine_enter`).

A `Coroutine` is a little state around a greenlet. The greenlet is created
lazily, by the first `enter`, in the thread that enters it: greenlet refuses
to start (or ever switch to) a greenlet from another thread, so that first
enter binds the coroutine to its thread for life.

Entering sets the coroutine's `_caller` to the greenlet that entered it;
`yield_()` switches back there. When a coroutine wakes another coroutine of
its own context, the wake is not a nested enter: it is appended to the
waker's `_wakeups` list, and `_enter()` runs that list, depth first, after
the waker yields or finishes (QEMU's `co_queue_wakeup`). So chains of wakes
never recurse, however long they are.

`scheduled` is a `threading.Lock` used as an atomic test-and-set flag: it is
held while the coroutine sits in a context's scheduled list, in a waker's
`_wakeups` list, or sleeps. Whoever acquires it owns the one pending entry
of the coroutine; whoever takes the coroutine out releases it just before
entering it. That is what makes double scheduling a clean error instead of
a double enter.

Threads: a coroutine runs only in the thread it is bound to. `enter()` is
called from that thread (or any thread for a new coroutine); the attributes
are readable from any thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import traceback
from collections import deque
from collections.abc import Callable
from contextvars import copy_context
from time import monotonic as _monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from greenlet import greenlet

from . import _mode, _thread

if TYPE_CHECKING:
    from .context import AioContext

T = TypeVar("T")

# Greenlet's primitives. Compiled, these are greenlet's C API (inline
# functions that coroutine.pxd cimports from _greenlet.pxd); in pure Python,
# greenlet's own functions. Bound without an assignment statement, which
# Cython refuses for names its .pxd declares.
getcurrent: Callable[[], greenlet]
_switch: Callable[[greenlet], Any]
_greenlet_init: Callable[[], None]
globals().update(_mode.greenlet_primitives())
_greenlet_init()

logger = logging.getLogger("corun")

# Numbers for default names only; never read back.
_names = itertools.count(1)

# Creating a coroutine's list of join waiters happens at most once per
# coroutine and only on the join path; this lock makes the lazy creation
# atomic. It is never held across a switch, a wake or a syscall.
_waiters_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    # Another thread of the parent may have held it at fork time.
    global _waiters_lock
    _waiters_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


class _CoGreenlet(greenlet):
    """The greenlet of a corun coroutine; `co` points back to it (None while pooled).

    `owner` mirrors greenlet's `parent`, which corun alone sets (always
    parent first, so a stale mirror only sends enter() down its slow path):
    enter() reads a slot instead of calling greenlet's parent getter.
    """

    __slots__ = ("co", "owner")
    co: Coroutine[Any] | None
    owner: greenlet


class _KernelContext:
    """The state of an AioContext that the coroutine kernel reads and writes.

    AioContext (context.py) derives from it. Kept here so that the kernel
    needs no import of the loop built on it, and so that, compiled, these
    are C fields that enter() reads directly (see coroutine.pxd).
    """

    __slots__ = ("_closed", "_co_entered", "_co_pool", "_live", "_thread")
    # Invariants (see AioContext): _closed is set once, when close() starts.
    _closed: bool
    # How many times a coroutine was entered here (stats()['co_entered']).
    _co_entered: int
    # Greenlets of finished coroutines, for new ones (POOL_SIZE).
    _co_pool: list[_CoGreenlet]
    # Coroutines that started here and have not finished (for close()).
    _live: set[Coroutine[Any]]
    # The ident of the home thread.
    _thread: int


class Cancelled(BaseException):
    """Raised inside a cancelled coroutine at its suspension point.

    A BaseException, like asyncio.CancelledError and trio.Cancelled, so
    that `except Exception` does not swallow it. `join()` and `result()` of
    a coroutine that finished cancelled re-raise it.
    """


# Guards the cancel counters; never held across a switch, a wake or a syscall.
_cancel_lock = threading.Lock()


def _describe_thread(ident: int | None) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return repr(thread.name)
    return f"#{ident}"


class _CoroutineBase:
    """The state and the methods of a Coroutine that do not depend on its result type.

    A separate base because compiled (see coroutine.pxd) it is an extension
    type, whose fields are C struct members, and an extension type cannot
    derive from typing.Generic; `Coroutine` adds the generic part.
    """

    __slots__ = (
        "_name",
        "_number",
        "ctx",
        "done",
        "_fn",
        "_args",
        "_kwargs",
        "_greenlet",
        "_thread",
        "_caller",
        "_sched",
        "_sched_where",
        "_wakeups",
        "_live_in",
        "_result",
        "_exc",
        "_tb",
        "_exc_owned",
        "_waiters",
        "_held",
        "_context",
        "_cancel",
        "_cancels",
        "_abort",
        "_waiting",
        "_since",
        "_unretrieved",
    )

    def __init__(
        self, fn: Callable[..., T], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> None:
        if not callable(fn):
            raise TypeError(f"Coroutine() needs a callable, got {fn!r}")
        # The default name is built on demand from fn and a number: a
        # suspended coroutine should cost little more than its greenlet.
        self._name = name
        self._number = next(_names) if name is None else 0
        #: The home AioContext, where wake() restarts it: the context it was
        #: scheduled on (schedule() and spawn() set it before the first enter)
        #: or last ran in. None for a coroutine never scheduled nor entered, or
        #: entered from a thread that has no context. Thread: any.
        self.ctx: AioContext | None = None
        #: True once fn has returned or raised, or the coroutine was cancelled
        #: before it started. Thread: any.
        self.done: bool = False
        self._fn = fn
        # Handed to fn at the first enter, then dropped.
        self._args: tuple[Any, ...] = args
        self._kwargs: dict[str, Any] | None = kwargs or None
        self._greenlet: _CoGreenlet | None = None
        self._thread: int | None = None  # ident of the thread it is bound to
        # The greenlet that entered it; not None exactly while entered.
        self._caller: greenlet | None = None
        # Held while scheduled (see the module docstring); _sched_where says where.
        self._sched = threading.Lock()
        self._sched_where: object = None
        # Coroutines this one woke on its own context, to enter after it yields.
        self._wakeups: list[Coroutine[Any]] | None = None
        # The context whose `_live` set holds it while it has started but not finished.
        self._live_in: AioContext | None = None
        self._result: T | None = None
        self._exc: BaseException | None = None
        self._tb: TracebackType | None = None
        # True when someone takes the exception itself (run(), call_sync()),
        # so it does not also go to the exception handler.
        self._exc_owned = False
        self._waiters: list[Any] | None = None
        # The latest lock it holds, the head of the chain of held locks (see
        # held_locks()), so that finishing while holding one is reported
        # instead of leaking the lock silently. QEMU keeps a bare locks_held
        # counter; a chain costs no more and can name the locks.
        self._held: Any = None
        # The contextvars it runs in: a copy of its creator's (as asyncio tasks).
        self._context = copy_context()
        # Cancellation (see cancel()): the Cancelled to raise at the next
        # cancellation point, or None; how many cancel() calls are not yet
        # withdrawn by a scope (asyncio's cancelling()); while parked in a
        # cancellable wait, the function that withdraws it from that wait.
        self._cancel: Cancelled | None = None
        self._cancels = 0
        self._abort: Callable[[], bool] | None = None
        # While parked in a corun wait: what it waits on, and since when
        # (time.monotonic()), for corun.dump(). None in a bare yield_().
        self._waiting: object = None
        self._since = 0.0
        # Set when it finishes with an exception nobody took yet (_unhandled).
        self._unretrieved: _Unretrieved | None = None

    # -- state -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name given at creation, or fn's qualified name and a number. Thread: any."""
        name = self._name
        if name is None:
            fn = self._fn
            return f"{getattr(fn, '__qualname__', type(fn).__name__)}-{self._number}"
        return name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def entered(self) -> bool:
        """True while running, or while it has entered a coroutine that runs. Thread: any."""
        return self._caller is not None

    @property
    def scheduled(self) -> bool:
        """True while queued to be entered by a loop, or sleeping. Thread: any."""
        return self._sched.locked()

    def _state(self) -> str:
        if self.done:
            return "done"
        if self._sched.locked():
            return "scheduled"
        if self._caller is not None:
            return "running"
        if self._greenlet is None:
            return "new"
        return "suspended"

    def __repr__(self) -> str:
        ctx = self.ctx
        where = f" ctx={ctx.name!r}" if ctx is not None else ""
        return f"<Coroutine {self.name!r} {self._state()}{where}>"

    # -- entering ----------------------------------------------------------

    def _where(self) -> str:
        """Where it is scheduled, for error messages."""
        where = self._sched_where
        if isinstance(where, Coroutine):
            return f"the wake-up queue of {where.name!r}"
        return repr(where)

    def _check_enterable(self, action: str, ident: int | None) -> None:
        """Raise if this coroutine may not be entered by thread `ident` now."""
        if self.done:
            raise RuntimeError(f"cannot {action} {self!r}: it has finished")
        if self._sched.locked():
            raise RuntimeError(
                f"cannot {action} {self!r}: it is already scheduled in {self._where()}"
            )
        if self._caller is not None:
            raise RuntimeError(f"cannot {action} {self!r}: it is running (re-entered recursively)")
        if self._thread is not None and ident is not None and self._thread != ident:
            raise RuntimeError(
                f"cannot {action} {self!r} in thread {_describe_thread(ident)}: it is "
                f"bound to thread {_describe_thread(self._thread)}"
            )

    def enter(self) -> None:
        """Run the coroutine in the calling thread until it yields or finishes.

        Re-raises the exception that finishes it. The first enter binds it to
        the calling thread. QEMU: qemu_coroutine_enter. Thread: the coroutine's
        own (any, for a new coroutine).
        """
        g = self._greenlet
        ctx = self._live_in
        # `_sched_where is not None` stands for `_sched.locked()` (a C call):
        # every taker of _sched sets it right after taking it and clears it
        # right before giving it back, and a schedule() racing this check
        # from another thread is a race either test loses.
        if (
            g is None
            or ctx is None
            or ctx._closed
            or self._caller is not None
            or self._sched_where is not None
            or self.done
        ):
            # The uncommon cases (first enter, no context, misuse).
            self._check_enterable("enter", threading.get_ident())
            _enter(_thread._tls.ctx, self, explicit=True)  # type: ignore[arg-type]
            return
        current = getcurrent()
        if g.owner is not current:
            # Re-parent, or refuse a coroutine of another thread.
            _enter(ctx, self, explicit=True)  # type: ignore[arg-type]
            return
        # Fast path: suspended, of this thread (its parent is our greenlet),
        # living in an open context, which is therefore this thread's.
        ctx._co_entered += 1
        started = None
        try:
            self._caller = current
            result = _switch(started := g)
            if result is _FINISHED:
                _finished(ctx, self, g)  # type: ignore[arg-type]
            if self.done or self._wakeups is not None:
                _settle(ctx, self, current, explicit=True)  # type: ignore[arg-type]
        except BaseException as exc:
            _unwind(ctx, self, started is g, exc)  # type: ignore[arg-type]
            raise

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        """fn returned `result` or raised `exc`. Thread: the coroutine's."""
        self._result = result
        self._exc = exc
        if exc is not None:
            self._tb = exc.__traceback__
        self.done = True
        self._caller = None
        self._greenlet = None  # break the cycle coroutine <-> greenlet
        live_in = self._live_in
        if live_in is not None:
            self._live_in = None
            live_in._live.discard(self)
        if self._held is not None:
            held = ", ".join(repr(lock) for lock in held_locks(self))  # type: ignore[arg-type]
            _report(
                self.ctx,
                RuntimeError(
                    f"{self!r} finished while holding {held}; it stays locked (release "
                    "it in a finally block or use `with`)"
                ),
                self,
            )
        # Pairs with join(): done is stored before the waiters are read, and a
        # joiner stores its waiter before it reads done, so at least one side
        # sees the other; Waiter.fire/cancel decide who wins.
        waiters = self._waiters
        if waiters:
            claimed = []
            while True:
                try:
                    claimed.append(waiters.pop())
                except IndexError:
                    break
            for waiter in reversed(claimed):  # in the order they joined
                self._wake_joiner(waiter)

    def _wake_joiner(self, waiter: Any) -> None:
        joiner = waiter.co
        try:
            if joiner is not None and joiner._thread == self._thread:
                # Same thread: queue it on our wake-up list, so _settle()
                # enters joiners one after another (a chain of joins must
                # not nest, as any chain of wakes).
                if waiter.cancel():
                    _defer(self, joiner)  # type: ignore[arg-type]
            else:
                waiter.fire()
        except Exception as exc:
            # The joiner cannot be woken (its context is closed): say so, but
            # never let it escape into the loop that ran us.
            _report(self.ctx, exc, self)

    # -- results -----------------------------------------------------------

    def exception(self) -> BaseException | None:
        """The exception a finished coroutine raised, or None. Thread: any."""
        if not self.done:
            raise RuntimeError(f"{self!r} has not finished")
        self._retrieved()
        return self._exc

    def _retrieved(self) -> None:
        """Its exception was taken: it is not reported (see _Unretrieved)."""
        pending = self._unretrieved
        if pending is not None:
            self._unretrieved = None
            pending.exc = None

    # -- cancellation --------------------------------------------------------

    def cancel(self, msg: object = None) -> bool:
        """Ask the coroutine to stop: Cancelled is raised at its suspension point.

        Not started: it never starts (it finishes cancelled). Suspended in a
        cancellable wait (sleep, CoSleep.sleep, fd waits, join, call_sync
        from a coroutine, run_in_thread): woken on its home context with
        Cancelled. Running, or in a bare yield_(): Cancelled is raised at
        its next cancellable wait, or when it is next resumed. Returns False
        if it has already finished. Thread: any.
        """
        if self.done:
            return False
        with _cancel_lock:
            self._cancels += 1
            if self._cancel is None:
                self._cancel = Cancelled() if msg is None else Cancelled(msg)
        if self._greenlet is None:
            # Not started. Scheduled: the loop finds the cancel when it enters
            # it, and fn never runs (_trampoline). Not scheduled: take its
            # schedule flag for good, so nobody can start it, and finish it.
            if self._sched.acquire(False):
                if self._greenlet is None and not self.done:
                    self._finish(None, self._take_cancel())
                    return True
                self._sched.release()
            return True
        if getattr(getcurrent(), "co", None) is self:
            return True  # raised at our own next cancellation point
        ctx = self.ctx
        if ctx is not None:
            try:
                ctx.call_soon(_deliver_cancel, self)
            except RuntimeError:
                pass  # its context is closed: nothing will resume it there
        return True

    def cancelled(self) -> bool:
        """True once it has finished by cancellation. Thread: any."""
        return self.done and isinstance(self._exc, Cancelled)

    def cancelling(self) -> int:
        """How many cancel() requests are outstanding (asyncio's Task.cancelling). Thread: any."""
        return self._cancels

    def uncancel(self) -> int:
        """Withdraw one cancel() request; return how many remain.

        When none remains, a Cancelled not yet raised is dropped. For
        cancellation scopes (asyncio's Task.uncancel). Thread: any.
        """
        with _cancel_lock:
            if self._cancels > 0:
                self._cancels -= 1
            if self._cancels == 0:
                self._cancel = None
            return self._cancels

    def _defer_cancel(self, exc: Cancelled) -> None:
        """Keep `exc` pending for the next cancellation point (the wait it hit completed)."""
        with _cancel_lock:
            if self._cancel is None:
                self._cancel = exc

    def _take_cancel(self) -> Cancelled:
        exc = self._cancel
        self._cancel = None
        if exc is None:  # withdrawn meanwhile by a scope; still, we were asked
            exc = Cancelled()
        return exc

    def _add_waiter(self, waiter: Any) -> None:
        waiters = self._waiters
        if waiters is None:
            with _waiters_lock:
                if self._waiters is None:
                    self._waiters = []
                waiters = self._waiters
        waiters.append(waiter)

    def _drop_waiter(self, waiter: Any) -> None:
        """A joiner gave up (timeout, cancel): do not keep its waiter until we finish."""
        waiters = self._waiters
        if waiters is not None:
            try:
                waiters.remove(waiter)
            except ValueError:
                pass


class Coroutine(_CoroutineBase, Generic[T]):
    """A coroutine that will run `fn(*args, **kwargs)`; creating it does not run it.

    Thread: any.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        def __init__(
            self, fn: Callable[..., T], /, *args: Any, name: str | None = None, **kwargs: Any
        ) -> None: ...

    def result(self) -> T:
        """The return value, or raise the exception, of a finished coroutine. Thread: any."""
        if not self.done:
            raise RuntimeError(f"{self!r} has not finished")
        exc = self._exc
        if exc is not None:
            self._retrieved()
            # Re-raise with the traceback it finished with, so that joining
            # often does not grow it.
            raise exc.with_traceback(self._tb)
        return self._result  # type: ignore[return-value]

    def join(self, timeout: float | None = None) -> T:
        """Wait until the coroutine is done; return its result or raise its exception.

        In a coroutine this yields; in a plain thread it blocks, except in the
        thread that owns `self.ctx`, which runs that context's loop meanwhile.
        TimeoutError after `timeout` seconds. Thread: any.
        """
        if self.done:
            return self.result()
        Waiter = _layer_above.Waiter
        me = current_coroutine()
        if me is self:
            raise RuntimeError(f"{self!r} cannot join itself")
        ident = threading.get_ident()
        if me is not None:
            if me.ctx is None and self._thread != me._thread:
                raise RuntimeError(
                    f"{me!r} has no context, so {self!r} (running elsewhere) could "
                    "never wake it; join from a coroutine that runs on a context"
                )
            waiter = Waiter(me, self)
        else:
            ctx = _thread._tls.ctx
            if ctx is not None and (self.ctx is ctx or self._thread == ident):
                return self._join_running_loop(ctx, timeout)
            if self._thread == ident:
                raise RuntimeError(
                    f"joining {self!r} would deadlock: it is bound to this thread, "
                    "which has no open context to run it"
                )
            waiter = Waiter(None)
        self._add_waiter(waiter)
        try:
            if waiter.wait(timeout, lambda: self.done):
                return self.result()
        except Cancelled:
            self._drop_waiter(waiter)
            raise
        self._drop_waiter(waiter)
        raise TimeoutError(f"{self!r} did not finish within {timeout} s")

    def _join_running_loop(self, ctx: AioContext, timeout: float | None) -> T:
        if timeout is None:
            while not self.done:
                ctx._check_poll()
                ctx._pass(None)
        else:
            deadline = ctx.time() + timeout
            while not self.done:
                remaining = deadline - ctx.time()
                if remaining <= 0:
                    raise TimeoutError(f"{self!r} did not finish within {timeout} s")
                ctx._check_poll()
                ctx._pass(remaining)
        return self.result()


def held_locks(co: Coroutine[Any]) -> list[Any]:
    """The locks `co` holds, latest first.

    The kernel's whole knowledge of locks (QEMU keeps a `locks_held`
    counter on the coroutine): a lock that wants its holder's finish
    checked links itself in on acquire - `lock._next_held = co._held;
    co._held = lock` - and out on release. Thread: any (a snapshot).
    """
    out = []
    node = co._held
    while node is not None:
        out.append(node)
        node = node._next_held
    return out


class _LayerAbove:
    """What the kernel's own API borrows from the layer above it, registered from there.

    `Coroutine.join()` and `AioContext.call_sync()` wait on a
    `corun.waiter.Waiter`, which is built on this kernel (wake, park):
    waiter.py registers the class here when it is imported, so the kernel
    never imports upward. `corun/__init__.py` imports every module, so it
    is always there by the time anyone can call join().
    """

    Waiter: Any = None


_layer_above = _LayerAbove()


def register_waiter(waiter_class: Any) -> None:
    """Called once by corun.waiter: the class join() and call_sync() wait with."""
    _LayerAbove.Waiter = waiter_class


def _report(ctx: AioContext | None, exc: BaseException, origin: object) -> None:
    if ctx is not None:
        ctx._report(exc, origin)
    else:
        logger.error("unhandled exception in %r", origin, exc_info=exc)


# Never swallowed: they propagate out of enter() and poll(). Every other
# exception, BaseExceptions included, finishes a coroutine or is reported.
FATAL = (KeyboardInterrupt, SystemExit)

# Interrupt safety. A KeyboardInterrupt (or any exception a signal handler
# raises) can land between any two lines, and after any C call, of the code
# that takes a coroutine out of a queue and switches into it. The rule
# (issue 7): a coroutine taken but not yet switched into is put back, one
# switched into counts as entered. Three devices make that exact:
# - a queue is consumed by a `for` over `iter(q.popleft, END)`: the pop and
#   the store into the loop variable happen in one bytecode, with no point
#   where a signal handler could run in between;
# - `_switch((started := co)._greenlet)` stores the marker in the same
#   expression that switches, with no such point in between; likewise
#   `(released := co)._sched.release()`;
# - the except clause compares those markers with the item in hand and puts
#   it back (_salvage) or brings its state up to date (_unwind).
# One-line try: where an item is in hand, an inner `try:` shares its line
# with its first statement. On its own line, CPython 3.11+ compiles it to a
# NOP that lies outside every exception-table range, so an exception raised
# there (by a trace function, as tests/test_signals.py does) would skip the
# enclosing handler and lose the item.

_END: Any = object()


def _enter(ctx: AioContext | None, co: Coroutine[Any], explicit: bool) -> None:
    """Enter `co`, then every coroutine it woke on this thread, depth first.

    QEMU: qemu_aio_coroutine_enter. The caller has checked that `co` may be
    entered here and is not scheduled. Exceptions of coroutines other than
    an explicitly entered `co` go to the context's exception handler.
    Thread: the coroutine's.
    """
    current = getcurrent()
    g = _prepare(ctx, co, current)
    started = None
    try:
        co._caller = current
        result = _switch(started := g)
        if result is _FINISHED:
            _finished(ctx, co, g)
        if co.done or co._wakeups is not None:
            _settle(ctx, co, current, explicit)
    except BaseException as exc:
        _unwind(ctx, co, started is g, exc)
        raise


def _prepare(ctx: AioContext | None, to: Coroutine[Any], current: greenlet) -> _CoGreenlet:
    """Make `to` ready to be switched to from `current`; safe to repeat."""
    g = to._greenlet
    if g is None:
        g = _bind(ctx, to, current)
    elif g.owner is not current:
        try:
            g.parent = current
        except ValueError:  # greenlet refuses a parent from another thread
            to._check_enterable("enter", threading.get_ident())
            raise
        g.owner = current
    # Invariant: _live_in is ctx implies ctx is already the home context.
    if to._live_in is not ctx:
        _rehome(to, ctx)
    if ctx is not None:
        ctx._co_entered += 1
    return g


# Creating a greenlet costs an mmap and a munmap (its frame stack) and is
# the bulk of a short coroutine's life; like QEMU's coroutine pool, each
# context keeps up to this many finished greenlets for new coroutines.
POOL_SIZE = 128

# What a coroutine's greenlet switches to its enterer when fn is done.
_FINISHED: Any = object()


def _bind(ctx: AioContext | None, to: Coroutine[Any], current: greenlet) -> _CoGreenlet:
    """Give `to` a greenlet (a pooled one if any) and bind it to this thread."""
    pool = ctx._co_pool if ctx is not None else None
    if pool:
        g = pool.pop()
        if g.owner is not current:
            g.parent = current
            g.owner = current
    else:
        g = _CoGreenlet(_trampoline)  # its parent is `current`
        g.owner = current
    g.co = to
    to._greenlet = g
    to._thread = ctx._thread if ctx is not None else threading.get_ident()
    return g


def _trampoline() -> None:
    """The run of every coroutine greenlet: call fn, report, take the next one.

    fn's outcome is stored on the coroutine and the greenlet switches
    _FINISHED to whoever entered it, which finishes the coroutine there and
    may put the greenlet back in its context's pool; the next coroutine then
    arrives in `g.co`. Any exception finishes the coroutine (GreenletExit
    and other BaseExceptions included) except KeyboardInterrupt and
    SystemExit, which end the greenlet and propagate to whoever entered it,
    and an exception thrown into a suspended greenlet (greenlet's
    GreenletExit when it collects one), which ends the greenlet too.
    """
    while True:
        # The coroutine arrives through g.co, not as an argument: greenlet
        # keeps run's first arguments alive as long as the greenlet lives.
        g: Any = getcurrent()
        co = g.co
        # The contextvars the coroutine runs in. Set here, by the greenlet
        # itself: greenlet refuses to set the context of a greenlet that is
        # suspended with no Python frame (in the compiled trampoline), which
        # it takes for one running in another thread.
        g.gr_context = co._context
        fn = co._fn
        args = co._args
        kwargs = co._kwargs
        co._args = ()
        co._kwargs = None
        result = None
        try:
            if co._cancel is not None:
                raise co._take_cancel()  # cancelled before it started: fn never runs
            # Plain calls, not fn(*args): the interpreter inlines those, so
            # no C frame stays on the saved stack of a suspended coroutine.
            if kwargs:
                result = fn(*args, **kwargs)
            elif not args:
                result = fn()
            elif len(args) == 1:
                result = fn(args[0])
            elif len(args) == 2:
                result = fn(args[0], args[1])
            else:
                result = fn(*args)
        except FATAL:
            raise
        except BaseException as exc:
            if co._caller is None:
                raise  # thrown in while suspended: nobody entered us
            co._exc = exc
        else:
            co._result = result
        caller = co._caller
        # Keep nothing alive while idle in the pool (g itself least of all: a
        # greenlet whose suspended frame refers to it is a cycle that is never
        # collected). g.co None also tells _reconcile that fn is over.
        fn = args = kwargs = result = co = g.co = g = None
        caller.switch(_FINISHED)


def _finished(ctx: AioContext | None, co: Coroutine[Any], g: _CoGreenlet) -> None:
    """fn of `co` returned or raised (outcome stored on `co`): finish it."""
    co._finish(co._result, co._exc)
    g.co = None
    if ctx is not None and len(ctx._co_pool) < POOL_SIZE and not ctx._closed:
        ctx._co_pool.append(g)


def _unwind(ctx: AioContext | None, co: Coroutine[Any], entered: bool, exc: BaseException) -> None:
    """An exception is leaving a switch into `co`: leave `co` consistent. Cold path.

    Not `entered` (interrupted before the switch): it was never entered.
    Entered, with its greenlet dead: fn raised `exc` (KeyboardInterrupt or
    SystemExit, which are never swallowed): the coroutine is done and
    whoever entered it sees the exception. Entered and alive: the exception
    landed after the switch returned, or is fn's own exception re-raised
    to an explicit enter(): bring `co` up to date. Either way, what it woke
    is kept for the loop.
    """
    if not entered:
        co._caller = None
        return
    g = co._greenlet
    if not co.done and g is not None and g.dead:
        co._exc_owned = True
        co._finish(None, exc)
    else:
        _reconcile(ctx, co)
    _requeue(ctx, co, ())


class _Unretrieved:
    """Reports a coroutine's exception if it is collected with nobody having retrieved it.

    asyncio's rule ("Task exception was never retrieved"): an exception that
    a join(), result() or exception() takes is the taker's, and is not also
    reported; one that nobody takes goes to the context's exception handler
    when the coroutine is garbage collected (in CPython, as soon as the last
    reference to it is dropped), at the loop's next pass, with the
    coroutine's repr as the origin; once the context is closed, to the log.
    """

    __slots__ = ("ctx", "exc", "origin")

    def __init__(self, ctx: AioContext | None, exc: BaseException, origin: str) -> None:
        self.ctx = ctx
        self.exc: BaseException | None = exc
        self.origin = origin

    def __del__(self) -> None:
        exc = self.exc
        if exc is None:
            return
        self.exc = None
        ctx = self.ctx
        # Garbage collection runs at any point of any thread (inside
        # ast.parse, inside logging...) and cannot propagate: hand the report
        # to the context's loop, where the handler runs as it always does
        # (and what it raises leaves poll()).
        if ctx is not None and not ctx._closed:
            try:
                ctx.call_soon(ctx._report, exc, self.origin)
                return
            except RuntimeError:
                pass  # closed meanwhile
        # No loop to hand it to: log it here, but without formatting the
        # traceback, which would parse source (3.11's carets) in the middle
        # of whatever the collection interrupted.
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        logger.error("unhandled exception in %s, never retrieved: %s", self.origin, summary)


def _unhandled(ctx: AioContext | None, co: Coroutine[Any], exc: BaseException) -> None:
    """`co` finished with `exc` and nobody takes it yet: report it unless retrieved."""
    co._exc_owned = True  # reported at most once
    co._unretrieved = _Unretrieved(ctx, exc, repr(co))


def _reconcile(ctx: AioContext | None, co: Coroutine[Any]) -> None:
    """An exception landed right after the switch into `co` returned.

    Finish `co` if its fn is over (its greenlet waits in the trampoline's
    last switch), so that joiners are woken; its wake-ups are the caller's
    to keep. Cold path only.
    """
    g = co._greenlet
    if co.done or g is None:
        return
    if g.co is None and not g.dead:  # waits in the trampoline's last switch
        _finished(ctx, co, g)
        exc = co._exc
        if exc is not None and not co._exc_owned and exc.__class__ is not Cancelled:
            _unhandled(ctx, co, exc)


def _absorb(
    ctx: AioContext | None,
    to: Coroutine[Any],
    pending: deque[Coroutine[Any]],
    explicit: bool,
) -> BaseException | None:
    """`to` yielded or finished: report its exception, queue what it woke.

    Returns the exception instead of reporting it when `explicit` (the
    caller of co.enter() takes it). Those `to` woke go to the front of
    `pending`, so they run before those queued earlier (QEMU's
    co_queue_wakeup order).
    """
    if to.done:
        exc = to._exc
        if exc is not None and not to._exc_owned and exc.__class__ is not Cancelled:
            if explicit:
                return exc
            _unhandled(ctx, to, exc)
    wakeups = to._wakeups
    if wakeups is not None:
        # Interrupted between these two lines, both hold the wake-ups:
        # _salvage keeps each once.
        pending.extendleft(reversed(wakeups))
        to._wakeups = None
    return None


def _settle(ctx: AioContext | None, co: Coroutine[Any], current: greenlet, explicit: bool) -> None:
    """`co` yielded or finished: deal with its exception, run what it woke.

    Coroutines woken on their own context while another one ran are
    entered now, depth first. Interrupted anywhere, nothing is lost: the
    coroutines still queued move to the context's ready queue (_salvage).
    """
    if co._wakeups is None:
        # Finished and woke nobody, the common case: only its exception to
        # deal with, and no queue to build.
        exc = co._exc
        if exc is not None and not co._exc_owned and exc.__class__ is not Cancelled:
            if explicit:
                raise exc
            _unhandled(ctx, co, exc)
        return
    pending: deque[Coroutine[Any]] = deque((_END,))
    to: Coroutine[Any] | None = None
    started = released = None
    try:
        failure = _absorb(ctx, co, pending, explicit)
        # zip() hands out fresh markers with each coroutine, in the same
        # bytecode as the pop (a coroutine may come round twice).
        taking = zip(iter(pending.popleft, _END), _NONES, _NONES, strict=False)
        for to, started, released in taking:
            to._sched_where = None
            # One line: see "One-line try" above.
            try: g = _prepare(ctx, to, current)  # noqa: E701
            except Exception as exc:  # could not even be entered (lost a race)
                (released := to)._sched.release()
                _report(ctx, exc, to)
                continue
            to._caller = current
            try: (released := to)._sched.release()  # noqa: E701
            except RuntimeError:
                pass  # released by an interrupted schedule() (_unschedule_interrupted)
            result = _switch((started := to)._greenlet)  # type: ignore[arg-type]
            if result is _FINISHED:
                _finished(ctx, to, g)
            _absorb(ctx, to, pending, False)
    except BaseException as exc:
        # Salvage first: it takes what `to` woke (once, however the interrupt
        # split _absorb), so _unwind's requeue finds nothing more to queue.
        _salvage(ctx, co, to, started, released, pending)
        if to is not None and started is to:
            _unwind(ctx, to, True, exc)
        raise
    if failure is not None:
        raise failure


_NONES = itertools.repeat(None)


def _salvage(
    ctx: AioContext | None,
    co: Coroutine[Any],
    to: Coroutine[Any] | None,
    started: object,
    released: object,
    pending: deque[Any],
) -> None:
    """_settle was interrupted: keep every coroutine it still had to enter."""
    first: list[Coroutine[Any]] = []
    if to is not None and started is not to and _take_back(to, released):
        first.append(to)
    _requeue(ctx, co, first + [c for c in pending if c is not _END], to)


def _take_back(co: Coroutine[Any], released: object) -> bool:
    """`co` was taken from a queue but not entered: may it be queued again?

    Its schedule flag is still held by us, unless we had released it
    (`released is co`): then take it again, unless somebody scheduled it
    meanwhile (then it is queued there, and will be entered from there).
    """
    co._caller = None
    return released is not co or co._sched.acquire(False)


def _rehome(co: Coroutine[Any], ctx: AioContext | None) -> None:
    old = co._live_in
    if old is not None:
        old._live.discard(co)
    co._live_in = ctx
    co.ctx = ctx
    if ctx is not None:
        ctx._live.add(co)


def _requeue(
    ctx: AioContext | None,
    failed: Coroutine[Any],
    leftovers: Any,
    last: Coroutine[Any] | None = None,
) -> None:
    """A BaseException left `_enter`/`_settle`: keep the deferred wake-ups.

    `leftovers` (coroutines taken but not entered) and what `failed` and
    `last` woke stay scheduled (their `_sched` stays held) and move to the
    front of the context's ready queue, in order and each once, so the loop
    enters them later and none is lost.
    """
    queued: list[Coroutine[Any]] = []
    seen: set[int] = set()
    for source in (leftovers, failed._wakeups or (), (last and last._wakeups) or ()):
        for c in source:
            if id(c) not in seen:
                seen.add(id(c))
                queued.append(c)
    failed._wakeups = None
    if last is not None:
        last._wakeups = None
    if not queued:
        return
    if ctx is None:
        logger.error("deferred wake-ups of %r lost: %r", failed, queued)
        return
    for c in reversed(queued):
        c._sched_where = ctx
        ctx._ready.appendleft(c)
    ctx.notify()


def _release_quietly(lock: threading.Lock) -> None:
    """Release `lock` if it is held. Only the home thread releases the ones used here."""
    try:
        lock.release()
    except RuntimeError:
        pass


def _defer(me: Coroutine[Any], co: Coroutine[Any]) -> None:
    """Queue `co` to be entered after `me`, the running coroutine, yields.

    QEMU: the co_queue_wakeup half of aio_co_enter. Thread: home.
    """
    if me is co:
        raise RuntimeError(f"{co!r} cannot wake itself")
    co._check_enterable("wake", me._thread)
    try:
        if not co._sched.acquire(False):
            raise RuntimeError(f"{co!r} is already scheduled in {co._where()}")
        co._sched_where = me  # rendered by Coroutine._where() only on error
        wakeups = me._wakeups
        if wakeups is None:
            me._wakeups = [co]
        else:
            wakeups.append(co)
    except BaseException as exc:
        # Interrupted between taking the flag and queueing (same thread as
        # every other user of me._wakeups: this check is exact).
        if (
            not isinstance(exc, Exception)
            and co._sched.locked()
            and co._sched_where in (None, me)
            and co not in (me._wakeups or ())
        ):
            co._sched_where = None
            _release_quietly(co._sched)
        raise


def yield_() -> None:
    """Suspend the current coroutine and return to whoever entered it.

    Returns when the coroutine is entered or woken again. QEMU's primitive:
    a cancel() does not interrupt it, but a pending Cancelled is raised
    when it resumes. QEMU: qemu_coroutine_yield. Coroutine only.
    """
    # Compiled, g is typed _CoGreenlet (a TypeError for a plain greenlet)
    # and co must be checked for None (a greenlet a fork child disowned).
    try:
        g: Any = getcurrent()
        co: Coroutine[Any] | None = g.co
    except (AttributeError, TypeError):
        co = None
    if co is None:
        raise RuntimeError("yield_() called outside a coroutine")
    caller = co._caller
    co._caller = None
    _switch(caller)  # type: ignore[arg-type]
    if co._cancel is not None:
        raise co._take_cancel()


def _shielded() -> bool:
    """The abort of a wait that cannot be cancelled (see _suspend)."""
    return False


def _suspend(co: Coroutine[Any], what: object = None) -> None:
    """yield_() for corun's own short waits: never raises Cancelled.

    Marked as a wait that cannot be withdrawn, so neither a cancel() nor
    close() resumes it spuriously; a pending Cancelled waits for the next
    cancellable wait. Coroutine only (co's).
    """
    co._abort = _shielded
    co._waiting = what
    co._since = _monotonic()
    caller = co._caller
    co._caller = None
    _switch(caller)  # type: ignore[arg-type]
    co._abort = None
    co._waiting = None


def checkpoint(co: Coroutine[Any]) -> None:
    """Raise a pending Cancelled at the start of a cancellable wait. Coroutine only."""
    if co._cancel is not None:
        raise co._take_cancel()


def park(co: Coroutine[Any], abort: Callable[[], bool] | None, what: object = None) -> None:
    """The kernel's one cancellable wait (trio's wait_task_rescheduled).

    The caller has published `co` where a waker will find it; `co` then
    suspends until woken. cancel() runs `abort()` on the home thread, from
    the loop: it withdraws `co` from what it waits on and returns True (then
    the canceller wakes `co`), or returns False when a wake-up already won
    the race (then that wake-up resumes `co`). Either way Cancelled is
    raised here on resume, and the caller cleans up in its except/finally
    (giving back what a racing wake-up handed it). `abort` None: the wait
    cannot be withdrawn; a pending cancel is raised when it is resumed.
    `what` says what it waits on, for corun.dump(). Coroutine only (co's).
    """
    co._abort = abort
    co._waiting = what
    co._since = _monotonic()
    caller = co._caller
    co._caller = None
    _switch(caller)  # type: ignore[arg-type]
    co._abort = None
    co._waiting = None
    if co._cancel is not None:
        raise co._take_cancel()


def _deliver_cancel(co: Coroutine[Any]) -> None:
    """Interrupt `co`'s cancellable wait. Thread: co's home, from the loop."""
    abort = co._abort
    if abort is None or co._cancel is None or co.done:
        return  # not parked (raised at its next wait or resume), or withdrawn
    ctx = co.ctx
    if abort() and ctx is not None:
        co._abort = None
        ctx.enter(co)  # we run in its home thread, outside coroutines: enters it now


def current_coroutine() -> Coroutine[Any] | None:
    """The running Coroutine, or None outside coroutines. Thread: any."""
    return getattr(getcurrent(), "co", None)


def in_coroutine() -> bool:
    """True inside a coroutine. Thread: any."""
    return getattr(getcurrent(), "co", None) is not None
