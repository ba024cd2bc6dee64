"""Seeing inside a running program: dump(), dump_on_signal(), the stall watchdog.

Anchors: gevent's `print_run_info`, Python 3.14's `asyncio ps`/`pstree`,
faulthandler, and asyncio's debug-mode slow-callback warning.

Design. Every corun wait parks through the kernel's one wait verb, which
records on the coroutine what it waits on (`_waiting`: a CoMutex, a
CoQueue, a Timer for a sleep, a joined Coroutine, an fd...) and since when
(`_since`). `dump()` walks every open context of the process (the registry
in _thread) and each context's live coroutines, and prints their state,
what they wait on, for how long, the chain of lock holders behind a lock
wait (across threads, with deadlocks named), and their Python stacks (a
suspended coroutine's from its greenlet's frame, a running one's from its
thread). It reads without locking, like faulthandler: a best-effort
snapshot of a program that may be busy, never an obstacle to it.

The stall watchdog (`ctx.set_slow_callback_duration`) lives in watchdog.py.

Threads: all of it from any thread; `dump_on_signal` from the main thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from . import _thread
from .comutex import CoMutex
from .coroutine import Coroutine
from .corwlock import CoRwLock
from .timer import Timer

if TYPE_CHECKING:
    pass

def describe_wait(what: object, now: float | None = None) -> str:
    """A line saying what a coroutine waits on (its `_waiting`)."""
    if what is None:
        return "a bare yield_() (resumed only by an explicit wake or enter)"
    if isinstance(what, Timer):
        when = what.when
        if when is None:
            return "sleep (its timer has fired: being woken)"
        left = when - (time.monotonic() if now is None else now)
        return f"sleep, {left:.3f} s left"
    if isinstance(what, Coroutine):
        return f"join of {what!r}"
    if isinstance(what, CoMutex):
        holder = what.holder
        where = f" on {holder.ctx.name!r}" if holder is not None and holder.ctx else ""
        return f"{what!r}{where}"
    if isinstance(what, CoRwLock):
        readers = ", ".join(repr(co.name) for co in list(what._readers))
        return f"{what!r}" + (f", read by {readers}" if readers else "")
    if isinstance(what, tuple) and what:
        kind = what[0]
        if len(what) == 2 and isinstance(what[1], int):
            # wait_readable/wait_writable, and socket operations (recv, send...)
            return f"{kind}(fd {what[1]})"
        if kind == "call_sync":
            return f"call_sync({_fn_name(what[2])}) on {what[1].name!r}"
        if kind == "run_in_thread":
            return f"run_in_thread({_fn_name(what[1])})"
    if isinstance(what, str):
        return what
    return repr(what)


def _fn_name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _holder_of(what: object) -> Coroutine[Any] | None:
    if isinstance(what, CoMutex):
        return what.holder
    if isinstance(what, CoRwLock):
        return what._writer
    if isinstance(what, Coroutine):
        return what  # a join waits for that coroutine
    return None


def holder_chain(co: Coroutine[Any]) -> tuple[list[str], bool]:
    """Follow `co`'s wait through lock holders (and joined coroutines).

    Returns the lines of the chain and whether it closes on itself (a
    deadlock).
    """
    lines: list[str] = []
    seen = {id(co)}
    current = co
    for _ in range(64):
        holder = _holder_of(current._waiting)
        if holder is None or holder.done:
            return lines, False
        if id(holder) in seen:
            lines.append(f"-> held by {holder.name!r}, which is already in this chain: DEADLOCK")
            return lines, True
        seen.add(id(holder))
        where = f" on {holder.ctx.name!r}" if holder.ctx is not None else ""
        lines.append(
            f"-> {holder.name!r}{where} ({holder._state()}) waits on "
            f"{describe_wait(holder._waiting)}"
        )
        current = holder
    return lines, False


def _stack_of(co: Coroutine[Any], frames: dict[int, FrameType]) -> list[str]:
    g = co._greenlet
    frame: FrameType | None = None
    if g is not None and not g.dead:
        if co._caller is not None:
            # Running (or entered another coroutine): its thread's frames.
            frame = frames.get(co._thread) if co._thread is not None else None
            if co._thread == threading.get_ident():
                frame = sys._getframe(2)
        else:
            frame = g.gr_frame
    if frame is None:
        return []
    try:
        return traceback.format_list(_user_frames(traceback.extract_stack(frame)))
    except Exception:  # a frame that moved under us: best effort
        return []


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_frames(stack: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The user's frames, each run of corun's own frames cut to the call into it."""
    out: list[traceback.FrameSummary] = []
    inside = True  # the trampoline at the bottom of every coroutine is corun's
    for entry in stack:
        ours = os.path.dirname(os.path.abspath(entry.filename)) == _PACKAGE_DIR
        if ours and not inside:
            out.append(entry)  # the corun call the user made (acquire, sleep...)
        inside = ours
        if not ours:
            out.append(entry)
    if not out and len(stack) > 1:
        out.append(stack[1])  # fn was a corun call itself (ctx.spawn(corun.sleep, 9))
    return out


def dump(file: TextIO | None = None) -> None:
    """Write every live coroutine of every open context to `file` (default stderr).

    For each: its state, what it waits on and for how long, the chain of
    lock holders behind it (deadlocks named), and its stack. Thread: any.
    """
    out = sys.stderr if file is None else file
    now = time.monotonic()
    frames = sys._current_frames()
    contexts = sorted(_thread._contexts, key=lambda c: c.name)
    write = out.write
    write(f"corun dump, pid {os.getpid()}, {len(contexts)} open context(s)\n")
    for ctx in contexts:
        cos = ctx.coroutines()
        stats = ctx.stats()
        write(
            f"\n== {ctx!r}: {len(cos)} coroutine(s), polls={stats['polls']}, "
            f"entered={stats['co_entered']}\n"
        )
        for co in sorted(cos, key=lambda c: c.name):
            state = co._state()
            line = f"  {co!r}"
            if co._waiting is not None or (state == "suspended" and co._abort is None):
                waited = now - co._since if co._waiting is not None else None
                line += f"\n    waits on: {describe_wait(co._waiting, now)}"
                if waited is not None:
                    line += f" (for {waited:.3f} s)"
                chain, _deadlock = holder_chain(co)
                for link in chain:
                    line += f"\n      {link}"
            write(line + "\n")
            for frame_line in _stack_of(co, frames):
                for sub in frame_line.rstrip("\n").splitlines():
                    write(f"      {sub}\n")
    out.flush()


def dump_on_signal(signum: int = signal.SIGUSR1, file: TextIO | None = None) -> Any:
    """Install a handler that writes dump() to stderr on `signum`; return the old one.

    Like faulthandler.register: `kill -USR1 PID` shows what a hung service
    waits on. Thread: main (signal handlers can only be set there), Unix.
    """

    def handler(signo: int, frame: FrameType | None) -> None:
        dump(file)

    return signal.signal(signum, handler)
