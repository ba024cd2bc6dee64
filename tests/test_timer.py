"""Tests for corun.timer: timers on a context's monotonic clock.

Ports QEMU's /aio/timer/schedule (tests/unit/test-aio.c). Timing is
tolerant: the tests check orderings and lower bounds ("never before its
deadline"), never how soon something happens; where QEMU asserts that a
timer has not fired yet, the check is made only if the clock is provably
still before the deadline, so a stalled machine cannot fail it.
"""

from __future__ import annotations

import threading
import time

import pytest

from corun import AioContext, IOThread, Timer

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-timer") as c:
        yield c


def sleep_until(ctx: AioContext, when: float) -> None:
    """Let the clock pass `when` without running the loop."""
    while ctx.time() < when:
        time.sleep(max(when - ctx.time(), 0.001))


def expect_no_progress_before(ctx: AioContext, deadline: float) -> None:
    """poll(False) must do nothing while the clock is before `deadline`."""
    progress = ctx.poll(False)
    if ctx.time() < deadline:  # the whole pass ran before the deadline
        assert progress is False


def test_timer_schedule(ctx):
    """/aio/timer/schedule: fire after the deadline, re-arm from the callback, max 2."""
    delay = 0.2
    fired: list[float] = []

    def cb():
        fired.append(ctx.time())
        if len(fired) < 2:
            timer.mod(ctx.time() + delay)

    timer = ctx.timer(cb)
    assert not timer.pending and timer.when is None
    first = ctx.time() + delay
    timer.mod(first)
    assert timer.pending and timer.when == first
    assert fired == []

    expect_no_progress_before(ctx, first)
    expect_no_progress_before(ctx, first)

    # Timers only run inside poll(): waiting past the deadline runs nothing.
    sleep_until(ctx, first)
    assert fired == []

    assert ctx.poll(False) is True
    assert len(fired) == 1
    assert fired[0] >= first
    second = timer.when  # re-armed by the callback
    assert second is not None and second >= fired[0] + delay

    expect_no_progress_before(ctx, second)
    if len(fired) < 2:
        # A blocking poll waits for the timer and runs it.
        assert ctx.poll(True) is True
    assert len(fired) == 2
    assert fired[1] >= second

    # max is 2: not re-armed.
    assert not timer.pending and timer.when is None
    assert ctx.poll(False) is False
    assert len(fired) == 2


def test_timers_fire_in_deadline_order(ctx):
    events = []
    base = ctx.time()
    offsets = {"c": 0.03, "a": 0.01, "b": 0.02}
    timers = {}
    for name, offset in offsets.items():
        timers[name] = ctx.call_at(base + offset, lambda n=name: events.append((n, ctx.time())))
    while len(events) < 3:
        ctx.poll(True)
    assert [name for name, _ in events] == ["a", "b", "c"]
    for name, at in events:
        assert at >= base + offsets[name]
    assert not any(t.pending for t in timers.values())


def test_equal_deadlines_fire_in_order_of_latest_mod(ctx):
    events = []
    t1, t2, t3 = (ctx.timer(events.append, i) for i in (1, 2, 3))
    when = ctx.time()
    t1.mod(when)
    t2.mod(when)
    t3.mod(when)
    t1.mod(when)  # t1 is now the latest mod
    assert ctx.poll(False) is True
    assert events == [2, 3, 1]
    assert ctx.poll(False) is False


def test_equal_deadlines_order_across_threads(ctx):
    """Mods from another thread take their place in the order of the calls."""
    events = []
    a, b, c = (ctx.timer(events.append, name) for name in "abc")
    when = ctx.time()
    a.mod(when)

    def remote():
        b.mod(when)
        a.mod(when)

    t = threading.Thread(target=remote)
    t.start()
    t.join(10)
    c.mod(when)
    while len(events) < 3:
        ctx.poll(True)
    assert events == ["b", "a", "c"]


def test_callback_rearms_itself(ctx):
    """A callback may re-arm its own timer; re-armed for now, it fires at the next pass."""
    seen = []

    def cb():
        seen.append((timer.pending, timer.when))
        if len(seen) < 5:
            timer.mod(ctx.time())

    timer = ctx.timer(cb)
    timer.mod(ctx.time())
    for i in range(5):
        assert ctx.poll(False) is True
        assert len(seen) == i + 1
    assert ctx.poll(False) is False
    assert seen == [(False, None)] * 5
    assert not timer.pending


def test_mod_moves_the_deadline(ctx):
    events = []
    base = ctx.time()
    late = ctx.call_at(base + 3600, events.append, "moved")
    sentinel = ctx.call_at(base + 0.02, events.append, "sentinel")
    late.mod(base + 0.01)  # now earlier than the sentinel
    assert late.when == base + 0.01
    while len(events) < 2:
        ctx.poll(True)
    assert events == ["moved", "sentinel"]
    assert not late.pending and not sentinel.pending


