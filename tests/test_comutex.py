"""Tests for corun.comutex: CoMutex.

/locking/co-mutex and /locking/co-mutex/lockable port QEMU's
tests/unit/test-coroutine.c; /aio/multi/mutex/contended and
/aio/multi/mutex/handoff port tests/unit/test-aio-multithread.c. The rest
checks the contract of API.md: FIFO order, direct hand-off without barging,
`holder`, the context manager and the misuse errors.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import warnings
from collections import deque

import pytest
from helpers import drain, in_other_thread

from corun import (
    AioContext,
    CoMutex,
    Coroutine,
    IOThread,
    current_coroutine,
    wake,
    yield_,
)

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-comutex") as c:
        yield c


def wait_for(predicate, timeout=10.0):
    """Poll `predicate` until it holds; for states no Event can announce.

    A coroutine's last action before it queues on a mutex is inside
    acquire(), so the only way to see that it queued is to watch it stop
    running.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def suspended(co, started):
    """`co` has started (it set `started`) and now waits (neither running nor queued)."""
    return started.is_set() and not co.entered and not co.scheduled and not co.done


# -- QEMU /locking/co-mutex ----------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("with_context", [False, True], ids=["no-context", "context"])
@pytest.mark.parametrize("style", ["mutex", "lockable"])
def test_co_mutex(style, with_context):
    """/locking/co-mutex and /locking/co-mutex/lockable (lockable: `with m:`).

    c1 takes the lock and yields; c2 queues. Entering c1 again unlocks,
    which queues c2: it runs as soon as c1 terminates, takes the lock and
    yields; entering c2 again finishes it.
    """
    m = CoMutex()
    state = {"locked": False, "done": 0}

    def mutex_fn():
        m.acquire()
        assert not state["locked"]
        state["locked"] = True
        yield_()
        state["locked"] = False
        m.release()
        state["done"] += 1

    def lockable_fn():
        with m:
            assert not state["locked"]
            state["locked"] = True
            yield_()
            state["locked"] = False
        state["done"] += 1

    entry = mutex_fn if style == "mutex" else lockable_fn
    with AioContext() if with_context else contextlib.nullcontext():
        c1 = Coroutine(entry)
        c2 = Coroutine(entry)

        c1.enter()
        assert state == {"locked": True, "done": 0}
        assert m.locked() and m.holder is c1

        c2.enter()
        assert state == {"locked": True, "done": 0}
        assert not c2.done and m.holder is c1

        # Unlock queues c2; it starts when c1 terminates.
        c1.enter()
        assert state == {"locked": True, "done": 1}
        assert c1.done and not c2.done
        assert m.locked() and m.holder is c2

        c2.enter()
        assert state == {"locked": False, "done": 2}
        assert not m.locked() and m.holder is None
        # Assertions inside c2 ran in a deferred wake-up: surface them.
        assert c1.result() is None and c2.result() is None


# -- QEMU /aio/multi/mutex/* ---------------------------------------------------


def run_multi_co_mutex(nthreads, seconds, per_thread=1, gil_release_inside=False):
    """test_multi_co_mutex: `nthreads` IOThreads each loop lock/counter++/unlock.

    `per_thread` coroutines run on each IOThread; `gil_release_inside` lets
    the other threads run in the middle of the critical section, so that
    nearly every lock queues and is handed off.

    The atomic counter is incremented *after* the release (as in QEMU), so a
    coroutine that is still waiting for a hand-off when we stop cannot make
    the two counts differ spuriously: every coroutine is joined first.
    """
    m = CoMutex()
    stopping = threading.Event()
    state = {"counter": 0}
    atomic = {"counter": 0}
    atomic_lock = threading.Lock()
    violations = []

    def entry():
        me = current_coroutine()
        while not stopping.is_set():
            m.acquire()
            if m.holder is not me:
                violations.append(("holder", m.holder, me))
            # A read-modify-write spread over two statements: a second
            # coroutine inside would lose updates.
            n = state["counter"]
            if gil_release_inside:
                time.sleep(0)
            state["counter"] = n + 1
            m.release()
            with atomic_lock:
                atomic["counter"] += 1

    with contextlib.ExitStack() as stack:
        threads = [stack.enter_context(IOThread(f"mutex-{i}")) for i in range(nthreads)]
        # Runs first on the way out, so a failing test never hangs in join.
        stack.callback(stopping.set)
        cos = [
            t.ctx.spawn(entry, name=f"locker-{i}-{j}")
            for i, t in enumerate(threads)
            for j in range(per_thread)
        ]
        time.sleep(seconds)  # the length of the run, not a synchronisation
        stopping.set()
        for co in cos:
            co.join(timeout=30)
    assert violations == []
    assert state["counter"] == atomic["counter"]
    assert state["counter"] > 0
    assert not m.locked() and m.holder is None


