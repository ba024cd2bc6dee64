"""Tests for corun.net: Socket, Stream, open_connection, serve() and notify_closing.

Issue 10's socket layer, without external tools: echo round trips through
a Stream (from corun.run in the main thread, in a plain thread, and on an
IOThread); closing a socket wakes whoever waits on it with OSError(EBADF);
a reused fd number is never taken for the old one; a client that hangs up
mid-command, a client that never reads, 1,000 concurrent connections,
closing a server with clients connected; timeouts on reads and connects.
Every server binds 127.0.0.1 and is closed by its test.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import drain, in_other_thread

import corun
from corun import AioContext, Cancelled, IOThread, Server, Socket, Stream
from corun.net import IncompleteReadError

pytestmark = pytest.mark.timeout(20)

# Bound for anything that should happen "at once": it only turns a hang into a failure.
QUICK = 5.0


@pytest.fixture
def ctx() -> Iterator[AioContext]:
    with AioContext("test-net") as c:
        yield c


@contextmanager
def serving(handler: Callable[..., Any], **kwargs: Any) -> Iterator[Server]:
    """serve(handler) on 127.0.0.1, closed (grace 0.5 s) when the block ends."""
    server = corun.serve(handler, "127.0.0.1", 0, **kwargs)
    try:
        yield server
    finally:
        server.close(grace=0.5)


def echo(stream: Stream, addr: Any) -> None:
    """Send back whatever arrives, until the client hangs up."""
    while data := stream.read(65536):
        stream.write(data)


def wait_until(predicate: Callable[[], bool], timeout: float = QUICK) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {predicate}")
        time.sleep(0.002)


def waits_on(co: corun.Coroutine[Any]) -> str:
    """What corun.dump() says `co` waits on ("" if it waits on nothing)."""
    out = io.StringIO()
    corun.dump(out)
    lines = out.getvalue().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(repr(co).split(" ctx=")[0]) and i + 1 < len(lines):
            following = lines[i + 1].strip()
            return following if following.startswith("waits on:") else ""
    return ""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- round trips -----------------------------------------------------------------------


def echo_client(port: int) -> list[Any]:
    """A Stream through every reading method, against the echo server."""
    seen: list[Any] = []
    stream = corun.open_connection("127.0.0.1", port, timeout=QUICK)
    with stream:
        stream.write(b"hello\nworld\n")
        seen.append(stream.readline())
        seen.append(stream.readline())
        stream.write(b"0123456789" * 1000)  # 10 kB: several segments
        seen.append(stream.readexactly(10_000) == b"0123456789" * 1000)
        stream.write(b"key=value;rest")
        seen.append(stream.readuntil(b";"))
        seen.append(stream.readexactly(4))
        # Everything sent came back: end our side; the server sees EOF and hangs up.
        stream.sock.shutdown(socket.SHUT_WR)
        try:
            stream.readexactly(100)
        except IncompleteReadError as exc:
            seen.append((exc.partial, exc.expected))
        seen.append(stream.readline())  # b"" at end of stream
        seen.append(stream.at_eof())
        try:
            stream.readuntil(b"\n")
        except IncompleteReadError as exc:
            seen.append((exc.partial, exc.expected))
    return seen


ECHOED = [
    b"hello\n",
    b"world\n",
    True,
    b"key=value;",
    b"rest",
    (b"", 100),
    b"",
    True,
    (b"", None),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["run-main-thread", "run-plain-thread", "iothread"])
@pytest.mark.parametrize("iothreads", [1, 2])
def test_echo_round_trips_through_a_stream(where: str, iothreads: int) -> None:
    with serving(echo, iothreads=iothreads) as server:
        port = server.address[1]
        if where == "run-main-thread":
            seen = corun.run(echo_client, port)
        elif where == "run-plain-thread":
            ok, seen = in_other_thread(lambda: corun.run(echo_client, port))
            assert ok, seen
        else:
            with IOThread("client") as t:
                seen = t.ctx.spawn(echo_client, port).join(QUICK)
    assert seen == ECHOED


@pytest.mark.timeout(20)
def test_many_clients_on_several_iothreads_at_once() -> None:
    """Clients on two IOThreads, 10 connections each, all in flight together."""
    with serving(echo, iothreads=2) as server:
        port = server.address[1]
        with IOThread("client-a") as a, IOThread("client-b") as b:
            cos = [t.ctx.spawn(echo_client, port) for t in (a, b) for _ in range(10)]
            results = [co.join(QUICK) for co in cos]
        assert server.accepted == 20
    assert results == [ECHOED] * 20


def test_socket_methods_outside_a_coroutine_are_refused() -> None:
    a, b = socket.socketpair()
    with Socket(a) as s, b:
        with pytest.raises(RuntimeError, match="outside a coroutine"):
            s.recv(1)  # nothing to read: it would have to wait
        b.send(b"x")
        assert s.recv(1) == b"x"  # ready: no wait, so no coroutine needed


def test_eof_after_partial_data_raises_incomplete_read_error() -> None:
    """The peer sends part of what readexactly/readuntil want, then hangs up."""
    a, b = socket.socketpair()

    def main() -> list[Any]:
        seen: list[Any] = []
        with Stream(Socket(a)) as stream:
            reader = corun.current_context().spawn(stream.readexactly, 10)  # type: ignore[union-attr]
            corun.sleep(0.01)  # parked in recv
            b.send(b"abc")
            corun.sleep(0.01)  # the reader took the 3 bytes and waits for 7 more
            b.close()  # EOF: a new edge after the data was read
            try:
                reader.join(QUICK)
            except IncompleteReadError as exc:
                seen.append((exc.partial, exc.expected, str(exc)))
            seen.append(stream.read())
        return seen

    assert corun.run(main) == [
        (b"abc", 10, "stream ended after 3 bytes, before 10 bytes"),
        b"",
    ]


@pytest.mark.parametrize("how", ["recv", "readexactly", "readline"])
def test_eof_arriving_with_the_last_data_is_seen(how: str) -> None:
    a, b = socket.socketpair()

    def main() -> Any:
        with Stream(Socket(a)) as stream:
            first = corun.current_context().spawn(stream.sock.recv, 1)  # type: ignore[union-attr]
            corun.sleep(0.01)  # parked: the fd is now watched
            b.send(b"x" + b"10\nabc")
            b.shutdown(socket.SHUT_WR)  # data and FIN before the loop polls
            assert first.join(QUICK) == b"x"
            with corun.timeout(0.3):  # b"" should come at once
                if how == "recv":
                    return [stream.sock.recv(100), stream.sock.recv(100)]
                if how == "readline":
                    return [stream.readline(), stream.readline()]
                stream.readline()
                try:
                    stream.readexactly(10)
                except IncompleteReadError as exc:
                    return exc.partial

    try:
        expected = {"recv": [b"10\nabc", b""], "readline": [b"10\n", b"abc"], "readexactly": b"abc"}
        assert corun.run(main) == expected[how]
    finally:
        b.close()


# -- closing wakes the waiters ----------------------------------------------------------


def fill_peer(sock: socket.socket) -> None:
    """Write to non-blocking `sock` until the pair's buffers are full."""
    sock.setblocking(False)
    while True:
        try:
            sock.send(b"x" * 65536)
        except BlockingIOError:
            return


