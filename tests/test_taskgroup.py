"""Tests for corun.TaskGroup (issue 9): structured concurrency across IOThreads.

Checks API.md, section "Groups and channels" (TaskGroup) and its interplay
with "Cancellation and timeouts": leaving the block waits for every child,
wherever it runs; the first failure cancels the others (across threads)
and the block raises an ExceptionGroup of exactly the failures; cancelling
the owner cancels the children; children spawn grandchildren; spawning
into a closing group raises RuntimeError; a timeout scope around a group.

Synchronisation is by events, counters and joins only. Every owner runs in
a helper thread joined with a bound (`bounded`), so a group whose exit
never returns fails its test instead of hanging the suite. Every context
gets an exception handler that records what it hears: a child's failure
belongs to the group, and cancellation is not an error, so the tests end by
asserting that it heard nothing.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from helpers import Recorder

import corun
from corun import AioContext, Cancelled, Coroutine, IOThread, TaskGroup

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

pytestmark = pytest.mark.timeout(15)

T = TypeVar("T")

# Bound for anything that must happen "at once" or "eventually": it only
# turns a hang into a failure, no assertion depends on it.
QUICK = 5.0
# Bound on a whole owner (every owner here ends well within it): a group
# whose exit never returns fails its test after this long.
HANG = 4.0


class Tally:
    """A thread-safe counter that plain threads can wait on.

    `reached` is a corun.Event set once the count reaches `target`, so that
    coroutines can wait for it too without blocking their loop.
    """

    def __init__(self, target: int = 0) -> None:
        self._cond = threading.Condition()
        self.count = 0
        self.target = target
        self.reached = corun.Event()

    def hit(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()
            reached = self.count == self.target
        if reached:
            self.reached.set()

    def wait_for(self, n: int, timeout: float = QUICK) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, timeout), (
                f"count {self.count} never reached {n}"
            )


@pytest.fixture
def reports() -> Recorder:
    return Recorder()


@pytest.fixture
def threads(reports: Recorder) -> Iterator[list[IOThread]]:
    """Three IOThreads watched by `reports`, joined afterwards."""
    ts = [IOThread(f"tg-io{i}") for i in range(3)]
    for t in ts:
        reports.watch(t.ctx)
    yield ts
    for t in ts:
        t.join(QUICK)


def bounded(fn: Callable[[], T], timeout: float = HANG) -> T:
    """fn() in a fresh plain thread: its result, or its exception re-raised; fails if it hangs."""
    outcome: list[tuple[bool, Any]] = []

    def main() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    t = threading.Thread(target=main, name="tg-owner", daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn!r} did not finish within {timeout} s (a TaskGroup hangs?)"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def run_owner(fn: Callable[[], T], reports: Recorder, timeout: float = HANG) -> T:
    """corun.run(fn) in a fresh plain thread, its context watched by `reports`."""

    def main() -> T:
        ctx = corun.current_context()
        assert ctx is not None
        reports.watch(ctx)
        return fn()

    return bounded(lambda: corun.run(main), timeout)


def ident_of(t: IOThread) -> int:
    return t.ctx.call_sync(threading.get_ident)


def wait_until(predicate: Callable[[], bool], timeout: float = QUICK) -> None:
    """Poll `predicate` until it holds; only for states no Event can announce."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def sleeper_factory(started: Tally, finals: list[str]) -> Callable[[str], None]:
    """A child that says it started, sleeps "forever", and records its finally block."""

    def sleeper(tag: str) -> None:
        try:
            started.hit()
            corun.sleep(30)
        finally:
            finals.append(tag)

    return sleeper


def only(eg: BaseException) -> list[BaseException]:
    assert isinstance(eg, BaseExceptionGroup)
    return list(eg.exceptions)


# -- leaving the block waits for every child -------------------------------------------


