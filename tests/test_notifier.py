"""Tests for corun.notifier: EventNotifier, alone and as an fd in a context.

The /aio/event/* tests port QEMU's tests/unit/test-aio.c, with
`ctx.add_reader(notifier, cb)` in place of aio_set_event_notifier.
"""

from __future__ import annotations

import os
import select
import threading

import pytest

from corun import AioContext, EventNotifier

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-notifier") as c:
        yield c


def readable(fd) -> bool:
    r, _, _ = select.select([fd], [], [], 0)
    return bool(r)


# -- EventNotifier on its own ---------------------------------------------------


def test_set_and_test_and_clear():
    with EventNotifier() as e:
        assert e.test_and_clear() is False
        assert not readable(e)
        e.set()
        assert readable(e)
        assert e.test_and_clear() is True
        assert not readable(e)
        assert e.test_and_clear() is False


def test_several_sets_collapse_into_one():
    with EventNotifier() as e:
        for _ in range(5):
            e.set()
        assert e.test_and_clear() is True
        assert e.test_and_clear() is False
        assert not readable(e)


def test_set_from_another_thread():
    with EventNotifier() as e:
        t = threading.Thread(target=e.set)
        t.start()
        t.join(10)
        assert select.select([e], [], [], 10)[0] == [e]
        assert e.test_and_clear() is True


def test_fileno_is_an_open_fd():
    with EventNotifier() as e:
        fd = e.fileno()
        assert isinstance(fd, int) and fd >= 0
        os.fstat(fd)  # raises if not open
        assert fd == e.fileno()


def test_close_is_idempotent_and_releases_the_fd():
    e = EventNotifier()
    fd = e.fileno()
    e.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    e.close()
    with pytest.raises(ValueError):
        e.fileno()
    with pytest.raises(ValueError):
        e.set()
    with pytest.raises(ValueError):
        e.test_and_clear()


def test_context_manager_closes():
    with EventNotifier() as e:
        assert isinstance(e, EventNotifier)
        fd = e.fileno()
    with pytest.raises(ValueError):
        e.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_repr():
    e = EventNotifier()
    assert str(e.fileno()) in repr(e)
    e.close()
    assert "closed" in repr(e)


# -- QEMU /aio/event/* ---------------------------------------------------------


class EventNotifierTestData:
    """QEMU's EventNotifierTestData and event_ready_cb."""

    def __init__(self, active: int = 0, auto_set: bool = False) -> None:
        self.e = EventNotifier()
        self.n = 0
        self.active = active
        self.auto_set = auto_set
        self.not_set = 0  # callbacks that found the notifier clear (QEMU asserts)

    def ready(self) -> None:
        if not self.e.test_and_clear():
            self.not_set += 1
        self.n += 1
        if self.active > 0:
            self.active -= 1
        if self.auto_set and self.active:
            self.e.set()


def wait_until_inactive(ctx: AioContext, data: EventNotifierTestData) -> None:
    while data.active > 0:
        ctx.poll(True)


def test_event_add_remove(ctx):
    """/aio/event/add-remove"""
    data = EventNotifierTestData()
    ctx.add_reader(data.e, data.ready)
    assert ctx.poll(False) is False
    assert data.n == 0

    assert ctx.remove_reader(data.e) is True
    assert ctx.poll(False) is False
    assert data.n == 0
    data.e.close()


def test_event_wait(ctx):
    """/aio/event/wait"""
    data = EventNotifierTestData(active=1)
    ctx.add_reader(data.e, data.ready)
    while ctx.poll(False):
        pass
    assert data.n == 0
    assert data.active == 1

    data.e.set()
    assert ctx.poll(False) is True
    assert data.n == 1
    assert data.active == 0

    assert ctx.poll(False) is False
    assert data.n == 1
    assert data.active == 0

    assert ctx.remove_reader(data.e) is True
    assert ctx.poll(False) is False
    assert data.n == 1
    assert data.not_set == 0
    data.e.close()


def test_event_flush(ctx):
    """/aio/event/flush"""
    data = EventNotifierTestData(active=10, auto_set=True)
    ctx.add_reader(data.e, data.ready)
    while ctx.poll(False):
        pass
    assert data.n == 0
    assert data.active == 10

    data.e.set()
    assert ctx.poll(False) is True
    assert data.n == 1
    assert data.active == 9
    assert ctx.poll(False) is True

    wait_until_inactive(ctx, data)
    assert data.n == 10
    assert data.active == 0
    assert ctx.poll(False) is False

    assert ctx.remove_reader(data.e) is True
    assert ctx.poll(False) is False
    assert data.not_set == 0
    data.e.close()


def test_event_wait_no_flush_cb(ctx):
    """/aio/event/wait/no-flush-cb"""
    data = EventNotifierTestData()
    dummy = EventNotifierTestData(active=1)
    ctx.add_reader(data.e, data.ready)

    assert ctx.poll(False) is False
    assert data.n == 0

    # corun always looks at every registered fd, so this poll must run the
    # handler (QEMU only says it must not block).
    data.e.set()
    assert ctx.poll(True) is True
    assert data.n == 1
    data.n = 0

    ctx.add_reader(dummy.e, dummy.ready)

    data.e.set()
    assert ctx.poll(False) is True
    assert data.n == 1
    assert ctx.poll(False) is False
    assert data.n == 1

    data.e.set()
    assert ctx.poll(False) is True
    assert data.n == 2
    assert ctx.poll(False) is False
    assert data.n == 2

    dummy.e.set()
    wait_until_inactive(ctx, dummy)
    assert data.n == 2
    assert dummy.n == 1
    assert dummy.active == 0

    assert ctx.remove_reader(dummy.e) is True
    dummy.e.close()

    assert ctx.remove_reader(data.e) is True
    assert ctx.poll(False) is False
    assert data.n == 2
    assert data.not_set == 0 and dummy.not_set == 0
    data.e.close()


def test_event_set_from_another_thread_wakes_blocked_poll(ctx):
    data = EventNotifierTestData(active=1)
    ctx.add_reader(data.e, data.ready)
    t = threading.Thread(target=data.e.set)
    t.start()
    wait_until_inactive(ctx, data)
    t.join(10)
    assert data.n == 1
    assert data.not_set == 0
    assert ctx.remove_reader(data.e) is True
    data.e.close()