@contextmanager
def parked_in(op: str) -> Iterator[tuple[Socket, Callable[[], Any]]]:
    """A corun Socket and a function that waits on it in `op` (recv, sendall, accept)."""
    if op == "accept":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        sock = Socket(listener)
        with sock:
            yield sock, sock.accept
        return
    a, b = socket.socketpair()
    with b:
        sock = Socket(a)
        with sock:
            if op == "recv":
                yield sock, lambda: sock.recv(100)
            else:
                fill_peer(a)  # a's buffers are full: sendall must wait
                yield sock, lambda: sock.sendall(b"y" * 1_000_000)


@pytest.mark.parametrize("op", ["recv", "sendall", "accept"])
def test_close_from_the_home_thread_wakes_the_waiter_with_ebadf(ctx: AioContext, op: str) -> None:
    with parked_in(op) as (sock, wait):
        co = ctx.spawn(wait, name=f"waits-in-{op}")
        drain(ctx)
        assert not co.done and not co.scheduled  # parked on the socket
        sock.close()
        drain(ctx)
        assert co.done
        exc = co.exception()
        assert isinstance(exc, OSError) and exc.errno == errno.EBADF, exc
        assert "closed" in str(exc)
        assert sock.fileno() == -1
        assert ctx.coroutines() == []