def test_coroutine_owner_waits_for_children_on_three_iothreads_and_its_context(
    threads: list[IOThread], reports: Recorder
) -> None:
    gate = corun.Event()
    started = Tally()

    def child(tag: str) -> tuple[str, int]:
        started.hit()
        assert gate.wait(QUICK)
        return tag, threading.get_ident()

    def opener() -> None:
        started.wait_for(4)
        gate.set()

    def owner() -> tuple[list[Coroutine[tuple[str, int]]], int, list[bool]]:
        with TaskGroup() as tg:
            kids = [tg.spawn(child, f"io{i}", ctx=t.ctx) for i, t in enumerate(threads)]
            kids.append(tg.spawn(child, "own"))
            # They are all gated on `gate`, which opens only once all started.
            done_in_block = [k.done for k in kids]
            threading.Thread(target=opener, daemon=True).start()
        assert all(k.done for k in kids)
        return kids, threading.get_ident(), done_in_block

    kids, me, done_in_block = run_owner(owner, reports)
    assert done_in_block == [False] * 4
    expected = [(f"io{i}", ident_of(t)) for i, t in enumerate(threads)] + [("own", me)]
    assert [k.result() for k in kids] == expected
    assert [k.join() for k in kids] == expected
    assert not any(k.cancelled() for k in kids)
    assert reports.seen == []


def test_plain_thread_owner_with_ctx_for_every_child(
    threads: list[IOThread], reports: Recorder
) -> None:
    gate = corun.Event()
    started = Tally()

    def child(n: int) -> int:
        started.hit()
        assert gate.wait(QUICK)
        corun.sleep(0)
        return n * n

    def opener() -> None:
        started.wait_for(9)
        gate.set()

    def owner() -> list[Coroutine[int]]:
        assert corun.current_context() is None
        with TaskGroup() as tg:
            kids = [tg.spawn(child, i, ctx=threads[i % 3].ctx) for i in range(9)]
            assert not any(k.done for k in kids)
            threading.Thread(target=opener, daemon=True).start()
        assert all(k.done for k in kids)
        return kids

    kids = bounded(owner)
    assert [k.result() for k in kids] == [i * i for i in range(9)]
    assert [k.ctx for k in kids] == [threads[i % 3].ctx for i in range(9)]
    assert reports.seen == []


def test_plain_thread_owning_a_context_runs_default_children_there_while_it_waits(
    threads: list[IOThread], reports: Recorder
) -> None:
    """No ctx=: children go to the owner's open context; the exit wait runs its loop."""

    def owner() -> tuple[list[int], int, int]:
        with AioContext("tg-owner-ctx") as ctx:
            reports.watch(ctx)
            order: list[int] = []
            q: corun.Queue[int] = corun.Queue()

            def local(n: int) -> int:
                order.append(n)
                corun.sleep(0)
                return threading.get_ident()

            def remote() -> int:
                q.put(7)  # hands over to the local child, across threads
                return threading.get_ident()

            def local_getter() -> int:
                return q.get(QUICK)

            with TaskGroup() as tg:
                a = tg.spawn(local, 1)
                b = tg.spawn(local, 2)
                g = tg.spawn(local_getter)
                r = tg.spawn(remote, ctx=threads[0].ctx)
            assert a.ctx is ctx and b.ctx is ctx and g.ctx is ctx
            assert a.result() == b.result() == threading.get_ident()
            return order, g.result(), r.result()

    order, got, remote_ident = bounded(owner)
    assert sorted(order) == [1, 2]
    assert got == 7
    assert remote_ident == ident_of(threads[0])
    assert reports.seen == []


@pytest.mark.parametrize("owner_kind", ["thread", "thread-with-context", "coroutine"])
def test_children_are_done_with_results_as_soon_as_the_block_is_left(
    threads: list[IOThread], reports: Recorder, owner_kind: str
) -> None:
    """Right after the block, every child is done and result() answers (asyncio's promise)."""

    def rounds() -> list[int]:
        late: list[int] = []
        for r in range(200):
            with TaskGroup() as tg:
                kids = [tg.spawn(corun.sleep, 0, ctx=t.ctx) for t in threads]
            if not all(k.done for k in kids):
                late.append(r)
            for k in kids:
                k.result()  # RuntimeError "has not finished" if the block left too early
        return late

    def with_context() -> list[int]:
        with AioContext("tg-owner-ctx") as ctx:
            reports.watch(ctx)
            return rounds()

    if owner_kind == "thread":
        late = bounded(rounds)
    elif owner_kind == "thread-with-context":
        late = bounded(with_context)
    else:
        late = run_owner(rounds, reports)
    assert late == []
    assert reports.seen == []


def test_empty_group_and_group_of_finished_children(reports: Recorder) -> None:
    def owner() -> int:
        with TaskGroup():
            pass
        with TaskGroup() as tg:
            kid = tg.spawn(lambda: 5)
        return kid.result()

    assert run_owner(owner, reports) == 5
    with TaskGroup():
        pass  # a plain thread with no context and no children
    assert reports.seen == []


