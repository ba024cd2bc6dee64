"""fd handlers: callbacks a context runs when a file descriptor is ready.

QEMU: util/aio-posix.c (aio_set_fd_handler and the epoll backend of
util/fdmon-epoll.c).

Design. Each context keeps `fd -> [reader, writer]` (each a `(cb, args)`
pair or None) and a Poller that waits for readiness. The poller speaks the
`selectors` event bits (EVENT_READ = 1, EVENT_WRITE = 2) whatever its
backend: `select.epoll` on Linux (level-triggered; hang-ups and errors
count as both readable and writable, so the handler sees them), and
`selectors.DefaultSelector` elsewhere.

Threads: everything here runs in the context's home thread.
"""

from __future__ import annotations

import select
import selectors
from collections.abc import Callable
from typing import Any, Protocol

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
HUP = 4  # with READ: the peer hung up (EPOLLRDHUP/EPOLLHUP), for corun sockets

Handler = tuple[Callable[..., Any], tuple[Any, ...]]


def fileno_of(fd: Any) -> int:
    """An int fd, or the `fileno()` of an object that has one."""
    if isinstance(fd, int):
        n = fd
    elif hasattr(fd, "fileno"):
        n = fd.fileno()
        if not isinstance(n, int):
            raise TypeError(f"{fd!r}.fileno() returned {n!r}, not an int")
    else:
        raise TypeError(f"expected an fd (an int or an object with fileno()), got {fd!r}")
    if n < 0:
        raise ValueError(f"invalid fd {n} (from {fd!r})")
    return n


# The longest wait handed to the poller, in seconds: epoll takes an int of
# milliseconds (about 24.8 days at most) and raises OverflowError beyond.
# A longer wait (a timer 30 days out, math.inf) wakes up once a day and
# waits again: the loop recomputes its deadline every pass.
MAX_WAIT = 86400.0


def clamp_wait(timeout: float | None) -> float | None:
    """None (wait forever) or a timeout the poller accepts."""
    if timeout is None or timeout <= MAX_WAIT:
        return timeout
    return MAX_WAIT


class Poller(Protocol):
    def set(self, fd: int, events: int) -> None: ...
    def watch_edge(self, fd: int) -> bool: ...
    def watch_notifier(self, fd: int) -> bool: ...
    def poll(self, timeout: float | None) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


if hasattr(select, "epoll"):
    _EPOLL_READ = (
        select.EPOLLIN | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
    )
    _EPOLL_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
    _EPOLL_HUP = select.EPOLLRDHUP | select.EPOLLHUP

    class EpollPoller:
        """Readiness by epoll. Thread: home."""

        __slots__ = ("_ep", "_registered")

        def __init__(self) -> None:
            self._ep = select.epoll()
            self._registered: dict[int, int] = {}

        def set(self, fd: int, events: int) -> None:
            mask = (select.EPOLLIN if events & READ else 0) | (
                select.EPOLLOUT if events & WRITE else 0
            )
            old = self._registered.get(fd)
            if not mask:
                if old is not None:
                    del self._registered[fd]
                    try:
                        self._ep.unregister(fd)
                    except OSError:
                        pass  # the fd was closed first: epoll forgot it already
            elif old is None:
                self._ep.register(fd, mask)
                self._registered[fd] = mask
            elif old != mask:
                self._ep.modify(fd, mask)
                self._registered[fd] = mask

        def watch_edge(self, fd: int) -> bool:
            """Watch `fd` for good, edge-triggered, both ways; True: supported.

            For corun sockets (net.py): registered once for the socket's
            life, reported only when its readiness changes (new data, room
            to write, hang-up), so a wait costs no epoll_ctl and an idle
            socket no wake-up. Undone with set(fd, 0).
            """
            self._ep.register(
                fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
            )
            self._registered[fd] = -1  # not a level-triggered mask: set() never modifies it
            return True

        def watch_notifier(self, fd: int) -> bool:
            """Watch an eventfd edge-triggered; True: it never needs reading.

            Every write to an eventfd is a new edge, so epoll reports each
            wake-up without the loop clearing the counter: one syscall (and
            one GIL release) less per wake-up. (The counter would saturate
            after 2**64 - 2 wake-ups.)
            """
            self._ep.register(fd, select.EPOLLIN | select.EPOLLET)
            self._registered[fd] = select.EPOLLIN
            return True

        def poll(self, timeout: float | None) -> list[tuple[int, int]]:
            raw = self._ep.poll(-1 if timeout is None else min(timeout, MAX_WAIT))
            if not raw:
                return []
            out = []
            for fd, ev in raw:
                out.append(
                    (
                        fd,
                        (READ if ev & _EPOLL_READ else 0)
                        | (WRITE if ev & _EPOLL_WRITE else 0)
                        | (HUP if ev & _EPOLL_HUP else 0),
                    )
                )
            return out

        def close(self) -> None:
            self._ep.close()
            self._registered.clear()


class SelectorPoller:
    """Readiness by `selectors` (where epoll is missing). Thread: home."""

    __slots__ = ("_sel",)

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    def set(self, fd: int, events: int) -> None:
        try:
            key = self._sel.get_key(fd)
        except KeyError:
            if events:
                self._sel.register(fd, events)
            return
        if not events:
            self._sel.unregister(fd)
        elif key.events != events:
            self._sel.modify(fd, events)

    def watch_edge(self, fd: int) -> bool:
        """No edge-triggered mode here: corun sockets register per wait instead."""
        return False

    def watch_notifier(self, fd: int) -> bool:
        """Watch the notifier level-triggered; False: the loop must clear it."""
        self._sel.register(fd, READ)
        return False

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        return [(key.fd, ev) for key, ev in self._sel.select(clamp_wait(timeout))]

    def close(self) -> None:
        self._sel.close()


def make_poller() -> Poller:
    if hasattr(select, "epoll"):
        return EpollPoller()
    return SelectorPoller()  # pragma: no cover
