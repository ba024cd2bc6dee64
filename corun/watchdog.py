"""The stall watchdog: a loop pass that runs too long is reported while it lasts.

Anchor: asyncio's debug-mode "Executing <Handle> took 0.2 seconds", but told
while the stall goes on, with the stack of the stuck thread.

Design. One daemon thread for the process watches the contexts that have a
`slow_callback_duration`. A context whose loop has been inside one pass (its
`_polls` counter unchanged, `_pass_ended` behind it) and not waiting in epoll
(`_notify_me` clear) for longer than its threshold is reported once, on the
`corun` logger at WARNING, with the coroutine that runs and the stack of the
loop's thread (sys._current_frames). It costs the loop nothing: it reads
counters the loop keeps anyway.

Threads: `watch_stalls` from any thread; the watchdog reads without locks.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import AioContext

logger = logging.getLogger("corun")


class _Watchdog:
    """One daemon thread that watches the contexts with a slow_callback_duration."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: weakref.WeakKeyDictionary[AioContext, float] = weakref.WeakKeyDictionary()
        # ctx -> (polls seen, since when, reported already)
        self._seen: weakref.WeakKeyDictionary[AioContext, tuple[int, float, bool]] = (
            weakref.WeakKeyDictionary()
        )
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, ctx: AioContext, limit: float | None) -> None:
        with self._lock:
            if limit is None:
                self._watched.pop(ctx, None)
                return
            self._watched[ctx] = limit
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="corun-watchdog", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                watched = list(self._watched.items())
            if not watched:
                self._wake.wait()
                self._wake.clear()
                continue
            period = max(min(limit for _, limit in watched) / 4, 0.005)
            self._wake.wait(period)
            self._wake.clear()
            now = time.monotonic()
            for ctx, limit in watched:
                self._check(ctx, limit, now)

    def _check(self, ctx: AioContext, limit: float, now: float) -> None:
        if ctx._closed:
            self._seen.pop(ctx, None)
            return
        polls = ctx._polls
        in_pass = ctx._pass_ended != polls and not ctx._notify_me
        seen = self._seen.get(ctx)
        if not in_pass:
            self._seen.pop(ctx, None)
            return
        if seen is None or seen[0] != polls:
            self._seen[ctx] = (polls, now, False)
            return
        if seen[2] or now - seen[1] < limit:
            return
        self._seen[ctx] = (polls, seen[1], True)
        _report_stall(ctx, now - seen[1], limit)


def _report_stall(ctx: AioContext, duration: float, limit: float) -> None:
    running = [co for co in ctx.coroutines() if co._caller is not None]
    who = ", ".join(repr(co.name) for co in running) or "no coroutine (a callback)"
    frame = sys._current_frames().get(ctx._thread)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
    logger.warning(
        "%r: one loop pass has been running for %.3f s (slow_callback_duration %.3f s), "
        "in %s; the loop's thread is at:\n%s",
        ctx,
        duration,
        limit,
        who,
        stack.rstrip("\n"),
    )


_watchdog = _Watchdog()


def watch_stalls(ctx: AioContext, limit: float | None) -> None:
    """Report (or, with None, stop reporting) passes of `ctx` longer than `limit` s."""
    _watchdog.watch(ctx, limit)

