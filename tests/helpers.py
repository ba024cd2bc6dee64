"""Helpers shared by the test files (imported as `helpers`: tests/ is on sys.path)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any

from corun import AioContext


def in_other_thread(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Run fn() in a fresh plain thread (no context); return (ok, value-or-exception)."""
    outcome: list[tuple[bool, Any]] = []

    def main() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    t = threading.Thread(target=main)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return outcome[0]


def drain(ctx: AioContext) -> None:
    """Run ctx's loop (we are its home thread) until nothing is left to do."""
    while ctx.poll(blocking=False):
        pass


@contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected, non-blocking socket pair, closed afterwards."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b

# Bound for anything that must happen "at once" or "eventually": it only
# turns a hang into a failure, no assertion depends on it.
QUICK = 5.0


class Recorder:
    """An exception handler (for any number of contexts) that records what it hears."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[str, BaseException, object]] = []

    def __call__(self, ctx: AioContext, exc: BaseException, origin: object) -> None:
        with self._lock:
            self.seen.append((ctx.name, exc, origin))

    def watch(self, ctx: AioContext) -> AioContext:
        ctx.set_exception_handler(self)
        return ctx


def wait_until(predicate: Callable[[], bool], timeout: float = QUICK) -> None:
    """Poll `predicate` until it holds; only for states no Event can announce."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.0005)


def wait_len(items: Sized, n: int) -> None:
    """Wait until `items` (a waiter deque) holds `n` entries."""
    wait_until(lambda: len(items) == n)


class Outcome:
    """fn() in a plain thread; `get()` joins it, returns its value or re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str = "q-thread") -> None:
        self._value: list[tuple[bool, Any]] = []
        self._thread = threading.Thread(target=self._main, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _main(self, fn: Callable[[], Any]) -> None:
        try:
            self._value.append((True, fn()))
        except BaseException as exc:
            self._value.append((False, exc))

    def get(self, timeout: float = QUICK) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "thread did not finish in time"
        ok, value = self._value[0]
        if not ok:
            raise value
        return value
