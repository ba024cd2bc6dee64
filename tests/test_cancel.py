"""Tests for cancellation and timeout scopes (issue 8, first slice).

Checks API.md, section "Cancellation and timeouts": `Coroutine.cancel()`
from any thread (before start, while suspended in each cancellable wait,
while running, in a bare `yield_()`), `Coroutine.cancelled()`, and the
`timeout()` / `move_on_after()` scopes.

Synchronisation is by events and joins only. A coroutine on the main
thread's context is known to be suspended once `drain(ctx)` returns (the
loop runs only when we poll it); one on an IOThread, once it set an Event
right before its wait and a `call_sync` round trip through its loop came
back (`quiesce`). Every context gets an exception handler that records what
it hears: cancellation is not an error, so each test ends by asserting that
it heard nothing.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Recorder, drain

import corun
from corun import (
    AioContext,
    CoMutex,
    Coroutine,
    CoSleep,
    IOThread,
    current_coroutine,
    run_in_thread,
    sleep,
    wait_readable,
    wait_writable,
    wake,
    yield_,
)

pytestmark = pytest.mark.timeout(10)

# Generous bound for "at once": a cancelled 10 s wait must end well before.
QUICK = 5.0


@pytest.fixture
def reports() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(reports: Recorder) -> Iterator[AioContext]:
    """A context owned by the main thread (the test), watched by `reports`."""
    with AioContext("test-cancel") as c:
        reports.watch(c)
        yield c


def iothread(name: str, reports: Recorder) -> IOThread:
    t = IOThread(name)
    reports.watch(t.ctx)
    return t


def quiesce(t: IOThread) -> None:
    """Return once the coroutine running on `t` (if any) has yielded to its loop."""
    t.ctx.call_sync(lambda: None)


def wait_for(predicate: Callable[[], bool], timeout: float = QUICK) -> None:
    """Poll `predicate` until it holds; only for states no Event can announce."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def parked(co: Coroutine[Any], started: threading.Event) -> bool:
    """`co` has started (set `started`) and now waits: neither running, queued nor done."""
    return started.is_set() and not co.entered and not co.scheduled and not co.done


def socket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def fill(sock: socket.socket) -> None:
    """Fill `sock`'s send buffer until it is no longer writable."""
    chunk = b"x" * 65536
    while True:
        try:
            sock.send(chunk)
        except BlockingIOError:
            return


def empty(sock: socket.socket) -> None:
    """Read everything that is waiting on `sock`."""
    while True:
        try:
            if not sock.recv(1 << 20):
                return
        except BlockingIOError:
            return


# -- the cancellable waits ----------------------------------------------------


