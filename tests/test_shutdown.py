"""Clean shutdown (issue 8): closing a context cancels what is suspended on it.

Checks API.md, the Contexts `close()` row and section "Cancellation and
timeouts": `IOThread.join()` (which closes its context) cancels every
coroutine still suspended there, whatever it waits in, and runs its
`finally:` blocks exactly once without a ResourceWarning; a coroutine that
refuses to finish is named in a ResourceWarning and close() stays bounded;
a real SIGINT during `corun.run()` runs the cleanup of every coroutine
before KeyboardInterrupt propagates; and nothing keeps 10,000 cancelled
coroutines (or their greenlets) alive once the user drops them.

A close racing producers that never stop is covered by
test_reliability.py (test_iothread_join_bounded_while_producers_never_stop:
bounded, every accepted callback ran exactly once) and test_context.py
(test_close_racing_producers_drops_nothing); it is not repeated here.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import greenlet
import pytest
from helpers import drain

import corun
from corun import (
    AioContext,
    Cancelled,
    CoMutex,
    CoQueue,
    Coroutine,
    CoSleep,
    IOThread,
    wait_readable,
    yield_,
)

# Bound for anything that should happen "at once": it only turns a hang into a failure.
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


@pytest.fixture
def reports() -> Recorder:
    return Recorder()


def quiesce(t: IOThread) -> None:
    """Return once the coroutine running on `t` (if any) has yielded to its loop."""
    t.ctx.call_sync(lambda: None)


def resource_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


# -- IOThread.join() cancels what is suspended -------------------------------------------


@pytest.mark.timeout(15)
def test_iothread_join_cancels_suspended_coroutines_and_runs_finally(reports: Recorder) -> None:
    t = IOThread("shutdown")
    reports.watch(t.ctx)
    finals: Counter[str] = Counter()  # written by t's thread only
    ready: dict[str, threading.Event] = {}
    q = CoQueue()
    m = CoMutex()
    never = CoQueue()  # nobody ever wakes it
    nap = CoSleep()
    rfd, wfd = os.pipe()
    coros: dict[str, Coroutine[Any]] = {}

    def spawn(name: str, wait: Callable[[], object], catch: bool = False) -> None:
        ready[name] = threading.Event()

        def body() -> str:
            try:
                ready[name].set()
                wait()
            except Cancelled:
                if not catch:
                    raise
                return "caught"
            finally:
                finals[name] += 1
            return "not cancelled"

        coros[name] = t.ctx.spawn(body, name=name)
        assert ready[name].wait(QUICK)
        quiesce(t)

    def hold_forever() -> None:
        with m:
            never.wait()

    try:
        spawn("sleep", lambda: corun.sleep(100))
        spawn("CoSleep", lambda: nap.sleep(100))
        spawn("CoQueue.wait", q.wait)
        spawn("CoMutex holder", hold_forever)
        spawn("CoMutex.acquire", m.acquire)
        spawn("wait_readable", lambda: wait_readable(rfd))
        spawn("yield_", yield_)
        spawn("join target", lambda: corun.sleep(100))
        spawn("join", coros["join target"].join)
        spawn("catches Cancelled", lambda: corun.sleep(100), catch=True)

        assert m.holder is coros["CoMutex holder"]
        assert list(m._waiters) == [coros["CoMutex.acquire"]]
        assert len(q) == 1 and len(never) == 1
        assert not any(co.done for co in coros.values())
        assert finals == Counter()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.join(timeout=10)
        assert resource_warnings(caught) == []
    finally:
        os.close(rfd)
        os.close(wfd)
        if t.is_alive():
            t.join(QUICK)

    assert all(co.done for co in coros.values())
    for name, co in coros.items():
        if name == "catches Cancelled":
            assert not co.cancelled() and co.result() == "caught"
        else:
            assert co.cancelled(), f"{co!r} was not cancelled"
            with pytest.raises(Cancelled):
                co.result()
    assert finals == Counter({name: 1 for name in coros})
    assert not m.locked() and len(m._waiters) == 0
    assert len(q) == 0 and len(never) == 0
    assert not t.ctx._live
    assert reports.seen == []


# -- a coroutine that refuses to finish ---------------------------------------------------


def stubborn_body(refusals: list[int]) -> Callable[[], None]:
    """Catches Cancelled and waits again, forever."""

    def stubborn() -> None:
        while True:
            try:
                corun.sleep(100)
            except Cancelled:
                refusals[0] += 1

    return stubborn


def polite_body(finals: list[str], name: str) -> Callable[[], None]:
    def polite() -> None:
        try:
            corun.sleep(100)
        finally:
            finals.append(name)

    return polite


@pytest.mark.timeout(10)
def test_refusing_coroutine_is_named_at_close_of_main_thread_context(reports: Recorder) -> None:
    ctx = AioContext("stubborn-main")
    reports.watch(ctx)
    refusals = [0]
    finals: list[str] = []
    stubborn = ctx.spawn(stubborn_body(refusals), name="refuses-to-die")
    polite = ctx.spawn(polite_body(finals, "polite"), name="polite")
    drain(ctx)
    assert not stubborn.done and not polite.done

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        ctx.close(grace=0.2)
        elapsed = time.monotonic() - start
    assert elapsed < QUICK, f"close(grace=0.2) took {elapsed:.1f} s"
    found = resource_warnings(caught)
    assert len(found) == 1, found
    assert "refuses-to-die" in found[0] and "polite" not in found[0]
    assert refusals[0] >= 1  # cancelled (and refused) at least once
    assert not stubborn.done
    assert polite.cancelled() and finals == ["polite"]
    assert reports.seen == []


@pytest.mark.timeout(15)
def test_refusing_coroutine_is_named_at_iothread_join(reports: Recorder) -> None:
    t = IOThread("stubborn-io")
    reports.watch(t.ctx)
    refusals = [0]
    finals: list[str] = []
    started = threading.Event()

    def stubborn() -> None:
        started.set()
        stubborn_body(refusals)()

    co = t.ctx.spawn(stubborn, name="refuses-to-die-io")
    polite = t.ctx.spawn(polite_body(finals, "polite-io"), name="polite-io")
    assert started.wait(QUICK)
    quiesce(t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        t.join(timeout=10)  # the default grace: 1 s
        elapsed = time.monotonic() - start
    assert elapsed < 8, f"IOThread.join() took {elapsed:.1f} s"
    found = resource_warnings(caught)
    assert len(found) == 1, found
    assert "refuses-to-die-io" in found[0] and "polite-io" not in found[0]
    assert refusals[0] >= 1
    assert not co.done
    assert polite.cancelled() and finals == ["polite-io"]
    assert reports.seen == []


# -- a real SIGINT during corun.run() -----------------------------------------------------

# argv[1]: "idle" (the signal comes while the loop waits in epoll) or "busy"
# (while a callback runs Python code). A watchdog in the signalling thread
# wakes the loop with notify() if no KeyboardInterrupt came 3 s after the
# signal, and says so ("signal lost"), so a lost signal cannot hang the test.
SIGINT_CHILD = textwrap.dedent(
    """
    import signal
    import sys
    import threading
    import time

    import corun

    MODE = sys.argv[1]
    parked = threading.Event()
    interrupted = threading.Event()
    contexts = []

    def busy():
        parked.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pass  # the KeyboardInterrupt lands here
        print("busy loop ended without a signal", flush=True)

    def child(i):
        try:
            if i == 2:
                # Runs at the next loop pass, once all three children are parked.
                corun.current_context().call_soon(parked.set if MODE == "idle" else busy)
            corun.sleep(100)
        finally:
            print(f"finally child {i}", flush=True)

    def main():
        ctx = corun.current_context()
        contexts.append(ctx)
        kids = [ctx.spawn(child, i, name=f"child-{i}") for i in range(3)]
        try:
            for kid in kids:
                kid.join()
        finally:
            print("finally main", flush=True)

    def interrupt():
        if not parked.wait(10):
            print("the children never parked", flush=True)
            return
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if not interrupted.wait(3):
            print("signal lost", flush=True)
            contexts[0].notify()

    threading.Timer(0, interrupt).start()
    try:
        corun.run(main)
    except KeyboardInterrupt:
        interrupted.set()
        print("KeyboardInterrupt", flush=True)
    else:
        print("run() returned", flush=True)
    """
)


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_real_sigint_during_run_runs_every_finally(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_CHILD, mode],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(corun.__file__))),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    lost = "signal lost" in lines
    if lost:
        lines.remove("signal lost")
    expected = ["finally child 0", "finally child 1", "finally child 2", "finally main"]
    assert Counter(lines) == Counter([*expected, "KeyboardInterrupt"]), (proc.stdout, proc.stderr)
    assert lines[-1] == "KeyboardInterrupt"  # every finally ran before it propagated
    # A SIGINT that lands after the loop's last check and before epoll_wait
    # must still wake the loop at once (the signal wake-up fd), not at its next
    # wake-up (here the watchdog's notify(); without it, 100 s later).
    assert not lost, "a SIGINT just before the loop blocked waited for its next wake-up"


# -- memory: nothing keeps cancelled coroutines alive ---------------------------------------


def live(kind: type) -> int:
    """How many objects of `kind` the garbage collector tracks, after a collection."""
    gc.collect()
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def park_cancel_join(n: int, reports: Recorder) -> None:
    """n coroutines park in CoQueue.wait() on an IOThread, which is then joined.

    Everything it creates is local: once it returns, the test holds none of it.
    """
    t = IOThread("memory")
    reports.watch(t.ctx)
    q = CoQueue()
    parked = [0]  # written by t's thread only
    all_parked = threading.Event()
    finals = [0]

    def waiter() -> None:
        try:
            parked[0] += 1
            if parked[0] == n:
                all_parked.set()
            q.wait()
        finally:
            finals[0] += 1

    def spawn_all() -> list[Coroutine[None]]:
        return [t.ctx.spawn(waiter) for _ in range(n)]

    coros = t.ctx.call_sync(spawn_all)
    assert all_parked.wait(10)
    quiesce(t)
    assert len(q) == n
    assert len(t.ctx._live) == n
    assert live(greenlet.greenlet) >= n  # the count sees them

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.join(timeout=20)
    assert resource_warnings(caught) == []
    assert sum(co.cancelled() for co in coros) == n
    assert finals[0] == n
    assert len(q) == 0
    assert not t.ctx._live  # the closed context holds none of them


@pytest.mark.timeout(30)
def test_ten_thousand_cancelled_coroutines_are_freed(reports: Recorder) -> None:
    greenlets_before = live(greenlet.greenlet)
    coroutines_before = live(Coroutine)
    park_cancel_join(10_000, reports)
    assert reports.seen == []
    greenlets_after = live(greenlet.greenlet)
    assert greenlets_after <= greenlets_before + 5, (
        f"{greenlets_after - greenlets_before} greenlets still alive after the join"
    )
    coroutines_after = live(Coroutine)
    assert coroutines_after <= coroutines_before + 5, (
        f"{coroutines_after - coroutines_before} Coroutine objects still alive after the join"
    )
