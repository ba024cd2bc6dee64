"""Tests for corun.fdwait: wait_readable() and wait_writable().

QEMU's equivalent (qio_channel_yield) is tested through the block layer;
these check API.md on a socketpair: ready -> True, timeout -> False, the
handler is gone afterwards, and misuse raises RuntimeError.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers import drain, socket_pair

from corun import AioContext, IOThread, current_context, wait_readable, wait_writable

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-fdwait") as c:
        yield c


@pytest.fixture
def pair():
    with socket_pair() as ab:
        yield ab


def fill(sock):
    """Write to `sock` until its buffers are full (it is no longer writable)."""
    chunk = b"x" * 65536
    while True:
        try:
            sock.send(chunk)
        except BlockingIOError:
            return


def read_all(sock):
    total = 0
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return total
        total += len(data)


@pytest.mark.parametrize("as_int", [False, True], ids=["socket", "int"])
def test_wait_readable_becomes_ready(ctx, pair, as_int):
    a, b = pair
    fd = a.fileno() if as_int else a

    def reader():
        ready = wait_readable(fd, timeout=10)
        return ready, ctx.remove_reader(a), a.recv(10)

    co = ctx.spawn(reader)
    drain(ctx)
    assert not co.done  # waiting: nothing to read yet
    b.send(b"ping")
    assert co.join(10) == (True, False, b"ping")
    assert ctx.remove_reader(a) is False


def test_wait_readable_when_already_readable(ctx, pair):
    a, b = pair
    b.send(b"x")

    def reader():
        return wait_readable(a), ctx.remove_reader(a)

    assert ctx.spawn(reader).join(10) == (True, False)


def test_wait_readable_times_out(ctx, pair):
    a, _ = pair

    def reader():
        start = time.monotonic()
        ready = wait_readable(a, timeout=0.05)
        return ready, time.monotonic() - start >= 0.05, ctx.remove_reader(a)

    assert ctx.spawn(reader).join(10) == (False, True, False)


@pytest.mark.parametrize("as_int", [False, True], ids=["socket", "int"])
def test_wait_writable_is_ready_at_once(ctx, pair, as_int):
    a, _ = pair
    fd = a.fileno() if as_int else a

    def writer():
        return wait_writable(fd, timeout=10), ctx.remove_writer(a)

    assert ctx.spawn(writer).join(10) == (True, False)


def test_wait_writable_times_out_on_a_full_socket(ctx, pair):
    a, _ = pair
    fill(a)

    def writer():
        start = time.monotonic()
        ready = wait_writable(a, timeout=0.05)
        return ready, time.monotonic() - start >= 0.05, ctx.remove_writer(a)

    assert ctx.spawn(writer).join(10) == (False, True, False)


def test_wait_writable_becomes_ready_when_the_peer_reads(ctx, pair):
    a, b = pair
    fill(a)

    def writer():
        return wait_writable(a, timeout=10), ctx.remove_writer(a)

    co = ctx.spawn(writer)
    drain(ctx)
    assert not co.done  # the buffer is full
    assert read_all(b) > 0
    assert co.join(10) == (True, False)


def test_reader_and_writer_on_one_fd_are_independent(ctx, pair):
    """A writer's wait on the fd ends (and removes its handler) without touching a
    reader that still waits on the same fd."""
    a, b = pair
    events = []

    def reader():
        events.append(("readable", wait_readable(a, timeout=10)))

    def writer():
        events.append(("writable", wait_writable(a, timeout=10)))

    r = ctx.spawn(reader)
    w = ctx.spawn(writer)
    drain(ctx)
    assert w.done and not r.done
    assert events == [("writable", True)]
    b.send(b"x")
    r.join(10)
    assert events == [("writable", True), ("readable", True)]
    assert ctx.remove_reader(a) is False and ctx.remove_writer(a) is False


def test_wait_readable_on_an_iothread_woken_by_another_thread(pair):
    a, b = pair
    started = threading.Event()

    def reader():
        started.set()
        ready = wait_readable(a, timeout=10)
        ctx = current_context()
        return ready, ctx.remove_reader(a), a.recv(10)

    with IOThread("fdwait") as t:
        co = t.ctx.spawn(reader)
        assert started.wait(10)
        t.ctx.call_sync(lambda: None)  # the reader has yielded: it waits
        assert not co.done
        b.send(b"pong")
        assert co.join(10) == (True, False, b"pong")


def test_a_second_waiter_for_the_same_direction_is_refused(ctx, pair):
    a, b = pair
    errors = []

    def first():
        return wait_readable(a, timeout=10)

    def second():
        try:
            wait_readable(a, timeout=10)
        except RuntimeError as exc:
            errors.append(str(exc))

    f = ctx.spawn(first)
    s = ctx.spawn(second, name="second-reader")
    drain(ctx)
    assert s.done and len(errors) == 1 and "second-reader" in errors[0]
    # The first waiter's handler is untouched.
    b.send(b"x")
    assert f.join(10) is True


def test_outside_a_coroutine(pair):
    a, _ = pair
    with pytest.raises(RuntimeError, match="outside a coroutine"):
        wait_readable(a)
    with pytest.raises(RuntimeError, match="outside a coroutine"):
        wait_writable(a, timeout=0)
