"""EventNotifier: a wake-up flag that an fd poller can wait on.

QEMU: util/event_notifier-posix.c. An eventfd on Linux, a non-blocking pipe
elsewhere. `set()` makes the fd readable, `test_and_clear()` makes it
unreadable again and says whether it was set. Several `set()` calls before a
`test_and_clear()` collapse into one readable state.

Thread: `set()` from any thread; `test_and_clear()` from the thread that
polls the fd; `close()` once nobody uses it any more.
"""

from __future__ import annotations

import os
from types import TracebackType


class EventNotifier:
    """An eventfd (a pipe where eventfd is missing). Thread: any."""

    __slots__ = ("_rfd", "_wfd", "_is_eventfd")

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._rfd = self._wfd = fd
            self._is_eventfd = True
        else:  # pragma: no cover - exercised only where eventfd is missing
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)
            self._is_eventfd = False

    def __repr__(self) -> str:
        state = "closed" if self._rfd < 0 else f"fd={self._rfd}"
        return f"<EventNotifier {state}>"

    def fileno(self) -> int:
        """The fd to poll for readability. Thread: any."""
        if self._rfd < 0:
            raise ValueError(f"{self!r} is closed")
        return self._rfd

    def set(self) -> None:
        """Make the fd readable (idempotent until cleared). Thread: any."""
        if self._wfd < 0:
            raise ValueError(f"{self!r} is closed")
        try:
            if self._is_eventfd:
                os.eventfd_write(self._wfd, 1)
            else:  # pragma: no cover
                os.write(self._wfd, b"\x01")
        except BlockingIOError:
            pass  # counter saturated or pipe full: it is readable anyway

    def test_and_clear(self) -> bool:
        """Clear the readable state; return whether it was set. Thread: the poller's."""
        if self._rfd < 0:
            raise ValueError(f"{self!r} is closed")
        if self._is_eventfd:
            try:
                os.eventfd_read(self._rfd)
            except BlockingIOError:
                return False
            return True
        was_set = False  # pragma: no cover
        while True:  # pragma: no cover
            try:
                if not os.read(self._rfd, 512):
                    return was_set
            except BlockingIOError:
                return was_set
            was_set = True

    def close(self) -> None:
        """Release the fd(s); idempotent. Thread: any, once nobody polls it."""
        rfd, wfd = self._rfd, self._wfd
        # Marked first: an interrupt between marking and closing leaks an fd,
        # which is safer than the other order, where a retry could close a
        # number that another thread has been given since.
        self._rfd = self._wfd = -1
        if rfd >= 0:
            os.close(rfd)
        if wfd >= 0 and wfd != rfd:
            os.close(wfd)

    def __enter__(self) -> EventNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