@pytest.mark.timeout(30)
def test_multi_co_mutex_contended():
    """/aio/multi/mutex/contended: 5 IOThreads for 1 s; focuses on the queue."""
    run_multi_co_mutex(5, 1)


@pytest.mark.timeout(30)
def test_multi_co_mutex_handoff():
    """/aio/multi/mutex/handoff: 2 IOThreads for 3 s; stresses the hand-off protocol."""
    run_multi_co_mutex(2, 3)


@pytest.mark.timeout(30)
def test_multi_co_mutex_queue_and_handoff():
    """Not in QEMU: 3 IOThreads x 2 coroutines for 1 s, each critical section
    letting the other threads run, so that almost every acquire queues and
    every release hands off, across threads and within one."""
    run_multi_co_mutex(3, 1, per_thread=2, gil_release_inside=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_multi_co_mutex_contended_10s():
    """/aio/multi/mutex/contended, the 10 s variant."""
    run_multi_co_mutex(5, 10)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_multi_co_mutex_handoff_30s():
    """/aio/multi/mutex/handoff, the 30 s variant."""
    run_multi_co_mutex(2, 30)


# -- FIFO and direct hand-off --------------------------------------------------


@pytest.mark.timeout(10)
def test_waiters_get_the_mutex_in_fifo_order(ctx):
    m = CoMutex()
    order = []

    def holder():
        m.acquire()
        yield_()
        m.release()

    def waiter(i):
        with m:
            order.append(i)
            assert m.holder is current_coroutine()

    h = ctx.spawn(holder)
    waiters = [ctx.spawn(waiter, i, name=f"waiter-{i}") for i in range(10)]
    drain(ctx)
    assert m.holder is h
    assert [w.done for w in waiters] == [False] * 10
    assert order == []

    wake(h)  # home thread, outside coroutines: h runs now, then each waiter in turn
    assert order == list(range(10))
    assert h.result() is None
    assert [w.result() for w in waiters] == [None] * 10
    assert not m.locked() and m.holder is None


@pytest.mark.timeout(20)
def test_fifo_order_across_threads():
    """Waiters on two IOThreads are served in the order they queued."""
    m = CoMutex()
    order = []
    held = threading.Event()

    def holder():
        m.acquire()
        held.set()
        yield_()
        m.release()

    def waiter(i, started):
        started.set()
        with m:
            order.append(i)

    with IOThread("fifo-a") as a, IOThread("fifo-b") as b:
        h = a.ctx.spawn(holder)
        assert held.wait(10)
        waiters = []
        for i in range(8):
            started = threading.Event()
            co = (a, b)[i % 2].ctx.spawn(waiter, i, started, name=f"waiter-{i}")
            wait_for(lambda co=co, started=started: suspended(co, started))
            waiters.append(co)
        assert order == []
        wake(h)
        h.join(10)
        for co in waiters:
            co.join(10)
    assert order == list(range(8))
    assert not m.locked()


@pytest.mark.timeout(10)
def test_release_hands_off_directly_in_one_thread():
    """locked() stays True from the hand-off until the next owner runs; no barging.

    The newcomer n arrives (nested enter) after the release has handed the
    mutex to the queued waiter w, but before w ran: n must queue behind w.
    """
    m = CoMutex()
    events = []

    def holder():
        m.acquire()
        yield_()
        m.release()
        events.append(("released", m.locked(), m.holder is w))
        n.enter()  # the newcomer tries while w has not run yet
        events.append(("newcomer queued", n.done, m.holder is w))

    def waiter(name):
        m.acquire()
        events.append((name, m.locked(), m.holder is current_coroutine()))
        m.release()

    h = Coroutine(holder)
    w = Coroutine(waiter, "w")
    n = Coroutine(waiter, "n")
    h.enter()
    w.enter()
    assert not w.done
    h.enter()
    assert events == [
        ("released", True, True),
        ("newcomer queued", False, True),
        ("w", True, True),
        ("n", True, True),
    ]
    assert h.result() is None and w.result() is None and n.result() is None
    assert not m.locked() and m.holder is None


@pytest.mark.timeout(20)
def test_no_barging_while_the_next_owner_is_not_running_yet():
    """Across threads: the waiter's IOThread is stalled between hand-off and its run.

    h (IOThread a) releases to w (IOThread b, stalled), then at once tries
    to take the mutex again: it must queue behind w, and the mutex must stay
    locked, held by w, the whole time w cannot run.
    """
    m = CoMutex()
    events = []
    held = threading.Event()
    stalled = threading.Event()
    gate = threading.Event()

    def holder():
        m.acquire()
        held.set()
        yield_()
        m.release()
        events.append(("h released", m.locked(), m.holder is w))
        m.acquire()  # a newcomer now: w was queued first
        events.append(("h again", m.holder is current_coroutine()))
        m.release()

    def waiter(started):
        started.set()
        with m:
            events.append(("w", m.holder is current_coroutine()))

    def stall():
        stalled.set()
        assert gate.wait(10)

    with IOThread("barge-a") as a, IOThread("barge-b") as b:
        try:
            h = a.ctx.spawn(holder, name="h")
            assert held.wait(10)
            started = threading.Event()
            w = b.ctx.spawn(waiter, started, name="w")
            wait_for(lambda: suspended(w, started))
            b.ctx.call_soon(stall)
            assert stalled.wait(10)
            wake(h)
            # h releases (to w), then queues behind w, who cannot run yet.
            wait_for(lambda: len(events) >= 1 and not h.entered and not h.scheduled)
            assert events == [("h released", True, True)]
            assert m.locked() and m.holder is w
            assert not w.done and not h.done
        finally:
            gate.set()
        h.join(10)
        w.join(10)
    assert events == [("h released", True, True), ("w", True), ("h again", True)]
    assert not m.locked()


class HalfwayIn:
    """Pins down the race the mutex is built around (QEMU's handoff dance).

    White box: it replaces `CoMutex._waiters` (and, for "while-freeing",
    `CoMutex._taken`) with versions that pause the holder h and the locker
    l at the points named in the tables of
    test_locker_halfway_in_while_the_holder_releases, a race a stress run
    only hits once in a long while.
    """

    def __init__(self, m, when):
        self.when = when
        self.publishing = threading.Event()  # l reached the queue's append()
        self.freeing = threading.Event()  # h is inside _taken.release()
        self.tried = threading.Event()  # l published itself and failed _taken
        self.released = threading.Event()  # h's release() returned
        self.locker = None
        waiters = self.waiters = _PausingDeque(self)
        m._waiters = waiters
        if when == "while-freeing":
            m._taken = _PausingLock(self, m._taken)

    def all_go(self):
        for event in (self.publishing, self.freeing, self.tried, self.released):
            event.set()


class _PausingDeque(deque):
    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def append(self, co):
        plan = self.plan
        first = plan.locker is None
        if first:
            plan.locker = co
            plan.publishing.set()
            if plan.when == "before":
                assert plan.released.wait(10)
            elif plan.when == "while-freeing":
                assert plan.freeing.wait(10)
        super().append(co)
        if first and plan.when == "after":
            assert plan.released.wait(10)


class _PausingLock:
    def __init__(self, plan, lock):
        self.plan = plan
        self.lock = lock

    def acquire(self, blocking=True):
        won = self.lock.acquire(blocking)
        plan = self.plan
        if not won and plan.locker is current_coroutine() and plan.locker in plan.waiters:
            plan.tried.set()
        return won

    def release(self):
        plan = self.plan
        if not plan.freeing.is_set():
            plan.freeing.set()
            assert plan.tried.wait(10)
        self.lock.release()

    def locked(self):
        return self.lock.locked()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("when", ["before", "after", "while-freeing"])
def test_locker_halfway_in_while_the_holder_releases(when):
    """The holder h releases while a locker l in another thread is halfway in.

    before: l has failed the fast path but not published itself; h sees no
    waiter and frees the mutex; l must then win it by itself.

    | h (IOThread a)       | l (IOThread b)                       |
    |----------------------+--------------------------------------|
    | acquire              |                                      |
    |                      | acquire: taken, spins, fails         |
    |                      | <about to publish in the queue>      |
    | release: no waiter,  |                                      |
    | frees it             |                                      |
    |                      | publishes, tries again: owns it      |

    after: l has published itself but not yet tried again; h sees it and
    hands the mutex over, waking l before it yields.

    | h (IOThread a)       | l (IOThread b)                       |
    |----------------------+--------------------------------------|
    | acquire              |                                      |
    |                      | acquire: taken, spins, fails         |
    |                      | publishes in the queue               |
    | release: hands off   |                                      |
    |                      | tries again: taken; yields, resumes  |
    |                      | as the owner                         |

    while-freeing: h saw no waiter and is freeing the mutex when l
    publishes itself and fails to take it; h must look again and hand off.

    | h (IOThread a)       | l (IOThread b)                       |
    |----------------------+--------------------------------------|
    | acquire              |                                      |
    |                      | acquire: taken, spins, fails         |
    | release: no waiter   |                                      |
    | <about to free it>   |                                      |
    |                      | publishes, tries again: still taken; |
    |                      | yields                               |
    | frees it, looks      |                                      |
    | again: hands off     |                                      |
    |                      | resumes as the owner                 |
    """
    m = CoMutex()
    plan = HalfwayIn(m, when)
    held = threading.Event()
    events = []

    def holder():
        m.acquire()
        held.set()
        assert plan.publishing.wait(10)  # blocks IOThread a until l is halfway in
        m.release()
        events.append(("h released", m.holder is plan.locker))
        plan.released.set()

    def locker():
        m.acquire()
        # Blocks IOThread b: once handed the mutex, l may run before h's
        # release() has even returned; let h record what it saw first.
        assert plan.released.wait(10)
        events.append(("l owns it", m.holder is current_coroutine()))
        m.release()

    with IOThread("halfway-a") as a, IOThread("halfway-b") as b:
        try:
            h = a.ctx.spawn(holder, name="h")
            assert held.wait(10)
            lock_co = b.ctx.spawn(locker, name="l")
            h.join(10)
            lock_co.join(10)
        finally:
            plan.all_go()
    assert plan.locker is lock_co
    # before: nobody was queued, so h left the mutex free; otherwise h handed it to l.
    assert events == [("h released", when != "before"), ("l owns it", True)]
    assert not m.locked() and m.holder is None and len(plan.waiters) == 0


# -- holder, context manager ---------------------------------------------------


@pytest.mark.timeout(10)
def test_holder_and_locked(ctx):
    m = CoMutex()
    seen = []

    def body():
        me = current_coroutine()
        seen.append((m.holder, m.locked()))
        m.acquire()
        seen.append((m.holder is me, m.locked()))
        m.release()
        seen.append((m.holder, m.locked()))

    assert m.holder is None and m.locked() is False
    ctx.spawn(body).join()
    assert seen == [(None, False), (True, True), (None, False)]
    assert "unlocked" in repr(m)


@pytest.mark.timeout(10)
def test_context_manager(ctx):
    m = CoMutex()
    seen = []

    def body():
        with m as entered:  # binds True, as threading.Lock does
            seen.append((entered is True, m.holder is current_coroutine()))
        seen.append(m.locked())
        with pytest.raises(KeyError), m:
            raise KeyError("inside")
        seen.append(m.locked())

    ctx.spawn(body).join()
    assert seen == [(True, True), False, False]


# -- misuse --------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_acquire_and_release_outside_a_coroutine():
    m = CoMutex()
    with pytest.raises(RuntimeError, match=r"CoMutex.*release\(\) called outside a coroutine"):
        m.release()
    with pytest.raises(RuntimeError, match=r"CoMutex.*acquire\(\) called outside a coroutine"):
        m.acquire()
    with pytest.raises(RuntimeError, match="outside a coroutine"), m:
        pass
    assert not m.locked() and m.holder is None


@pytest.mark.timeout(10)
def test_release_by_non_holder(ctx):
    m = CoMutex()
    errors = []

    def owner():
        m.acquire()
        yield_()
        m.release()

    def thief():
        for _ in range(2):
            try:
                m.release()
            except RuntimeError as exc:
                errors.append(str(exc))
            yield_()

    o = ctx.spawn(owner, name="the-owner")
    t = ctx.spawn(thief, name="the-thief")
    drain(ctx)
    assert len(errors) == 1
    assert "the-thief" in errors[0] and "CoMutex" in errors[0]
    assert m.holder is o  # the failed release changed nothing
    wake(o)
    assert o.done and not m.locked()
    # Now nobody holds it: releasing is still an error.
    wake(t)
    assert len(errors) == 2
    assert "the-thief" in errors[1] and "CoMutex" in errors[1]
    assert not m.locked()

    # The mutex and the loop still work.
    def lock_and_unlock():
        with m:
            return "ok"

    assert ctx.spawn(lock_and_unlock).join() == "ok"
    wake(t)
    assert t.result() is None


@pytest.mark.timeout(10)
def test_acquire_twice_by_the_holder(ctx):
    m = CoMutex()
    seen = []

    def twice():
        m.acquire()
        try:
            m.acquire()
        except RuntimeError as exc:
            seen.append(str(exc))
        seen.append(m.holder is current_coroutine())
        m.release()

    co = ctx.spawn(twice, name="greedy")
    assert co.join() is None
    assert len(seen) == 2
    assert "greedy" in seen[0] and "CoMutex" in seen[0]
    assert seen[1] is True
    assert not m.locked()

    # The loop goes on: a later coroutine runs and takes the mutex.
    def take():
        with m:
            return m.holder

    later = ctx.spawn(take)
    assert later.join() is later
    assert not m.locked()


@pytest.mark.timeout(20)
def test_misuse_escaping_a_coroutine_leaves_the_loop_working():
    """Misuse errors that escape go to the exception handler; the IOThread goes on."""
    m = CoMutex()
    reports = []
    handled = threading.Event()

    def handler(ctx, exc, origin):
        reports.append((exc, origin))
        handled.set()

    def bad():
        m.release()

    def good():
        with m:
            return "still works"

    with IOThread("misuse") as t:
        t.ctx.set_exception_handler(handler)
        co = t.ctx.spawn(bad, name="bad-releaser")
        with pytest.raises(RuntimeError, match="bad-releaser"):
            co.join(10)  # retrieved by the join: not reported as well
        # Nobody keeps this one: its error goes to the handler once it is
        # collected (its traceback holds a frame that holds it: the cyclic GC).
        t.ctx.call_sync(lambda: t.ctx.spawn(bad, name="dropped-bad-releaser") and None)
        t.ctx.call_sync(lambda: None)  # it has run
        gc.collect()
        assert handled.wait(10)
        assert t.ctx.spawn(good).join(10) == "still works"
    assert len(reports) == 1
    exc, origin = reports[0]
    assert isinstance(exc, RuntimeError) and "dropped-bad-releaser" in str(origin)
    assert "CoMutex" in str(exc) and "dropped-bad-releaser" in str(exc)


@pytest.mark.timeout(10)
def test_finishing_while_holding_is_reported(ctx):
    m = CoMutex()
    reports = []
    ctx.set_exception_handler(lambda c, exc, origin: reports.append((c, exc, origin)))

    def leaker():
        m.acquire()

    co = ctx.spawn(leaker, name="leaker")
    drain(ctx)
    assert co.done and co.exception() is None
    assert len(reports) == 1
    c, exc, origin = reports[0]
    assert c is ctx and origin is co
    assert isinstance(exc, RuntimeError)
    assert "leaker" in str(exc) and "CoMutex" in str(exc)
    # It stays locked (held by a dead coroutine), and the loop goes on.
    assert m.locked()
    assert ctx.spawn(lambda: "next").join() == "next"
    assert len(reports) == 1


# -- regressions from the review ---------------------------------------------------


def _holder_and_late(ctx, mutex, events):
    def holder():
        mutex.acquire()
        yield_()
        mutex.release()
        events.append("released")

    def late():
        with mutex:
            events.append("late got it")

    h = ctx.spawn(holder)
    drain(ctx)
    return h, late


@pytest.mark.timeout(20)
def test_a_waiter_whose_context_closes_is_cancelled_and_leaves_the_queue(ctx):
    mutex = CoMutex()
    errors = []
    ctx.set_exception_handler(lambda c, exc, origin: errors.append(exc))
    events = []
    h, late = _holder_and_late(ctx, mutex, events)
    with IOThread("doomed") as t:
        doomed = t.ctx.spawn(mutex.acquire, name="doomed-waiter")
        t.ctx.call_sync(lambda: None)  # it has queued
    # Closing t cancelled `doomed`, which withdrew from the queue.
    assert doomed.cancelled()
    assert len(mutex._waiters) == 0
    ctx.spawn(late)
    drain(ctx)
    wake(h)
    drain(ctx)
    assert events == ["released", "late got it"]
    assert not mutex.locked()
    assert errors == []


@pytest.mark.timeout(20)
def test_release_skips_a_waiter_whose_context_was_closed(ctx):
    """Handing the mutex to a coroutine that can never run would lock it forever."""
    mutex = CoMutex()
    errors = []
    ctx.set_exception_handler(lambda c, exc, origin: errors.append(exc))
    events = []
    h, late = _holder_and_late(ctx, mutex, events)
    box = []

    def other_thread():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            other = AioContext("doomed")
            box.append(other.spawn(mutex.acquire, name="doomed-waiter"))
            drain(other)
            other.close(grace=0)  # no time to cancel it: it stays in the queue

    in_other_thread(other_thread)
    dead = box[0]
    ctx.spawn(late)
    drain(ctx)
    wake(h)
    drain(ctx)
    assert events == ["released", "late got it"]
    assert not mutex.locked()
    assert len(errors) == 1 and "doomed-waiter" in str(errors[0])
    assert not dead.done