def test_spawn_returns_a_named_coroutine(threads: list[IOThread], reports: Recorder) -> None:
    def owner() -> tuple[str, str]:
        with TaskGroup() as tg:
            a = tg.spawn(corun.sleep, 0, name="napper")
            b = tg.spawn(corun.sleep, 0, ctx=threads[1].ctx)
        return a.name, b.name

    a_name, b_name = run_owner(owner, reports)
    assert a_name == "napper"
    assert isinstance(b_name, str) and b_name
    assert reports.seen == []


# -- failures ------------------------------------------------------------------------


def test_one_failure_cancels_the_others_and_interrupts_the_owner_body(
    threads: list[IOThread], reports: Recorder
) -> None:
    started = Tally(target=4)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    boom = ValueError("boom")
    body: list[str] = []

    def failing() -> None:
        assert started.reached.wait(QUICK)
        raise boom

    def owner() -> tuple[BaseException, list[Coroutine[None]], Coroutine[None], int]:
        me = corun.current_coroutine()
        assert me is not None
        kids: list[Coroutine[None]] = []
        try:
            with TaskGroup() as tg:
                kids = [tg.spawn(sleeper, f"io{i}", ctx=t.ctx) for i, t in enumerate(threads)]
                kids.append(tg.spawn(sleeper, "own"))
                bad = tg.spawn(failing, ctx=threads[1].ctx)
                try:
                    corun.sleep(30)
                    body.append("slept through")
                except Cancelled:
                    body.append("interrupted")
                    raise
        except ExceptionGroup as eg:
            caught: BaseException = eg
        # The group withdrew its cancel of the owner: it runs on normally.
        corun.sleep(0)
        return caught, kids, bad, me.cancelling()

    eg, kids, bad, cancelling = run_owner(owner, reports)
    assert isinstance(eg, ExceptionGroup)
    assert only(eg) == [boom]
    assert body == ["interrupted"]
    assert cancelling == 0
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io0", "io1", "io2", "own"]
    assert bad.done and not bad.cancelled() and bad.exception() is boom
    assert reports.seen == []


def test_one_failure_with_plain_thread_owner(threads: list[IOThread], reports: Recorder) -> None:
    started = Tally(target=3)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    boom = RuntimeError("child failed")

    def failing() -> None:
        assert started.reached.wait(QUICK)
        raise boom

    def owner() -> tuple[BaseException, list[Coroutine[None]]]:
        try:
            with TaskGroup() as tg:
                kids = [tg.spawn(sleeper, f"io{i}", ctx=t.ctx) for i, t in enumerate(threads)]
                tg.spawn(failing, ctx=threads[0].ctx)
        except ExceptionGroup as eg:
            return eg, kids
        raise AssertionError("no ExceptionGroup")

    eg, kids = bounded(owner)
    assert only(eg) == [boom]
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io0", "io1", "io2"]
    assert reports.seen == []


def test_two_failures_are_both_in_the_group(threads: list[IOThread], reports: Recorder) -> None:
    started = Tally(target=2)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    # Both failing children pass the barrier before either raises: neither
    # can be cancelled by the other first (a barrier is no cancellation point).
    barrier = threading.Barrier(2, timeout=QUICK)
    errors = [ValueError("first"), KeyError("second")]

    def failing(i: int) -> None:
        assert started.reached.wait(QUICK)
        barrier.wait()
        raise errors[i]

    def owner() -> tuple[BaseException, list[Coroutine[None]]]:
        try:
            with TaskGroup() as tg:
                kids = [tg.spawn(sleeper, "io2", ctx=threads[2].ctx), tg.spawn(sleeper, "own")]
                tg.spawn(failing, 0, ctx=threads[0].ctx)
                tg.spawn(failing, 1, ctx=threads[1].ctx)
        except ExceptionGroup as eg:
            return eg, kids
        raise AssertionError("no ExceptionGroup")

    eg, kids = run_owner(owner, reports)
    got = only(eg)
    assert len(got) == 2
    assert {id(e) for e in got} == {id(e) for e in errors}
    assert not any(isinstance(e, Cancelled) for e in got)
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io2", "own"]
    assert reports.seen == []


