"""Cancellation and timeouts on the coroutine locks (issue 8): CoMutex, CoQueue, CoRwLock.

Checks API.md, section "Cancellation and timeouts", on the lock waits: a
cancelled waiter raises `Cancelled`, leaves the queue it waited in, and a
wake-up or hand-off that raced the cancel is passed on, never lost;
`timeout=` returns False and leaves the queue; `CoRwLock.upgrade()` is not a
cancellation point; cancel scopes around lock waits.

Synchronisation is by events, joins and `call_sync` only. A coroutine on
the main thread's context is known to be suspended once `drain(ctx)`
returns (its loop runs only when the test polls it); one on an IOThread,
once it set an Event right before its wait and a `call_sync` round trip
through its loop came back (`quiesce`). Every context gets an exception
handler that records what it hears: cancellation is not an error, so the
tests end by asserting that it heard nothing.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Recorder, drain, in_other_thread

import corun
from corun import (
    AioContext,
    Cancelled,
    CoMutex,
    CoQueue,
    Coroutine,
    CoRwLock,
    IOThread,
    current_coroutine,
    move_on_after,
    wake,
    yield_,
)

# Bound for anything that should happen "at once" (a join of a finished or
# cancelled coroutine): generous, it only turns a hang into a failure.
QUICK = 5.0

ORIGINS = ["home", "thread", "iothread"]


@pytest.fixture
def reports() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(reports: Recorder) -> Iterator[AioContext]:
    """A context owned by the main thread (the test), watched by `reports`."""
    with AioContext("test-cancel-locks") as c:
        reports.watch(c)
        yield c


def iothread(name: str, reports: Recorder) -> IOThread:
    t = IOThread(name)
    reports.watch(t.ctx)
    return t


def quiesce(t: IOThread) -> None:
    """Return once the coroutine running on `t` (if any) has yielded to its loop."""
    t.ctx.call_sync(lambda: None)


def me() -> Coroutine[Any]:
    co = current_coroutine()
    assert co is not None
    return co


def outcome(co: Coroutine[Any], timeout: float = QUICK) -> object:
    """Join `co`: its result, or the string "cancelled" if it finished cancelled."""
    try:
        return co.join(timeout)
    except Cancelled:
        assert co.cancelled()
        return "cancelled"


def cancel_from(origin: str, co: Coroutine[Any], reports: Recorder) -> None:
    """co.cancel() from `origin`: the calling (home) thread, a plain thread, another
    IOThread's coroutine."""
    if origin == "home":
        assert co.cancel() is True
    elif origin == "thread":
        assert in_other_thread(co.cancel) == (True, True)
    else:
        with iothread("canceller", reports) as t:
            assert t.ctx.spawn(co.cancel, name="canceller").join(QUICK) is True


def holder_body(m: CoMutex, log: list[str]) -> Callable[[], None]:
    """Takes `m`, yields until the test wakes it, releases `m`."""

    def holder() -> None:
        m.acquire()
        log.append("H in")
        yield_()
        log.append("H out")
        m.release()

    return holder


def waiter_body(m: CoMutex, log: list[str], name: str) -> Callable[[], str]:
    """acquire(); record whether it got in or was cancelled (and who held `m` then)."""

    def waiter() -> str:
        try:
            m.acquire()
        except Cancelled:
            holder = m.holder
            log.append(f"{name} cancelled, held by {holder.name if holder else None}")
            raise
        log.append(f"{name} in")
        m.release()
        return name

    return waiter


def assert_mutex_free(m: CoMutex) -> None:
    assert not m.locked()
    assert m.holder is None
    assert len(m._waiters) == 0


