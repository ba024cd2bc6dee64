"""Tests for corun.Queue (issue 9): a FIFO data channel for coroutines and threads.

Checks API.md, section "Groups and channels" (Queue): FIFO order,
put_nowait/get_nowait with QueueFull/QueueEmpty, qsize/empty/full, the
maxsize bound, `timeout=` on put and get, close() as end of stream (Python
3.13's Queue.shutdown), and the issue's promise that no item is ever lost
or duplicated when a waiter is cancelled or times out while an item is
being handed to it.

Synchronisation is by events, joins and `call_sync` only. A coroutine on
the main thread's context is known to be parked once `drain(ctx)` returns
(its loop runs only when the test polls it); elsewhere the test waits until
the queue lists the waiter. The stress runs race cancels and timeouts
against hand-offs; their assertions are exact (multisets, per-producer
order) and never depend on how the race went. Every context gets an
exception handler that records what it hears, and the tests end by
asserting that it heard nothing.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from helpers import Outcome, Recorder, drain, wait_len, wait_until

import corun
import corun.waiter
from corun import (
    AioContext,
    Cancelled,
    Coroutine,
    IOThread,
    Queue,
    QueueEmpty,
    QueueFull,
    QueueShutDown,
)

pytestmark = pytest.mark.timeout(20)

T = TypeVar("T")

# Bound for anything that must happen "at once" or "eventually": it only
# turns a hang into a failure, no assertion depends on it.
QUICK = 5.0

Item = tuple[int, int]  # (producer, sequence number)


@pytest.fixture
def reports() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(reports: Recorder) -> Iterator[AioContext]:
    """A context owned by the main thread (the test), watched by `reports`."""
    with AioContext("test-channel") as c:
        reports.watch(c)
        yield c


@pytest.fixture
def threads(reports: Recorder) -> Iterator[list[IOThread]]:
    """Three IOThreads watched by `reports`, joined afterwards."""
    ts = [IOThread(f"q-io{i}") for i in range(3)]
    for t in ts:
        reports.watch(t.ctx)
    yield ts
    for t in ts:
        t.join(QUICK)


def drain_queue(q: Queue[T]) -> list[T]:
    """Everything left in a closed queue."""
    assert q.closed
    left: list[T] = []
    while True:
        try:
            left.append(q.get_nowait())
        except QueueShutDown:
            return left


def assert_no_waiters(q: Queue[Any]) -> None:
    assert len(q._getters) == 0 and len(q._putters) == 0


# -- non-blocking use -------------------------------------------------------------------


def test_fifo_and_sizes_unbounded() -> None:
    q: Queue[int] = Queue()
    assert q.maxsize == 0
    assert q.empty() and not q.full() and q.qsize() == 0
    for i in range(100):
        q.put_nowait(i)
        assert not q.full()  # unbounded: never full
    assert q.qsize() == 100 and not q.empty()
    assert [q.get_nowait() for _ in range(100)] == list(range(100))
    assert q.empty() and q.qsize() == 0
    with pytest.raises(QueueEmpty):
        q.get_nowait()
    assert q.qsize() == 0


def test_bounded_nowait_respects_maxsize() -> None:
    q: Queue[str] = Queue(maxsize=3)
    for s in "abc":
        q.put_nowait(s)
    assert q.full() and q.qsize() == 3
    with pytest.raises(QueueFull):
        q.put_nowait("d")
    assert q.qsize() == 3
    assert q.get_nowait() == "a"
    assert not q.full() and q.qsize() == 2
    q.put_nowait("e")
    assert q.full()
    assert [q.get_nowait() for _ in range(3)] == ["b", "c", "e"]
    assert q.empty()


def test_blocking_calls_that_need_not_wait_return_at_once(ctx: AioContext) -> None:
    q: Queue[int] = Queue(maxsize=2)
    q.put(1)
    q.put(2, timeout=0)
    assert q.get() == 1
    assert q.get(timeout=0) == 2

    def co_side() -> list[int]:
        q.put(3)
        q.put(4, timeout=0)
        return [q.get(), q.get(timeout=0)]

    co = ctx.spawn(co_side)
    drain(ctx)
    assert co.result() == [3, 4]


# -- timeouts ---------------------------------------------------------------------------


def test_get_timeout_raises_queue_empty_thread_and_coroutine(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue()
    with pytest.raises(QueueEmpty):
        q.get(timeout=0.01)
    with pytest.raises(QueueEmpty):
        q.get(timeout=0)

    def co_get() -> str:
        try:
            q.get(timeout=0.01)
        except QueueEmpty:
            return "empty"
        return "got"

    assert threads[0].ctx.spawn(co_get).join(QUICK) == "empty"
    assert_no_waiters(q)
    q.put_nowait(5)  # no stale getter took it
    assert q.qsize() == 1 and q.get_nowait() == 5
    assert reports.seen == []


def test_put_timeout_raises_queue_full_thread_and_coroutine(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue(maxsize=1)
    q.put_nowait(1)
    with pytest.raises(QueueFull):
        q.put(2, timeout=0.01)
    with pytest.raises(QueueFull):
        q.put(3, timeout=0)

    def co_put() -> str:
        try:
            q.put(4, timeout=0.01)
        except QueueFull:
            return "full"
        return "put"

    assert threads[0].ctx.spawn(co_put).join(QUICK) == "full"
    assert_no_waiters(q)
    assert q.qsize() == 1 and q.get_nowait() == 1
    assert q.empty()  # none of the timed-out items got in
    assert reports.seen == []


# -- hand-offs --------------------------------------------------------------------------


def test_item_is_handed_straight_to_a_waiting_getter(ctx: AioContext, reports: Recorder) -> None:
    q: Queue[int] = Queue()
    co = ctx.spawn(q.get)
    drain(ctx)
    assert not co.done and len(q._getters) == 1
    q.put_nowait(7)
    assert q.qsize() == 0  # handed over, not queued
    drain(ctx)
    assert co.result() == 7
    assert_no_waiters(q)
    assert reports.seen == []


def test_getters_are_served_in_arrival_order(ctx: AioContext, reports: Recorder) -> None:
    q: Queue[int] = Queue()
    getters = []
    for _ in range(3):
        getters.append(ctx.spawn(q.get))
        drain(ctx)  # parked in this order
    for i in range(3):
        q.put_nowait(i)
    drain(ctx)
    assert [g.result() for g in getters] == [0, 1, 2]
    assert reports.seen == []


def test_waiting_putter_fills_the_room_a_get_makes(ctx: AioContext, reports: Recorder) -> None:
    q: Queue[int] = Queue(maxsize=2)
    q.put_nowait(1)
    q.put_nowait(2)
    putters = [ctx.spawn(q.put, 3)]
    drain(ctx)
    putters.append(ctx.spawn(q.put, 4))
    drain(ctx)
    assert not any(p.done for p in putters) and len(q._putters) == 2
    assert q.get_nowait() == 1
    assert q.qsize() == 2 and q.full()  # 3 took the room at once
    drain(ctx)
    assert putters[0].done and not putters[1].done
    assert q.get() == 2
    drain(ctx)
    assert putters[1].done
    assert [q.get_nowait(), q.get_nowait()] == [3, 4]
    assert_no_waiters(q)
    assert reports.seen == []


def test_plain_thread_get_blocks_until_a_coroutine_puts(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue()
    getter = Outcome(q.get)
    wait_until(lambda: len(q._getters) == 1)
    threads[0].ctx.spawn(q.put, 11).join(QUICK)
    assert getter.get() == 11
    assert reports.seen == []


def test_plain_thread_put_blocks_until_a_coroutine_gets(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue(maxsize=1)
    q.put_nowait(1)
    putter = Outcome(lambda: q.put(2))
    wait_until(lambda: len(q._putters) == 1)
    assert threads[1].ctx.spawn(q.get).join(QUICK) == 1
    putter.get()
    assert q.get_nowait() == 2
    assert reports.seen == []


# -- close ------------------------------------------------------------------------------


def test_close_refuses_puts_and_drains_gets() -> None:
    q: Queue[int] = Queue(maxsize=5)
    q.put_nowait(1)
    q.put_nowait(2)
    assert not q.closed
    q.close()
    assert q.closed
    with pytest.raises(QueueShutDown):
        q.put(3)
    with pytest.raises(QueueShutDown):
        q.put_nowait(3)
    with pytest.raises(QueueShutDown):
        q.put(3, timeout=0.01)
    assert q.qsize() == 2
    assert q.get() == 1
    assert q.get_nowait() == 2
    with pytest.raises(QueueShutDown):
        q.get()
    with pytest.raises(QueueShutDown):
        q.get_nowait()
    with pytest.raises(QueueShutDown):
        q.get(timeout=0.01)
    q.close()  # idempotent
    q.shutdown()  # the 3.13 name
    assert q.closed and q.empty()


def test_close_wakes_waiting_getters_everywhere(threads: list[IOThread], reports: Recorder) -> None:
    q: Queue[int] = Queue()

    def co_get() -> str:
        try:
            q.get()
        except QueueShutDown:
            return "shut down"
        return "got"

    def thread_get() -> str:
        try:
            q.get(timeout=QUICK)
        except QueueShutDown:
            return "shut down"
        return "got"

    cos = [threads[0].ctx.spawn(co_get), threads[1].ctx.spawn(co_get)]
    thread = Outcome(thread_get)
    wait_until(lambda: len(q._getters) == 3)
    q.close()
    assert [c.join(QUICK) for c in cos] == ["shut down", "shut down"]
    assert thread.get() == "shut down"
    assert_no_waiters(q)
    assert reports.seen == []


def test_close_wakes_waiting_putters_and_drops_their_items(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue(maxsize=1)
    q.put_nowait(0)

    def putter(n: int) -> str:
        try:
            q.put(n)
        except QueueShutDown:
            return "shut down"
        return "put"

    cos = [threads[0].ctx.spawn(putter, 1), threads[1].ctx.spawn(putter, 2)]
    thread = Outcome(lambda: putter(3))
    wait_until(lambda: len(q._putters) == 3)
    q.close()
    assert [c.join(QUICK) for c in cos] == ["shut down", "shut down"]
    assert thread.get() == "shut down"
    assert drain_queue(q) == [0]
    assert_no_waiters(q)
    assert reports.seen == []


# -- cancellation -----------------------------------------------------------------------


def test_cancelled_getter_leaves_no_waiter_and_takes_nothing(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue()
    co = threads[0].ctx.spawn(q.get)
    wait_until(lambda: len(q._getters) == 1)
    co.cancel()
    with pytest.raises(Cancelled):
        co.join(QUICK)
    assert co.cancelled()
    assert_no_waiters(q)
    q.put_nowait(1)
    assert q.qsize() == 1  # queued, not handed to the dead getter
    assert reports.seen == []


def test_cancelled_putter_leaves_no_waiter_and_puts_nothing(
    threads: list[IOThread], reports: Recorder
) -> None:
    q: Queue[int] = Queue(maxsize=1)
    q.put_nowait(1)
    co = threads[0].ctx.spawn(q.put, 2)
    wait_until(lambda: len(q._putters) == 1)
    co.cancel()
    with pytest.raises(Cancelled):
        co.join(QUICK)
    assert_no_waiters(q)
    assert q.get_nowait() == 1
    assert q.empty()
    assert reports.seen == []


def test_item_handed_before_the_cancel_is_returned(ctx: AioContext, reports: Recorder) -> None:
    """The hand-off wins: get() returns the item, Cancelled comes at the next wait."""
    q: Queue[int] = Queue()
    got: list[int] = []

    def consumer() -> None:
        got.append(q.get())
        corun.sleep(0)
        got.append(-1)  # never reached

    co = ctx.spawn(consumer)
    drain(ctx)
    q.put_nowait(42)  # claims the getter and wakes it
    co.cancel()  # too late for the get: raised at the sleep
    drain(ctx)
    assert got == [42]
    assert co.cancelled()
    assert q.empty()
    assert reports.seen == []


def test_put_completed_before_the_cancel_stays_put(ctx: AioContext, reports: Recorder) -> None:
    q: Queue[int] = Queue(maxsize=1)
    q.put_nowait(1)
    done: list[int] = []

    def producer() -> None:
        q.put(2)
        done.append(2)
        corun.sleep(0)
        done.append(-1)  # never reached

    co = ctx.spawn(producer)
    drain(ctx)
    assert q.get_nowait() == 1  # the putter's item takes the room
    co.cancel()
    drain(ctx)
    assert done == [2]
    assert co.cancelled()
    assert q.get_nowait() == 2
    assert reports.seen == []


def test_move_on_after_around_a_get(ctx: AioContext, reports: Recorder) -> None:
    q: Queue[int] = Queue()

    def consumer() -> tuple[bool, int]:
        with corun.move_on_after(0.01) as scope:
            q.get()
        return scope.cancelled_caught, len(q._getters)

    co = ctx.spawn(consumer)
    co.join(QUICK)
    assert co.result() == (True, 0)
    assert reports.seen == []


@pytest.mark.parametrize("side", ["get", "put"])
def test_handoff_and_cancel_landing_before_the_waiter_parks(
    threads: list[IOThread], reports: Recorder, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """The hand-off and a cancel both land after get()/put() published its waiter
    but before the coroutine parked.

    White-box, to make a narrow race deterministic: Waiter.wait is wrapped so
    that, for this coroutine's waiter, another thread first completes the
    hand-off (put_nowait / get_nowait) and cancels it. The operation must
    complete (nothing lost), Cancelled comes at the next wait, and the wake-up
    the hand-off sent must be absorbed: later waits behave, the loop reports
    nothing.
    """
    q: Queue[str] = Queue(maxsize=1)
    if side == "put":
        q.put_nowait("first")
    real_wait = corun.waiter.Waiter.wait
    target: list[Coroutine[Any]] = []
    fired: list[bool] = []

    def other() -> None:
        if side == "get":
            q.put_nowait("item")
        else:
            assert q.get_nowait() == "first"
        target[0].cancel()

    def wait(
        self: corun.waiter.Waiter,
        timeout: float | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> bool:
        if target and self.co is target[0] and not fired:
            fired.append(True)
            Outcome(other).get()
        return real_wait(self, timeout, ready)

    monkeypatch.setattr(corun.waiter.Waiter, "wait", wait)
    log: list[str] = []

    def worker() -> None:
        if side == "get":
            log.append(q.get())
        else:
            q.put("item")
            log.append("put")
        try:
            corun.sleep(0)
        except Cancelled:
            log.append("cancelled at the next wait")
        corun.sleep(0.001)  # a later wait behaves normally
        log.append("slept")

    co: Coroutine[None] = Coroutine(worker)
    target.append(co)
    threads[0].ctx.schedule(co)
    co.join(QUICK)
    assert fired
    first = "item" if side == "get" else "put"
    assert log == [first, "cancelled at the next wait", "slept"]
    q.close()
    assert drain_queue(q) == ([] if side == "get" else ["item"])
    assert reports.seen == []


# -- a thread that owns a context -----------------------------------------------------


def test_context_owning_thread_gets_from_a_coroutine_on_its_own_context(
    reports: Recorder,
) -> None:
    """The thread runs its loop while it waits, so the putter can run: no deadlock."""

    def main() -> tuple[int, int, bool]:
        with AioContext("q-owner") as ctx:
            reports.watch(ctx)
            q: Queue[int] = Queue()

            def putter(n: int) -> None:
                corun.sleep(0.001)
                q.put(n)

            a = ctx.spawn(putter, 1)
            first = q.get()
            b = ctx.spawn(putter, 2)
            second = q.get(timeout=QUICK)  # the timed wait runs the loop too
            return first, second, a.done and b.done

    assert Outcome(main).get() == (1, 2, True)
    assert reports.seen == []


def test_context_owning_thread_puts_to_a_coroutine_on_its_own_context(
    reports: Recorder,
) -> None:
    def main() -> list[int]:
        with AioContext("q-owner") as ctx:
            reports.watch(ctx)
            q: Queue[int] = Queue(maxsize=1)
            q.put_nowait(0)

            def getter() -> list[int]:
                return [q.get() for _ in range(3)]

            co = ctx.spawn(getter)
            q.put(1)  # full: waits, running the loop, until the getter makes room
            q.put(2, timeout=QUICK)
            return co.join(QUICK)

    assert Outcome(main).get() == [0, 1, 2]
    assert reports.seen == []


# -- many producers, many consumers ---------------------------------------------------


def check_received(
    per_consumer: list[list[Item]], leftover: list[Item], expected: list[Item]
) -> None:
    """Exactly the items put, each once; per producer, every consumer saw them in order."""
    everything = [item for got in per_consumer for item in got] + leftover
    counts = Counter(everything)
    dupes = [item for item, n in counts.items() if n > 1]
    assert dupes == [], f"duplicated: {dupes[:10]}"
    missing = set(expected) - set(counts)
    assert not missing, f"lost {len(missing)}: {sorted(missing)[:10]}"
    assert counts == Counter(expected)
    for got in per_consumer:
        for pid in {p for p, _ in got}:
            seqs = [s for p, s in got if p == pid]
            assert seqs == sorted(seqs), f"producer {pid} out of order"


def test_producers_and_consumers_across_iothreads_and_threads(
    threads: list[IOThread], reports: Recorder
) -> None:
    """4 producers (2 coroutines on 2 IOThreads, 2 plain threads) to 4 consumers
    (coroutines on 3 IOThreads, a plain thread) through Queue(maxsize=8)."""
    per = 500
    q: Queue[Item] = Queue(maxsize=8)
    over: list[int] = []

    def produce(pid: int) -> None:
        for s in range(per):
            q.put((pid, s))

    def consume(mine: list[Item]) -> None:
        while True:
            try:
                item = q.get()
            except QueueShutDown:
                return
            size = q.qsize()
            if size > q.maxsize:
                over.append(size)
            mine.append(item)

    got: list[list[Item]] = [[] for _ in range(4)]
    consumers = [threads[i].ctx.spawn(consume, got[i]) for i in range(3)]
    thread_consumer = Outcome(lambda: consume(got[3]))
    producers = [threads[0].ctx.spawn(produce, 0), threads[1].ctx.spawn(produce, 1)]
    thread_producers = [Outcome(lambda: produce(2)), Outcome(lambda: produce(3))]
    for p in producers:
        p.join(QUICK)
    for tp in thread_producers:
        tp.get()
    q.close()
    for c in consumers:
        c.join(QUICK)
    thread_consumer.get()
    expected = [(pid, s) for pid in range(4) for s in range(per)]
    check_received(got, drain_queue(q), expected)
    assert over == []
    assert_no_waiters(q)
    assert reports.seen == []


def test_consumers_cancelled_and_timing_out_lose_and_duplicate_nothing(
    threads: list[IOThread], reports: Recorder
) -> None:
    """The same with random cancels of consumer coroutines (replaced as they go)
    and consumers and producers that use tiny timeouts and retry."""
    per = 3000
    rng = random.Random(99)
    q: Queue[Item] = Queue(maxsize=8)
    lock = threading.Lock()
    got: list[list[Item]] = []
    consumers: list[Coroutine[None]] = []
    producers_done = threading.Event()

    def produce(pid: int, timeout: float | None) -> None:
        for s in range(per):
            while True:
                try:
                    q.put((pid, s), timeout=timeout)
                    break
                except QueueFull:
                    continue

    def consume(mine: list[Item], timeout: float | None) -> None:
        while True:
            try:
                item = q.get(timeout=timeout)
            except QueueEmpty:
                continue
            except QueueShutDown:
                return
            mine.append(item)

    def start_consumer() -> None:
        mine: list[Item] = []
        timeout = rng.choice([None, 0.0002, 0.001])
        co = rng.choice(threads).ctx.spawn(consume, mine, timeout)
        with lock:
            got.append(mine)
            consumers.append(co)

    for _ in range(4):
        start_consumer()
    thread_mine: list[Item] = []
    got.append(thread_mine)
    thread_consumer = Outcome(lambda: consume(thread_mine, 0.0005))

    cancels = [0]

    def canceller() -> None:
        # Pacing only: how the cancels fall against the hand-offs does not
        # matter to any assertion.
        # At least one round, however fast the producers are: consumers live
        # until the queue is closed, after producers_done.
        while True:
            with lock:
                live = [c for c in consumers if not c.done]
            if live:
                rng.choice(live).cancel()
                cancels[0] += 1
                start_consumer()
            if producers_done.wait(rng.uniform(0, 0.0005)):
                break

    cancel_thread = Outcome(canceller)
    producers = [
        threads[0].ctx.spawn(produce, 0, None),
        threads[1].ctx.spawn(produce, 1, 0.0003),
    ]
    thread_producers = [Outcome(lambda: produce(2, None)), Outcome(lambda: produce(3, 0.0005))]
    for p in producers:
        p.join(QUICK)
    for tp in thread_producers:
        tp.get()
    producers_done.set()
    cancel_thread.get()
    q.close()
    with lock:
        everyone = list(consumers)
    for c in everyone:
        try:
            c.join(QUICK)
        except Cancelled:
            pass
    thread_consumer.get()
    expected = [(pid, s) for pid in range(4) for s in range(per)]
    check_received(got, drain_queue(q), expected)
    assert cancels[0] > 0
    assert_no_waiters(q)
    assert reports.seen == []


def test_cancel_racing_handoff_to_getters(threads: list[IOThread], reports: Recorder) -> None:
    """Hundreds of rounds: puts race cancels of the coroutines waiting to get them."""
    rng = random.Random(7)
    for r in range(300):
        q: Queue[int] = Queue()
        got: list[list[int]] = [[], []]
        started = [threading.Event(), threading.Event()]

        def consumer(
            i: int, q: Queue[int] = q, got: list[list[int]] = got, started: list[Any] = started
        ) -> None:
            started[i].set()
            while True:
                try:
                    got[i].append(q.get())
                except QueueShutDown:
                    return

        cos = [threads[0].ctx.spawn(consumer, 0), threads[1].ctx.spawn(consumer, 1)]
        if rng.random() < 0.7:  # mostly parked already; sometimes not started yet
            assert started[0].wait(QUICK) and started[1].wait(QUICK)
        barrier = threading.Barrier(2, timeout=QUICK)
        items = [2 * r, 2 * r + 1]

        def putter(
            q: Queue[int] = q, items: list[int] = items, barrier: threading.Barrier = barrier
        ) -> None:
            barrier.wait()
            for item in items:
                q.put(item)

        put_thread = Outcome(putter)
        barrier.wait()
        cos[0].cancel()
        if rng.random() < 0.3:
            cos[1].cancel()
        put_thread.get()
        q.close()
        for co in cos:
            try:
                co.join(QUICK)
            except Cancelled:
                pass
        received = got[0] + got[1] + drain_queue(q)
        assert sorted(received) == items, f"round {r}: {got} left {received}"
        assert_no_waiters(q)
    assert reports.seen == []


def test_cancel_racing_room_for_putters(threads: list[IOThread], reports: Recorder) -> None:
    """Hundreds of rounds: a get making room races the cancel of the waiting putter.

    The putter's item is in the queue exactly when its put() returned.
    """
    rng = random.Random(8)
    for r in range(300):
        q: Queue[int] = Queue(maxsize=1)
        q.put_nowait(-1)
        done: list[int] = []
        parked = threading.Event()

        def producer(
            q: Queue[int] = q, done: list[int] = done, r: int = r, parked: Any = parked
        ) -> None:
            parked.set()
            q.put(r)
            done.append(r)
            corun.sleep(0)  # the deferred cancel, if any, lands here

        co = threads[r % 2].ctx.spawn(producer)
        if rng.random() < 0.7:
            assert parked.wait(QUICK)
            wait_len(q._putters, 1)
        barrier = threading.Barrier(2, timeout=QUICK)

        def getter(q: Queue[int] = q, barrier: threading.Barrier = barrier) -> int:
            barrier.wait()
            return q.get_nowait()

        get_thread = Outcome(getter)
        barrier.wait()
        co.cancel()
        assert get_thread.get() == -1
        try:
            co.join(QUICK)
        except Cancelled:
            pass
        q.close()
        left = drain_queue(q)
        assert left == done, f"round {r}: put returned {done}, queue holds {left}"
        assert_no_waiters(q)
    assert reports.seen == []