class WaitKind:
    """One kind of cancellable wait.

    `block()` (in a coroutine) waits until cancelled: nothing ends it
    otherwise during the test. `again()` (in the same coroutine, after a
    cancelled `block()`) is a wait of the same kind, on the same object,
    that completes normally: it checks that the cancelled wait cleaned up.
    `close()` (in the test, any thread) releases what the kind holds.
    """

    name = ""

    def block(self) -> None:
        raise NotImplementedError

    def again(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SleepKind(WaitKind):
    name = "sleep"

    def block(self) -> None:
        sleep(10)

    def again(self) -> None:
        # The sleep flag was dropped: sleep(0) would find it still held.
        sleep(0)
        start = time.monotonic()
        sleep(0.02)
        assert time.monotonic() - start >= 0.02


class CoSleepKind(WaitKind):
    name = "CoSleep"

    def __init__(self) -> None:
        self.s = CoSleep()

    def block(self) -> None:
        self.s.sleep(10)

    def again(self) -> None:
        # The nap was withdrawn: a second sleeper on the same CoSleep is fine.
        start = time.monotonic()
        self.s.sleep(0.02)
        assert time.monotonic() - start >= 0.02


class ReadableKind(WaitKind):
    name = "wait_readable"

    def __init__(self) -> None:
        self.a, self.b = socket_pair()

    def block(self) -> None:
        wait_readable(self.a)

    def again(self) -> None:
        # The handler was removed: installing a new one on the fd is fine.
        self.b.send(b"x")
        assert wait_readable(self.a, timeout=QUICK) is True

    def close(self) -> None:
        self.a.close()
        self.b.close()


class WritableKind(WaitKind):
    name = "wait_writable"

    def __init__(self) -> None:
        self.a, self.b = socket_pair()
        fill(self.a)

    def block(self) -> None:
        wait_writable(self.a)

    def again(self) -> None:
        empty(self.b)
        assert wait_writable(self.a, timeout=QUICK) is True

    def close(self) -> None:
        self.a.close()
        self.b.close()


class JoinKind(WaitKind):
    """Join another coroutine (of the same context) that waits for a flag."""

    name = "join"

    def __init__(self) -> None:
        self.s = CoSleep()
        self.released = False
        self.other: Coroutine[str] | None = None

    def _other(self) -> str:
        while not self.released:
            self.s.sleep(10)
        return "other"

    def block(self) -> None:
        me = current_coroutine()
        assert me is not None and me.ctx is not None
        self.other = me.ctx.spawn(self._other, name="joined")
        self.other.join()

    def again(self) -> None:
        # Same thread as `other`: no race between the flag and the wake.
        assert self.other is not None
        self.released = True
        self.s.wake()
        assert self.other.join() == "other"

    def close(self) -> None:
        other = self.other
        if other is not None and not other.done:
            assert other.ctx is not None
            other.ctx.call_sync(self._release)
        if other is not None:
            assert other.join(QUICK) == "other"

    def _release(self) -> None:
        self.released = True
        self.s.wake()


class CallSyncKind(WaitKind):
    """call_sync() to another IOThread whose loop is stuck until `gate` is set."""

    name = "call_sync"

    def __init__(self, reports: Recorder) -> None:
        self.gate = threading.Event()
        self.t = iothread("call-sync-target", reports)

    def block(self) -> None:
        self.t.ctx.call_sync(self.gate.wait, QUICK)

    def again(self) -> None:
        self.gate.set()
        assert self.t.ctx.call_sync(lambda: 7) == 7

    def close(self) -> None:
        self.gate.set()
        self.t.join(QUICK)


class RunInThreadKind(WaitKind):
    name = "run_in_thread"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.ran = threading.Event()

    def _blocking(self) -> str:
        self.ran.set()
        self.gate.wait(QUICK)
        return "dropped"

    def block(self) -> None:
        run_in_thread(self._blocking)

    def again(self) -> None:
        self.gate.set()
        assert run_in_thread(lambda: 7) == 7

    def close(self) -> None:
        self.gate.set()


KINDS = ["sleep", "CoSleep", "wait_readable", "wait_writable", "join", "call_sync", "run_in_thread"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, reports: Recorder) -> Iterator[WaitKind]:
    name = request.param
    k: WaitKind
    if name == "sleep":
        k = SleepKind()
    elif name == "CoSleep":
        k = CoSleepKind()
    elif name == "wait_readable":
        k = ReadableKind()
    elif name == "wait_writable":
        k = WritableKind()
    elif name == "join":
        k = JoinKind()
    elif name == "call_sync":
        k = CallSyncKind(reports)
    else:
        k = RunInThreadKind()
    try:
        yield k
    finally:
        k.close()


def blocked_body(
    kind: WaitKind, log: list[str], ready: threading.Event | None = None
) -> Callable[[], str]:
    """A coroutine body that blocks in `kind` and records its cleanup."""

    def body() -> str:
        log.append("start")
        try:
            if ready is not None:
                ready.set()
            kind.block()
            log.append("wait returned")
        finally:
            log.append("finally")
        log.append("after")
        return "not cancelled"

    return body


# -- Cancelled ---------------------------------------------------------------


def test_cancelled_is_a_base_exception_not_an_exception() -> None:
    assert issubclass(corun.Cancelled, BaseException)
    assert not issubclass(corun.Cancelled, Exception)
    assert "Cancelled" in corun.__all__


def test_except_exception_does_not_swallow_cancelled(ctx: AioContext, reports: Recorder) -> None:
    def body() -> str:
        try:
            sleep(10)
        except Exception:
            return "swallowed"
        return "not cancelled"

    co = ctx.spawn(body)
    drain(ctx)
    assert co.cancel() is True
    with pytest.raises(corun.Cancelled):
        co.join(QUICK)
    assert co.cancelled() is True
    assert reports.seen == []


# -- before it starts ----------------------------------------------------------


def test_cancel_never_scheduled_coroutine(reports: Recorder) -> None:
    ran: list[str] = []
    co: Coroutine[None] = Coroutine(ran.append, "ran")
    assert co.cancel("too late to start") is True
    assert co.done is True
    assert co.cancelled() is True
    exc = co.exception()
    assert isinstance(exc, corun.Cancelled)
    assert exc.args == ("too late to start",)
    assert "too late to start" in str(exc)
    with pytest.raises(corun.Cancelled, match="too late to start"):
        co.join()
    with pytest.raises(corun.Cancelled, match="too late to start"):
        co.result()
    # Finished now: a second cancel changes nothing.
    assert co.cancel("again") is False
    assert co.exception() is exc
    assert ran == []
    # It can no longer be started anywhere.
    with AioContext("never-started") as c:
        reports.watch(c)
        with pytest.raises(RuntimeError):
            c.schedule(co)
        drain(c)
    assert ran == []
    assert reports.seen == []


def test_cancel_scheduled_coroutine_before_it_runs(ctx: AioContext, reports: Recorder) -> None:
    ran: list[str] = []
    co = ctx.spawn(ran.append, "ran")
    assert co.cancel("never mind") is True
    assert co.cancel() is True  # not finished yet: harmless
    drain(ctx)
    assert co.done is True
    assert co.cancelled() is True
    assert ran == []
    exc = co.exception()
    assert isinstance(exc, corun.Cancelled)
    assert "never mind" in exc.args
    assert "never mind" in str(exc)
    with pytest.raises(corun.Cancelled):
        co.join(QUICK)
    with pytest.raises(corun.Cancelled):
        co.result()
    assert co.cancel() is False
    assert reports.seen == []


def test_cancel_scheduled_coroutine_on_busy_iothread_from_main_thread(
    reports: Recorder,
) -> None:
    ran: list[str] = []
    gate = threading.Event()
    with iothread("busy", reports) as t:
        t.ctx.call_soon(gate.wait, QUICK)  # its loop is stuck until we set the gate
        co = t.ctx.spawn(ran.append, "ran")
        assert co.cancel() is True
        gate.set()
        with pytest.raises(corun.Cancelled):
            co.join(QUICK)
    assert co.cancelled() is True
    assert ran == []
    assert reports.seen == []


# -- finished ----------------------------------------------------------------


def test_cancel_finished_coroutine_returns_false(ctx: AioContext, reports: Recorder) -> None:
    def fails() -> None:
        raise ValueError("boom")

    ok = ctx.spawn(lambda: 42)
    assert ok.join(QUICK) == 42
    bad = ctx.spawn(fails)
    with pytest.raises(ValueError, match="boom"):
        bad.join(QUICK)
    assert ok.cancelled() is False
    assert bad.cancelled() is False
    assert ok.cancel() is False
    assert bad.cancel("late") is False
    assert ok.cancelled() is False
    assert bad.cancelled() is False
    assert ok.result() == 42
    assert isinstance(bad.exception(), ValueError)
    # The ValueError may or may not have gone to the handler (the join took
    # it); nothing else did.
    assert all(isinstance(exc, ValueError) for _, exc, _ in reports.seen)


def test_cancelled_is_false_while_not_done(ctx: AioContext) -> None:
    co = ctx.spawn(sleep, 10)
    drain(ctx)
    assert co.cancelled() is False
    co.cancel()
    with pytest.raises(corun.Cancelled):
        co.join(QUICK)
    assert co.cancelled() is True


# -- suspended in a cancellable wait --------------------------------------------


def test_cancel_wait_from_home_thread(ctx: AioContext, reports: Recorder, kind: WaitKind) -> None:
    log: list[str] = []
    co = ctx.spawn(blocked_body(kind, log))
    drain(ctx)
    assert log == ["start"]
    assert not co.done
    start = time.monotonic()
    assert co.cancel(f"stop {kind.name}") is True
    with pytest.raises(corun.Cancelled) as info:
        co.join(QUICK)
    assert time.monotonic() - start < QUICK
    assert f"stop {kind.name}" in info.value.args
    assert log == ["start", "finally"]
    assert co.done is True
    assert co.cancelled() is True
    assert isinstance(co.exception(), corun.Cancelled)
    assert co.cancel() is False
    kind.close()
    drain(ctx)
    assert reports.seen == []


def test_caught_cancel_lets_coroutine_finish_and_next_wait_works(
    ctx: AioContext, reports: Recorder, kind: WaitKind
) -> None:
    log: list[str] = []

    def body() -> int:
        try:
            kind.block()
            log.append("wait returned")
        except corun.Cancelled as exc:
            log.append(f"caught {exc.args}")
        kind.again()
        log.append("again done")
        return 5

    co = ctx.spawn(body)
    drain(ctx)
    assert co.cancel("x") is True
    assert co.join(QUICK) == 5
    assert co.cancelled() is False
    assert co.exception() is None
    assert log == ["caught ('x',)", "again done"]
    assert co.cancel() is False
    kind.close()
    drain(ctx)
    assert reports.seen == []


def test_cancel_wait_from_another_thread(reports: Recorder, kind: WaitKind) -> None:
    log: list[str] = []
    ready = threading.Event()
    with iothread("waiter", reports) as t:
        co = t.ctx.spawn(blocked_body(kind, log, ready))
        assert ready.wait(QUICK)
        quiesce(t)
        assert not co.done
        start = time.monotonic()
        assert co.cancel() is True
        with pytest.raises(corun.Cancelled):
            co.join(QUICK)
        assert time.monotonic() - start < QUICK
        assert log == ["start", "finally"]
        assert co.cancelled() is True
        kind.close()
        quiesce(t)
    assert reports.seen == []


def test_cancel_wait_from_coroutine_on_another_iothread(reports: Recorder, kind: WaitKind) -> None:
    log: list[str] = []
    ready = threading.Event()
    with iothread("waiter", reports) as t1, iothread("canceller", reports) as t2:
        co = t1.ctx.spawn(blocked_body(kind, log, ready))
        assert ready.wait(QUICK)
        quiesce(t1)

        def canceller() -> tuple[bool, bool]:
            first = co.cancel("from t2")
            with pytest.raises(corun.Cancelled):
                co.join()  # a coroutine joining the cancelled one sees Cancelled too
            return first, co.cancelled()

        c = t2.ctx.spawn(canceller)
        assert c.join(QUICK) == (True, True)
        assert log == ["start", "finally"]
        kind.close()
        quiesce(t1)
    assert reports.seen == []


def test_cancelled_sleep_leaves_no_stale_timer(ctx: AioContext, reports: Recorder) -> None:
    """The timer of a cancelled sleep does not end a later sleep early."""

    def body() -> float:
        try:
            sleep(0.3)
        except corun.Cancelled:
            pass
        start = time.monotonic()
        sleep(0.6)  # a stale timer would wake us at about 0.3 s
        return time.monotonic() - start

    co = ctx.spawn(body)
    drain(ctx)
    co.cancel()
    assert co.join(QUICK) >= 0.6
    assert reports.seen == []


def test_cancelled_fd_wait_removes_its_handler(ctx: AioContext, reports: Recorder) -> None:
    a, b = socket_pair()
    with a, b:
        fill(a)
        r = ctx.spawn(wait_readable, a)
        w = ctx.spawn(wait_writable, a)
        drain(ctx)
        r.cancel()
        w.cancel()
        for co in (r, w):
            with pytest.raises(corun.Cancelled):
                co.join(QUICK)
        assert ctx.remove_reader(a) is False
        assert ctx.remove_writer(a) is False
        # And the fd works again for a new waiter.
        r2 = ctx.spawn(wait_readable, a, QUICK)
        drain(ctx)
        b.send(b"x")
        assert r2.join(QUICK) is True
    assert reports.seen == []


def test_cancelled_joiner_is_not_woken_when_the_joined_finishes(
    ctx: AioContext, reports: Recorder
) -> None:
    s = CoSleep()
    log: list[str] = []

    def target() -> str:
        s.sleep(10)
        return "target"

    def joiner(name: str) -> str:
        try:
            return t.join()
        except corun.Cancelled:
            log.append(f"{name} cancelled")
            raise

    t = ctx.spawn(target)
    j1 = ctx.spawn(joiner, "j1")
    j2 = ctx.spawn(joiner, "j2")
    drain(ctx)
    assert j1.cancel() is True
    with pytest.raises(corun.Cancelled):
        j1.join(QUICK)
    assert not t.done and not j2.done
    s.wake()
    assert j2.join(QUICK) == "target"
    assert t.result() == "target"
    assert log == ["j1 cancelled"]
    assert j1.cancelled() is True
    assert reports.seen == []


def test_cancelled_run_in_thread_drops_the_result(ctx: AioContext, reports: Recorder) -> None:
    gate = threading.Event()
    running = threading.Event()
    finished = threading.Event()

    def blocking() -> str:
        running.set()
        gate.wait(QUICK)
        finished.set()
        return "dropped"

    def body() -> str:
        return run_in_thread(blocking)

    co = ctx.spawn(body)
    drain(ctx)
    assert running.wait(QUICK)
    co.cancel()
    with pytest.raises(corun.Cancelled):
        co.join(QUICK)
    assert not finished.is_set()  # the coroutine did not wait for the worker
    gate.set()
    assert finished.wait(QUICK)
    # A later run_in_thread on the same context works.
    assert ctx.spawn(run_in_thread, lambda: 7).join(QUICK) == 7
    assert co.cancelled() is True
    assert reports.seen == []


# -- running -------------------------------------------------------------------


@pytest.mark.parametrize("wait", ["sleep(0)", "sleep(10)", "wait_readable", "join"])
def test_self_cancel_raises_at_next_wait_before_suspending(
    ctx: AioContext, reports: Recorder, wait: str
) -> None:
    log: list[str] = []
    a_sock, b_sock = socket_pair()
    b_sock.send(b"x")  # readable: a wait that would not even suspend
    lingering = ctx.spawn(sleep, 10)

    def body() -> None:
        me = current_coroutine()
        assert me is not None
        assert me.cancel("self") is True
        log.append("A still running")
        assert me.done is False
        try:
            if wait == "sleep(0)":
                sleep(0)
            elif wait == "sleep(10)":
                sleep(10)
            elif wait == "wait_readable":
                wait_readable(a_sock)
            else:
                lingering.join()
            log.append("A wait returned")
        except corun.Cancelled as exc:
            log.append(f"A cancelled {exc.args}")
            raise

    with a_sock, b_sock:
        a = ctx.spawn(body)
        ctx.spawn(log.append, "B")  # runs only once A suspends or finishes
        with pytest.raises(corun.Cancelled):
            a.join(QUICK)
        drain(ctx)
        assert log == ["A still running", "A cancelled ('self',)", "B"]
        assert a.cancelled() is True
        lingering.cancel()
        with pytest.raises(corun.Cancelled):
            lingering.join(QUICK)
    assert reports.seen == []


def test_cancel_twice_raises_once(ctx: AioContext, reports: Recorder) -> None:
    def body() -> int:
        me = current_coroutine()
        assert me is not None
        assert me.cancel() is True
        assert me.cancel() is True
        caught = 0
        try:
            sleep(0)
        except corun.Cancelled:
            caught += 1
        sleep(0)
        sleep(0.01)
        CoSleep().sleep(0.01)
        return caught

    co = ctx.spawn(body)
    assert co.join(QUICK) == 1
    assert co.cancelled() is False
    assert reports.seen == []


# -- bare yield_() ----------------------------------------------------------------


def test_bare_yield_is_not_interrupted_home_thread(ctx: AioContext, reports: Recorder) -> None:
    log: list[str] = []

    def body() -> None:
        try:
            yield_()
            log.append("yield returned")
        except corun.Cancelled:
            log.append("cancelled at resume")
            raise

    co = ctx.spawn(body)
    drain(ctx)
    assert co.cancel() is True
    drain(ctx)  # the loop may run cancel()'s own work, but must not resume it
    assert co.done is False
    assert log == []
    ctx.spawn(wake, co)  # a coroutine resumes it
    with pytest.raises(corun.Cancelled):
        co.join(QUICK)
    assert log == ["cancelled at resume"]
    assert co.cancelled() is True
    assert reports.seen == []


def test_bare_yield_is_not_interrupted_from_another_thread(reports: Recorder) -> None:
    log: list[str] = []
    ready = threading.Event()

    def body() -> None:
        ready.set()
        try:
            yield_()
            log.append("yield returned")
        except corun.Cancelled:
            log.append("cancelled at resume")
            raise

    with iothread("yielder", reports) as t:
        co = t.ctx.spawn(body)
        assert ready.wait(QUICK)
        quiesce(t)
        assert co.cancel() is True
        quiesce(t)
        quiesce(t)
        assert co.done is False
        assert log == []
        wake(co)
        with pytest.raises(corun.Cancelled):
            co.join(QUICK)
        assert log == ["cancelled at resume"]
        assert co.cancelled() is True
    assert reports.seen == []


# -- CoMutex (not a cancellation point in this slice) ----------------------------


def test_cancel_while_parked_on_comutex_keeps_it_exclusive(
    ctx: AioContext, reports: Recorder
) -> None:
    m = CoMutex()
    inside = [0]
    most = [0]
    log: list[str] = []

    def critical(name: str) -> None:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        log.append(f"{name} in")

    def leave() -> None:
        inside[0] -= 1

    def holder() -> None:
        with m:
            critical("H")
            yield_()  # parked until the test wakes it
            leave()

    def waiter(name: str) -> None:
        with m:
            critical(name)
            try:
                sleep(0)
            finally:
                leave()

    h = ctx.spawn(holder)
    w = ctx.spawn(waiter, "W")
    c = ctx.spawn(waiter, "C")
    drain(ctx)
    assert m.holder is h
    assert w.cancel() is True
    drain(ctx)
    assert m.holder is h and m.locked()
    assert log == ["H in"]
    ctx.spawn(wake, h)
    h.join(QUICK)
    c.join(QUICK)
    try:
        w.join(QUICK)
    except corun.Cancelled:
        pass
    assert w.done and (w.cancelled() or w.exception() is None)
    assert c.result() is None
    assert most[0] == 1
    assert inside[0] == 0
    assert m.locked() is False
    assert m.holder is None
    # The mutex still works.
    assert ctx.spawn(lambda: (m.acquire(), m.release(), "ok")[2]).join(QUICK) == "ok"
    assert reports.seen == []


def test_cancel_while_parked_on_comutex_across_iothreads(reports: Recorder) -> None:
    m = CoMutex()
    lock = threading.Lock()
    inside = [0]
    most = [0]
    s = CoSleep()
    h_started = threading.Event()
    w_started = threading.Event()
    c_started = threading.Event()

    def enter_critical() -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])

    def leave_critical() -> None:
        with lock:
            inside[0] -= 1

    def holder() -> None:
        with m:
            enter_critical()
            h_started.set()
            s.sleep(10)
            leave_critical()

    def waiter(started: threading.Event) -> str:
        started.set()
        with m:
            enter_critical()
            try:
                sleep(0)
            finally:
                leave_critical()
        return "done"

    with (
        iothread("holder", reports) as t1,
        iothread("cancelled", reports) as t2,
        iothread("contender", reports) as t3,
    ):
        h = t1.ctx.spawn(holder)
        assert h_started.wait(QUICK)
        w = t2.ctx.spawn(waiter, w_started)
        wait_for(lambda: parked(w, w_started))
        c = t3.ctx.spawn(waiter, c_started)
        wait_for(lambda: parked(c, c_started))
        assert w.cancel() is True
        quiesce(t2)
        assert m.holder is h
        s.wake()
        h.join(QUICK)
        assert c.join(QUICK) == "done"
        try:
            w.join(QUICK)
        except corun.Cancelled:
            pass
        assert w.done and (w.cancelled() or w.result() == "done")
        assert most[0] == 1
        assert inside[0] == 0
        assert m.locked() is False
        assert m.holder is None
        assert t1.ctx.spawn(lambda: (m.acquire(), m.release(), "ok")[2]).join(QUICK) == "ok"
    assert reports.seen == []