# -- CoMutex: cancel a parked acquire() -------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("origin", ORIGINS)
def test_mutex_cancel_parked_acquire_on_main_context(
    ctx: AioContext, reports: Recorder, origin: str
) -> None:
    m = CoMutex()
    log: list[str] = []
    h = ctx.spawn(holder_body(m, log), name="H")
    w = ctx.spawn(waiter_body(m, log, "W"), name="W")
    drain(ctx)
    assert m.holder is h and list(m._waiters) == [w]

    cancel_from(origin, w, reports)
    drain(ctx)
    assert w.cancelled()
    with pytest.raises(Cancelled):
        w.result()
    # It left the queue; the holder keeps the mutex.
    assert len(m._waiters) == 0
    assert m.holder is h and m.locked()

    late = ctx.spawn(waiter_body(m, log, "L"), name="L")
    drain(ctx)
    assert list(m._waiters) == [late]
    wake(h)  # releases: the mutex goes to L, not to the cancelled W
    drain(ctx)
    assert late.result() == "L"
    assert h.result() is None
    assert log == ["H in", "W cancelled, held by H", "H out", "L in"]
    assert_mutex_free(m)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("origin", ORIGINS)
def test_mutex_cancel_parked_acquire_across_iothreads(reports: Recorder, origin: str) -> None:
    """Holder on t1, waiter on t2; cancelled from t2's thread, a plain thread, or t3."""
    m = CoMutex()
    gate = CoQueue()
    log: list[str] = []
    h_in = threading.Event()
    w_started = threading.Event()
    l_started = threading.Event()

    def holder() -> None:
        with m:
            log.append("H in")
            h_in.set()
            gate.wait()
            log.append("H out")

    def waiter(name: str, started: threading.Event) -> str:
        started.set()
        return waiter_body(m, log, name)()

    with iothread("holder", reports) as t1, iothread("waiter", reports) as t2:
        h = t1.ctx.spawn(holder, name="H")
        assert h_in.wait(QUICK)
        quiesce(t1)
        w = t2.ctx.spawn(waiter, "W", w_started, name="W")
        assert w_started.wait(QUICK)
        quiesce(t2)
        assert list(m._waiters) == [w]

        if origin == "home":
            assert t2.ctx.call_sync(w.cancel) is True  # t2's thread, outside coroutines
        else:
            cancel_from(origin, w, reports)
        assert outcome(w) == "cancelled"
        assert len(m._waiters) == 0
        assert m.holder is h and m.locked()

        late = t2.ctx.spawn(waiter, "L", l_started, name="L")
        assert l_started.wait(QUICK)
        quiesce(t2)
        assert list(m._waiters) == [late]
        assert gate.next() is True
        assert late.join(QUICK) == "L"
        assert h.join(QUICK) is None
    assert log == ["H in", "W cancelled, held by H", "H out", "L in"]
    assert_mutex_free(m)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("order", ["release-then-cancel", "cancel-then-release"])
def test_mutex_hand_off_racing_cancel_is_passed_on(
    ctx: AioContext, reports: Recorder, order: str
) -> None:
    """The holder hands the mutex to A and A is cancelled before it runs: B gets it."""
    m = CoMutex()
    log: list[str] = []
    peers: dict[str, Coroutine[Any]] = {}

    def holder() -> None:
        m.acquire()
        log.append("H in")
        yield_()
        # One stretch of code, no yield: the hand-off to A and the cancel of A
        # both happen before A can run.
        if order == "release-then-cancel":
            m.release()
            assert m.holder is peers["A"]  # handed off, A not yet running
            assert peers["A"].cancel() is True
        else:
            assert peers["A"].cancel() is True
            m.release()
            assert m.holder is peers["A"]
        log.append("H out")

    h = ctx.spawn(holder, name="H")
    a = peers["A"] = ctx.spawn(waiter_body(m, log, "A"), name="A")
    b = ctx.spawn(waiter_body(m, log, "B"), name="B")
    drain(ctx)
    assert list(m._waiters) == [a, b]
    wake(h)
    drain(ctx)
    assert h.result() is None
    assert a.cancelled()
    assert b.result() == "B"
    # A was cancelled while the mutex was handed to it: acquire() passed it on to B
    # before Cancelled left it.
    assert log == ["H in", "H out", "A cancelled, held by B", "B in"]
    assert_mutex_free(m)
    assert reports.seen == []


# -- CoMutex: acquire(timeout=...) ------------------------------------------------------


