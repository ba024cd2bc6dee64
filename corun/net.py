"""Sockets for coroutines: Socket, Stream, open_connection, serve.

QEMU: io/channel-socket.c and io/channel.c's qio_channel_yield, which parks
a coroutine until its channel's fd is ready; gevent's cooperative socket
and asyncio's streams are the anchors for the API.

Design. A Socket wraps a non-blocking `socket.socket`. The first time one
of its coroutines has to wait, its fd is registered with that coroutine's
context, edge-triggered for reading and writing, for the socket's whole
life (`_Watch`): a wait costs no epoll_ctl, and a socket nobody waits on
costs no wake-up. The watch also remembers whether the last read or write
came back short or with EAGAIN: then the next call waits for the next
edge first instead of taking an EAGAIN exception, so a request/response
exchange costs its read and write syscalls and nothing else. Once an edge
has carried the peer's hang-up (EPOLLRDHUP), a short read no longer counts:
the FIN's edge is spent and the next read must see the end of stream.
Each wait is a kernel park with an abort, so every socket operation is a
cancellation point; `timeout=` wraps it in a scope.

Closing is safe: `close()` (or `ctx.notify_closing(fd)`, for an fd closed
by other means) wakes every coroutine waiting on the socket with
OSError(EBADF) and removes the registration before the fd is closed, so a
new socket that gets the same fd number is never taken for the old one.

Threads: a Socket belongs to the context of the coroutine that first waits
on it; its methods are for coroutines of that context. `close()` from its
home thread (another thread's close() hops there with call_sync).
Connecting and name resolution run `getaddrinfo` in the context's thread
pool, so the loop never blocks on DNS.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent

from .coroutine import park
from .iothread import IOThread
from .scope import timeout as _timeout_scope
from .threadpool import run_in_thread

if TYPE_CHECKING:
    from .context import AioContext
    from .coroutine import Coroutine

_READ, _WRITE = 0, 1


def _closed_error(what: str) -> OSError:
    return OSError(errno.EBADF, f"{what}: the socket was closed")


class _Watch:
    """A socket's fd as its context sees it: who waits, and what is ready."""

    __slots__ = ("ctx", "edge", "fd", "hup", "owner", "rd_ready", "reader", "wr_ready", "writer")

    def __init__(self, ctx: AioContext, fd: int, owner: Socket) -> None:
        self.ctx = ctx
        self.fd = fd
        self.owner = owner
        self.reader: Coroutine[Any] | None = None
        self.writer: Coroutine[Any] | None = None
        # Whether a read (write) may succeed without waiting: True until one
        # comes back short or EAGAIN, True again at the next edge.
        self.rd_ready = True
        self.wr_ready = True
        # The peer hung up (an edge carried RDHUP/HUP): from then on a short
        # read no longer means drained (the FIN's edge is spent already).
        self.hup = False
        self.edge = ctx._watch_edge(fd, self)

    def __repr__(self) -> str:
        return repr(self.owner)

    # Called by the loop (home thread, outside coroutines) at each edge.
    def hangup(self) -> None:
        self.hup = True

    def readable(self) -> None:
        self.rd_ready = True
        co = self.reader
        if co is not None:
            self.reader = None
            self.ctx.enter(co)

    def writable(self) -> None:
        self.wr_ready = True
        co = self.writer
        if co is not None:
            self.writer = None
            self.ctx.enter(co)

    def closing(self) -> None:
        """The fd is being closed: wake the waiters; they raise EBADF."""
        self.owner._closed = True
        self.readable()
        self.writable()

    def _abort_reader(self) -> bool:
        if self.reader is None:
            return False  # its wake-up is on the way
        self.reader = None
        return True

    def _abort_writer(self) -> bool:
        if self.writer is None:
            return False
        self.writer = None
        return True

    def wait(self, co: Coroutine[Any], index: int, what: str) -> None:
        """Park `co` until the fd may be ready for `index` (read/write)."""
        owner = self.owner
        if index == _READ:
            if self.reader is not None:
                raise RuntimeError(f"{what}() in {co!r}: {self.reader!r} already reads {owner!r}")
            self.rd_ready = False
            self.reader = co
            abort = self._abort_reader
        else:
            if self.writer is not None:
                raise RuntimeError(f"{what}() in {co!r}: {self.writer!r} already writes {owner!r}")
            self.wr_ready = False
            self.writer = co
            abort = self._abort_writer
        level = not self.edge
        if level:  # no edge-triggered poller: register for this wait only
            handler = (self.readable, ()) if index == _READ else (self.writable, ())
            self.ctx._set_handler(self.fd, index, handler, what)
        try:
            park(co, abort, (what, self.fd))
        finally:
            if index == _READ:
                if self.reader is co:
                    self.reader = None
            elif self.writer is co:
                self.writer = None
            if level and not owner._closed and not self.ctx._closed:
                self.ctx._set_handler(self.fd, index, None, what)
        if owner._closed:
            raise _closed_error(f"{what}()")