# -- timeout scopes ----------------------------------------------------------------


def test_timeout_raises_timeout_error_at_exit(ctx: AioContext, reports: Recorder) -> None:
    log: list[str] = []

    def body() -> str:
        start = time.monotonic()
        try:
            with corun.timeout(0.05):
                try:
                    sleep(10)
                    log.append("after sleep")
                finally:
                    log.append("finally")
            log.append("after block")
        except TimeoutError:
            log.append("TimeoutError")
        assert time.monotonic() - start < QUICK
        sleep(0.01)  # no Cancelled leaks out of the scope
        return "survived"

    co = ctx.spawn(body)
    assert co.join(QUICK) == "survived"
    assert log == ["finally", "TimeoutError"]
    assert co.cancelled() is False
    assert reports.seen == []


def test_timeout_uncaught_finishes_coroutine_with_timeout_error(
    ctx: AioContext, reports: Recorder
) -> None:
    def body() -> None:
        with corun.timeout(0.05):
            sleep(10)

    co = ctx.spawn(body)
    with pytest.raises(TimeoutError):
        co.join(QUICK)
    assert co.cancelled() is False
    # An ordinary error: the handler may have heard of it, as of any other.
    assert all(isinstance(exc, TimeoutError) for _, exc, _ in reports.seen)


