"""Tests for corun.coqueue: CoQueue.

QEMU has no unit test of its own for CoQueue (it is exercised through the
block layer); these check API.md: FIFO wake-up order, the return values of
next()/restart_all()/enter_next(), empty()/len(), how wait() and
enter_next() treat the lock they are given, and that a waker in another
thread never loses a waiter.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers import drain

import corun
from corun import AioContext, CoMutex, CoQueue, IOThread, current_coroutine

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-coqueue") as c:
        yield c


def wait_for(predicate, timeout=10.0):
    """Poll `predicate` until it holds: for "has queued", which no Event announces."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


class RecordingLock:
    """Not a CoMutex: anything with acquire()/release() will do for wait()."""

    def __init__(self, events):
        self.events = events

    def acquire(self):
        self.events.append("acquire")

    def release(self):
        self.events.append("release")


# -- order, counts -------------------------------------------------------------


def test_ten_waiters_wake_in_fifo_order(ctx):
    q = CoQueue()
    order = []

    def waiter(i):
        q.wait()
        order.append(i)

    cos = [ctx.spawn(waiter, i, name=f"waiter-{i}") for i in range(10)]
    drain(ctx)
    assert len(q) == 10 and order == []
    for k in range(10):
        # Home thread, outside coroutines: the waiter runs inside next().
        assert q.next() is True
        assert order == list(range(k + 1))
        assert len(q) == 9 - k
    assert q.next() is False
    assert [co.result() for co in cos] == [None] * 10


def test_fifo_order_with_a_waker_in_another_thread():
    q = CoQueue()
    order = []

    def waiter(i):
        q.wait()
        order.append(i)

    with IOThread("coqueue-fifo") as t:
        cos = [t.ctx.spawn(waiter, i, name=f"waiter-{i}") for i in range(10)]
        # The waiters are entered in spawn order; wait until all queued.
        wait_for(lambda: len(q) == 10)
        for _ in range(10):
            assert q.next() is True
        for co in cos:
            co.join(10)
    assert order == list(range(10))
    assert q.empty()


def test_restart_all_returns_how_many_it_woke(ctx):
    q = CoQueue()
    order = []

    def waiter(i):
        q.wait()
        order.append(i)

    assert q.restart_all() == 0
    cos = [ctx.spawn(waiter, i) for i in range(5)]
    drain(ctx)
    assert q.restart_all() == 5
    assert order == [0, 1, 2, 3, 4]
    assert all(co.done for co in cos)
    assert q.restart_all() == 0
    assert q.empty()


def test_restart_all_wakes_only_those_waiting_now(ctx):
    """A waiter that queues again while restart_all() runs waits for the next one."""
    q = CoQueue()
    rounds = []

    def waiter(i):
        for r in range(2):
            q.wait()
            rounds.append((r, i))

    cos = [ctx.spawn(waiter, i) for i in range(3)]
    drain(ctx)
    assert q.restart_all() == 3
    assert rounds == [(0, 0), (0, 1), (0, 2)]
    assert len(q) == 3
    assert q.restart_all() == 3
    assert rounds == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(co.done for co in cos)
    assert q.empty()


def test_next_on_an_empty_queue_returns_false():
    q = CoQueue()
    assert q.next() is False
    assert q.enter_next() is False
    assert q.restart_all() == 0
    assert q.empty() is True and len(q) == 0


def test_empty_and_len(ctx):
    q = CoQueue()
    seen = [(q.empty(), len(q))]

    def waiter():
        q.wait()

    for _ in range(3):
        ctx.spawn(waiter)
    drain(ctx)
    seen.append((q.empty(), len(q)))
    q.next()
    seen.append((q.empty(), len(q)))
    q.restart_all()
    seen.append((q.empty(), len(q)))
    assert seen == [(True, 0), (False, 3), (False, 2), (True, 0)]
    assert "0 waiting" in repr(q)


# -- wait(lock), enter_next(lock) ----------------------------------------------


