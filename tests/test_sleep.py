"""Tests for corun.sleep: sleep() and CoSleep.

QEMU: util/qemu-coroutine-sleep.c has no unit test of its own; these check
API.md. Time is only ever bounded generously: a sleep lasts *at least* what
was asked (the timers' clock is monotonic), and a wake-up from another
thread ends a 30 s sleep well before the 30 s.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest

from corun import AioContext, CoSleep, IOThread, current_coroutine, sleep, wake

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-sleep") as c:
        yield c


def run_until_done(ctx, *cos):
    """Run ctx's loop (we are its home thread) until every coroutine finished."""
    for co in cos:
        co.join(10)


def quiesce(iothread):
    """Return once every coroutine on `iothread` that was running has yielded.

    A coroutine runs in its IOThread, so by the time the loop runs a
    callback queued now, the coroutine that was running meanwhile (and set
    an Event we waited for) has reached its next yield.
    """
    iothread.ctx.call_sync(lambda: None)


# -- sleep() -------------------------------------------------------------------


def test_sleep_lasts_at_least_the_delay_and_others_run_meanwhile(ctx):
    events = []

    def sleeper():
        start = time.monotonic()
        events.append("sleeper sleeps")
        sleep(0.05)
        events.append(("sleeper woke", time.monotonic() - start >= 0.05))

    def other():
        events.append("other runs")

    s = ctx.spawn(sleeper)
    o = ctx.spawn(other)
    run_until_done(ctx, s, o)
    assert events == ["sleeper sleeps", "other runs", ("sleeper woke", True)]


def test_sleep_on_an_iothread_does_not_block_the_thread():
    ticks = []
    slept = []

    def sleeper():
        start = time.monotonic()
        sleep(0.2)
        slept.append(time.monotonic() - start)
        return len(ticks)

    def ticker():
        while not s.done:
            ticks.append(1)
            sleep(0.01)

    with IOThread("sleep") as t:
        s = t.ctx.spawn(sleeper)
        k = t.ctx.spawn(ticker)
        ticks_while_asleep = s.join(10)
        k.join(10)
    assert slept[0] >= 0.2
    assert ticks_while_asleep >= 2  # the ticker ran while the sleeper slept


def test_sleep_zero_yields_to_the_loop(ctx):
    events = []

    def body(name):
        for i in range(3):
            events.append((name, i))
            sleep(0)

    a = ctx.spawn(body, "a")
    b = ctx.spawn(body, "b")
    run_until_done(ctx, a, b)
    assert events == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_negative_sleep_just_yields(ctx):
    events = []

    def body(name):
        events.append(name)
        sleep(-1)
        events.append(name)

    run_until_done(ctx, ctx.spawn(body, "a"), ctx.spawn(body, "b"))
    assert events == ["a", "b", "a", "b"]


def test_a_sleeping_coroutine_is_scheduled_and_cannot_be_scheduled_or_woken(ctx):
    checks = []

    def sleeper():
        sleep(0.3)
        checks.append("sleeper woke")

    def checker():
        checks.append(("scheduled", s.scheduled, "scheduled" in repr(s)))
        for action in (ctx.schedule, wake, ctx.enter):
            try:
                action(s)
            except RuntimeError as exc:
                checks.append(("refused", action.__name__, "the-sleeper" in str(exc)))

    s = ctx.spawn(sleeper, name="the-sleeper")
    c = ctx.spawn(checker)
    run_until_done(ctx, c, s)
    assert checks == [
        ("scheduled", True, True),
        ("refused", "schedule", True),
        ("refused", "wake", True),
        ("refused", "enter", True),
        "sleeper woke",  # once: the refused attempts queued nothing
    ]
    assert not s.scheduled


@pytest.mark.timeout(30)
def test_a_cosleeping_coroutine_cannot_be_woken_from_another_thread():
    """wake()/schedule() of a coroutine in CoSleep.sleep() fail in the caller's
    thread and queue nothing: only CoSleep.wake() ends that sleep, once."""
    s = CoSleep()
    started = threading.Event()
    rounds = []

    def sleeper():
        started.set()
        s.sleep(30)
        rounds.append("woke")
        return "done"

    with IOThread("cosleeper") as t:
        co = t.ctx.spawn(sleeper, name="the-cosleeper")
        assert started.wait(10)
        quiesce(t)  # now inside s.sleep(30)
        assert co.scheduled
        for action in (wake, t.ctx.schedule, t.ctx.enter):
            with pytest.raises(RuntimeError, match=r"the-cosleeper.*already scheduled"):
                action(co)
        assert co.scheduled and not co.done and rounds == []
        s.wake()
        assert co.join(10) == "done"
    assert rounds == ["woke"]
    assert not co.scheduled


def test_sleep_outside_a_coroutine():
    with pytest.raises(RuntimeError, match="outside a coroutine"):
        sleep(0.01)
    with pytest.raises(RuntimeError, match="outside a coroutine"):
        sleep(0)
    with pytest.raises(RuntimeError, match="outside a coroutine"):
        CoSleep().sleep(0.01)


@pytest.mark.parametrize(
    "bad_sleep",
    [
        pytest.param(lambda: CoSleep().sleep(None), id="cosleep-none"),
        pytest.param(lambda: sleep(Decimal("0.01")), id="sleep-decimal"),
    ],
)
def test_a_sleep_that_fails_to_start_leaves_the_coroutine_unscheduled(ctx, bad_sleep):
    """A bad duration raises at the call; the coroutine is not left flagged as
    sleeping (it can still sleep, be scheduled and be woken)."""
    seen = []

    def body():
        with pytest.raises(TypeError):
            bad_sleep()
        seen.append(current_coroutine().scheduled)
        sleep(0)
        sleep(0.001)
        seen.append("slept")

    co = ctx.spawn(body)
    run_until_done(ctx, co)
    assert seen == [False, "slept"]