def test_cancel(ctx):
    events = []
    base = ctx.time()
    cancelled = ctx.call_at(base + 0.01, events.append, "cancelled")
    sentinel = ctx.call_at(base + 0.03, events.append, "sentinel")
    cancelled.cancel()
    assert not cancelled.pending and cancelled.when is None
    cancelled.cancel()  # no effect when not armed
    while not events:
        ctx.poll(True)
    assert events == ["sentinel"]
    assert not sentinel.pending
    assert ctx.poll(False) is False


def test_cancel_from_another_thread(ctx):
    events = []
    base = ctx.time()
    cancelled = ctx.call_at(base + 0.01, events.append, "cancelled")
    ctx.call_at(base + 0.03, events.append, "sentinel")
    t = threading.Thread(target=cancelled.cancel)
    t.start()
    t.join(10)
    assert not cancelled.pending
    while not events:
        ctx.poll(True)
    assert events == ["sentinel"]


def test_rearm_after_cancel(ctx):
    events = []
    timer = ctx.timer(events.append, "x")
    timer.mod(ctx.time() + 3600)
    timer.cancel()
    timer.mod(ctx.time())
    assert ctx.poll(False) is True
    assert events == ["x"]


def test_mod_from_another_thread_wakes_blocked_loop(ctx):
    """The loop sleeps on a far timer; a nearer one armed remotely must wake it."""
    events = []
    far = ctx.call_later(3600, events.append, "far")
    near = ctx.timer(events.append, "near")
    t = threading.Thread(target=lambda: near.mod(ctx.time()))
    t.start()
    while not events:
        ctx.poll(True)
    t.join(10)
    assert events == ["near"]
    assert far.pending
    far.cancel()


def test_mod_from_another_thread_wakes_idle_loop(ctx):
    events = []
    timer = ctx.timer(events.append, "remote")
    t = threading.Thread(target=lambda: timer.mod(ctx.time() + 0.01))
    t.start()
    while not events:
        ctx.poll(True)
    t.join(10)
    assert events == ["remote"]


def test_call_later(ctx):
    fired = []
    before = ctx.time()
    timer = ctx.call_later(0.02, lambda *args: fired.append((args, ctx.time())), 1, "two")
    assert isinstance(timer, Timer)
    assert timer.pending
    assert timer.when is not None and timer.when >= before + 0.02
    when = timer.when
    while not fired:
        ctx.poll(True)
    assert fired[0][0] == (1, "two")
    assert fired[0][1] >= when
    assert not timer.pending and timer.when is None


def test_call_at(ctx):
    fired = []
    when = ctx.time() + 0.02
    timer = ctx.call_at(when, lambda *args: fired.append((args, ctx.time())), "a")
    assert timer.pending and timer.when == when
    while not fired:
        ctx.poll(True)
    assert fired[0][0] == ("a",)
    assert fired[0][1] >= when


def test_deadline_in_the_past_fires_at_next_poll(ctx):
    fired = []
    ctx.call_at(ctx.time() - 10, fired.append, "late")
    assert ctx.poll(False) is True
    assert fired == ["late"]


def test_time_is_monotonic_seconds(ctx):
    a = ctx.time()
    b = ctx.time()
    assert isinstance(a, float)
    assert b >= a
    assert abs(a - time.monotonic()) < 3600  # same clock as time.monotonic


def test_nan_deadline_rejected(ctx):
    timer = ctx.timer(lambda: None)
    with pytest.raises(ValueError):
        timer.mod(float("nan"))
    assert not timer.pending


def test_timer_needs_callable(ctx):
    with pytest.raises(TypeError):
        ctx.timer(None)


def test_timer_on_iothread_runs_in_its_thread():
    done = threading.Event()
    where = []

    def cb():
        where.append(threading.current_thread().name)
        done.set()

    with IOThread(name="timer-io") as t:
        timer = t.ctx.call_later(0.01, cb)
        assert done.wait(10)
        assert where == ["timer-io"]
        assert not timer.pending


@pytest.mark.timeout(20)
def test_many_remote_mods_last_one_wins(ctx):
    """Mods from several threads: the timer ends armed at the last deadline set."""
    events = []
    timer = ctx.timer(events.append, "fired")
    far = ctx.time() + 3600
    barrier = threading.Barrier(3)

    def hammer():
        barrier.wait()
        for _ in range(500):
            timer.mod(far)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    timer.mod(ctx.time())
    while not events:
        ctx.poll(True)
    assert events == ["fired"]
    assert ctx.poll(False) is False
    assert not timer.pending
