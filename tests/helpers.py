"""Helpers shared by the test files (imported as `helpers`: tests/ is on sys.path)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
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