def test_failure_while_owner_waits_at_the_exit(threads: list[IOThread], reports: Recorder) -> None:
    started = Tally(target=3)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    boom = OSError("late failure")

    def failing() -> None:
        assert started.reached.wait(QUICK)
        corun.sleep(0.001)  # lets the owner reach the exit; nothing depends on it
        raise boom

    def owner() -> BaseException:
        try:
            with TaskGroup() as tg:
                for i, t in enumerate(threads):
                    tg.spawn(sleeper, f"io{i}", ctx=t.ctx)
                tg.spawn(failing)
        except ExceptionGroup as eg:
            return eg
        raise AssertionError("no ExceptionGroup")

    eg = run_owner(owner, reports)
    assert only(eg) == [boom]
    assert sorted(finals) == ["io0", "io1", "io2"]
    assert reports.seen == []


def test_the_body_raising_cancels_children_and_joins_the_group(
    threads: list[IOThread], reports: Recorder
) -> None:
    started = Tally(target=4)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    oops = KeyError("body")

    def owner() -> tuple[BaseException, list[Coroutine[None]]]:
        try:
            with TaskGroup() as tg:
                kids = [tg.spawn(sleeper, f"io{i}", ctx=t.ctx) for i, t in enumerate(threads)]
                kids.append(tg.spawn(sleeper, "own"))
                assert started.reached.wait(QUICK)
                raise oops
        except ExceptionGroup as eg:
            return eg, kids
        raise AssertionError("no ExceptionGroup")

    eg, kids = run_owner(owner, reports)
    assert only(eg) == [oops]
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io0", "io1", "io2", "own"]
    assert reports.seen == []


def test_the_body_and_a_child_failing_are_both_in_the_group(
    threads: list[IOThread], reports: Recorder
) -> None:
    boom = ValueError("child")
    oops = KeyError("body")
    failed = threading.Event()

    def failing() -> None:
        try:
            raise boom
        finally:
            failed.set()

    def owner() -> BaseException:
        try:
            with TaskGroup() as tg:
                tg.spawn(failing, ctx=threads[0].ctx)
                # A plain thread cannot be interrupted: the body goes on.
                assert failed.wait(QUICK)
                raise oops
        except ExceptionGroup as eg:
            return eg
        raise AssertionError("no ExceptionGroup")

    eg = bounded(owner)
    got = only(eg)
    assert len(got) == 2 and {id(e) for e in got} == {id(boom), id(oops)}
    assert reports.seen == []


def test_body_raising_before_its_children_start(threads: list[IOThread], reports: Recorder) -> None:
    """Children cancelled before they ever ran still count as finished."""
    ran: list[str] = []
    oops = KeyError("body")

    def owner() -> tuple[BaseException, list[Coroutine[None]]]:
        try:
            with TaskGroup() as tg:
                # On the owner's own context: they cannot start before it yields.
                kids = [tg.spawn(ran.append, "own0"), tg.spawn(ran.append, "own1")]
                raise oops
        except ExceptionGroup as eg:
            return eg, kids
        raise AssertionError("no ExceptionGroup")

    eg, kids = run_owner(owner, reports)
    assert only(eg) == [oops]
    assert ran == []
    assert all(k.cancelled() for k in kids)
    assert reports.seen == []


def test_failure_cancels_children_not_yet_started_on_a_busy_iothread(
    threads: list[IOThread], reports: Recorder
) -> None:
    """A child queued behind a blocked loop is cancelled before it ever runs."""
    busy = threading.Event()
    release = threading.Event()
    ran: list[str] = []
    boom = ValueError("boom")

    def block() -> None:
        busy.set()
        assert release.wait(QUICK)  # blocks threads[1]'s loop on purpose

    def failing() -> None:
        raise boom

    def owner() -> tuple[BaseException, Coroutine[None]]:
        threads[1].ctx.call_soon(block)
        assert busy.wait(QUICK)
        try:
            with TaskGroup() as tg:
                queued = tg.spawn(ran.append, "queued", ctx=threads[1].ctx)
                tg.spawn(failing, ctx=threads[0].ctx)
                # Once the failure has cancelled `queued`, unblock its loop.
                wait_until(lambda: queued.cancelling() > 0)
                release.set()
        except ExceptionGroup as eg:
            return eg, queued
        raise AssertionError("no ExceptionGroup")

    try:
        eg, queued = bounded(owner)
    finally:
        release.set()
    assert only(eg) == [boom]
    assert ran == []
    assert queued.cancelled()
    assert reports.seen == []