def test_timeout_in_time_raises_nothing_and_disarms(ctx: AioContext, reports: Recorder) -> None:
    def body() -> float:
        with corun.timeout(0.05):
            sleep(0)
        start = time.monotonic()
        sleep(0.2)  # spans the old deadline: the scope must not fire afterwards
        return time.monotonic() - start

    co = ctx.spawn(body)
    assert co.join(QUICK) >= 0.2
    assert co.cancelled() is False
    assert reports.seen == []


def test_move_on_after_leaves_quietly(ctx: AioContext, reports: Recorder) -> None:
    log: list[str] = []

    def body() -> bool:
        start = time.monotonic()
        with corun.move_on_after(0.05) as scope:
            try:
                sleep(10)
                log.append("after sleep")
            finally:
                log.append("finally")
        log.append("after block")
        assert time.monotonic() - start < QUICK
        sleep(0.01)  # no Cancelled leaks out of the scope
        log.append("slept")
        return bool(scope.cancelled_caught)

    co = ctx.spawn(body)
    assert co.join(QUICK) is True
    assert log == ["finally", "after block", "slept"]
    assert co.cancelled() is False
    assert reports.seen == []


def test_move_on_after_in_time(ctx: AioContext, reports: Recorder) -> None:
    def body() -> tuple[bool, float]:
        with corun.move_on_after(0.05) as scope:
            sleep(0)
        start = time.monotonic()
        sleep(0.2)  # spans the old deadline: the scope must not fire afterwards
        return scope.cancelled_caught, time.monotonic() - start

    co = ctx.spawn(body)
    caught, slept = co.join(QUICK)
    assert caught is False
    assert slept >= 0.2
    assert co.cancelled() is False
    assert reports.seen == []


