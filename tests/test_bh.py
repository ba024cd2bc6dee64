"""Tests for corun.bh: bottom halves.

The /aio/bh/* tests port QEMU's tests/unit/test-aio.c; the rest check the
BottomHalf contract of API.md (idle scheduling, snapshot per pass, delete).
"""

from __future__ import annotations

import threading

import pytest

from corun import AioContext, BottomHalf

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-bh") as c:
        yield c


class BHTestData:
    """QEMU's BHTestData: a BH whose callback counts and reschedules itself."""

    def __init__(self, ctx: AioContext, max: int = 0, delete_at_max: bool = False) -> None:
        self.n = 0
        self.max = max
        self.delete_at_max = delete_at_max
        self.bh: BottomHalf | None = ctx.bh(self.cb)

    def cb(self) -> None:
        self.n += 1
        assert self.bh is not None
        if self.n < self.max:
            self.bh.schedule()
        elif self.delete_at_max:
            self.bh.delete()
            self.bh = None


def test_schedule(ctx):
    """/aio/bh/schedule"""
    data = BHTestData(ctx)
    assert data.bh is not None
    data.bh.schedule()
    assert data.n == 0
    assert data.bh.scheduled

    assert ctx.poll(True) is True
    assert data.n == 1
    assert not data.bh.scheduled

    assert ctx.poll(False) is False
    assert data.n == 1
    data.bh.delete()


def test_schedule10(ctx):
    """/aio/bh/schedule10"""
    data = BHTestData(ctx, max=10)
    assert data.bh is not None
    data.bh.schedule()
    assert data.n == 0

    assert ctx.poll(False) is True
    assert data.n == 1

    assert ctx.poll(True) is True
    assert data.n == 2

    passes = 0
    while data.n < 10:
        ctx.poll(True)
        passes += 1
    assert data.n == 10
    assert passes == 8  # exactly one run per pass: a BH rescheduled by itself waits

    assert ctx.poll(False) is False
    assert data.n == 10
    data.bh.delete()


def test_cancel(ctx):
    """/aio/bh/cancel"""
    data = BHTestData(ctx)
    assert data.bh is not None
    data.bh.schedule()
    assert data.n == 0

    data.bh.cancel()
    assert not data.bh.scheduled
    assert data.n == 0

    assert ctx.poll(False) is False
    assert data.n == 0
    data.bh.cancel()  # no effect when not scheduled
    data.bh.delete()


def test_delete(ctx):
    """/aio/bh/delete"""
    data = BHTestData(ctx)
    assert data.bh is not None
    data.bh.schedule()
    assert data.n == 0

    data.bh.delete()
    assert not data.bh.scheduled
    assert data.n == 0

    assert ctx.poll(False) is False
    assert data.n == 0


def test_callback_delete_one(ctx):
    """/aio/bh/callback-delete/one"""
    data = BHTestData(ctx, max=1, delete_at_max=True)
    assert data.bh is not None
    data.bh.schedule()
    assert data.n == 0

    while data.n < data.max:
        ctx.poll(True)
    assert data.n == data.max
    assert data.bh is None

    assert ctx.poll(False) is False


def test_callback_delete_many(ctx):
    """/aio/bh/callback-delete/many"""
    datas = [BHTestData(ctx, max=m, delete_at_max=True) for m in (1, 3, 2, 4)]
    for d in datas:
        assert d.bh is not None
        d.bh.schedule()
    assert [d.n for d in datas] == [0, 0, 0, 0]

    assert ctx.poll(False) is True
    assert [d.n for d in datas] == [1, 1, 1, 1]
    assert datas[0].bh is None

    while any(d.n < d.max for d in datas):
        ctx.poll(True)
    assert [d.n for d in datas] == [1, 3, 2, 4]
    assert all(d.bh is None for d in datas)
    assert ctx.poll(False) is False


def test_flush(ctx):
    """/aio/bh/flush"""
    data = BHTestData(ctx)
    assert data.bh is not None
    data.bh.schedule()
    assert data.n == 0

    assert ctx.poll(True) is True
    assert data.n == 1

    assert ctx.poll(False) is False
    assert data.n == 1
    data.bh.delete()


# -- beyond QEMU ----------------------------------------------------------------


def test_schedule_twice_runs_once(ctx):
    ran = []
    bh = ctx.bh(ran.append, "x")
    bh.schedule()
    bh.schedule()
    bh.schedule()
    assert ctx.poll(False) is True
    assert ran == ["x"]
    assert ctx.poll(False) is False
    assert ran == ["x"]


def test_bhs_run_in_schedule_order_and_pass_args(ctx):
    events = []
    bhs = [ctx.bh(events.append, i) for i in range(5)]
    for i in (3, 1, 4, 0, 2):
        bhs[i].schedule()
    assert ctx.poll(False) is True
    assert events == [3, 1, 4, 0, 2]


