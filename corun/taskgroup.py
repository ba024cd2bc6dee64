"""TaskGroup: structured concurrency whose children may run on several IOThreads.

asyncio's name, trio's nursery semantics, and what neither has: the
children of one group may live on different contexts and threads, and the
group's owner may be a coroutine or a plain thread.

Design. The group counts its running children under a tiny
`threading.Lock` (never held across a switch, a wake or a syscall). A
join waiter on each child records its failure, if any, and counts it out
once it is done, on whatever thread it ends (so every child is done, its
result set, when the block is left). The first
failure aborts the group: every other child is cancelled with
`co.cancel()` (which crosses threads), and so is the owner while it is
still in the block, so that the block stops too; later spawns are refused.
Leaving the block waits, in a loop of one-shot Waiters, until the count is
zero; a cancel of the owner meanwhile aborts the group and the wait goes on
(children always finish before the block is left). Then the failures, the
block's own exception among them, are raised together as an
ExceptionGroup; a cancel of the owner that was not the group's own is
raised as Cancelled.

Threads: `with TaskGroup()` in a coroutine or a plain thread; `spawn` from
any thread (children spawn grandchildren into the group too).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from greenlet import getcurrent

from . import _thread
from .coroutine import Cancelled, Coroutine
from .waiter import Waiter

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from .context import AioContext

T = TypeVar("T")



class _ChildDone:
    """Joins a child for its group: fired by the child's _finish (a join waiter)."""

    __slots__ = ("child", "group")

    # Read by Coroutine._wake_joiner: not a coroutine, so it is fire()d.
    co = None

    def __init__(self, group: TaskGroup, child: Coroutine[Any]) -> None:
        self.group = group
        self.child = child

    def fire(self, value: object = None) -> bool:
        # The child's outcome is set before its waiters fire: a failure is
        # recorded (and the group aborted) before the child is counted out,
        # so the owner's __exit__ never sees zero running without it.
        child = self.child
        exc = child._exc
        if exc is not None and not isinstance(exc, Cancelled):
            self.group._fail(exc)
        self.group._child_finished(child)
        return True


class TaskGroup:
    """A block that owns the coroutines spawned into it.

    `with TaskGroup() as tg:` in a coroutine or a plain thread; leaving the
    block waits for every child. The first child that fails cancels the
    others (across threads) and the owner's block, if the owner is a
    coroutine; the block then raises an ExceptionGroup of the failures.
    Thread: the `with` in a coroutine or a plain thread; spawn() from any
    thread.
    """

    __slots__ = (
        "__weakref__",
        "_aborted",
        "_cancelled_owner",
        "_children",
        "_ctx",
        "_done",
        "_entered",
        "_exited",
        "_failures",
        "_leaving",
        "_lock",
        "_owner",
        "_running",
    )

    def __init__(self) -> None:
        # Invariants (under _lock): _running counts children spawned and not
        # yet finished; once _aborted, every child alive then was cancelled
        # and no spawn is accepted; _done is the owner's waiter while it
        # waits in __exit__ for _running to reach zero.
        self._lock = threading.Lock()
        self._running = 0
        self._children: set[Coroutine[Any]] = set()
        self._failures: list[BaseException] = []
        self._aborted = False
        self._entered = False
        self._exited = False
        self._leaving = False  # the owner has reached __exit__: no longer cancelled by us
        self._owner: Coroutine[Any] | None = None
        self._cancelled_owner = False
        self._ctx: AioContext | None = None
        self._done: Waiter | None = None

    def __repr__(self) -> str:
        if self._exited:
            state = "done"
        elif self._aborted:
            state = "aborting"
        else:
            state = "open" if self._entered else "new"
        return f"<TaskGroup at {id(self):#x} {state}, {self._running} running>"

    def __enter__(self) -> TaskGroup:
        if self._entered:
            raise RuntimeError(f"{self!r} cannot be entered twice")
        owner: Coroutine[Any] | None = getattr(getcurrent(), "co", None)
        self._owner = owner
        self._ctx = owner.ctx if owner is not None else _thread._tls.ctx
        self._entered = True
        return self

    def spawn(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        ctx: AioContext | None = None,
        name: str | None = None,
    ) -> Coroutine[T]:
        """Start fn(*args) as a child on `ctx` (default: the owner's context).

        RuntimeError if the group is not entered, has finished, or is
        aborting after a failure. Thread: any.
        """
        target = ctx if ctx is not None else self._ctx
        if target is None:
            raise RuntimeError(
                f"{self!r}.spawn({fn!r}): the group's owner has no context; pass ctx="
            )
        co: Coroutine[T] = Coroutine(fn, *args, name=name)
        co._exc_owned = True  # the group raises its exception, not the handler
        # Counted out (and its failure recorded) once it is done, however it
        # ends: even cancelled before it ever ran. Nobody else can see `co`
        # yet: its waiter list needs no lock.
        co._waiters = [_ChildDone(self, co)]
        with self._lock:
            if not self._entered:
                raise RuntimeError(f"{self!r}.spawn() outside its `with` block")
            if self._exited or self._aborted:
                raise RuntimeError(f"cannot spawn {fn!r} into {self!r}: it is closing")
            self._running += 1
            self._children.add(co)
        try:
            target.schedule(co)
        except BaseException:
            if co.done:
                # An abort cancelled it between our count and the schedule:
                # its join waiter counted it out already.
                raise RuntimeError(f"cannot spawn {fn!r} into {self!r}: it is closing") from None
            self._child_finished(co)
            raise
        return co

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._failures.append(exc)
        self._abort()

    def _abort(self) -> None:
        """Cancel every child (and the owner, while it is in the block). Thread: any."""
        me = getattr(getcurrent(), "co", None)
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            children = list(self._children)
            owner = self._owner if not self._leaving else None
            if owner is me:
                owner = None
            if owner is not None:
                self._cancelled_owner = True
        for child in children:
            if child is not me:
                child.cancel()
        if owner is not None:
            owner.cancel()

    def _child_finished(self, co: Coroutine[Any]) -> None:
        with self._lock:
            self._running -= 1
            self._children.discard(co)
            waiter = self._done if self._running == 0 else None
        if waiter is not None:
            waiter.fire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        owner = self._owner
        with self._lock:
            self._leaving = True
        cancelled: Cancelled | None = exc if isinstance(exc, Cancelled) else None
        if exc is not None:
            if cancelled is None:
                with self._lock:
                    self._failures.append(exc)
            self._abort()
        while True:
            with self._lock:
                if self._running == 0:
                    self._exited = True
                    self._done = None
                    break
                waiter = self._done = Waiter(owner, self)
            try:
                waiter.wait()
            except Cancelled as caught:
                # The owner is cancelled while it waits: stop the children,
                # and go on waiting for them (they always finish first).
                cancelled = caught
                self._abort()
        if self._cancelled_owner and owner is not None:
            # Withdraw our own cancel of the owner; if nobody else's is
            # outstanding, the Cancelled we caused is not the caller's.
            if owner.uncancel() == 0 and cancelled is not None and exc is cancelled:
                cancelled = None
        failures = self._failures
        if failures:
            if cancelled is not None and owner is not None and owner.cancelling() > 0:
                # Somebody else cancelled the owner too: the group's error
                # replaces that Cancelled here, so keep it pending for the
                # owner's next wait rather than lose it.
                owner._defer_cancel(cancelled)
            raise BaseExceptionGroup("unhandled errors in a TaskGroup", failures) from None
        if cancelled is not None:
            if cancelled is exc:
                return False
            raise cancelled
        return exc is not None and isinstance(exc, Cancelled)