def test_outer_expiry_goes_through_inner_timeout(ctx: AioContext, reports: Recorder) -> None:
    log: list[str] = []

    def body() -> bool:
        with corun.move_on_after(0.05) as outer:
            try:
                with corun.timeout(10):
                    sleep(10)
                    log.append("after sleep")
            except TimeoutError:
                log.append("inner TimeoutError")
            log.append("after inner")
        log.append("after outer")
        return bool(outer.cancelled_caught)

    co = ctx.spawn(body)
    assert co.join(QUICK) is True
    assert log == ["after outer"]
    assert reports.seen == []


def test_inner_move_on_after_inside_outer_timeout(ctx: AioContext, reports: Recorder) -> None:
    log: list[str] = []

    def body() -> bool:
        with corun.timeout(10):
            with corun.move_on_after(0.05) as inner:
                sleep(10)
                log.append("after sleep")
            log.append("after inner")
            sleep(0.01)
            log.append("slept")
        log.append("after outer")
        return bool(inner.cancelled_caught)

    co = ctx.spawn(body)
    assert co.join(QUICK) is True
    assert log == ["after inner", "slept", "after outer"]
    assert reports.seen == []


def test_inner_move_on_after_inside_outer_move_on_after(ctx: AioContext, reports: Recorder) -> None:
    def body() -> tuple[bool, bool, list[str]]:
        log: list[str] = []
        with corun.move_on_after(10) as outer:
            with corun.move_on_after(0.05) as inner:
                sleep(10)
                log.append("after sleep")
            log.append("after inner")
        return outer.cancelled_caught, inner.cancelled_caught, log

    co = ctx.spawn(body)
    assert co.join(QUICK) == (False, True, ["after inner"])
    assert reports.seen == []


