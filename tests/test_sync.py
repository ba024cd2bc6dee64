"""Tests for corun.Event, Semaphore and BoundedSemaphore (issue 9).

Checks API.md, section "Groups and channels": Event (`set`, `clear`,
`is_set`, `wait(timeout=None) -> bool`) and Semaphore / BoundedSemaphore
(`acquire(timeout=None) -> bool`, `release()`, context manager), used at
once by coroutines on several IOThreads and by plain threads, with
cancellation ("Cancellation and timeouts"): a cancelled wait leaves no
waiter behind, and a permit is never lost or counted twice whoever gives up
when.

Synchronisation is by events, joins and `call_sync` only. A coroutine on
the main thread's context is known to be parked once `drain(ctx)` returns
(its loop runs only when the test polls it); elsewhere the test waits until
the object lists the waiter. Stress runs check invariants inside the
critical section and exact counts at the end, never timing. Every context
gets an exception handler that records what it hears, and the tests end by
asserting that it heard nothing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Recorder, drain, wait_len, wait_until

import corun
import corun.waiter
from corun import (
    AioContext,
    BoundedSemaphore,
    Cancelled,
    Coroutine,
    Event,
    IOThread,
    Semaphore,
)

pytestmark = pytest.mark.timeout(20)

# Bound for anything that must happen "at once" or "eventually": it only
# turns a hang into a failure, no assertion depends on it.
QUICK = 5.0


@pytest.fixture
def reports() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(reports: Recorder) -> Iterator[AioContext]:
    """A context owned by the main thread (the test), watched by `reports`."""
    with AioContext("test-sync") as c:
        reports.watch(c)
        yield c


@pytest.fixture
def threads(reports: Recorder) -> Iterator[list[IOThread]]:
    """Two IOThreads watched by `reports`, joined afterwards."""
    ts = [IOThread(f"sync-io{i}") for i in range(2)]
    for t in ts:
        reports.watch(t.ctx)
    yield ts
    for t in ts:
        t.join(QUICK)


class Outcome:
    """fn() in a plain thread; `get()` joins it, returns its value or re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str = "sync-thread") -> None:
        self._value: list[tuple[bool, Any]] = []
        self._thread = threading.Thread(target=self._main, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _main(self, fn: Callable[[], Any]) -> None:
        try:
            self._value.append((True, fn()))
        except BaseException as exc:
            self._value.append((False, exc))

    def get(self, timeout: float = QUICK) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "thread did not finish in time"
        ok, value = self._value[0]
        if not ok:
            raise value
        return value


def join_quietly(co: Coroutine[Any]) -> str:
    """Join `co`: "cancelled" or "returned"."""
    try:
        co.join(QUICK)
    except Cancelled:
        return "cancelled"
    return "returned"


# -- Event --------------------------------------------------------------------------------


def test_event_flag_basics() -> None:
    ev = Event()
    assert not ev.is_set()
    assert ev.wait(0.01) is False
    assert ev.wait(0) is False
    ev.set()
    assert ev.is_set()
    assert ev.wait() is True
    assert ev.wait(0) is True
    ev.set()  # idempotent
    ev.clear()
    assert not ev.is_set()
    assert ev.wait(0.01) is False
    ev.clear()
    assert not ev.is_set()
    assert len(ev._waiters) == 0


def test_event_wait_timeout_in_coroutines(threads: list[IOThread], reports: Recorder) -> None:
    ev = Event()

    def waiter() -> tuple[bool, bool]:
        return ev.wait(0.01), ev.wait(0)

    assert threads[0].ctx.spawn(waiter).join(QUICK) == (False, False)
    assert len(ev._waiters) == 0
    ev.set()
    assert threads[1].ctx.spawn(waiter).join(QUICK) == (True, True)
    assert reports.seen == []


def test_event_set_from_plain_thread_wakes_coroutines_and_threads(
    threads: list[IOThread], reports: Recorder
) -> None:
    ev = Event()
    cos = [t.ctx.spawn(ev.wait) for t in threads for _ in range(2)]
    timed = threads[0].ctx.spawn(ev.wait, QUICK)
    plain = [Outcome(ev.wait), Outcome(lambda: ev.wait(QUICK))]

    def context_owner() -> list[bool]:
        # A thread that owns a context waits, and a coroutine on that context too.
        with AioContext("sync-owner") as own:
            reports.watch(own)
            co = own.spawn(ev.wait)
            return [ev.wait(), co.join(QUICK)]

    owner = Outcome(context_owner)
    wait_until(lambda: len(ev._waiters) == 9)  # everyone parked: no fast path
    Outcome(ev.set).get()
    assert [c.join(QUICK) for c in cos] == [True] * 4
    assert timed.join(QUICK) is True
    assert [p.get() for p in plain] == [True, True]
    assert owner.get() == [True, True]
    assert len(ev._waiters) == 0
    assert reports.seen == []


def test_event_waiter_woken_by_set_returns_true_even_if_cleared_at_once(
    ctx: AioContext, reports: Recorder
) -> None:
    """As threading.Event and asyncio.Event: a wait woken by set() reports True."""
    ev = Event()
    co = ctx.spawn(ev.wait)
    drain(ctx)
    assert not co.done
    ev.set()
    ev.clear()
    drain(ctx)
    assert co.result() is True
    assert len(ev._waiters) == 0
    assert reports.seen == []


def test_cancelled_event_wait_leaves_no_waiter(
    ctx: AioContext, threads: list[IOThread], reports: Recorder
) -> None:
    ev = Event()
    home = ctx.spawn(ev.wait)
    drain(ctx)
    remote = [t.ctx.spawn(ev.wait) for t in threads]
    timed = threads[0].ctx.spawn(ev.wait, 30)
    wait_until(lambda: len(ev._waiters) == 4)
    for co in [home, *remote, timed]:
        assert co.cancel()
    drain(ctx)
    for co in [home, *remote, timed]:
        with pytest.raises(Cancelled):
            co.join(QUICK)
        assert co.cancelled()
    assert len(ev._waiters) == 0
    ev.set()  # nothing stale to wake
    assert reports.seen == []


def test_move_on_after_around_an_event_wait(ctx: AioContext, reports: Recorder) -> None:
    ev = Event()

    def waiter() -> tuple[bool, int]:
        with corun.move_on_after(0.01) as scope:
            ev.wait()
        return scope.cancelled_caught, len(ev._waiters)

    assert ctx.spawn(waiter).join(QUICK) == (True, 0)
    assert reports.seen == []


def test_event_cancel_racing_set(threads: list[IOThread], reports: Recorder) -> None:
    """Hundreds of rounds: set() from one thread races cancel() from another."""
    rng = random.Random(5)
    outcomes: set[str] = set()
    for r in range(300):
        ev = Event()
        co = threads[r % 2].ctx.spawn(ev.wait)
        if rng.random() < 0.7:
            wait_len(ev._waiters, 1)
        barrier = threading.Barrier(2, timeout=QUICK)

        def setter(ev: Event = ev, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            ev.set()

        t = Outcome(setter)
        barrier.wait()
        co.cancel()
        t.get()
        how = join_quietly(co)
        if how == "returned":
            assert co.result() is True
        outcomes.add(how)
        assert len(ev._waiters) == 0, f"round {r}"
    assert "cancelled" in outcomes
    assert reports.seen == []


def test_context_owning_thread_waits_for_event_set_on_its_own_context(
    reports: Recorder,
) -> None:
    def main() -> tuple[bool, bool]:
        with AioContext("sync-owner") as own:
            reports.watch(own)
            ev = Event()

            def setter() -> None:
                corun.sleep(0.001)
                ev.set()

            own.spawn(setter)
            first = ev.wait()  # runs the loop while it waits: no deadlock
            ev.clear()
            own.spawn(setter)
            return first, ev.wait(QUICK)

    assert Outcome(main).get() == (True, True)
    assert reports.seen == []


def race_before_park(
    monkeypatch: pytest.MonkeyPatch, target: list[Coroutine[Any]], other: Callable[[], None]
) -> list[bool]:
    """Wrap Waiter.wait: for `target[0]`'s waiter, run other() in another thread first.

    White-box, to make a narrow race deterministic: what other() does lands
    after the wait published its waiter and before the coroutine parked.
    Returns a list that gets one entry when the hook fired.
    """
    real_wait = corun.waiter.Waiter.wait
    fired: list[bool] = []

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
    return fired


def test_event_set_and_cancel_landing_before_the_waiter_parks(
    threads: list[IOThread], reports: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set() and cancel() from another thread between the publish and the park.

    wait() may return True or raise Cancelled, but the wake-up set() sent must
    be absorbed: a later wait behaves normally and the loop reports nothing.
    """
    ev = Event()
    target: list[Coroutine[Any]] = []

    def other() -> None:
        ev.set()
        target[0].cancel()

    fired = race_before_park(monkeypatch, target, other)
    log: list[str] = []

    def worker() -> None:
        try:
            log.append(f"wait {ev.wait()}")
            corun.sleep(0)
        except Cancelled:
            log.append("cancelled")
        corun.sleep(0.001)
        log.append("slept")

    co: Coroutine[None] = Coroutine(worker)
    target.append(co)
    threads[0].ctx.schedule(co)
    co.join(QUICK)
    assert fired
    assert log in (["cancelled", "slept"], ["wait True", "cancelled", "slept"])
    assert len(ev._waiters) == 0
    assert reports.seen == []


# -- Semaphore ------------------------------------------------------------------------


def test_semaphore_basics() -> None:
    with pytest.raises(ValueError):
        Semaphore(-1)
    assert Semaphore().value == 1
    assert Semaphore(0).locked()
    sem = Semaphore(2)
    assert not sem.locked()
    assert sem.acquire() is True
    assert sem.acquire(timeout=0) is True
    assert sem.value == 0 and sem.locked()
    assert sem.acquire(timeout=0.01) is False
    assert sem.acquire(timeout=0) is False
    assert sem.value == 0
    sem.release()
    assert sem.value == 1
    sem.release()
    sem.release()  # a plain Semaphore may go above its initial value
    assert sem.value == 3
    assert len(sem._waiters) == 0


def test_semaphore_acquire_timeout_in_coroutines(
    threads: list[IOThread], reports: Recorder
) -> None:
    sem = Semaphore(0)

    def taker() -> tuple[bool, bool]:
        return sem.acquire(timeout=0.01), sem.acquire(timeout=0)

    assert threads[0].ctx.spawn(taker).join(QUICK) == (False, False)
    assert sem.value == 0 and len(sem._waiters) == 0
    sem.release()
    sem.release()
    assert threads[1].ctx.spawn(taker).join(QUICK) == (True, True)
    assert sem.value == 0
    assert reports.seen == []


def test_semaphore_context_manager(ctx: AioContext, reports: Recorder) -> None:
    sem = Semaphore(2)
    with sem as acquired:
        assert acquired is True
        assert sem.value == 1
    assert sem.value == 2
    with pytest.raises(KeyError):
        with sem:
            raise KeyError("inside")
    assert sem.value == 2

    def co_side() -> list[int]:
        seen = []
        with sem:
            seen.append(sem.value)
            with sem:
                seen.append(sem.value)
        seen.append(sem.value)
        return seen

    co = ctx.spawn(co_side)
    drain(ctx)
    assert co.result() == [1, 0, 2]
    assert reports.seen == []


def test_semaphore_hands_permits_in_fifo_order_without_barging(
    ctx: AioContext, reports: Recorder
) -> None:
    sem = Semaphore(0)
    order: list[str] = []

    def taker(tag: str) -> None:
        sem.acquire()
        order.append(tag)

    a = ctx.spawn(taker, "a")
    drain(ctx)
    b = ctx.spawn(taker, "b")
    drain(ctx)
    assert len(sem._waiters) == 2
    sem.release()  # handed to "a", not to the count
    assert sem.value == 0
    assert sem.acquire(timeout=0) is False  # no barging past a waiter
    sem.release()
    drain(ctx)
    assert a.done and b.done
    assert order == ["a", "b"]
    assert sem.value == 0 and len(sem._waiters) == 0
    assert reports.seen == []


def test_bounded_semaphore_refuses_over_release(ctx: AioContext, reports: Recorder) -> None:
    sem = BoundedSemaphore(2)
    with pytest.raises(ValueError):
        sem.release()
    assert sem.value == 2
    assert sem.acquire() and sem.acquire()
    sem.release()
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    assert sem.value == 2
    with sem:
        assert sem.value == 1
    assert sem.value == 2
    assert BoundedSemaphore().value == 1

    # A release handed to a waiter never trips the bound.
    one = BoundedSemaphore(1)
    assert one.acquire()
    co = ctx.spawn(one.acquire)
    drain(ctx)
    one.release()
    drain(ctx)
    assert co.result() is True and one.value == 0
    one.release()
    assert one.value == 1
    with pytest.raises(ValueError):
        one.release()
    assert one.value == 1
    assert reports.seen == []


def test_cancelled_semaphore_waiters_leave_no_waiter(
    threads: list[IOThread], reports: Recorder
) -> None:
    sem = Semaphore(0)
    cos = [t.ctx.spawn(sem.acquire) for t in threads]
    cos.append(threads[0].ctx.spawn(sem.acquire, 30))
    wait_until(lambda: len(sem._waiters) == 3)
    for co in cos:
        co.cancel()
    for co in cos:
        with pytest.raises(Cancelled):
            co.join(QUICK)
    assert len(sem._waiters) == 0
    sem.release()
    assert sem.value == 1  # to the count, not to a stale waiter
    assert reports.seen == []


def test_permit_handed_before_the_cancel_is_kept(ctx: AioContext, reports: Recorder) -> None:
    """The hand-off wins: acquire() returns True, Cancelled comes at the next wait."""
    sem = Semaphore(0)
    steps: list[str] = []

    def taker() -> None:
        got = sem.acquire()
        steps.append(f"acquired {got}")
        try:
            corun.sleep(0)
            steps.append("not cancelled")
        finally:
            sem.release()

    co = ctx.spawn(taker)
    drain(ctx)
    sem.release()  # handed to the parked taker
    co.cancel()
    drain(ctx)
    assert steps == ["acquired True"]
    assert co.cancelled()
    assert sem.value == 1 and len(sem._waiters) == 0
    assert reports.seen == []


def test_release_and_cancel_landing_before_the_waiter_parks(
    threads: list[IOThread], reports: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release() and cancel() between the publish and the park: the permit is
    taken (acquire returns True), Cancelled comes at the next wait, and the
    wake-up release() sent is absorbed (later waits behave, no report)."""
    sem = Semaphore(0)
    target: list[Coroutine[Any]] = []

    def other() -> None:
        sem.release()
        target[0].cancel()

    fired = race_before_park(monkeypatch, target, other)
    log: list[str] = []

    def worker() -> None:
        log.append(f"acquired {sem.acquire()}")
        try:
            corun.sleep(0)
        except Cancelled:
            log.append("cancelled at the next wait")
        finally:
            sem.release()
        corun.sleep(0.001)
        log.append("slept")

    co: Coroutine[None] = Coroutine(worker)
    target.append(co)
    threads[0].ctx.schedule(co)
    co.join(QUICK)
    assert fired
    assert log == ["acquired True", "cancelled at the next wait", "slept"]
    assert sem.value == 1 and len(sem._waiters) == 0
    assert reports.seen == []


def test_semaphore_stress_never_exceeds_its_value(
    threads: list[IOThread], reports: Recorder
) -> None:
    """Semaphore(3) shared by 8 coroutines on 2 IOThreads and 2 plain threads.

    Inside the critical section a counter under a lock checks that no more
    than 3 holders are ever inside; at the end every permit is back.
    """
    sem = Semaphore(3)
    lock = threading.Lock()
    inside = [0]
    peak = [0]
    violations: list[int] = []
    entries = [0]
    rounds = 300

    def enter() -> None:
        with lock:
            inside[0] += 1
            entries[0] += 1
            peak[0] = max(peak[0], inside[0])
            if inside[0] > 3:
                violations.append(inside[0])

    def leave() -> None:
        with lock:
            inside[0] -= 1

    def co_worker(timeout: float | None) -> None:
        for _ in range(rounds):
            while not sem.acquire(timeout=timeout):
                pass
            try:
                enter()
                corun.sleep(0)  # lets others run and park on the semaphore
                leave()
            finally:
                sem.release()

    def thread_worker() -> None:
        for _ in range(rounds):
            with sem:
                enter()
                time.sleep(0)
                leave()

    workers = [
        t.ctx.spawn(co_worker, timeout) for t in threads for timeout in (None, None, 0.0005, 0.001)
    ]
    plain = [Outcome(thread_worker), Outcome(thread_worker)]
    for w in workers:
        w.join(QUICK * 2)
    for p in plain:
        p.get(QUICK * 2)
    assert violations == []
    assert 1 <= peak[0] <= 3
    assert entries[0] == rounds * (len(workers) + len(plain))
    assert inside[0] == 0
    assert sem.value == 3 and len(sem._waiters) == 0
    assert reports.seen == []


def test_cancel_racing_release_never_loses_or_duplicates_a_permit(
    threads: list[IOThread], reports: Recorder
) -> None:
    """Hundreds of rounds: release() from one thread races cancel() of the waiter."""
    rng = random.Random(3)
    outcomes: set[str] = set()
    for r in range(300):
        sem = Semaphore(1)
        assert sem.acquire()  # the test holds the only permit
        held: list[bool] = []

        def taker(sem: Semaphore = sem, held: list[bool] = held) -> None:
            if sem.acquire():
                held.append(True)
                try:
                    corun.sleep(0)  # a deferred cancel lands here
                finally:
                    sem.release()

        co = threads[r % 2].ctx.spawn(taker)
        if rng.random() < 0.7:
            wait_len(sem._waiters, 1)
        barrier = threading.Barrier(2, timeout=QUICK)

        def releaser(sem: Semaphore = sem, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            sem.release()

        t = Outcome(releaser)
        barrier.wait()
        co.cancel()
        t.get()
        outcomes.add(f"{join_quietly(co)} held={bool(held)}")
        assert sem.value == 1, f"round {r}: value {sem.value}, held {held}"
        assert len(sem._waiters) == 0
    assert any(o.startswith("cancelled") for o in outcomes)
    assert reports.seen == []


def test_semaphore_with_random_cancels_and_timeouts_keeps_every_permit(
    threads: list[IOThread], reports: Recorder
) -> None:
    """Semaphore(3): coroutine workers (some with timeouts) cancelled at random and
    replaced, plain-thread workers with timeouts; the invariant holds throughout
    and every permit is back at the end."""
    rng = random.Random(11)
    sem = Semaphore(3)
    lock = threading.Lock()
    inside = [0]
    violations: list[int] = []
    workers: list[Coroutine[None]] = []
    stop = threading.Event()

    def critical() -> None:
        with lock:
            inside[0] += 1
            if inside[0] > 3:
                violations.append(inside[0])
        try:
            corun.sleep(0)
        finally:
            with lock:
                inside[0] -= 1

    def co_worker(timeout: float | None) -> None:
        while not stop.is_set():
            if sem.acquire(timeout=timeout):
                try:
                    critical()
                finally:
                    sem.release()

    def thread_worker() -> int:
        n = 0
        while not stop.is_set():
            if sem.acquire(timeout=0.0005):
                try:
                    with lock:
                        inside[0] += 1
                        if inside[0] > 3:
                            violations.append(inside[0])
                    with lock:
                        inside[0] -= 1
                    n += 1
                finally:
                    sem.release()
        return n

    def start_worker() -> None:
        co = rng.choice(threads).ctx.spawn(co_worker, rng.choice([None, 0.0002, 0.001]))
        with lock:
            workers.append(co)

    for _ in range(8):
        start_worker()
    plain = [Outcome(thread_worker), Outcome(thread_worker)]
    cancels = 0
    while cancels < 150:
        # Pacing only: how cancels fall against the releases does not matter.
        time.sleep(rng.uniform(0, 0.0005))
        with lock:
            live = [w for w in workers if not w.done]
        rng.choice(live).cancel()
        cancels += 1
        start_worker()
    stop.set()
    with lock:
        everyone = list(workers)
    results = [join_quietly(w) for w in everyone]
    for p in plain:
        p.get()
    assert violations == []
    assert inside[0] == 0
    assert results.count("cancelled") >= 1
    assert sem.value == 3 and len(sem._waiters) == 0
    assert reports.seen == []


def test_context_owning_thread_acquires_from_a_coroutine_on_its_own_context(
    reports: Recorder,
) -> None:
    def main() -> tuple[bool, bool, int]:
        with AioContext("sync-owner") as own:
            reports.watch(own)
            sem = Semaphore(0)

            def releaser() -> None:
                corun.sleep(0.001)
                sem.release()

            own.spawn(releaser)
            first = sem.acquire()  # runs the loop while it waits: no deadlock
            own.spawn(releaser)
            second = sem.acquire(timeout=QUICK)
            return first, second, sem.value

    assert Outcome(main).get() == (True, True, 0)
    assert reports.seen == []
