"""Tests for corun.fdhandler: add_reader/add_writer/remove_* on a context.

QEMU: aio_set_fd_handler (util/aio-posix.c); the event-notifier flavour of
QEMU's tests is in test_notifier.py.
"""

from __future__ import annotations

import os

import pytest
from helpers import in_other_thread, socket_pair

from corun import AioContext

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-fd") as c:
        yield c


@pytest.fixture
def pair():
    with socket_pair() as ab:
        yield ab


def test_reader_runs_when_readable(ctx, pair):
    a, b = pair
    got = []
    ctx.add_reader(a, lambda: got.append(a.recv(100)))
    assert ctx.poll(False) is False
    assert got == []
    b.send(b"hello")
    assert ctx.poll(True) is True
    assert got == [b"hello"]
    assert ctx.poll(False) is False  # drained: level-triggered, nothing left
    assert ctx.remove_reader(a) is True


def test_reader_is_level_triggered(ctx, pair):
    """A reader that does not drain the fd is called again at every pass."""
    a, b = pair
    calls = []
    ctx.add_reader(a, calls.append, "r")
    b.send(b"x")
    for i in range(3):
        assert ctx.poll(True) is True
        assert calls == ["r"] * (i + 1)
    a.recv(10)
    assert ctx.poll(False) is False
    assert len(calls) == 3
    ctx.remove_reader(a)


def test_reader_args(ctx, pair):
    a, b = pair
    got = []
    ctx.add_reader(a, lambda *args: (got.append(args), a.recv(10)), 1, "two")
    b.send(b"x")
    ctx.poll(True)
    assert got == [(1, "two")]
    ctx.remove_reader(a)


def test_writer_runs_when_writable(ctx, pair):
    a, _ = pair
    calls = []
    ctx.add_writer(a, calls.append, "w")
    assert ctx.poll(False) is True
    assert calls == ["w"]
    assert ctx.remove_writer(a) is True
    assert ctx.poll(False) is False
    assert calls == ["w"]


def test_reader_and_writer_on_one_fd(ctx, pair):
    a, b = pair
    events = []
    ctx.add_reader(a, lambda: events.append(("r", a.recv(10))))
    ctx.add_writer(a, events.append, "w")
    assert ctx.poll(False) is True
    assert events == ["w"]
    b.send(b"x")
    events.clear()
    assert ctx.poll(True) is True
    assert events == [("r", b"x"), "w"]
    assert ctx.remove_writer(a) is True
    events.clear()
    b.send(b"y")
    assert ctx.poll(True) is True
    assert events == [("r", b"y")]
    assert ctx.remove_reader(a) is True


def test_reader_removing_writer_in_same_pass(ctx, pair):
    """A writer removed by the reader of the same fd does not run in that pass."""
    a, b = pair
    events = []

    def reader():
        events.append(("r", a.recv(10)))
        ctx.remove_writer(a)

    ctx.add_reader(a, reader)
    ctx.add_writer(a, events.append, "w")
    b.send(b"x")
    # Wait until both directions are ready in one pass.
    assert ctx.poll(True) is True
    assert events == [("r", b"x")]
    assert ctx.poll(False) is False
    ctx.remove_reader(a)


def test_remove_return_values_are_bools(ctx, pair):
    a, _ = pair
    assert ctx.remove_reader(a) is False
    assert ctx.remove_writer(a) is False
    ctx.add_reader(a, lambda: None)
    assert ctx.remove_writer(a) is False  # a reader, but no writer
    assert ctx.remove_reader(a) is True
    assert ctx.remove_reader(a) is False
    ctx.add_writer(a, lambda: None)
    assert ctx.remove_reader(a) is False
    assert ctx.remove_writer(a) is True
    assert ctx.remove_writer(a) is False


def test_add_replaces_earlier_handler(ctx, pair):
    a, b = pair
    events = []
    ctx.add_reader(a, lambda: events.append(("first", a.recv(10))))
    ctx.add_reader(a, lambda: events.append(("second", a.recv(10))))
    b.send(b"x")
    assert ctx.poll(True) is True
    assert events == [("second", b"x")]
    assert ctx.remove_reader(a) is True
    assert ctx.remove_reader(a) is False

    ctx.add_writer(a, events.append, "w1")
    ctx.add_writer(a, events.append, "w2")
    events.clear()
    assert ctx.poll(False) is True
    assert events == ["w2"]
    assert ctx.remove_writer(a) is True
    assert ctx.remove_writer(a) is False


def test_fd_as_int_or_object(ctx, pair):
    """An int and an object with fileno() name the same fd."""
    a, b = pair
    events = []
    ctx.add_reader(a.fileno(), lambda: events.append(a.recv(10)))
    b.send(b"x")
    assert ctx.poll(True) is True
    assert events == [b"x"]
    assert ctx.remove_reader(a) is True  # removed through the object
    ctx.add_writer(a, events.append, "w")
    assert ctx.remove_writer(a.fileno()) is True