def test_explicit_cancel_is_not_swallowed_by_move_on_after(reports: Recorder) -> None:
    scopes: list[Any] = []
    log: list[str] = []
    ready = threading.Event()

    def body() -> None:
        with corun.move_on_after(10) as scope:
            scopes.append(scope)
            ready.set()
            try:
                sleep(10)
            finally:
                log.append("finally")
        log.append("after block")

    with iothread("scoped", reports) as t:
        co = t.ctx.spawn(body)
        assert ready.wait(QUICK)
        quiesce(t)
        assert co.cancel() is True
        with pytest.raises(corun.Cancelled):
            co.join(QUICK)
    assert co.cancelled() is True
    assert scopes[0].cancelled_caught is False
    assert log == ["finally"]
    assert reports.seen == []


@pytest.mark.parametrize("scope_first", [True, False])
def test_explicit_cancel_is_not_swallowed_by_a_fired_scope(
    ctx: AioContext, reports: Recorder, scope_first: bool
) -> None:
    """The scope fired and an explicit cancel() is pending too: the cancel wins."""
    scopes: list[Any] = []
    log: list[str] = []

    def body() -> None:
        me = current_coroutine()
        assert me is not None
        with corun.move_on_after(10) as scope:
            scopes.append(scope)
            if scope_first:
                scope.cancel()
                me.cancel()
            else:
                me.cancel()
                scope.cancel()
            sleep(0)
            log.append("after sleep")
        log.append("after block")

    co = ctx.spawn(body)
    with pytest.raises(corun.Cancelled):
        co.join(QUICK)
    assert co.cancelled() is True
    assert scopes[0].cancelled_caught is False
    assert log == []
    assert reports.seen == []