def test_bh_scheduled_during_pass_runs_at_next_pass(ctx):
    """A BH scheduled while BHs run (by itself or by another) waits for the next pass."""
    events = []
    second = ctx.bh(lambda: events.append("second"))
    reschedules = {"n": 0}

    def first_cb():
        events.append("first")
        second.schedule()
        if reschedules["n"] < 1:
            reschedules["n"] += 1
            first.schedule()

    first = ctx.bh(first_cb)
    first.schedule()

    assert ctx.poll(False) is True
    events.append("pass")
    assert ctx.poll(False) is True
    events.append("pass")
    assert ctx.poll(False) is True
    events.append("pass")
    assert ctx.poll(False) is False
    assert events == ["first", "pass", "second", "first", "pass", "second", "pass"]


def test_schedule_idle_is_not_progress(ctx):
    ran = []
    bh = ctx.bh(ran.append, "idle")
    bh.schedule_idle()
    assert bh.scheduled
    # A blocking poll with only an idle BH waits at most the idle delay, runs
    # it, and reports no progress.
    assert ctx.poll(True) is False
    assert ran == ["idle"]
    assert not bh.scheduled
    assert ctx.poll(False) is False
    assert ran == ["idle"]


def test_schedule_after_schedule_idle_is_progress(ctx):
    """schedule() upgrades a pending schedule_idle(): it runs once and counts."""
    ran = []
    bh = ctx.bh(ran.append, "bh")
    bh.schedule_idle()
    bh.schedule()
    assert bh.scheduled
    assert ctx.poll(False) is True
    assert ran == ["bh"]
    assert ctx.poll(False) is False
    assert ran == ["bh"]


def test_cancel_schedule_idle(ctx):
    ran = []
    bh = ctx.bh(ran.append, 1)
    bh.schedule_idle()
    bh.cancel()
    assert not bh.scheduled
    assert ctx.poll(False) is False
    assert ran == []


def test_schedule_after_delete_raises(ctx):
    bh = ctx.bh(lambda: None, name="gone")
    bh.delete()
    with pytest.raises(RuntimeError, match="gone"):
        bh.schedule()
    with pytest.raises(RuntimeError, match="gone"):
        bh.schedule_idle()
    assert not bh.scheduled
    # The context goes on working.
    assert ctx.spawn(lambda: 5).join() == 5


def test_reschedule_after_run(ctx):
    ran = []
    bh = ctx.bh(lambda: ran.append(len(ran)))
    for _ in range(3):
        bh.schedule()
        assert ctx.poll(False) is True
    assert ran == [0, 1, 2]


def test_schedule_from_another_thread_wakes_blocked_poll(ctx):
    ran = []
    bh = ctx.bh(ran.append, "remote")
    t = threading.Thread(target=bh.schedule)
    t.start()
    while not ran:
        ctx.poll(True)
    t.join(10)
    assert ran == ["remote"]
    assert ctx.poll(False) is False


def test_bh_callback_exception_goes_to_handler(ctx):
    seen = []
    ctx.set_exception_handler(lambda c, exc, origin: seen.append((c, exc, origin)))
    events = []
    err = ValueError("bh failed")

    def bad():
        raise err

    bad_bh = ctx.bh(bad)
    good_bh = ctx.bh(events.append, "good")
    bad_bh.schedule()
    good_bh.schedule()
    assert ctx.poll(False) is True
    assert events == ["good"]
    assert seen == [(ctx, err, bad)]
    # The failed BH can be scheduled again.
    bad_bh.schedule()
    assert ctx.poll(False) is True
    assert len(seen) == 2


def test_bh_name_and_repr(ctx):
    def my_callback():
        pass

    bh = ctx.bh(my_callback)
    assert "my_callback" in bh.name
    assert ctx.bh(my_callback, name="named").name == "named"
    assert "my_callback" in repr(bh)


def test_bh_needs_callable(ctx):
    with pytest.raises(TypeError):
        ctx.bh(None)


def test_bh_calls_counted_in_stats(ctx):
    bh = ctx.bh(lambda: None)
    before = ctx.stats()["bh_calls"]
    bh.schedule()
    ctx.poll(False)
    ctx.call_soon(lambda: None)
    ctx.poll(False)
    assert ctx.stats()["bh_calls"] == before + 2


def test_bh_scheduled_by_a_call_soon_callback_runs_at_the_next_poll(ctx):
    log = []
    bh = ctx.bh(log.append, "bh")
    ctx.call_soon(bh.schedule)
    ctx.poll(blocking=False)
    assert log == []
    ctx.poll(blocking=False)
    assert log == ["bh"]


def test_bh_scheduled_by_a_coroutine_runs_at_the_next_poll(ctx):
    log = []
    bh = ctx.bh(log.append, "bh")
    ctx.spawn(bh.schedule)
    ctx.poll(blocking=False)
    assert log == []
    ctx.poll(blocking=False)
    assert log == ["bh"]