# -- CoSleep -------------------------------------------------------------------


def test_cosleep_times_out_like_sleep(ctx):
    s = CoSleep()
    lasted = []

    def sleeper():
        start = time.monotonic()
        s.sleep(0.05)
        lasted.append(time.monotonic() - start)

    co = ctx.spawn(sleeper)
    run_until_done(ctx, co)
    assert lasted[0] >= 0.05
    s.wake()  # after the timer: nothing to do
    assert "idle" in repr(s)


@pytest.mark.timeout(30)
def test_wake_from_another_thread_ends_a_long_sleep():
    s = CoSleep()
    started = threading.Event()
    lasted = []

    def sleeper():
        start = time.monotonic()
        started.set()
        s.sleep(30)
        lasted.append(time.monotonic() - start)
        return "woken"

    with IOThread("cosleep") as t:
        co = t.ctx.spawn(sleeper)
        assert started.wait(10)
        quiesce(t)  # the sleeper has yielded inside s.sleep(30)
        assert co.scheduled and not co.done
        start = time.monotonic()
        s.wake()
        assert co.join(10) == "woken"
        waited = time.monotonic() - start
    assert waited < 10
    assert lasted[0] < 10


@pytest.mark.timeout(30)
def test_second_wake_is_a_no_op():
    """Two wakes while the sleeper cannot run yet: the second must not cut its next sleep.

    The sleeper's IOThread is stalled (a callback blocks on an Event) while
    the two wakes happen, so the sleeper is certainly still in its first
    sleep for both.
    """
    s = CoSleep()
    started = threading.Event()
    stalled = threading.Event()
    gate = threading.Event()
    lasted = []

    def sleeper():
        started.set()
        s.sleep(30)
        start = time.monotonic()
        s.sleep(0.2)
        lasted.append(time.monotonic() - start)

    def stall():
        stalled.set()
        assert gate.wait(10)

    with IOThread("cosleep-twice") as t:
        reports = []
        t.ctx.set_exception_handler(lambda c, exc, origin: reports.append(exc))
        co = t.ctx.spawn(sleeper)
        try:
            assert started.wait(10)
            quiesce(t)
            t.ctx.call_soon(stall)
            assert stalled.wait(10)
            s.wake()
            s.wake()  # no effect: the first one already ended this sleep
        finally:
            gate.set()
        co.join(10)
    assert lasted[0] >= 0.2
    assert reports == []


@pytest.mark.timeout(60)
def test_wake_racing_the_timer_ends_each_sleep_exactly_once():
    """A plain thread calls wake() in a loop while the sleeper's short sleeps
    also end by their timers: every sleep ends once, nothing is reported,
    the waker never sees an error."""
    s = CoSleep()
    rounds = 500
    done = threading.Event()
    waker_errors = []
    reports = []

    def sleeper():
        for i in range(rounds):
            s.sleep((i % 3) * 0.0005)
        done.set()
        return rounds

    def waker():
        try:
            while not done.is_set():
                s.wake()
                time.sleep(0)
        except BaseException as exc:
            waker_errors.append(exc)

    with IOThread("cosleep-race") as t:
        t.ctx.set_exception_handler(lambda c, exc, origin: reports.append(exc))
        thread = threading.Thread(target=waker)
        co = t.ctx.spawn(sleeper)
        thread.start()
        try:
            assert co.join(45) == rounds
        finally:
            done.set()
            thread.join(10)
    assert waker_errors == []
    assert reports == []
    assert not co.scheduled


def test_wake_with_nobody_sleeping_is_a_no_op(ctx):
    s = CoSleep()
    s.wake()  # nobody: nothing happens, nothing is remembered
    lasted = []

    def sleeper():
        start = time.monotonic()
        s.sleep(0.05)
        lasted.append(time.monotonic() - start)

    co = ctx.spawn(sleeper)
    s.wake()  # still nobody: the coroutine has not started
    run_until_done(ctx, co)
    assert lasted[0] >= 0.05


def test_wake_from_a_coroutine_of_the_same_context(ctx):
    s = CoSleep()
    events = []

    def sleeper():
        events.append("sleeping")
        s.sleep(30)
        events.append("woken")

    def waker():
        events.append("waking")
        s.wake()
        s.wake()
        events.append("woke it")

    a = ctx.spawn(sleeper)
    b = ctx.spawn(waker)
    run_until_done(ctx, b, a)
    # The wake-up is deferred until the waker yields (here: finishes).
    assert events == ["sleeping", "waking", "woke it", "woken"]


def test_a_cosleep_has_one_sleeper_at_a_time(ctx):
    s = CoSleep()
    errors = []

    def first():
        s.sleep(30)

    def second():
        try:
            s.sleep(0.01)
        except RuntimeError as exc:
            errors.append(str(exc))
        s.wake()

    a = ctx.spawn(first)
    b = ctx.spawn(second, name="second-sleeper")
    run_until_done(ctx, b, a)
    assert len(errors) == 1 and "second-sleeper" in errors[0] and "CoSleep" in errors[0]
    assert a.done  # and the first sleeper was woken by the second's wake()