def test_fileno_object_that_is_not_a_socket(ctx):
    class FdHolder:
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

    r, w = os.pipe()
    try:
        events = []
        ctx.add_reader(FdHolder(r), lambda: events.append(os.read(r, 10)))
        os.write(w, b"p")
        assert ctx.poll(True) is True
        assert events == [b"p"]
        assert ctx.remove_reader(FdHolder(r)) is True
    finally:
        os.close(r)
        os.close(w)


def test_peer_close_makes_reader_run(ctx, pair):
    a, b = pair
    got = []
    ctx.add_reader(a, lambda: got.append(a.recv(10)))
    b.close()
    assert ctx.poll(True) is True
    assert got == [b""]
    ctx.remove_reader(a)


def test_bad_fd_raises_clear_error(ctx):
    def cb():
        pass

    with pytest.raises(ValueError, match="-1"):
        ctx.add_reader(-1, cb)
    with pytest.raises(TypeError, match="fileno"):
        ctx.add_reader("not an fd", cb)
    with pytest.raises(TypeError, match="fileno"):
        ctx.add_writer(None, cb)

    class BadFileno:
        def fileno(self):
            return "nope"

    with pytest.raises(TypeError):
        ctx.add_reader(BadFileno(), cb)

    # A number that is not an open fd: the OS error, and no ghost handler.
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        ctx.add_reader(r, cb)
    assert ctx.remove_reader(r) is False

    # The context still works.
    assert ctx.spawn(lambda: "ok").join() == "ok"


def test_failed_add_leaves_no_ghost_handler(ctx, pair):
    """An fd rejected by the poller leaves nothing behind to fire later on a reused fd."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    ghost = []
    with pytest.raises(OSError):
        ctx.add_reader(r, ghost.append, "ghost")
    # Reuse the number for a live, readable fd and watch only its writability.
    a, b = pair
    fd = os.dup2(a.fileno(), r)
    try:
        b.send(b"x")
        seen = []
        ctx.add_writer(fd, seen.append, "w")
        assert ctx.poll(False) is True
        assert seen == ["w"]
        assert ghost == []
        assert ctx.remove_reader(fd) is False
        assert ctx.remove_writer(fd) is True
    finally:
        os.close(fd)


def test_callback_must_be_callable(ctx, pair):
    a, _ = pair
    with pytest.raises(TypeError):
        ctx.add_reader(a, None)
    with pytest.raises(TypeError):
        ctx.add_writer(a, 42)
    assert ctx.remove_reader(a) is False


def test_context_notifier_fd_is_refused(ctx):
    fd = ctx._notify_fd
    with pytest.raises(ValueError):
        ctx.add_reader(fd, lambda: None)


@pytest.mark.parametrize(
    "call",
    [
        lambda ctx, s: ctx.add_reader(s, lambda: None),
        lambda ctx, s: ctx.add_writer(s, lambda: None),
        lambda ctx, s: ctx.remove_reader(s),
        lambda ctx, s: ctx.remove_writer(s),
    ],
    ids=["add_reader", "add_writer", "remove_reader", "remove_writer"],
)
def test_home_thread_only(ctx, pair, call):
    a, b = pair
    ok, value = in_other_thread(lambda: call(ctx, a))
    assert not ok
    assert isinstance(value, RuntimeError)
    assert repr(ctx) in str(value)
    # Nothing changed, and the context still works from its home thread.
    assert ctx.remove_reader(a) is False
    assert ctx.remove_writer(a) is False
    got = []
    ctx.add_reader(a, lambda: got.append(a.recv(10)))
    b.send(b"x")
    ctx.poll(True)
    assert got == [b"x"]
    assert ctx.remove_reader(a) is True


def test_handler_exception_goes_to_handler_and_loop_goes_on(ctx, pair):
    a, b = pair
    seen = []
    ctx.set_exception_handler(lambda c, exc, origin: seen.append((exc, origin)))
    err = OSError("handler failed")

    def bad_reader():
        a.recv(10)
        raise err

    writes = []
    ctx.add_reader(a, bad_reader)
    ctx.add_writer(a, writes.append, "w")
    b.send(b"x")
    assert ctx.poll(True) is True
    assert seen == [(err, bad_reader)]
    assert writes == ["w"]
    ctx.remove_reader(a)
    ctx.remove_writer(a)


def test_fd_events_counted(ctx, pair):
    a, _ = pair
    before = ctx.stats()["fd_events"]
    ctx.add_writer(a, lambda: None)
    ctx.poll(False)
    ctx.remove_writer(a)
    assert ctx.stats()["fd_events"] == before + 1


def test_close_forgets_handlers(pair):
    a, b = pair
    ctx = AioContext("closing")
    ctx.add_reader(a, lambda: None)
    ctx.close()
    with pytest.raises(RuntimeError, match="closing"):
        ctx.add_reader(a, lambda: None)
    # A new context in this thread can watch the same fd.
    with AioContext() as again:
        got = []
        again.add_reader(a, lambda: got.append(a.recv(10)))
        b.send(b"x")
        again.poll(True)
        assert got == [b"x"]