def test_base_exception_failure_gives_a_base_exception_group(reports: Recorder) -> None:
    class Stop(BaseException):
        pass

    stop = Stop()

    def failing() -> None:
        raise stop

    def owner() -> BaseException:
        try:
            with TaskGroup() as tg:
                tg.spawn(failing)
        except BaseExceptionGroup as eg:
            return eg
        raise AssertionError("no BaseExceptionGroup")

    eg = run_owner(owner, reports)
    assert not isinstance(eg, ExceptionGroup)
    assert only(eg) == [stop]
    assert reports.seen == []


def test_nested_group_failure_reaches_the_outer_group(
    threads: list[IOThread], reports: Recorder
) -> None:
    boom = ValueError("inner")
    started = Tally(target=1)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)

    def failing() -> None:
        assert started.reached.wait(QUICK)
        raise boom

    def middle() -> None:
        with TaskGroup() as inner:
            inner.spawn(failing, ctx=threads[2].ctx)

    def owner() -> BaseException:
        try:
            with TaskGroup() as outer:
                outer.spawn(sleeper, "outer-sleeper", ctx=threads[0].ctx)
                outer.spawn(middle, ctx=threads[1].ctx)
        except ExceptionGroup as eg:
            return eg
        raise AssertionError("no ExceptionGroup")

    eg = run_owner(owner, reports)
    (inner_eg,) = only(eg)
    assert only(inner_eg) == [boom]
    assert finals == ["outer-sleeper"]
    assert reports.seen == []


# -- cancelling the owner ------------------------------------------------------------


def test_cancel_owner_while_in_the_block(threads: list[IOThread], reports: Recorder) -> None:
    started = Tally(target=3)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    body: list[str] = []
    kids: list[Coroutine[None]] = []

    def owner() -> None:
        with TaskGroup() as tg:
            kids.append(tg.spawn(sleeper, "own"))
            kids.append(tg.spawn(sleeper, "io1", ctx=threads[1].ctx))
            kids.append(tg.spawn(sleeper, "io2", ctx=threads[2].ctx))
            try:
                corun.sleep(30)
            except Cancelled:
                body.append("interrupted")
                raise
        body.append("after the block")

    co = threads[0].ctx.spawn(owner)
    started.wait_for(3)
    assert co.cancel()
    with pytest.raises(Cancelled):
        co.join(QUICK)
    assert co.cancelled()
    assert body == ["interrupted"]
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io1", "io2", "own"]
    assert reports.seen == []


def test_cancel_owner_while_it_waits_at_the_exit(
    threads: list[IOThread], reports: Recorder
) -> None:
    """The owner's cancel stops the children, and the block still waits for them."""
    started = Tally(target=3)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    in_finally = threading.Event()
    release = threading.Event()
    leaving = threading.Event()
    kids: list[Coroutine[None]] = []

    def slow_finally() -> None:
        try:
            started.hit()
            corun.sleep(30)
        finally:
            in_finally.set()
            assert release.wait(QUICK)  # blocks threads[1] until the test has looked
            finals.append("slow")

    def owner() -> None:
        with TaskGroup() as tg:
            kids.append(tg.spawn(sleeper, "own"))
            kids.append(tg.spawn(slow_finally, ctx=threads[1].ctx))
            kids.append(tg.spawn(sleeper, "io2", ctx=threads[2].ctx))
            leaving.set()

    co = threads[0].ctx.spawn(owner)
    try:
        started.wait_for(3)
        assert leaving.wait(QUICK)
        wait_until(lambda: not co.entered and not co.scheduled)  # parked at the exit
        assert co.cancel()
        assert in_finally.wait(QUICK)
        wait_until(lambda: len(finals) == 2)
        # A child is still in its finally block: the owner must not have left.
        assert not co.done
    finally:
        release.set()
    with pytest.raises(Cancelled):
        co.join(QUICK)
    assert co.cancelled()
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io2", "own", "slow"]
    assert reports.seen == []


def test_cancelled_owner_catching_cancelled_sees_no_exception_group(
    threads: list[IOThread], reports: Recorder
) -> None:
    started = Tally(target=2)
    finals: list[str] = []
    sleeper = sleeper_factory(started, finals)
    caught: list[BaseException] = []

    def owner() -> str:
        try:
            with TaskGroup() as tg:
                tg.spawn(sleeper, "io1", ctx=threads[1].ctx)
                tg.spawn(sleeper, "io2", ctx=threads[2].ctx)
                corun.sleep(30)
        except BaseException as exc:
            caught.append(exc)
            return "caught"
        return "not cancelled"

    co = threads[0].ctx.spawn(owner)
    started.wait_for(2)
    co.cancel()
    assert co.join(QUICK) == "caught"
    assert len(caught) == 1 and type(caught[0]) is Cancelled
    assert sorted(finals) == ["io1", "io2"]
    assert reports.seen == []