def test_wait_releases_the_comutex_while_waiting_and_reacquires_it(ctx):
    m = CoMutex()
    q = CoQueue()
    events = []

    def waiter():
        with m:
            events.append("waiter waits")
            q.wait(m)
            events.append(("waiter woke", m.holder is current_coroutine()))

    def waker():
        # Would never get the mutex if wait() did not release it.
        with m:
            events.append("waker has the lock")
            assert q.next() is True
            # Let the woken waiter run while we still hold the mutex: it
            # must not return from wait() before we release.
            corun.sleep(0)
            events.append("waker releases")
        events.append("waker released")

    w = ctx.spawn(waiter)
    k = ctx.spawn(waker)
    drain(ctx)
    assert events == [
        "waiter waits",
        "waker has the lock",
        "waker releases",
        "waker released",
        ("waiter woke", True),
    ]
    assert w.result() is None and k.result() is None
    assert not m.locked()


def test_wait_with_a_lock_that_is_not_a_comutex(ctx):
    q = CoQueue()
    events = []
    lock = RecordingLock(events)

    def waiter():
        q.wait(lock)
        events.append("woke")

    co = ctx.spawn(waiter)
    drain(ctx)
    assert events == ["release"]  # released while waiting
    assert q.next() is True
    assert events == ["release", "acquire", "woke"]  # re-acquired before returning
    assert co.result() is None


def test_wait_with_a_real_threading_lock(ctx):
    q = CoQueue()
    lock = threading.Lock()
    seen = []

    def waiter():
        lock.acquire()
        q.wait(lock)
        seen.append(lock.locked())
        lock.release()

    ctx.spawn(waiter)
    drain(ctx)
    assert not lock.locked()
    q.next()
    assert seen == [True]
    assert not lock.locked()


def test_enter_next_releases_the_lock_around_the_wake_up(ctx):
    q = CoQueue()
    events = []
    lock = RecordingLock(events)

    def waiter():
        q.wait()
        events.append("woke")

    co = ctx.spawn(waiter)
    drain(ctx)
    # Home thread, outside coroutines: the waiter runs inside the wake-up.
    assert q.enter_next(lock) is True
    assert events == ["release", "woke", "acquire"]
    assert co.done
    # Nobody waits: the lock is not touched.
    assert q.enter_next(lock) is False
    assert events == ["release", "woke", "acquire"]


def test_enter_next_with_a_comutex_from_a_coroutine(ctx):
    """The waker keeps the mutex; the woken waiter gets it when the waker lets go."""
    m = CoMutex()
    q = CoQueue()
    events = []

    def waiter():
        with m:
            q.wait(m)
            events.append(("waiter", m.holder is current_coroutine()))

    def waker():
        with m:
            assert q.enter_next(m) is True
            events.append(("waker", m.holder is current_coroutine()))

    w = ctx.spawn(waiter)
    k = ctx.spawn(waker)
    drain(ctx)
    assert events == [("waker", True), ("waiter", True)]
    assert w.result() is None and k.result() is None
    assert not m.locked()


# -- misuse --------------------------------------------------------------------


def test_wait_outside_a_coroutine():
    q = CoQueue()
    with pytest.raises(RuntimeError, match=r"CoQueue.*outside a coroutine"):
        q.wait()
    assert q.empty()


def test_wait_with_a_comutex_one_does_not_hold(ctx):
    m = CoMutex()
    q = CoQueue()
    errors = []

    def waiter():
        try:
            q.wait(m)
        except RuntimeError as exc:
            errors.append(str(exc))

    co = ctx.spawn(waiter, name="no-lock")
    drain(ctx)
    assert co.done
    assert len(errors) == 1 and "no-lock" in errors[0] and "CoMutex" in errors[0]
    assert q.empty()


def test_wait_when_releasing_the_lock_fails(ctx):
    class BrokenLock:
        def acquire(self):
            pass

        def release(self):
            raise ValueError("cannot release")

    q = CoQueue()

    def waiter():
        q.wait(BrokenLock())

    co = ctx.spawn(waiter)
    drain(ctx)
    assert isinstance(co.exception(), ValueError)
    assert q.empty()  # not left queued


# -- cross-thread stress --------------------------------------------------------