class Socket:
    """A non-blocking socket whose blocking-style methods suspend the coroutine.

    Wraps `sock` (made non-blocking). Thread: see the module.
    """

    __slots__ = ("__weakref__", "_closed", "_fd", "_sock", "_watch")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._closed = False
        self._watch: _Watch | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<corun.Socket {state} {self._sock.family.name} {self._sock.type.name}>"

    @property
    def sock(self) -> socket.socket:
        """The wrapped socket.socket (non-blocking). Thread: any."""
        return self._sock

    def fileno(self) -> int:
        """The socket's fd. Thread: any."""
        return self._sock.fileno()

    def getsockname(self) -> Any:
        """The local address. Thread: any."""
        return self._sock.getsockname()

    def getpeername(self) -> Any:
        """The remote address. Thread: any."""
        return self._sock.getpeername()

    def setsockopt(self, *args: Any) -> None:
        """socket.setsockopt. Thread: any."""
        self._sock.setsockopt(*args)

    # -- waiting -----------------------------------------------------------------

    def _wait(self, index: int, what: str) -> None:
        co: Coroutine[Any] | None = getattr(getcurrent(), "co", None)
        if co is None:
            raise RuntimeError(f"{self!r}.{what}() called outside a coroutine")
        watch = self._watch
        if watch is None:
            ctx = co.ctx
            if ctx is None:
                raise RuntimeError(f"{self!r}.{what}() in {co!r}, which has no context")
            watch = self._watch = _Watch(ctx, self._fd, self)
        elif watch.ctx is not co.ctx:
            raise RuntimeError(
                f"{self!r}.{what}() in {co!r}: the socket belongs to {watch.ctx!r} "
                "(a socket's fd is watched by one context)"
            )
        watch.wait(co, index, what)

    def _check(self, what: str) -> None:
        if self._closed:
            raise _closed_error(f"{what}()")

    # -- reading -------------------------------------------------------------------

    def _io(self, index: int, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """call(*args) on the socket, waiting for readiness as needed (the retry loop
        of every operation): waits first if the last one came back short."""
        self._check(what)
        watch = self._watch
        if watch is not None and not (watch.rd_ready if index == _READ else watch.wr_ready):
            self._wait(index, what)
        while True:
            try:
                return call(*args)
            except BlockingIOError:
                self._wait(index, what)
            except OSError:
                if self._closed:
                    raise _closed_error(f"{what}()") from None
                raise

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive up to `bufsize` bytes; b"" at end of stream. A cancellation point
        when it has to wait. Coroutine only."""
        data: bytes = self._io(_READ, "recv", self._sock.recv, bufsize, flags)
        watch = self._watch
        if watch is not None and 0 < len(data) < bufsize and not watch.hup:
            # Drained: the next read waits for an edge instead of taking
            # EAGAIN. Not after a hang-up: the FIN's edge is spent.
            watch.rd_ready = False
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into `buffer`; return how many bytes (0 at end of stream).
        Coroutine only."""
        n: int = self._io(_READ, "recv_into", self._sock.recv_into, buffer, nbytes, flags)
        watch = self._watch
        if watch is not None and n and not watch.hup and n < (nbytes or memoryview(buffer).nbytes):
            watch.rd_ready = False  # drained, as in recv()
        return n

    # -- writing -------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """Send some of `data`; return how many bytes went. Coroutine only."""
        n: int = self._io(_WRITE, "send", self._sock.send, data, flags)
        watch = self._watch
        if watch is not None and n < len(data):
            watch.wr_ready = False  # the send buffer is full
        return n

    def sendmsg(self, buffers: Sequence[Any], ancdata: Any = (), flags: int = 0) -> int:
        """Send `buffers` in one gather write (socket.sendmsg, no join); return
        how many bytes went, maybe fewer than all. Coroutine only.

        Unlike send(), a short write is not remembered (that would cost a pass
        over the buffers every call): the next call finds the buffer full itself.
        """
        if not isinstance(buffers, (list, tuple)):
            buffers = list(buffers)  # retried after a wait: must be iterable twice
        n: int = self._io(_WRITE, "sendmsg", self._sock.sendmsg, buffers, ancdata, flags)
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Send all of `data`, waiting for room as needed. A cancellation point
        when it has to wait (then some of `data` may have gone). Coroutine only."""
        view = memoryview(data).cast("B")
        total = len(view)
        sent = self.send(view, flags)
        while sent < total:
            sent += self.send(view[sent:], flags)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send `count` bytes of `file` (a file object or an fd) from `offset`, or
        up to its end; return how many went.

        os.sendfile: the kernel moves the data from the page cache to the
        socket, with no copy through Python. Waits for room as needed, a
        cancellation point when it does (then some may have gone). The
        file's own position is neither used nor moved. Coroutine only.
        """
        fd = file if isinstance(file, int) else file.fileno()
        if offset < 0 or (count is not None and count < 0):
            raise ValueError(f"{self!r}.sendfile(): negative offset or count")
        total = 0
        while count is None or total < count:
            chunk = 1 << 30 if count is None else min(count - total, 1 << 30)
            n: int = self._io(_WRITE, "sendfile", os.sendfile, self._fd, fd, offset + total, chunk)
            if n == 0:
                break  # the end of the file
            total += n
        return total

    # -- connections ---------------------------------------------------------------

    def accept(self) -> tuple[Socket, Any]:
        """Wait for a connection; return (Socket, address). Coroutine only."""
        conn, addr = self._io(_READ, "accept", self._sock.accept)
        return Socket(conn), addr

    def connect(self, address: Any, timeout: float | None = None) -> None:
        """Connect to `address` (resolved already), waiting for the handshake.

        TimeoutError after `timeout` seconds. Coroutine only.
        """
        self._check("connect")
        if timeout is not None:
            with _timeout_scope(timeout):
                self._connect(address)
        else:
            self._connect(address)

    def _connect(self, address: Any) -> None:
        err = self._sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            self._wait(_WRITE, "connect")
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {address!r}: {errno.errorcode.get(err, err)}")

    def shutdown(self, how: int) -> None:
        """socket.shutdown (SHUT_RD, SHUT_WR, SHUT_RDWR). Thread: any."""
        self._sock.shutdown(how)

    def close(self) -> None:
        """Wake every coroutine waiting on the socket (OSError EBADF), forget the
        fd, close it. Idempotent. Thread: the socket's home (or any: it hops)."""
        if self._closed and self._sock.fileno() < 0:
            return
        watch = self._watch
        if watch is not None and threading.get_ident() != watch.ctx._thread:
            if not watch.ctx._closed:
                try:
                    watch.ctx.call_sync(self.close)
                    return
                except RuntimeError:
                    pass  # its context closed meanwhile: nothing waits there
            self._closed = True
            self._sock.close()
            return
        self._closed = True
        if watch is not None:
            self._watch = None
            watch.ctx._unwatch_edge(self._fd, watch)
            watch.closing()
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- streams -------------------------------------------------------------------------


class IncompleteReadError(EOFError):
    """The stream ended before readexactly() or readuntil() was satisfied."""

    def __init__(self, partial: bytes, expected: int | None) -> None:
        want = "the separator" if expected is None else f"{expected} bytes"
        super().__init__(f"stream ended after {len(partial)} bytes, before {want}")
        self.partial = partial
        self.expected = expected


class Stream:
    """Buffered reading and plain writing over a Socket, for one coroutine at a time.

    asyncio's StreamReader/StreamWriter in one object, without drain():
    write() sends everything before it returns. Coroutine only.
    """

    __slots__ = ("_buf", "_eof", "_limit", "sock")

    def __init__(self, sock: Socket, limit: int = 65536) -> None:
        #: The Socket it reads from and writes to.
        self.sock = sock
        self._buf = bytearray()
        self._eof = False
        self._limit = limit

    def __repr__(self) -> str:
        return f"<corun.Stream {self.sock!r}, {len(self._buf)} buffered>"

    def _fill(self) -> bool:
        """Read more into the buffer; False at end of stream."""
        if self._eof:
            return False
        data = self.sock.recv(self._limit)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all until end of stream if n < 0); b"" at end."""
        if n < 0:
            while self._fill():
                pass
            data = bytes(self._buf)
            self._buf.clear()
            return data
        if not self._buf:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes, or IncompleteReadError at end of stream."""
        while len(self._buf) < n:
            if not self._fill():
                partial = bytes(self._buf)
                self._buf.clear()
                raise IncompleteReadError(partial, n)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Up to and including `separator`, or IncompleteReadError at end of stream.

        ValueError past `limit` bytes without it (the buffer is kept).
        """
        start = 0
        while True:
            i = self._buf.find(separator, start)
            if i >= 0:
                end = i + len(separator)
                data = bytes(self._buf[:end])
                del self._buf[:end]
                return data
            if len(self._buf) > self._limit:
                raise ValueError(f"{self!r}: no {separator!r} within {self._limit} bytes")
            start = max(0, len(self._buf) - len(separator) + 1)
            if not self._fill():
                partial = bytes(self._buf)
                self._buf.clear()
                raise IncompleteReadError(partial, None)

    def readline(self) -> bytes:
        """A line with its b"\\n"; what is left (maybe b"") at end of stream."""
        try:
            return self.readuntil(b"\n")
        except IncompleteReadError as e:
            return e.partial

    def write(self, data: Any) -> None:
        """Send all of `data` (no drain() needed)."""
        self.sock.sendall(data)

    def at_eof(self) -> bool:
        """Whether the peer ended the stream and the buffer is empty."""
        return self._eof and not self._buf

    def close(self) -> None:
        """Close the socket (waking whoever waits on it)."""
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def getaddrinfo(host: str | None, port: int | str | None, *args: Any) -> list[Any]:
    """socket.getaddrinfo in the context's thread pool: the loop never blocks on DNS.

    Coroutine only.
    """
    return run_in_thread(socket.getaddrinfo, host, port, *args)


def open_connection(
    host: str, port: int, *, timeout: float | None = None, nodelay: bool = True
) -> Stream:
    """Resolve `host` (without blocking the loop), connect, return a Stream.

    Tries each address in turn; TimeoutError after `timeout` seconds for
    the whole attempt. Coroutine only (also from a plain thread's
    corun.run()).
    """
    if timeout is not None:
        with _timeout_scope(timeout):
            return open_connection(host, port, nodelay=nodelay)
    infos = getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _canon, address in infos:
        sock = Socket(socket.socket(family, kind, proto))
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        if nodelay and family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Stream(sock)
    raise error if error is not None else OSError(f"no address for {host!r}:{port}")


# -- the server ----------------------------------------------------------------------


class Server:
    """Accepts on one context; serves each connection on one of N IOThreads.

    Made by serve(). Connections go to the IOThreads round-robin (each
    connection's coroutine lives on its IOThread for good). close() stops
    accepting, lets connections finish for `grace` seconds, cancels the
    rest (their finally blocks run), and joins the IOThreads. Thread: any.
    """

    def __init__(
        self,
        handler: Callable[..., Any],
        listener: socket.socket,
        iothreads: int,
        nodelay: bool,
        stream: bool,
        thread_pool_size: int | None = None,
    ) -> None:
        if iothreads < 1:
            raise ValueError(f"serve(): iothreads must be >= 1, got {iothreads}")
        if thread_pool_size is not None and (
            isinstance(thread_pool_size, bool)
            or not isinstance(thread_pool_size, int)
            or thread_pool_size < 1
        ):
            raise ValueError(
                f"serve(): thread_pool_size must be an int >= 1, got {thread_pool_size!r}"
            )
        self._handler = handler
        self._nodelay = nodelay
        self._stream = stream
        self._lock = threading.Lock()
        self._connections: set[Coroutine[Any]] = set()
        self._idle = threading.Event()  # set while no connection is open
        self._idle.set()
        self._accepted = 0
        self._closed = False
        #: The (host, port) it listens on (port 0 in serve() picks a free one).
        self.address = listener.getsockname()
        self._threads = [IOThread(f"serve-{i}") for i in range(iothreads)]
        if thread_pool_size is not None:
            for t in self._threads:
                t.ctx.call_sync(t.ctx.set_thread_pool_size, thread_pool_size)
        self._next = itertools.cycle(self._threads)
        self._acceptor_thread = IOThread("serve-accept")
        self._listener = Socket(listener)
        self._acceptor = self._acceptor_thread.ctx.spawn(self._accept_loop, name="serve-accept")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._connections)} connection(s)"
        return f"<corun.Server {self.address!r} {state}, {len(self._threads)} IOThread(s)>"

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far. Thread: any."""
        return self._accepted

    @property
    def connections(self) -> int:
        """How many connections are open now (their handlers running). Thread: any."""
        return len(self._connections)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no connection is open; False if `timeout` seconds pass first.

        Thread: any but the server's own IOThreads (it blocks the thread).
        """
        return self._idle.wait(timeout)

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                conn, addr = listener.accept()
            except OSError:
                if self._closed:
                    return
                raise
            raw = conn._sock
            conn._closed = True  # the wrapper is dropped: its fd goes to another context
            if self._nodelay and raw.family in (socket.AF_INET, socket.AF_INET6):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accepted += 1
            target = next(self._next)
            try:
                co = target.ctx.spawn(self._serve_one, raw, addr, name=f"conn-{addr}")
            except RuntimeError:
                raw.close()  # closing: refused
                return
            with self._lock:
                if not co.done:
                    self._connections.add(co)
                    self._idle.clear()

    def _serve_one(self, raw: socket.socket, addr: Any) -> Any:
        me: Coroutine[Any] = getcurrent().co  # type: ignore[attr-defined]
        sock = Socket(raw)
        try:
            return self._handler(Stream(sock) if self._stream else sock, addr)
        finally:
            sock.close()
            with self._lock:
                self._connections.discard(me)
                if not self._connections:
                    self._idle.set()

    def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give connections `grace` seconds, cancel the rest, join.

        Idempotent. Thread: any but the server's own IOThreads.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._acceptor_thread.ctx.call_sync(self._listener.close)
        self._acceptor_thread.join()
        # Let the connections finish (their errors stay theirs: no join).
        self._idle.wait(max(grace, 0.0))
        with self._lock:
            remaining = list(self._connections)
        for co in remaining:
            co.cancel("server closing")
        for t in self._threads:
            t.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve(
    handler: Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    iothreads: int = 1,
    backlog: int = 128,
    nodelay: bool = True,
    stream: bool = True,
    reuse_address: bool = True,
    thread_pool_size: int | None = None,
) -> Server:
    """Listen on (host, port) and serve each connection with handler(conn, addr).

    `conn` is a Stream (or the Socket, with stream=False). The listener runs
    on its own IOThread; each connection's coroutine on one of `iothreads`
    IOThreads, round-robin. TCP_NODELAY is set (small replies are not held
    back). `port=0` picks a free port: see `server.address`.
    `thread_pool_size` sets each IOThread's run_in_thread() pool size
    (AioContext.set_thread_pool_size). Thread: any.
    """
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, kind, proto, _canon, address = infos[0]
    listener = socket.socket(family, kind, proto)
    try:
        if reuse_address:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(backlog)
        return Server(handler, listener, iothreads, nodelay, stream, thread_pool_size)
    except BaseException:
        listener.close()
        raise


__all__ = [
    "IncompleteReadError",
    "Server",
    "Socket",
    "Stream",
    "getaddrinfo",
    "open_connection",
    "serve",
]
