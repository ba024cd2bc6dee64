"""Tests for corun.corwlock: CoRwLock.

/locking/co-rwlock/upgrade and /locking/co-rwlock/downgrade port QEMU's
tests/unit/test-coroutine.c (their interleaving tables are repeated below).
The rest checks API.md: readers and writers never overlap under a
multi-thread stress, FIFO tickets (a queued writer goes before readers that
came after it), the context managers and the misuse errors.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest
from helpers import drain

import corun
from corun import AioContext, Coroutine, CoRwLock, IOThread, yield_

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-corwlock") as c:
        yield c


def take_write_lock(lock):
    with lock.writer():
        return "taken"


def assert_free(ctx, lock):
    """A writer gets `lock` without waiting: nobody holds it or waits for it."""
    co = ctx.spawn(take_write_lock, lock)
    drain(ctx)
    assert co.result() == "taken"


# -- QEMU /locking/co-rwlock/* ---------------------------------------------------


def test_co_rwlock_upgrade():
    """/locking/co-rwlock/upgrade: an upgrading sole reader goes back to the queue.

    | c1           | c2         |
    |--------------+------------+
    | rdlock       |            |
    | yield        |            |
    |              | wrlock     |
    |              | <queued>   |
    | upgrade      |            |
    | <queued>     | <dequeued> |
    |              | unlock     |
    | <dequeued>   |            |
    | unlock       |            |
    """
    lock = CoRwLock()
    done = {"c1": False, "c2": False}
    events = []

    def rwlock_yield_upgrade():
        lock.rdlock()
        yield_()
        events.append("c1 upgrade")
        lock.upgrade()
        events.append("c1 upgraded")
        lock.unlock()
        done["c1"] = True

    def rwlock_wrlock_yield():
        lock.wrlock()
        events.append("c2 wrlocked")
        yield_()
        lock.unlock()
        events.append("c2 unlocked")
        done["c2"] = True

    c1 = Coroutine(rwlock_yield_upgrade)
    c2 = Coroutine(rwlock_wrlock_yield)
    c1.enter()
    c2.enter()
    assert events == []  # c2 queued behind c1's read hold

    # c1 now should go to sleep.
    c1.enter()
    assert not done["c1"]
    assert events == ["c1 upgrade", "c2 wrlocked"]

    c2.enter()
    assert done == {"c1": True, "c2": True}
    assert events == ["c1 upgrade", "c2 wrlocked", "c2 unlocked", "c1 upgraded"]
    assert c1.result() is None and c2.result() is None


def test_co_rwlock_downgrade():
    """/locking/co-rwlock/downgrade: downgrading with readers and writers queued does not hang.

    | c1     | c2         | c3         | c4         |
    |--------+------------+------------+------------|
    | rdlock |            |            |            |
    | yield  |            |            |            |
    |        | wrlock     |            |            |
    |        | <queued>   |            |            |
    |        |            | rdlock     |            |
    |        |            | <queued>   |            |
    |        |            |            | wrlock     |
    |        |            |            | <queued>   |
    | unlock |            |            |            |
    | yield  |            |            |            |
    |        | <dequeued> |            |            |
    |        | downgrade  |            |            |
    |        |            | <dequeued> |            |
    |        |            | unlock     |            |
    |        | ...        |            |            |
    |        | unlock     |            |            |
    |        |            |            | <dequeued> |
    |        |            |            | unlock     |
    """
    lock = CoRwLock()
    done = dict.fromkeys(("c1", "c2", "c3", "c4"), False)
    events = []

    def rwlock_rdlock_yield():
        lock.rdlock()
        yield_()
        lock.unlock()
        yield_()
        done["c1"] = True

    def rwlock_wrlock_downgrade():
        lock.wrlock()
        events.append("c2 wrlocked")
        lock.downgrade()
        events.append("c2 downgraded")
        lock.unlock()
        done["c2"] = True

    def rwlock_rdlock():
        lock.rdlock()
        events.append("c3 rdlocked")
        lock.unlock()
        done["c3"] = True

    def rwlock_wrlock():
        lock.wrlock()
        events.append("c4 wrlocked")
        lock.unlock()
        done["c4"] = True

    c1 = Coroutine(rwlock_rdlock_yield)
    c2 = Coroutine(rwlock_wrlock_downgrade)
    c3 = Coroutine(rwlock_rdlock)
    c4 = Coroutine(rwlock_wrlock)
    for co in (c1, c2, c3, c4):
        co.enter()
    assert events == []

    c1.enter()
    assert done == {"c1": False, "c2": True, "c3": True, "c4": True}
    assert events == ["c2 wrlocked", "c2 downgraded", "c3 rdlocked", "c4 wrlocked"]

    c1.enter()
    assert done["c1"]
    assert [co.result() for co in (c1, c2, c3, c4)] == [None] * 4


# -- fairness --------------------------------------------------------------------


def test_queued_writer_goes_before_later_readers(ctx):
    lock = CoRwLock()
    events = []

    def reader(name):
        lock.rdlock()
        events.append(f"{name} in")
        yield_()
        events.append(f"{name} out")
        lock.unlock()

    def writer(name):
        lock.wrlock()
        events.append(f"{name} in")
        yield_()
        events.append(f"{name} out")
        lock.unlock()

    r1 = Coroutine(reader, "r1")
    w = Coroutine(writer, "w")
    r2 = Coroutine(reader, "r2")
    r3 = Coroutine(reader, "r3")
    r1.enter()
    w.enter()  # queued behind r1
    r2.enter()  # would share with r1, but w came first
    r3.enter()
    assert events == ["r1 in"]

    r1.enter()
    assert events == ["r1 in", "r1 out", "w in"]

    w.enter()  # w unlocks: the readers queued behind it enter together
    assert events == ["r1 in", "r1 out", "w in", "w out", "r2 in", "r3 in"]

    r2.enter()
    r3.enter()
    assert events[-2:] == ["r2 out", "r3 out"]
    assert all(co.done for co in (r1, w, r2, r3))
    assert [co.result() for co in (r1, w, r2, r3)] == [None] * 4


def test_writer_waits_for_every_reader(ctx):
    lock = CoRwLock()
    events = []

    def reader(name):
        with lock.reader():
            events.append(f"{name} in")
            yield_()
            events.append(f"{name} out")

    def writer():
        with lock.writer():
            events.append("w in")

    r1 = ctx.spawn(reader, "r1")
    r2 = ctx.spawn(reader, "r2")
    w = ctx.spawn(writer)
    drain(ctx)
    assert events == ["r1 in", "r2 in"]
    corun.wake(r1)
    assert events == ["r1 in", "r2 in", "r1 out"]
    assert not w.done
    corun.wake(r2)
    assert events == ["r1 in", "r2 in", "r1 out", "r2 out", "w in"]
    assert w.done and r1.done and r2.done


def test_downgrade_lets_queued_readers_in_at_once(ctx):
    """The downgraded writer still reads; the readers queued behind it share the lock."""
    lock = CoRwLock()
    events = []

    def writer():
        lock.wrlock()
        yield_()
        lock.downgrade()
        events.append("w downgraded")
        yield_()
        events.append("w out")
        lock.unlock()

    def reader(name):
        with lock.reader():
            events.append(f"{name} in")

    w = Coroutine(writer)
    w.enter()
    r1 = Coroutine(reader, "r1")
    r2 = Coroutine(reader, "r2")
    r1.enter()
    r2.enter()
    assert events == []
    w.enter()  # downgrade: r1, then r2, get in while w still holds its read lock
    assert events == ["w downgraded", "r1 in", "r2 in"]
    assert r1.done and r2.done and not w.done
    w.enter()
    assert events == ["w downgraded", "r1 in", "r2 in", "w out"]
    assert [co.result() for co in (w, r1, r2)] == [None] * 3


# -- stress ------------------------------------------------------------------------


def run_rwlock_stress(nthreads, per_thread, seconds):
    """Random readers, writers, upgrades and downgrades on `nthreads` IOThreads.

    Who is inside is tracked under a threading.Lock and checked on every
    entry; violations are recorded (an assert would only reach the
    coroutine's joiner) and compared with [] at the end.
    """
    lock = CoRwLock()
    stopping = threading.Event()
    track = threading.Lock()
    inside = {"readers": 0, "writers": 0}
    stats = {"read": 0, "write": 0, "upgrade": 0, "downgrade": 0, "max_readers": 0}
    violations = []

    def enter_read(what):
        with track:
            if inside["writers"]:
                violations.append((what, dict(inside)))
            inside["readers"] += 1
            stats["max_readers"] = max(stats["max_readers"], inside["readers"])

    def leave_read():
        with track:
            inside["readers"] -= 1

    def enter_write(what):
        with track:
            if inside["writers"] or inside["readers"]:
                violations.append((what, dict(inside)))
            inside["writers"] += 1

    def leave_write():
        with track:
            inside["writers"] -= 1

    def worker(seed):
        rng = random.Random(seed)

        def maybe_yield():
            if rng.random() < 0.5:
                corun.sleep(0)

        while not stopping.is_set():
            op = rng.random()
            if op < 0.5:
                lock.rdlock()
                enter_read("read")
                maybe_yield()
                leave_read()
                lock.unlock()
                kind = "read"
            elif op < 0.8:
                lock.wrlock()
                enter_write("write")
                maybe_yield()
                leave_write()
                lock.unlock()
                kind = "write"
            elif op < 0.9:
                lock.rdlock()
                enter_read("read before upgrade")
                maybe_yield()
                leave_read()  # the read hold may be gone once upgrade() queues
                lock.upgrade()
                enter_write("upgraded")
                maybe_yield()
                leave_write()
                lock.unlock()
                kind = "upgrade"
            else:
                lock.wrlock()
                enter_write("write before downgrade")
                maybe_yield()
                with track:  # still exclusive: become a reader before others may enter
                    inside["writers"] -= 1
                    inside["readers"] += 1
                lock.downgrade()
                maybe_yield()
                leave_read()
                lock.unlock()
                kind = "downgrade"
            with track:
                stats[kind] += 1
            maybe_yield()

    with contextlib.ExitStack() as stack:
        threads = [stack.enter_context(IOThread(f"rw-{i}")) for i in range(nthreads)]
        stack.callback(stopping.set)  # runs first on the way out: never hang in join
        cos = [
            t.ctx.spawn(worker, 1000 * i + j, name=f"rw-{i}-{j}")
            for i, t in enumerate(threads)
            for j in range(per_thread)
        ]
        time.sleep(seconds)  # the length of the run, not a synchronisation
        stopping.set()
        for co in cos:
            co.join(30)
        # The lock is free again: a writer gets it.
        assert threads[0].ctx.spawn(take_write_lock, lock).join(10) == "taken"

    assert violations == []
    assert inside == {"readers": 0, "writers": 0}
    for kind in ("read", "write", "upgrade", "downgrade"):
        assert stats[kind] > 0, stats
    assert stats["max_readers"] >= 2, stats


@pytest.mark.timeout(60)
def test_random_stress_on_three_iothreads():
    run_rwlock_stress(3, 3, 1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_random_stress_on_three_iothreads_10s():
    run_rwlock_stress(3, 3, 10)


# -- context managers --------------------------------------------------------------


def test_reader_and_writer_context_managers(ctx):
    lock = CoRwLock()
    events = []

    def reader(name):
        with lock.reader() as held:
            assert held is lock
            events.append(f"{name} in")
            yield_()
        events.append(f"{name} out")

    def writer():
        with lock.writer() as held:
            assert held is lock
            events.append("w in")
            yield_()
        events.append("w out")

    r1 = ctx.spawn(reader, "r1")
    r2 = ctx.spawn(reader, "r2")
    w = ctx.spawn(writer)
    r3 = ctx.spawn(reader, "r3")
    drain(ctx)
    assert events == ["r1 in", "r2 in"]  # readers share; w and then r3 queue
    corun.wake(r1)
    corun.wake(r2)
    assert events == ["r1 in", "r2 in", "r1 out", "r2 out", "w in"]
    corun.wake(w)
    assert events == ["r1 in", "r2 in", "r1 out", "r2 out", "w in", "w out", "r3 in"]
    corun.wake(r3)
    assert [co.result() for co in (r1, r2, w, r3)] == [None] * 4


def test_context_managers_release_on_exception(ctx):
    lock = CoRwLock()

    def body():
        with pytest.raises(KeyError), lock.writer():
            raise KeyError("w")
        with pytest.raises(KeyError), lock.reader():
            raise KeyError("r")
        # Both released: a write lock is free to take.
        with lock.writer():
            return "ok"

    assert ctx.spawn(body).join() == "ok"
    assert_free(ctx, lock)


# -- misuse ------------------------------------------------------------------------


def test_unlock_without_holding(ctx):
    lock = CoRwLock()
    errors = []

    def bad():
        try:
            lock.unlock()
        except RuntimeError as exc:
            errors.append(str(exc))

    ctx.spawn(bad, name="not-a-holder").join()
    assert len(errors) == 1
    assert "not-a-holder" in errors[0] and "CoRwLock" in errors[0]

    # The failed unlock left nothing behind: the lock still works.
    def good():
        with lock.writer():
            pass
        with lock.reader():
            return "ok"

    assert ctx.spawn(good).join() == "ok"


def test_wrong_mode_operations(ctx):
    lock = CoRwLock()
    errors = []

    def attempt(fn):
        try:
            fn()
        except RuntimeError as exc:
            errors.append((fn.__name__, str(exc)))

    def body():
        attempt(lock.upgrade)  # holds nothing
        attempt(lock.downgrade)  # holds nothing
        lock.rdlock()
        attempt(lock.wrlock)  # holds a read lock
        attempt(lock.downgrade)  # not a writer
        lock.unlock()
        lock.wrlock()
        attempt(lock.rdlock)  # holds the write lock
        attempt(lock.wrlock)
        attempt(lock.upgrade)
        lock.unlock()

    ctx.spawn(body, name="confused").join()
    assert [name for name, _ in errors] == [
        "upgrade",
        "downgrade",
        "wrlock",
        "downgrade",
        "rdlock",
        "wrlock",
        "upgrade",
    ]
    for _, message in errors:
        assert "confused" in message and "CoRwLock" in message
    assert_free(ctx, lock)


def test_outside_a_coroutine():
    lock = CoRwLock()
    for op in (lock.rdlock, lock.wrlock, lock.unlock, lock.upgrade, lock.downgrade):
        with pytest.raises(RuntimeError, match=r"CoRwLock.*outside a coroutine"):
            op()