def test_external_cancel_colliding_with_a_failure_is_not_lost(
    threads: list[IOThread], reports: Recorder
) -> None:
    """The owner is cancelled from outside, and a child fails while being cancelled.

    The block raises the ExceptionGroup of the failure, and the owner's own
    cancel is not swallowed by it: it is raised at the owner's next wait
    (asyncio.TaskGroup since Python 3.13; API.md: scopes never swallow an
    explicit cancel).
    """
    started = threading.Event()
    boom = ValueError("failed while cancelled")
    log: list[str] = []

    def child() -> None:
        try:
            started.set()
            corun.sleep(30)
        except Cancelled:
            raise boom from None

    def owner() -> None:
        try:
            with TaskGroup() as tg:
                tg.spawn(child, ctx=threads[1].ctx)
                corun.sleep(30)
        except ExceptionGroup as eg:
            log.append(f"group {[repr(e) for e in eg.exceptions]}")
        try:
            corun.sleep(0.01)
        except Cancelled:
            log.append("next wait cancelled")
            raise
        log.append("next wait not cancelled")

    co = threads[0].ctx.spawn(owner)
    assert started.wait(QUICK)
    co.cancel()
    outcome = "returned"
    try:
        co.join(QUICK)
    except Cancelled:
        outcome = "cancelled"
    assert log[0] == f"group {[repr(boom)]}"
    assert log[1:] == ["next wait cancelled"], f"the owner's cancel was lost: {log}"
    assert outcome == "cancelled"
    assert reports.seen == []


def test_spawn_racing_the_abort_counts_the_child_once(
    threads: list[IOThread], reports: Recorder
) -> None:
    """A child registered by spawn() but not yet scheduled is cancelled by a
    concurrent abort (a failure on another thread).

    The race window (between spawn's bookkeeping and the hand-over to the
    context) is widened deterministically: the spawning thread's call to
    the target context's schedule() first waits until the failure has
    aborted the group. (Through a stand-in for the context that spawn() is
    given: compiled, AioContext is an extension type, whose methods can be
    replaced neither on the class nor on an instance.)
    Whatever spawn then does (start the child cancelled, or refuse with
    RuntimeError), the child counts once and the block ends with the failure.
    """
    boom = ValueError("boom")
    go = threading.Event()
    real_schedule = AioContext.schedule
    hook: dict[str, Any] = {}

    def failing() -> None:
        assert go.wait(QUICK)  # blocks threads[0] until the spawn is in the window
        raise boom

    class Target:
        """threads[1].ctx, as far as spawn() uses it (its schedule())."""

        def schedule(self, co: Coroutine[Any]) -> None:
            if hook.get("thread") is threading.current_thread() and not hook.get("fired"):
                hook["fired"] = True
                go.set()
                bad: Coroutine[Any] = hook["failing"]
                wait_until(lambda: bad.done)  # the failure has aborted the group
            real_schedule(threads[1].ctx, co)

    target: Any = Target()
    spawn_errors: list[str] = []

    def owner() -> BaseException:
        try:
            with TaskGroup() as tg:
                hook["failing"] = tg.spawn(failing, ctx=threads[0].ctx)
                hook["thread"] = threading.current_thread()
                try:
                    tg.spawn(corun.sleep, 0, ctx=target)
                except RuntimeError as exc:
                    spawn_errors.append(str(exc))
        except ExceptionGroup as eg:
            return eg
        raise AssertionError("no ExceptionGroup")

    eg = bounded(owner)
    assert hook.get("fired")
    assert only(eg) == [boom]
    assert all("closing" in e for e in spawn_errors), spawn_errors
    assert reports.seen == []


# -- children spawning children; spawn refused -------------------------------------


