"""Bottom halves: callbacks a context runs once at its next loop pass.

QEMU: the bottom-half part of util/async.c (aio_bh_new, qemu_bh_schedule,
qemu_bh_schedule_idle, qemu_bh_cancel, qemu_bh_delete).

Design. A BottomHalf has a mode (0: not scheduled, 1: scheduled, 2:
scheduled idle) and a `_queued` Lock used as a test-and-set flag: held while
the BH sits in one of its context's two lock-free deques (`_bh_q` for
scheduled, `_idle_q` for idle). `schedule()` stores the mode, then appends
the BH only if it can take `_queued`, so a BH is in a deque at most once
however often it is scheduled. The loop pops it, releases `_queued`, then
reads and clears the mode and runs the callback if the mode was set.

Why no schedule is lost (pairs with `AioContext._run_bhs`): a producer
stores the mode before it tries `_queued`. If its try fails, the BH is
still queued and the loop, which reads the mode only after releasing
`_queued`, sees the mode. If its try succeeds, it queues the BH again and
a later pass sees it. The one overlap - the loop reads the mode, a producer
stores it, the loop clears it - runs the callback after the producer's
store, which is all a schedule promises (and the requeued BH then finds the
mode clear and does nothing).

Threads: everything but running the callback may be called from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import AioContext

IDLE = 2
SCHEDULED = 1


class BottomHalf:
    """A callback that runs once in its context's thread per `schedule()`. Thread: any."""

    __slots__ = ("name", "_ctx", "_cb", "_args", "_mode", "_queued", "_deleted")

    def __init__(
        self, ctx: AioContext, cb: Callable[..., Any], args: tuple[Any, ...], name: str | None
    ) -> None:
        if not callable(cb):
            raise TypeError(f"{ctx!r}.bh() needs a callable, got {cb!r}")
        #: The name given to ctx.bh(), or the callback's qualified name; shown in
        #: its repr. Thread: any.
        self.name = name or getattr(cb, "__qualname__", repr(cb))
        self._ctx = ctx
        self._cb = cb
        self._args = args
        self._mode = 0
        self._queued = threading.Lock()
        self._deleted = False

    def __repr__(self) -> str:
        state = "deleted" if self._deleted else ("scheduled" if self._mode else "idle")
        return f"<BottomHalf {self.name!r} {state} ctx={self._ctx.name!r}>"

    @property
    def scheduled(self) -> bool:
        """Whether it will run at the next poll. Thread: any."""
        return self._mode != 0

    def _enqueue(self, mode: int) -> None:
        if self._deleted:
            raise RuntimeError(f"cannot schedule {self!r}: it was deleted")
        ctx = self._ctx
        if ctx._closed and ctx._refuses():
            raise ctx._refusal(repr(self))
        self._mode = mode
        if self._queued.acquire(False):
            ctx._submit(ctx._bh_q if mode == SCHEDULED else ctx._idle_q, self)
        elif mode == SCHEDULED:
            # Queued already, perhaps as idle: make sure the loop does not
            # wait the idle delay for it.
            ctx.notify()

    def schedule(self) -> None:
        """Run the callback once at the next poll (qemu_bh_schedule). Thread: any."""
        self._enqueue(SCHEDULED)

    def schedule_idle(self) -> None:
        """Like schedule(), but does not count as progress and may wait up to 10 ms. Thread: any."""
        self._enqueue(IDLE)

    def cancel(self) -> None:
        """Unschedule; no effect if not scheduled (qemu_bh_cancel). Thread: any."""
        self._mode = 0

    def delete(self) -> None:
        """Cancel and free; scheduling it afterwards raises (qemu_bh_delete). Thread: any."""
        self._deleted = True
        self._mode = 0