@pytest.mark.parametrize("fire", ["inner", "outer", "both"])
def test_nested_scopes_fired_by_cancel_are_exact(
    ctx: AioContext, reports: Recorder, fire: str
) -> None:
    """Each scope catches its own cancellation only, whichever scopes fired."""

    def body() -> tuple[bool, bool, list[str]]:
        log: list[str] = []
        with corun.move_on_after(10) as outer:
            with corun.move_on_after(10) as inner:
                if fire in ("inner", "both"):
                    inner.cancel()
                if fire in ("outer", "both"):
                    outer.cancel()
                sleep(0)
                log.append("after sleep")
            log.append("after inner")
            sleep(0)
            log.append("after second sleep")
        log.append("after outer")
        return outer.cancelled_caught, inner.cancelled_caught, log

    co = ctx.spawn(body)
    expected = {
        "inner": (False, True, ["after inner", "after second sleep", "after outer"]),
        "outer": (True, False, ["after outer"]),
        "both": (True, False, ["after outer"]),
    }
    assert co.join(QUICK) == expected[fire]
    assert co.cancelled() is False
    assert reports.seen == []


def test_scope_cancel_from_another_thread(reports: Recorder) -> None:
    scopes: list[Any] = []
    log: list[str] = []
    ready = threading.Event()

    def body() -> bool:
        start = time.monotonic()
        with corun.move_on_after(10) as scope:
            scopes.append(scope)
            ready.set()
            sleep(10)
            log.append("after sleep")
        log.append("after block")
        assert time.monotonic() - start < QUICK
        sleep(0.01)
        log.append("slept")
        return bool(scope.cancelled_caught)

    with iothread("scoped", reports) as t:
        co = t.ctx.spawn(body)
        assert ready.wait(QUICK)
        quiesce(t)
        scopes[0].cancel()
        assert co.join(QUICK) is True
    assert co.cancelled() is False
    assert log == ["after block", "slept"]
    assert reports.seen == []


