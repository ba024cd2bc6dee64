"""IOThread: an OS thread whose whole life is running one AioContext.

QEMU: iothread.c (iothread_new, iothread_run, iothread_stop, iothread_join).

Design. The thread creates its context, publishes it (the constructor
returns only once `t.ctx` is ready), then runs `ctx.poll(blocking=True)`
until asked to stop. `stop()` stores a flag and notifies the context; the
loop sees the flag after its current pass and leaves. Leaving closes the
context, which first runs everything already queued, so `join()` loses
nothing that was scheduled before it.

Threads: every method from any thread, except `join()` from the IOThread
itself (it would wait for itself).
"""

from __future__ import annotations

import itertools
import logging
import threading
from types import TracebackType

from .context import AioContext

logger = logging.getLogger("corun")

# Numbers for default names only; never read back.
_names = itertools.count(1)


class IOThread:
    """An OS thread running its own AioContext. Thread: any."""

    def __init__(self, name: str | None = None) -> None:
        #: Its name (default "iothread-N"), also the OS thread's and its context's
        #: name. Thread: any.
        self.name: str = name if name is not None else f"iothread-{next(_names)}"
        self._stopping = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._ctx: AioContext | None = None
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError(f"IOThread {self.name!r} failed to start") from self._startup_error

    @property
    def ctx(self) -> AioContext:
        """The thread's context. Thread: any."""
        assert self._ctx is not None
        return self._ctx

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<IOThread {self.name!r} {state}>"

    def _main(self) -> None:
        try:
            ctx = AioContext(self.name)
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ctx = ctx
        self._ready.set()
        try:
            # Pairs with stop(): it stores _stopping, then notifies, so a
            # blocked poll returns and this test sees the flag.
            while not self._stopping:
                ctx._pass(None)
        except BaseException:
            logger.exception("%r: loop stopped by an exception", self)
            raise
        finally:
            ctx.close()

    def stop(self) -> None:
        """Ask the loop to finish; return at once. No-op once stopped. Thread: any."""
        if self._stopping:
            return
        self._stopping = True
        ctx = self._ctx
        if ctx is not None:
            ctx.notify()

    def join(self, timeout: float | None = None) -> None:
        """Stop, let the loop run what is queued, close the context, join the thread.

        TimeoutError if it has not finished in time. Idempotent. Thread: any
        but the IOThread's own.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{self!r}.join() called from the IOThread itself")
        self.stop()
        if timeout is not None and timeout >= threading.TIMEOUT_MAX:
            timeout = None  # longer than the OS can wait for: as good as forever
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self!r} did not finish within {timeout} s")

    def is_alive(self) -> bool:
        """Whether the thread runs. Thread: any."""
        return self._thread.is_alive()

    def __enter__(self) -> IOThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.join()