@pytest.mark.parametrize("op", ["recv", "sendall", "accept"])
def test_close_from_another_thread_wakes_the_waiter_on_its_iothread(op: str) -> None:
    with parked_in(op) as (sock, wait), IOThread("owner") as t:
        co = t.ctx.spawn(wait, name=f"waits-in-{op}")
        wait_until(lambda: "waits on:" in waits_on(co))
        sock.close()  # from the main thread: hops to the socket's IOThread
        with pytest.raises(OSError) as info:
            co.join(QUICK)
        assert info.value.errno == errno.EBADF
        sock.close()  # idempotent


def test_a_closed_socket_refuses_io_at_once(ctx: AioContext) -> None:
    a, b = socket.socketpair()
    with b:
        sock = Socket(a)
        sock.close()

        def use() -> list[int | None]:
            codes: list[int | None] = []
            for call in (lambda: sock.recv(1), lambda: sock.sendall(b"x"), sock.accept):
                try:
                    call()
                except OSError as exc:
                    codes.append(exc.errno)
            return codes

        assert ctx.spawn(use).join(QUICK) == [errno.EBADF] * 3


# -- fd numbers reused after close --------------------------------------------------------


def test_fd_reused_after_close_is_a_new_socket(ctx: AioContext) -> None:
    """A Socket closed while waited on; the next socketpair gets its fd number and
    works: no stale registration, no "already has a reader", no lost wake-up."""
    for _round in range(20):
        a, b = socket.socketpair()
        old = Socket(a)
        old_fd = old.fileno()
        waiter = ctx.spawn(old.recv, 10, name="old-reader")
        drain(ctx)
        old.close()  # wakes the waiter, forgets the fd
        b.close()
        c, d = socket.socketpair()  # at once: the lowest free fd numbers come back
        assert old_fd in (c.fileno(), d.fileno())
        drain(ctx)
        assert isinstance(waiter.exception(), OSError)
        new = Socket(c if c.fileno() == old_fd else d)
        peer = d if new.sock is c else c
        with new, peer:
            reader = ctx.spawn(new.recv, 10, name="new-reader")
            drain(ctx)
            assert not reader.done  # parked: nothing was sent yet
            peer.send(b"fresh")
            deadline = time.monotonic() + QUICK
            while not reader.done and time.monotonic() < deadline:
                ctx.poll(blocking=True)
            assert reader.result() == b"fresh"
            # wait_readable on the same fd of another fresh socket works too.
            new.close()
            e, f = socket.socketpair()
            with e, f:
                fd = e.fileno() if e.fileno() == old_fd else f.fileno()
                other = f if fd == e.fileno() else e
                assert fd == old_fd
                co = ctx.spawn(corun.wait_readable, fd, QUICK)
                drain(ctx)
                other.send(b"!")
                while not co.done and time.monotonic() < deadline:
                    ctx.poll(blocking=True)
                assert co.result() is True