def test_scope_deadline_during_fd_wait_removes_handler(ctx: AioContext, reports: Recorder) -> None:
    a, b = socket_pair()

    def body() -> tuple[bool, bool]:
        with corun.move_on_after(0.05) as scope:
            wait_readable(a)  # nothing is ever written before the deadline
        me = current_coroutine()
        assert me is not None and me.ctx is not None
        me.ctx.call_later(0.02, b.send, b"x")
        return scope.cancelled_caught, wait_readable(a, timeout=QUICK)

    with a, b:
        co = ctx.spawn(body)
        assert co.join(QUICK) == (True, True)
        assert ctx.remove_reader(a) is False
    assert reports.seen == []


@pytest.mark.parametrize("scope_kind", ["timeout", "move_on_after"])
def test_infinite_scopes_never_fire(ctx: AioContext, reports: Recorder, scope_kind: str) -> None:
    make = corun.timeout if scope_kind == "timeout" else corun.move_on_after

    def body() -> str:
        with make(math.inf) as scope:
            sleep(0.05)
        if scope_kind == "move_on_after":
            assert scope.cancelled_caught is False
        return "done"

    co = ctx.spawn(body)
    assert co.join(QUICK) == "done"
    assert reports.seen == []


@pytest.mark.parametrize("scope_kind", ["timeout", "move_on_after"])
def test_scope_outside_coroutine_raises(scope_kind: str) -> None:
    make = corun.timeout if scope_kind == "timeout" else corun.move_on_after
    ran: list[str] = []
    with pytest.raises(RuntimeError):
        with make(1):
            ran.append("body")
    assert ran == []