def test_children_spawn_grandchildren_across_threads(
    threads: list[IOThread], reports: Recorder
) -> None:
    gate = corun.Event()
    spawned: list[Coroutine[Any]] = []
    leaves: list[Coroutine[Any]] = []
    lock = threading.Lock()

    def leaf(n: int) -> int:
        assert gate.wait(QUICK)
        return n

    def node(tg: TaskGroup, depth: int, n: int) -> int:
        if depth == 0:
            return leaf(n)
        for k in range(2):
            target = threads[(n + k) % 3].ctx
            co = tg.spawn(node, tg, depth - 1, 2 * n + k, ctx=target)
            with lock:
                spawned.append(co)
                if depth == 1:
                    leaves.append(co)
        return -1

    def owner() -> list[Coroutine[Any]]:
        with TaskGroup() as tg:
            root = tg.spawn(node, tg, 3, 1, ctx=threads[0].ctx)
            # 1 root + 2 + 4 + 8 descendants; the 8 leaves wait for the gate.
            wait_until(lambda: len(spawned) == 14)
            assert len(leaves) == 8 and not any(c.done for c in leaves)
            gate.set()
        return [root, *spawned]

    everyone = bounded(owner)
    assert all(c.done for c in everyone)
    leaf_values = sorted(c.result() for c in everyone if c.result() != -1)
    assert leaf_values == list(range(8, 16))
    assert reports.seen == []


def test_spawn_outside_the_block_raises(threads: list[IOThread], reports: Recorder) -> None:
    ran: list[int] = []
    tg = TaskGroup()
    with pytest.raises(RuntimeError):
        tg.spawn(ran.append, 1, ctx=threads[0].ctx)
    with tg:
        tg.spawn(ran.append, 2, ctx=threads[0].ctx)
    with pytest.raises(RuntimeError):
        tg.spawn(ran.append, 3, ctx=threads[0].ctx)
    with pytest.raises(RuntimeError):
        tg.spawn(ran.append, 4)
    with pytest.raises(RuntimeError), tg:
        pass  # a group is entered once
    threads[0].ctx.call_sync(lambda: None)
    assert ran == [2]
    assert reports.seen == []


def test_spawn_after_the_block_from_a_surviving_coroutine_raises(
    threads: list[IOThread], reports: Recorder
) -> None:
    """A coroutine that got hold of the group spawns after the block ended."""
    holder: list[TaskGroup] = []

    def owner() -> str:
        with TaskGroup() as tg:
            holder.append(tg)
        return "done"

    assert run_owner(owner, reports) == "done"

    def late() -> str:
        try:
            holder[0].spawn(corun.sleep, 0)
        except RuntimeError:
            return "refused"
        return "accepted"

    assert threads[0].ctx.spawn(late).join(QUICK) == "refused"
    assert reports.seen == []


def test_spawn_while_aborting_raises(threads: list[IOThread], reports: Recorder) -> None:
    started = Tally(target=2)
    refused: list[str] = []
    ran: list[str] = []
    boom = ValueError("boom")

    def stubborn(tg: TaskGroup, tag: str) -> None:
        try:
            started.hit()
            corun.sleep(30)
        except Cancelled:
            try:
                tg.spawn(ran.append, tag, ctx=threads[2].ctx)
            except RuntimeError:
                refused.append(tag)
            raise

    def failing() -> None:
        assert started.reached.wait(QUICK)
        raise boom

    def owner() -> BaseException:
        try:
            with TaskGroup() as tg:
                tg.spawn(stubborn, tg, "own")
                tg.spawn(stubborn, tg, "io1", ctx=threads[1].ctx)
                tg.spawn(failing, ctx=threads[0].ctx)
                try:
                    corun.sleep(30)
                except Cancelled:
                    try:
                        tg.spawn(ran.append, "body")
                    except RuntimeError:
                        refused.append("body")
                    raise
        except ExceptionGroup as eg:
            return eg
        raise AssertionError("no ExceptionGroup")

    eg = run_owner(owner, reports)
    assert only(eg) == [boom]
    assert sorted(refused) == ["body", "io1", "own"]
    threads[2].ctx.call_sync(lambda: None)
    assert ran == []
    assert reports.seen == []


def test_plain_thread_owner_without_context_needs_ctx(
    threads: list[IOThread], reports: Recorder
) -> None:
    def owner() -> int:
        assert corun.current_context() is None
        with TaskGroup() as tg:
            with pytest.raises(RuntimeError):
                tg.spawn(corun.sleep, 0)
            kid = tg.spawn(lambda: 3, ctx=threads[0].ctx)
        return kid.result()

    assert bounded(owner) == 3
    assert reports.seen == []