def test_fd_closed_underneath_a_socket_then_reused(ctx: AioContext) -> None:
    """The fd of a watched Socket is closed behind its back (sock.sock.close()),
    and a new Socket gets the number: the stale watch is dropped, its waiter
    woken with EBADF, and the new Socket's waits work."""
    a, b = socket.socketpair()
    old = Socket(a)
    old_fd = old.fileno()
    waiter = ctx.spawn(old.recv, 10, name="stale-reader")
    drain(ctx)
    a.close()  # not old.close(): the context still has the fd registered
    b.close()
    c, d = socket.socketpair()
    new_sock, peer = (c, d) if c.fileno() == old_fd else (d, c)
    assert new_sock.fileno() == old_fd
    with Socket(new_sock) as new, peer:
        reader = ctx.spawn(new.recv, 10, name="new-reader")
        drain(ctx)
        exc = waiter.exception()
        assert isinstance(exc, OSError) and exc.errno == errno.EBADF
        peer.send(b"data")
        deadline = time.monotonic() + QUICK
        while not reader.done and time.monotonic() < deadline:
            ctx.poll(blocking=True)
        assert reader.result() == b"data"


@pytest.mark.parametrize("order", ["notify-then-close", "close-then-notify"])
def test_notify_closing_wakes_wait_readable_with_ebadf(ctx: AioContext, order: str) -> None:
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())  # a raw fd, not a corun Socket
    a.close()
    try:
        co = ctx.spawn(corun.wait_readable, fd, name="raw-reader")
        drain(ctx)
        assert not co.done
        if order == "notify-then-close":
            corun.notify_closing(fd)
            os.close(fd)
        else:
            os.close(fd)
            corun.notify_closing(fd)
        drain(ctx)
        exc = co.exception()
        assert isinstance(exc, OSError) and exc.errno == errno.EBADF, exc
        # The number is free in the context: a new fd with it waits normally.
        c, d = socket.socketpair()
        with c, d:
            reused = c if c.fileno() == fd else d
            other = d if reused is c else c
            assert reused.fileno() == fd
            co2 = ctx.spawn(corun.wait_readable, reused, QUICK, name="new-reader")
            drain(ctx)
            other.send(b"x")
            deadline = time.monotonic() + QUICK
            while not co2.done and time.monotonic() < deadline:
                ctx.poll(blocking=True)
            assert co2.result() is True
    finally:
        b.close()


def test_notify_closing_on_an_iothread_wakes_its_socket() -> None:
    a, b = socket.socketpair()
    with b, IOThread("owner") as t:
        sock = Socket(a)
        co = t.ctx.spawn(sock.recv, 10, name="reader")
        wait_until(lambda: "waits on:" in waits_on(co))
        t.ctx.call_sync(t.ctx.notify_closing, a.fileno())
        with pytest.raises(OSError) as info:
            co.join(QUICK)
        assert info.value.errno == errno.EBADF
        sock.close()


# -- misbehaving clients ----------------------------------------------------------------


def test_client_disconnecting_mid_command_leaves_the_server_serving() -> None:
    """A length-prefixed protocol: one client sends 3 bytes of a 10-byte message
    and hangs up; its handler sees EOF; the server goes on serving the others."""
    outcomes: list[object] = []
    progress: list[int] = []

    def handler(stream: Stream, addr: Any) -> None:
        try:
            while line := stream.readline():
                size = int(line)
                body = b""
                while len(body) < size:
                    data = stream.read(size - len(body))
                    if not data:
                        raise IncompleteReadError(body, size)
                    body += data
                    progress.append(len(body))
                stream.write(b"got %d\n" % len(body))
            outcomes.append("eof")
        except IncompleteReadError as exc:
            outcomes.append(exc)

    with serving(handler, iothreads=2) as server:
        address = server.address
        with socket.create_connection(address, timeout=QUICK) as rude:
            rude.sendall(b"10\nabc")  # 3 of 10 bytes
            # (Hang up once the server has read them: see test_eof_arriving_with_the_last_data.)
            wait_until(lambda: progress == [3])
        wait_until(lambda: len(outcomes) == 1)
        exc = outcomes[0]
        assert isinstance(exc, IncompleteReadError)
        assert exc.partial == b"abc" and exc.expected == 10
        for _ in range(3):  # and the server goes on
            with socket.create_connection(address, timeout=QUICK) as polite:
                polite.sendall(b"5\nhello")
                assert polite.recv(100) == b"got 5\n"
        wait_until(lambda: len(outcomes) == 4)
        assert outcomes[1:] == ["eof"] * 3
        assert server.accepted == 4