ROUNDS = 5000


@pytest.mark.timeout(60)
def test_coroutine_waker_on_another_iothread_never_loses_a_waiter():
    """Ping-pong between IOThreads a and b through one CoMutex and two CoQueues.

    Every round each side waits for its turn (condition checked under the
    mutex) and hands the turn over with next(). A lost wake-up hangs a side,
    and join() times out.
    """
    m = CoMutex()
    turn_a, turn_b = CoQueue(), CoQueue()
    state = {"turn": "a", "a": 0, "b": 0, "waits": 0}

    def side(me, other, my_queue, other_queue):
        for _ in range(ROUNDS):
            with m:
                while state["turn"] != me:
                    state["waits"] += 1
                    my_queue.wait(m)
                state[me] += 1
                state["turn"] = other
                other_queue.next()

    with IOThread("pingpong-a") as a, IOThread("pingpong-b") as b:
        ca = a.ctx.spawn(side, "a", "b", turn_a, turn_b)
        cb = b.ctx.spawn(side, "b", "a", turn_b, turn_a)
        ca.join(45)
        cb.join(45)
    assert state["a"] == ROUNDS and state["b"] == ROUNDS
    assert state["waits"] > 0
    assert turn_a.empty() and turn_b.empty()


@pytest.mark.timeout(60)
def test_plain_thread_waker_never_loses_a_waiter():
    """A coroutine on an IOThread waits (with a threading.Lock as the lock);
    a plain thread hands it work and calls next(). Exact counts."""
    q = CoQueue()
    lock = threading.Lock()
    state = {"work": 0, "consumed": 0, "waits": 0, "woken": 0}
    consumed = threading.Event()
    consumed.set()

    def consumer():
        for _ in range(ROUNDS):
            lock.acquire()
            while state["work"] == 0:
                state["waits"] += 1
                q.wait(lock)
            state["work"] -= 1
            state["consumed"] += 1
            lock.release()
            consumed.set()

    with IOThread("consumer") as t:
        co = t.ctx.spawn(consumer)
        for _ in range(ROUNDS):
            assert consumed.wait(30)
            consumed.clear()
            with lock:
                state["work"] += 1
                if q.next():
                    state["woken"] += 1
        co.join(45)
    assert state["consumed"] == ROUNDS and state["work"] == 0
    assert state["woken"] == state["waits"]  # every wait ended by exactly one next()
    assert q.empty()


@pytest.mark.timeout(60)
def test_next_from_another_thread_races_the_yield():
    """The waiter queues itself and yields; a plain thread pops it at once,
    often before the yield. Each successful next() ends exactly one wait."""
    q = CoQueue()
    woke = []

    def waiter():
        for i in range(ROUNDS):
            q.wait()
            woke.append(i)

    with IOThread("racer") as t:
        co = t.ctx.spawn(waiter)
        nexts = 0
        while nexts < ROUNDS:
            if q.next():
                nexts += 1
            else:
                assert not co.done
                time.sleep(0)  # let the waiter's thread run
        co.join(45)
    assert woke == list(range(ROUNDS))
    assert q.next() is False


def test_waiter_is_woken_on_its_home_context():
    q = CoQueue()
    homes = []

    def waiter():
        before = (threading.get_ident(), corun.current_context())
        q.wait()
        homes.append(before == (threading.get_ident(), corun.current_context()))

    with IOThread("home") as t:
        co = t.ctx.spawn(waiter)
        wait_for(lambda: not q.empty())
        assert q.next() is True
        co.join(10)
    assert homes == [True]


# -- regressions from the review ---------------------------------------------------


def test_enter_next_keeps_the_waiter_when_the_lock_cannot_be_released(ctx):
    queue = CoQueue()
    waiter = ctx.spawn(queue.wait)
    while ctx.poll(blocking=False):
        pass
    assert len(queue) == 1
    with pytest.raises(RuntimeError):
        queue.enter_next(CoMutex())  # releasing a mutex we do not hold
    assert len(queue) == 1
    assert queue.next() is True
    while ctx.poll(blocking=False):
        pass
    assert waiter.done