# -- timeout scopes ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["body", "exit"])
def test_move_on_after_around_a_group(
    threads: list[IOThread], reports: Recorder, where: str
) -> None:
    finals: list[str] = []

    def napper(tag: str) -> None:
        try:
            corun.sleep(10)
        finally:
            finals.append(tag)

    def owner() -> tuple[bool, list[Coroutine[None]], int, str]:
        me = corun.current_coroutine()
        assert me is not None
        kids: list[Coroutine[None]] = []
        with corun.move_on_after(0.05) as scope:
            with TaskGroup() as tg:
                kids.append(tg.spawn(corun.sleep, 10))
                kids.append(tg.spawn(napper, "own"))
                kids.append(tg.spawn(napper, "io0", ctx=threads[0].ctx))
                kids.append(tg.spawn(napper, "io1", ctx=threads[1].ctx))
                if where == "body":
                    corun.sleep(10)
        corun.sleep(0)  # not cancelled any more
        return scope.cancelled_caught, kids, me.cancelling(), "left quietly"

    caught, kids, cancelling, how = run_owner(owner, reports)
    assert caught
    assert how == "left quietly"
    assert cancelling == 0
    assert all(k.cancelled() for k in kids)
    assert sorted(finals) == ["io0", "io1", "own"]
    assert reports.seen == []


def test_timeout_around_a_group_raises_timeout_error(
    threads: list[IOThread], reports: Recorder
) -> None:
    def owner() -> list[Coroutine[None]]:
        kids: list[Coroutine[None]] = []
        with pytest.raises(TimeoutError):
            with corun.timeout(0.05):
                with TaskGroup() as tg:
                    kids.append(tg.spawn(corun.sleep, 10, ctx=threads[2].ctx))
                    kids.append(tg.spawn(corun.sleep, 10))
        return kids

    kids = run_owner(owner, reports)
    assert all(k.cancelled() for k in kids)
    assert reports.seen == []


def test_scope_that_does_not_fire_leaves_the_group_alone(
    threads: list[IOThread], reports: Recorder
) -> None:
    def owner() -> tuple[bool, list[int]]:
        with corun.move_on_after(30) as scope:
            with TaskGroup() as tg:
                kids = [tg.spawn(lambda n=n: n, ctx=threads[n % 3].ctx) for n in range(6)]
        return scope.cancelled_caught, [k.result() for k in kids]

    assert run_owner(owner, reports) == (False, list(range(6)))
    assert reports.seen == []


# -- stress --------------------------------------------------------------------------


def _racing_round(threads: list[IOThread], bad: int, boom: ValueError) -> None:
    spawned: list[Coroutine[Any]] = []
    lock = threading.Lock()
    attempts = [0]
    refused = [0]

    def try_spawn(tg: TaskGroup, n: int, spawn_more: bool) -> bool:
        with lock:
            attempts[0] += 1
        try:
            co = tg.spawn(child, tg, n, spawn_more, ctx=threads[n % 3].ctx)
        except RuntimeError:
            with lock:
                refused[0] += 1
            return False
        with lock:
            spawned.append(co)
        return True

    def child(tg: TaskGroup, n: int, spawn_more: bool) -> int:
        corun.sleep(0)
        if spawn_more:
            try_spawn(tg, 100 + n, False)
        if n == bad:
            raise boom
        corun.sleep(0)
        return n

    def owner() -> BaseException | None:
        try:
            with TaskGroup() as tg:
                for n in range(12):
                    if not try_spawn(tg, n, n % 2 == 0):
                        break  # a child failed already: the group is closing
        except ExceptionGroup as eg:
            return eg
        return None

    eg = bounded(owner)
    assert eg is not None and only(eg) == [boom]
    assert all(c.done for c in spawned)
    for c in spawned:
        assert c.cancelled() or c.exception() is boom or isinstance(c.result(), int)
    # Every spawn either started a child or was refused, never both or neither.
    assert len(spawned) + refused[0] == attempts[0]
    assert len(spawned) >= bad + 1  # the owner spawned 0..bad, or boom never came


def test_failure_racing_spawns_across_threads(threads: list[IOThread], reports: Recorder) -> None:
    """Many rounds: one random child fails while others run, finish and spawn.

    Invariants: the block always ends, every spawned child is done and either
    returned its value or was cancelled, the group holds exactly the one
    failure, and every spawn either started a child or was refused with
    RuntimeError because the group was closing.
    """
    rng = random.Random(9)
    for round_no in range(40):
        _racing_round(threads, rng.randrange(12), ValueError(round_no))
    assert reports.seen == []