@pytest.mark.parametrize("freed_by", ["cancel", "client-close", "server-close"])
def test_slow_client_parks_the_writer_and_the_writer_can_be_freed(freed_by: str) -> None:
    """The server writes 1 MiB chunks to a client that never reads: its writer
    blocks in sendall once the socket buffers are full (memory bounded by them),
    and cancelling it, the client hanging up or closing the server frees it."""
    chunk = b"z" * (1 << 20)
    sent: list[int] = []
    writers: list[corun.Coroutine[Any]] = []
    endings: list[BaseException] = []

    def handler(stream: Stream, addr: Any) -> None:
        writers.append(corun.current_coroutine())  # type: ignore[arg-type]
        try:
            while True:
                stream.write(chunk)
                sent.append(len(chunk))
        except BaseException as exc:
            endings.append(exc)
            raise

    server = corun.serve(handler, "127.0.0.1", 0)
    try:
        client = socket.create_connection(server.address, timeout=QUICK)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        wait_until(lambda: bool(writers))
        writer = writers[0]
        wait_until(lambda: "send" in waits_on(writer))
        before = sum(sent)
        time.sleep(0.2)
        assert sum(sent) == before  # no progress: parked, not spinning
        assert "suspended" in repr(writer) and not writer.done
        # Bounded by the socket buffers (a few MiB on loopback), not by the 1 MiB/round loop.
        assert before <= 64 << 20
        if freed_by == "cancel":
            writer.cancel("enough")
            with pytest.raises(Cancelled):
                writer.join(QUICK)
        elif freed_by == "client-close":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST: the writer's send fails
            with pytest.raises(OSError) as info:
                writer.join(QUICK)
            assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
        else:
            t0 = time.monotonic()
            server.close(grace=0.1)
            assert time.monotonic() - t0 < QUICK
            assert writer.cancelled()
        assert len(endings) == 1
        client.close()
    finally:
        server.close(grace=0.1)


# -- many connections --------------------------------------------------------------------


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} fds this test needs")
    new_soft = needed if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


@pytest.mark.timeout(30)
def test_a_thousand_concurrent_connections() -> None:
    """1,000 clients connected at once, each one round trip, over serve(iothreads=2)."""
    n = 1000
    raise_fd_limit(2 * n + 100)
    all_answered = corun.Event()
    served: list[int] = []

    def handler(stream: Stream, addr: Any) -> None:
        line = stream.readline()
        stream.write(line.upper())
        served.append(1)
        stream.read()  # until the client hangs up

    def client(i: int, answers: list[bytes]) -> None:
        stream = corun.open_connection("127.0.0.1", port, timeout=10)
        with stream:
            stream.write(b"client %d\n" % i)
            answers[i] = stream.readline()
            if all(answers):  # the last to be answered releases everyone
                all_answered.set()
            all_answered.wait()  # every connection stays open until all are answered

    with serving(handler, iothreads=2, backlog=n) as server:
        port = server.address[1]
        answers: list[bytes] = [b""] * n
        with IOThread("clients") as t:
            cos = [t.ctx.spawn(client, i, answers) for i in range(n)]
            for co in cos:
                co.join(25)
        assert answers == [b"CLIENT %d\n" % i for i in range(n)]
        assert server.accepted == n
        wait_until(lambda: len(served) == n)


# -- server shutdown ----------------------------------------------------------------------


def test_server_close_with_clients_connected_cancels_their_handlers() -> None:
    started: list[int] = []
    finished: list[str] = []
    lock = threading.Lock()

    def handler(stream: Stream, addr: Any) -> None:
        with lock:
            started.append(1)
        try:
            stream.readline()  # the clients never send anything
            finished.append("returned")
        except Cancelled:
            finished.append("cancelled")
            raise
        finally:
            finished.append("finally")

    server = corun.serve(handler, "127.0.0.1", 0, iothreads=2)
    clients = [socket.create_connection(server.address, timeout=QUICK) for _ in range(6)]
    try:
        wait_until(lambda: len(started) == 6)
        t0 = time.monotonic()
        server.close(grace=0.2)
        elapsed = time.monotonic() - t0
        assert 0.2 <= elapsed < 3.0
        assert sorted(finished) == ["cancelled"] * 6 + ["finally"] * 6
        for c in clients:
            assert c.recv(10) == b""  # the server closed its end
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.address, timeout=QUICK).close()
        server.close()  # idempotent
    finally:
        for c in clients:
            c.close()
        server.close(grace=0)