@pytest.mark.timeout(10)
def test_mutex_acquire_timeout_returns_false_when_held(ctx: AioContext, reports: Recorder) -> None:
    m = CoMutex()
    log: list[str] = []
    h = ctx.spawn(holder_body(m, log), name="H")

    def timed() -> tuple[bool, bool, int]:
        got = m.acquire(timeout=0.05)
        return got, m.holder is me(), len(m._waiters)

    drain(ctx)
    w = ctx.spawn(timed, name="timed")
    assert w.join(QUICK) == (False, False, 0)  # join on the home thread runs the loop
    assert m.holder is h and m.locked()
    # timeout=0 on a held mutex: False at once, and nothing queued.
    assert ctx.spawn(lambda: (m.acquire(timeout=0), len(m._waiters))).join(QUICK) == (False, 0)

    wake(h)
    drain(ctx)
    assert_mutex_free(m)

    # Free: a timed acquire gets it at once.
    def timed_free() -> tuple[bool, bool, int]:
        try:
            return timed()
        finally:
            m.release()

    assert ctx.spawn(timed_free, name="timed-free").join(QUICK) == (True, True, 0)
    assert_mutex_free(m)
    assert reports.seen == []


@pytest.mark.timeout(10)
def test_mutex_acquire_timeout_returns_true_when_handed_in_time(
    ctx: AioContext, reports: Recorder
) -> None:
    m = CoMutex()
    log: list[str] = []
    h = ctx.spawn(holder_body(m, log), name="H")

    def timed() -> tuple[bool, bool]:
        got = m.acquire(timeout=QUICK)
        held = m.holder is me()
        if got:
            m.release()
        return got, held

    drain(ctx)
    w = ctx.spawn(timed, name="timed")
    drain(ctx)
    assert list(m._waiters) == [w]
    wake(h)
    assert w.join(QUICK) == (True, True)
    assert_mutex_free(m)
    assert reports.seen == []


# -- CoMutex: hand-off racing cancel, stressed --------------------------------------------