def test_server_close_waits_for_handlers_that_finish_within_the_grace() -> None:
    finished: list[str] = []

    def handler(stream: Stream, addr: Any) -> None:
        corun.sleep(0.1)  # finishing its work: the grace period covers it
        stream.write(b"bye\n")
        finished.append("done")

    server = corun.serve(handler, "127.0.0.1", 0)
    with socket.create_connection(server.address, timeout=QUICK) as c:
        wait_until(lambda: server.accepted == 1)
        server.close(grace=QUICK)
        assert finished == ["done"]
        assert c.recv(10) == b"bye\n"


def test_serve_thread_pool_size_bounds_each_iothreads_workers() -> None:
    """serve(thread_pool_size=2): each connection's run_in_thread() calls share
    a pool of 2 workers on its IOThread."""
    lock = threading.Lock()
    running = 0
    peak = 0

    def slow() -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)  # the work itself: overlapping calls are what is counted
        with lock:
            running -= 1
        return threading.get_ident()

    def handler(stream: Stream, addr: Any) -> None:
        stream.readline()
        with corun.TaskGroup() as group:
            calls = [group.spawn(corun.run_in_thread, slow) for _ in range(8)]
        stream.write(b"%d\n" % len({co.result() for co in calls}))

    with serving(handler, thread_pool_size=2) as server:
        with socket.create_connection(server.address, timeout=QUICK) as c:
            c.sendall(b"go\n")
            assert c.makefile("rb").readline() == b"2\n"
    assert peak == 2


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_serve_rejects_a_bad_thread_pool_size_and_leaks_nothing(size: Any) -> None:
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match=r"serve\(\): thread_pool_size must be an int >= 1"):
        corun.serve(echo, "127.0.0.1", 0, thread_pool_size=size)
    assert set(threading.enumerate()) <= before  # no IOThread was started


# -- timeouts ----------------------------------------------------------------------------


def test_timeout_scope_on_readline_then_the_socket_still_works() -> None:
    a, b = socket.socketpair()

    def main() -> list[Any]:
        seen: list[Any] = []
        stream = Stream(Socket(a))
        with stream:
            t0 = time.monotonic()
            try:
                with corun.timeout(0.05):
                    stream.readline()  # the peer is silent
            except TimeoutError:
                seen.append(("timeout", time.monotonic() - t0 < 1.0))
            b.send(b"late\n")
            seen.append(stream.readline())
            with corun.move_on_after(0.05) as scope:
                stream.readexactly(4)
            seen.append(scope.cancelled_caught)
            b.send(b"done")
            seen.append(stream.readexactly(4))
        return seen

    with b:
        assert corun.run(main) == [("timeout", True), b"late\n", True, b"done"]


def test_open_connection_times_out_when_the_listener_never_accepts() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        # Fill the accept queue until a connect hangs (Linux drops the SYNs then).
        for _ in range(16):
            s = socket.socket()
            s.settimeout(0.2)
            fillers.append(s)
            try:
                s.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("the kernel never stopped accepting connections for backlog 0")
        fds = open_fds()

        def main() -> float:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                corun.open_connection("127.0.0.1", port, timeout=0.2)
            return time.monotonic() - t0

        elapsed = corun.run(main)
        assert 0.2 <= elapsed < 2.0
        assert open_fds() == fds  # the attempt's socket was closed
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_open_connection_to_a_closed_port_is_refused() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens there now

    def main() -> None:
        corun.open_connection("127.0.0.1", port, timeout=QUICK)

    fds = open_fds()
    with pytest.raises(ConnectionRefusedError):
        corun.run(main)
    assert open_fds() == fds


def test_connect_timeout_on_a_socket() -> None:
    """Socket.connect(timeout=) directly, to an address that never answers a SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = [socket.create_connection(address, timeout=QUICK)]  # the queue holds one

    def main() -> str:
        for _ in range(8):
            sock = Socket(socket.socket())
            with sock:
                try:
                    sock.connect(address, timeout=0.1)
                except TimeoutError:
                    return "timeout"
                filler.append(sock.sock.dup())  # it got in: keep it queued, try again
        return "never timed out"

    try:
        assert corun.run(main) == "timeout"
    finally:
        for s in filler:
            s.close()
        listener.close()


def test_sendmsg_gathers_buffers_and_waits_for_room() -> None:
    """Socket.sendmsg sends several buffers in one call; when the peer does not
    read, it suspends the coroutine (not the thread) until there is room."""
    a, b = socket.socketpair()
    b.setblocking(True)
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    sent: list[int] = []
    first_call_done = threading.Event()

    def writer() -> None:
        sock = Socket(a)
        buffers: list[Any] = [b"head:", big, b":tail"]
        total = sum(len(x) for x in buffers)
        n = sock.sendmsg(buffers)
        sent.append(n)
        first_call_done.set()  # nobody read before it: it could not send it all
        while n < total:  # the rest, as a caller of a gather write does
            rest = (b"head:" + big + b":tail")[n:]
            n += sock.sendmsg([rest])
        sent.append(n)
        sock.close()

    with IOThread("sendmsg") as t:
        co = t.ctx.spawn(writer)
        assert first_call_done.wait(QUICK)
        got = bytearray()
        while chunk := b.recv(65536):
            got += chunk
        co.join(QUICK)
    b.close()
    assert bytes(got) == b"head:" + big + b":tail"
    assert 0 < sent[0] < len(got)  # the first call went in part: the buffer was full
    assert sent[-1] == len(got)


def test_server_counts_open_connections_and_waits_until_idle() -> None:
    release = threading.Event()

    def handler(stream: Stream, addr: Any) -> None:
        stream.readline()
        run_in_thread_wait(release)

    with serving(handler) as server:
        assert server.connections == 0 and server.wait_idle(0)
        clients = [socket.create_connection(server.address, timeout=QUICK) for _ in range(3)]
        wait_until(lambda: server.connections == 3)
        for c in clients:
            c.sendall(b"x\n")
        assert not server.wait_idle(0.01)
        release.set()
        assert server.wait_idle(QUICK)
        assert server.connections == 0
        for c in clients:
            c.close()


def run_in_thread_wait(event: threading.Event) -> None:
    corun.run_in_thread(event.wait, QUICK)


@pytest.mark.parametrize(
    ("offset", "count", "expected"),
    [(0, None, slice(0, None)), (1000, 300_000, slice(1000, 301_000)), (1 << 20, 50, slice(0, 0))],
    ids=["whole", "range", "past-the-end"],
)
def test_sendfile_sends_a_file_range_and_waits_for_room(
    tmp_path: Any, offset: int, count: int | None, expected: slice
) -> None:
    """Socket.sendfile moves a file's bytes to the socket, waiting (as a coroutine)
    while the peer does not read; it stops at the end of the file."""
    data = os.urandom(1 << 20)  # more than the socket buffers hold
    path = tmp_path / "data"
    path.write_bytes(data)
    a, b = socket.socketpair()
    b.setblocking(True)
    result: list[int] = []

    def sender() -> None:
        sock = Socket(a)
        with open(path, "rb") as f:
            result.append(sock.sendfile(f, offset, count))
            assert f.tell() == 0  # the file's own position is not used or moved
        sock.close()

    with IOThread("sendfile") as t:
        co = t.ctx.spawn(sender)
        got = bytearray()
        while chunk := b.recv(65536):
            got += chunk
        co.join(QUICK)
    b.close()
    assert bytes(got) == data[expected]
    assert result == [len(got)]