class Stress:
    """Shared bookkeeping of the stress test (any thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.acquisitions = 0
        self.timeouts = 0
        self.counter = 0  # written only inside the CoMutex, on purpose without a lock

    def enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.acquisitions += 1

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


def stress_worker(m: CoMutex, st: Stress, k: int, rounds: int) -> str:
    for r in range(rounds):
        if k == 0 and r == 1:
            if not m.acquire(timeout=0.0005):
                with st.lock:
                    st.timeouts += 1
                continue
        else:
            m.acquire()
        try:
            st.enter()
            v = st.counter
            if k == 1 and r == 2:
                time.sleep(0)  # let the other threads run: a second holder would lose updates
            st.counter = v + 1
            corun.sleep(0)  # a cancellation point while holding the mutex
        finally:
            st.leave()
            m.release()
    return "done"


@pytest.mark.timeout(30)
def test_mutex_hand_off_racing_cancel_stress(reports: Recorder) -> None:
    """Coroutines on 3 IOThreads lock a shared CoMutex while the test cancels waiters.

    Mutual exclusion holds, no acquisition is lost, every coroutine finishes
    (normally or cancelled), and the mutex never ends up held by nobody with
    waiters queued.
    """
    iterations, per_thread, rounds = 2000, 3, 4
    m = CoMutex()
    st = Stress()
    rng = random.Random(20268)
    finished = {"done": 0, "cancelled": 0}
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads often
    threads = [iothread(f"stress-{i}", reports) for i in range(3)]
    try:
        for it in range(iterations):
            cos = [
                t.ctx.spawn(stress_worker, m, st, k, rounds, name=f"w{it}.{n}.{k}")
                for n, t in enumerate(threads)
                for k in range(per_thread)
            ]
            budget = rng.randint(1, 3)
            spins = 0
            while budget and spins < 200 and not all(co.done for co in cos):
                spins += 1
                try:
                    queued = list(m._waiters)
                except RuntimeError:  # mutated while we copied it
                    continue
                if queued:
                    rng.choice(queued).cancel()
                    budget -= 1
                elif rng.random() < 0.01:
                    rng.choice(cos).cancel()  # maybe running, maybe not started
                    budget -= 1
            for co in cos:
                got = outcome(co, 10.0)
                assert got in ("done", "cancelled"), f"{co!r}: {got!r}"
                finished[str(got)] += 1
            assert st.most == 1, f"iteration {it}: {st.most} holders at once"
            assert not m.locked(), f"iteration {it}: {m!r} left locked"
            assert m.holder is None
            assert len(m._waiters) == 0, f"iteration {it}: {m!r} has waiters left"
    finally:
        sys.setswitchinterval(old_interval)
        for t in threads:
            t.join(QUICK)
    assert st.inside == 0
    assert st.counter == st.acquisitions
    assert finished["done"] + finished["cancelled"] == iterations * 3 * per_thread
    assert finished["cancelled"] > 0
    assert reports.seen == []


# -- CoQueue.wait() -----------------------------------------------------------------------

LOCKS = ["none", "comutex", "comutex-contended"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("origin", ["home", "thread"])
@pytest.mark.parametrize("lock", LOCKS)
def test_queue_wait_cancelled(ctx: AioContext, reports: Recorder, lock: str, origin: str) -> None:
    """Cancelled in wait(): it left the queue, and holds the lock again when Cancelled
    propagates (even when another coroutine held the lock at the cancel)."""
    q = CoQueue()
    m = CoMutex()
    use = None if lock == "none" else m
    seen: list[object] = []

    def waiter() -> str:
        co = me()
        if use is not None:
            use.acquire()
        try:
            q.wait(use)
        except Cancelled:
            seen.append(m.holder is co if use is not None else "no lock")
            seen.append(len(q))
            raise
        finally:
            if use is not None:
                use.release()
        return "woken"

    w = ctx.spawn(waiter, name="W")
    drain(ctx)
    assert list(q._waiters) == [w]
    assert not m.locked()  # wait() released it
    other = None
    if lock == "comutex-contended":
        other = ctx.spawn(holder_body(m, []), name="other")
        drain(ctx)
        assert m.holder is other

    cancel_from(origin, w, reports)
    drain(ctx)
    assert len(q) == 0
    if other is not None:
        # W left the queue but waits for the mutex (not a cancellation point).
        assert not w.done
        assert list(m._waiters) == [w]
        wake(other)
        drain(ctx)
        assert other.result() is None
    assert w.cancelled()
    assert seen == [True if use is not None else "no lock", 0]
    assert_mutex_free(m)
    # The queue works as before.
    w2 = ctx.spawn(q.wait, name="W2")
    drain(ctx)
    assert q.next() is True
    drain(ctx)
    assert w2.result() is True
    assert q.next() is False
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("lock", ["none", "comutex"])
def test_queue_wait_timeout_returns_false(ctx: AioContext, reports: Recorder, lock: str) -> None:
    q = CoQueue()
    m = CoMutex()
    use = None if lock == "none" else m

    def waiter() -> tuple[bool, int, bool]:
        if use is not None:
            use.acquire()
        try:
            got = q.wait(use, timeout=0.05)
            return got, len(q), m.holder is me()
        finally:
            if use is not None:
                use.release()

    w = ctx.spawn(waiter, name="W")
    assert w.join(QUICK) == (False, 0, use is not None)
    assert q.next() is False
    assert_mutex_free(m)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("lock", ["none", "comutex"])
def test_queue_wait_timeout_woken_in_time_returns_true(
    ctx: AioContext, reports: Recorder, lock: str
) -> None:
    q = CoQueue()
    m = CoMutex()
    use = None if lock == "none" else m

    def waiter() -> tuple[bool, int, bool]:
        if use is not None:
            use.acquire()
        try:
            got = q.wait(use, timeout=QUICK)
            return got, len(q), m.holder is me()
        finally:
            if use is not None:
                use.release()

    w = ctx.spawn(waiter, name="W")
    drain(ctx)
    assert list(q._waiters) == [w]
    assert q.next() is True
    assert w.join(QUICK) == (True, 0, use is not None)
    assert_mutex_free(m)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("waker", ["plain-thread", "coroutine"])
@pytest.mark.parametrize("lock", ["none", "comutex"])
def test_queue_wake_racing_cancel_is_passed_on(
    ctx: AioContext, reports: Recorder, waker: str, lock: str
) -> None:
    """next() pops A and A is cancelled before it runs: B is woken, A finishes cancelled."""
    q = CoQueue()
    m = CoMutex()
    use = None if lock == "none" else m
    log: list[str] = []

    def waiter(name: str) -> str:
        if use is not None:
            use.acquire()
        try:
            q.wait(use)
            log.append(f"{name} woken")
        except Cancelled:
            log.append(f"{name} cancelled")
            raise
        finally:
            if use is not None:
                assert m.holder is me()
                use.release()
        return name

    a = ctx.spawn(waiter, "A", name="A")
    b = ctx.spawn(waiter, "B", name="B")
    drain(ctx)
    assert list(q._waiters) == [a, b]

    if waker == "plain-thread":
        # next() from another thread schedules A here; the loop does not run
        # until we poll, so A is cancelled before it runs.
        assert in_other_thread(q.next) == (True, True)
        assert list(q._waiters) == [b]
        assert a.cancel() is True
    else:

        def wake_and_cancel() -> None:
            # A's wake-up is deferred until this coroutine finishes.
            assert q.next() is True
            assert a.cancel() is True

        ctx.spawn(wake_and_cancel, name="waker")
    drain(ctx)
    assert a.cancelled()
    assert b.result() == "B"
    assert log == ["A cancelled", "B woken"]
    assert len(q) == 0
    assert_mutex_free(m)
    assert reports.seen == []


# -- CoRwLock -----------------------------------------------------------------------------


def assert_rwlock_free(lock: CoRwLock) -> None:
    assert lock._owners == 0
    assert lock._writer is None
    assert lock._readers == {}
    assert len(lock._tickets) == 0
    assert "free, 0 waiting" in repr(lock)
    assert_mutex_free(lock._mutex)


def rw_holder(lock: CoRwLock, write: bool, log: list[str], name: str) -> Callable[[], None]:
    """Takes a read or the write hold, yields until the test wakes it, unlocks."""

    def holder() -> None:
        if write:
            lock.wrlock()
        else:
            lock.rdlock()
        log.append(f"{name} in")
        yield_()
        log.append(f"{name} out")
        lock.unlock()

    return holder


def rw_waiter(lock: CoRwLock, write: bool, log: list[str], name: str) -> Callable[[], str]:
    def waiter() -> str:
        try:
            if write:
                lock.wrlock()
            else:
                lock.rdlock()
        except Cancelled:
            log.append(f"{name} cancelled")
            raise
        log.append(f"{name} in")
        lock.unlock()
        log.append(f"{name} out")
        return name

    return waiter


def assert_rwlock_works(ctx: AioContext, lock: CoRwLock) -> None:
    """A writer, then two readers at once, lock and unlock; the lock ends free."""
    log: list[str] = []
    w = ctx.spawn(rw_holder(lock, True, log, "w"), name="w")
    r1 = ctx.spawn(rw_holder(lock, False, log, "r1"), name="r1")
    r2 = ctx.spawn(rw_holder(lock, False, log, "r2"), name="r2")
    drain(ctx)
    assert log == ["w in"] and lock._writer is w and len(lock._tickets) == 2
    wake(w)
    drain(ctx)
    assert log == ["w in", "w out", "r1 in", "r2 in"]
    assert lock._owners == 2
    wake(r1)
    wake(r2)
    drain(ctx)
    for co in (w, r1, r2):
        assert co.result() is None
    assert_rwlock_free(lock)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("origin", ["home", "thread"])
def test_rwlock_rdlock_cancelled_while_queued(
    ctx: AioContext, reports: Recorder, origin: str
) -> None:
    lock = CoRwLock()
    log: list[str] = []
    w = ctx.spawn(rw_holder(lock, True, log, "W"), name="W")
    r = ctx.spawn(rw_waiter(lock, False, log, "R"), name="R")
    drain(ctx)
    assert lock._writer is w and len(lock._tickets) == 1
    cancel_from(origin, r, reports)
    drain(ctx)
    assert r.cancelled()
    assert lock._owners == -1 and lock._writer is w
    assert len(lock._tickets) == 0 and lock._readers == {}
    wake(w)
    drain(ctx)
    assert w.result() is None
    assert log == ["W in", "R cancelled", "W out"]
    assert_rwlock_free(lock)
    assert_rwlock_works(ctx, lock)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("origin", ["home", "thread"])
def test_rwlock_wrlock_cancelled_while_queued(
    ctx: AioContext, reports: Recorder, origin: str
) -> None:
    lock = CoRwLock()
    log: list[str] = []
    r = ctx.spawn(rw_holder(lock, False, log, "R"), name="R")
    w = ctx.spawn(rw_waiter(lock, True, log, "W"), name="W")
    drain(ctx)
    assert lock._owners == 1 and len(lock._tickets) == 1
    cancel_from(origin, w, reports)
    drain(ctx)
    assert w.cancelled()
    assert lock._owners == 1 and lock._writer is None and len(lock._tickets) == 0
    # The writer's ticket is gone: a new reader gets in at once, beside R.
    r2 = ctx.spawn(rw_waiter(lock, False, log, "R2"), name="R2")
    drain(ctx)
    assert r2.result() == "R2"
    wake(r)
    drain(ctx)
    assert r.result() is None
    assert log == ["R in", "W cancelled", "R2 in", "R2 out", "R out"]
    assert_rwlock_free(lock)
    assert_rwlock_works(ctx, lock)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("origin", ["home", "thread"])
def test_rwlock_cancelled_writer_lets_readers_behind_it_in(
    ctx: AioContext, reports: Recorder, origin: str
) -> None:
    """R1 reads; W queues; R2 queues behind W; cancelling W lets R2 in beside R1."""
    lock = CoRwLock()
    log: list[str] = []
    r1 = ctx.spawn(rw_holder(lock, False, log, "R1"), name="R1")
    w = ctx.spawn(rw_waiter(lock, True, log, "W"), name="W")
    r2 = ctx.spawn(rw_holder(lock, False, log, "R2"), name="R2")
    drain(ctx)
    assert log == ["R1 in"]
    assert lock._owners == 1 and len(lock._tickets) == 2
    cancel_from(origin, w, reports)
    drain(ctx)
    assert w.cancelled()
    # R2 is in while R1 still reads: the withdrawn ticket no longer blocks it.
    assert log == ["R1 in", "W cancelled", "R2 in"]
    assert lock._owners == 2 and set(lock._readers) == {r1, r2}
    assert len(lock._tickets) == 0
    wake(r1)
    wake(r2)
    drain(ctx)
    assert r1.result() is None and r2.result() is None
    assert_rwlock_free(lock)
    assert_rwlock_works(ctx, lock)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("want", ["rdlock", "wrlock"])
def test_rwlock_timeout_returns_false_when_not_in_time(
    ctx: AioContext, reports: Recorder, want: str
) -> None:
    lock = CoRwLock()
    log: list[str] = []
    # A writer blocks both kinds; a reader blocks a writer.
    holder = ctx.spawn(rw_holder(lock, want == "rdlock", log, "H"), name="H")
    drain(ctx)

    def timed() -> tuple[bool, int]:
        got = lock.rdlock(timeout=0.05) if want == "rdlock" else lock.wrlock(timeout=0.05)
        return got, len(lock._tickets)

    w = ctx.spawn(timed, name="timed")
    behind = None
    if want == "wrlock":
        # A reader queued behind the timed writer gets in once the writer gives up.
        behind = ctx.spawn(rw_waiter(lock, False, log, "R2"), name="R2")
    # Gave up and left no ticket (the reader behind a timed-out writer went in then).
    assert w.join(QUICK) == (False, 0)
    drain(ctx)
    if behind is not None:
        assert behind.result() == "R2"
    assert lock._writer is (holder if want == "rdlock" else None)
    assert lock._owners == (-1 if want == "rdlock" else 1)
    assert len(lock._tickets) == 0
    wake(holder)
    drain(ctx)
    assert holder.result() is None
    assert_rwlock_free(lock)
    assert_rwlock_works(ctx, lock)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("want", ["rdlock", "wrlock"])
def test_rwlock_timeout_returns_true_when_in_time(
    ctx: AioContext, reports: Recorder, want: str
) -> None:
    lock = CoRwLock()
    log: list[str] = []

    def timed() -> tuple[bool, bool]:
        got = lock.rdlock(timeout=QUICK) if want == "rdlock" else lock.wrlock(timeout=QUICK)
        co = me()
        holds = lock._writer is co if want == "wrlock" else co in lock._readers
        lock.unlock()
        return got, holds

    # Free: in at once.
    assert ctx.spawn(timed, name="timed-free").join(QUICK) == (True, True)
    holder = ctx.spawn(rw_holder(lock, want == "rdlock", log, "H"), name="H")
    drain(ctx)
    w = ctx.spawn(timed, name="timed")
    drain(ctx)
    assert len(lock._tickets) == 1
    wake(holder)
    assert w.join(QUICK) == (True, True)
    assert holder.result() is None
    assert_rwlock_free(lock)
    assert reports.seen == []


@pytest.mark.timeout(10)
def test_rwlock_upgrade_is_not_a_cancellation_point(ctx: AioContext, reports: Recorder) -> None:
    """A cancel while upgrade() waits does not interrupt it: the coroutine gets the
    write hold, and Cancelled comes at its next cancellable wait."""
    lock = CoRwLock()
    log: list[str] = []

    def upgrader() -> None:
        co = me()
        lock.rdlock()
        try:
            lock.upgrade()
            log.append(f"upgraded, writer={lock._writer is co}, cancelling={co.cancelling()}")
            try:
                corun.sleep(0)
            except Cancelled:
                log.append("cancelled at sleep(0)")
                raise
            log.append("not cancelled")
        finally:
            lock.unlock()

    other = ctx.spawn(rw_holder(lock, False, log, "R"), name="R")
    u = ctx.spawn(upgrader, name="U")
    drain(ctx)
    assert log == ["R in"]
    assert lock._owners == 1 and len(lock._tickets) == 1  # U gave up its read hold to queue
    assert u.cancel() is True
    drain(ctx)
    assert not u.done  # still waiting in upgrade()
    assert log == ["R in"]
    wake(other)  # R unlocks: U is let in as the writer
    drain(ctx)
    assert u.cancelled()
    assert log == ["R in", "R out", "upgraded, writer=True, cancelling=1", "cancelled at sleep(0)"]
    assert other.result() is None
    assert_rwlock_free(lock)
    assert_rwlock_works(ctx, lock)
    assert reports.seen == []


# -- cancel scopes around lock waits ----------------------------------------------------


@pytest.mark.timeout(10)
def test_move_on_after_around_mutex_acquire(ctx: AioContext, reports: Recorder) -> None:
    m = CoMutex()
    log: list[str] = []
    h = ctx.spawn(holder_body(m, log), name="H")
    drain(ctx)

    def bounded() -> tuple[bool, bool, int, bool]:
        got = False
        with move_on_after(0.05) as s:
            got = m.acquire()
        return s.cancelled_caught, got or m.holder is me(), len(m._waiters), me().cancelling() > 0

    w = ctx.spawn(bounded, name="bounded")
    assert w.join(QUICK) == (True, False, 0, False)
    assert m.holder is h
    wake(h)
    drain(ctx)
    assert_mutex_free(m)
    assert reports.seen == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("lock", ["none", "comutex"])
def test_move_on_after_around_queue_wait(ctx: AioContext, reports: Recorder, lock: str) -> None:
    q = CoQueue()
    m = CoMutex()
    use = None if lock == "none" else m

    def bounded() -> tuple[bool, bool, int, bool]:
        co = me()
        if use is not None:
            use.acquire()
        try:
            woken = False
            with move_on_after(0.05) as s:
                woken = q.wait(use)
            holds = m.holder is co
            return s.cancelled_caught, woken, len(q), holds
        finally:
            if use is not None:
                use.release()

    w = ctx.spawn(bounded, name="bounded")
    assert w.join(QUICK) == (True, False, 0, use is not None)
    assert q.next() is False
    assert_mutex_free(m)
    assert reports.seen == []
