"""An NBD server on corun: a file or block device exported the way QEMU does it.

    python examples/nbdserver.py disk.img --port 10809 --iothreads 2
    nbdinfo nbd://127.0.0.1:10809
    qemu-img convert -O raw nbd://127.0.0.1:10809 copy.img
    nbdcopy --connections 4 nbd://127.0.0.1:10809 copy.img

QEMU's block exports run as coroutines on IOThreads; so does this one.
Each connection is a coroutine on one of N IOThreads (corun.serve hands
them out round-robin). After the handshake, that coroutine only reads
requests: each one gets a coroutine of its own, in the connection's
TaskGroup, so many requests are in flight at once; replies leave in
whatever order the requests finish, one at a time under the connection's
CoMutex, and those that pile up while a send waits for room go out
together in the next send (QEMU's send_lock, and its cork). Disk I/O runs
on the loop (`--io inline`: pread/pwrite are page-cache copies, cheaper
than a hop to a thread) or in the context's thread pool (`--io threads`,
corun.run_in_thread: the loop never blocks on a slow disk). FLUSH and FUA
always go to the pool: fdatasync can take seconds.

Protocol: fixed newstyle handshake with NBD_OPT_EXPORT_NAME, ABORT, LIST,
INFO, GO (NBD_INFO_EXPORT, NAME, DESCRIPTION, BLOCK_SIZE),
STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
(`base:allocation`); commands READ, WRITE (FUA), FLUSH, TRIM (punches a
hole), WRITE_ZEROES (NO_HOLE), BLOCK_STATUS (from SEEK_DATA/SEEK_HOLE;
REQ_ONE) and DISC. Bad requests get the error the NBD spec names
(doc/proto.md, "Error values") and the connection goes on: EINVAL for an
unknown command or flag, a read, trim or block-status past the end, or a
read larger than the maximum payload (32 MiB); ENOSPC for a write past the
end; EPERM for a write on a read-only export; an oversized write's
payload is read and dropped, then EINVAL. Only a broken framing (a bad
magic number) ends the connection, as the spec requires. The export may
be shared by several connections (NBD_FLAG_CAN_MULTI_CONN: one fd, and
FLUSH syncs it for all of them).

Importable: start(path, port=0, ...) returns a running NBDServer
(`.address`, `.close()`).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import corun

# -- the protocol's numbers (NBD doc/proto.md) ------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

# Structured reply chunks.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# base:allocation status bits.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Errors (the spec's subset of errno values).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75

ALLOCATION = b"base:allocation"
ALLOCATION_ID = 1  # the one metadata context's id

# -- limits -----------------------------------------------------------------------

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # advertised; the spec asks servers to take up to 2^25
MAX_OPTION = 64 * 1024  # option data we read; beyond it the client is broken or hostile
MAX_EXTENTS = 1 << 16  # per BLOCK_STATUS reply (the spec's cap is 2^20)
MAX_INFLIGHT = 64  # requests in flight per connection before we stop reading
HANDSHAKE_TIMEOUT = 30.0  # seconds a client gets to finish option haggling
RECV_BUFFER = 256 * 1024
IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
SPARE_BYTES = 32 * 1024 * 1024  # WRITE buffers a connection keeps for reuse (the
# reader runs up to MAX_INFLIGHT requests ahead: a few spares would not do)
SENDFILE_MIN = 64 * 1024  # inline READs this large go by sendfile

OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
DATA_CHUNK = struct.Struct(">IHHQIQ")  # CHUNK + the data's offset
EXTENT = struct.Struct(">II")  # length, status

# fallocate(2) modes: os has posix_fallocate only, which cannot punch holes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


def nbd_error(exc: OSError) -> int:
    """The NBD error code for an OSError from the disk."""
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return NBD_EPERM
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NBD_ENOSPC
    if exc.errno == errno.ENOMEM:
        return NBD_ENOMEM
    if exc.errno == errno.EINVAL:
        return NBD_EINVAL
    return NBD_EIO


class FileRange(NamedTuple):
    """Reply data that the sender takes straight from the export (sendfile)."""

    offset: int
    length: int


class RequestError(Exception):
    """A request the spec says to refuse: answered with `error`, the connection lives."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Disconnect(Exception):
    """The client broke the protocol, or asked to stop: end the connection."""


# -- the export -------------------------------------------------------------------


class Export:
    """The file or block device, opened once and shared by every connection."""

    def __init__(
        self,
        path: str,
        name: str = "",
        description: str = "",
        readonly: bool = False,
    ) -> None:
        self.path = path
        self.name = name
        self.description = description or f"corun NBD export of {path}"
        self.readonly = readonly
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if not (self.block_device or stat.S_ISREG(st.st_mode)):
                raise ValueError(f"{path!r} is neither a regular file nor a block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.block_device else st.st_size
        except BaseException:
            os.close(self.fd)
            raise

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<Export {self.name!r} {self.path!r} {self.size} bytes {mode}>"

    def flags(self, structured: bool) -> int:
        """The transmission flags: what this export lets a client do."""
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN
        if self.readonly:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if structured:
            flags |= FLAG_SEND_DF  # a read is always one chunk: DF costs nothing
        return flags

    def matches(self, name: bytes) -> bool:
        """Whether a client's export name selects this export ("" is the default)."""
        return name in (b"", self.name.encode())

    def close(self) -> None:
        """Close the fd; again is a no-op (never another file's reused fd)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    # The disk operations: plain blocking calls, run on the loop or in a worker.

    def read(self, offset: int, length: int) -> bytes:
        """[offset, offset+length), zeros past the end of a file that shrank.

        os.pread's bytes are not zero-filled first, as a bytearray would be:
        one copy, from the page cache.
        """
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # short: read on, then pad
            parts = [data]
            done = len(data)
            while done < length:
                more = os.pread(self.fd, length - done, offset + done)
                if not more:
                    parts.append(bytes(length - done))
                    break
                parts.append(more)
                done += len(more)
            data = b"".join(parts)
        return data

    def write(self, data: memoryview, offset: int, fua: bool) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        # A trim is advisory: where holes cannot be punched, do nothing.
        if length == 0:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if fua:
            os.fdatasync(self.fd)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        if length == 0:
            return
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if may_trim:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        else:  # no fallocate here: write the zeros
            zeros = memoryview(bytes(min(length, 1 << 20)))
            done = 0
            while done < length:
                n = min(len(zeros), length - done)
                done += os.pwrite(self.fd, zeros[:n], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def extents(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        """base:allocation of [offset, offset+length): (length, status) runs."""
        end = offset + length
        runs: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(runs) < MAX_EXTENTS:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but hole from pos to the end
                    data = end
                else:  # no SEEK_DATA here (a block device, some file systems): all data
                    runs.append((end - pos, 0))
                    break
            if data > pos:
                stop = min(data, end)
                runs.append((stop - pos, STATE_HOLE | STATE_ZERO))
            else:
                stop = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                runs.append((stop - pos, 0))
            pos = stop
            if one:
                break
        return runs


def _inline(fn: Callable[..., Any], /, *args: Any) -> Any:
    return fn(*args)


# -- a connection -----------------------------------------------------------------


class Connection:
    """One client: its socket, what it negotiated, its in-flight requests."""

    def __init__(self, export: Export, sock: corun.Socket, threads: bool) -> None:
        self.export = export
        self.sock = sock
        # Disk I/O: on the loop, or in the context's pool. FLUSH and FUA
        # always go to the pool (a sync can take seconds).
        self.threads = threads
        self.io: Callable[..., Any] = corun.run_in_thread if threads else _inline
        self.no_zeroes = False  # the client asked for no 124-byte pad after EXPORT_NAME
        self.structured = False
        self.allocation = False  # base:allocation selected for BLOCK_STATUS
        self.ready = False  # in the transmission phase
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._outbox: list[Any] = []  # replies waiting for the sender: buffers, FileRanges
        self._spares: list[Any] = []  # WRITE buffers done with, for the next of the same size
        self._spare_bytes = 0
        self._sending = False  # a coroutine is sending the outbox
        # Requests read and not yet answered. Every request is a coroutine of
        # the connection's context, so a plain int will do; the reader waits
        # on _room when MAX_INFLIGHT are in flight.
        self._pending = 0
        self._room = corun.Event()
        self._broken = False

    # -- reading ----------------------------------------------------------------

    def _take(self, n: int) -> int:
        """Make n bytes available; return where they start in _buf, and consume them."""
        while self._end - self._start < n:
            if len(self._buf) - self._start < n:  # no room behind: move the rest to the front
                kept = self._end - self._start
                self._buf[:kept] = self._buf[self._start : self._end]
                self._start, self._end = 0, kept
            got = self.sock.recv_into(self._view[self._end :])
            if not got:
                raise EOFError("the client hung up")
            self._end += got
        start = self._start
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return start

    def _read_into(self, view: memoryview) -> None:
        """Fill `view` from the stream: what is buffered first, then straight from the socket."""
        have = min(self._end - self._start, len(view))
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
            if self._start == self._end:
                self._start = self._end = 0
        while have < len(view):
            got = self.sock.recv_into(view[have:])
            if not got:
                raise EOFError("the client hung up mid-payload")
            have += got

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            chunk = scratch[: min(n, len(scratch))]
            self._read_into(chunk)
            n -= len(chunk)

    def _read_bytes(self, n: int) -> bytes:
        data = bytearray(n)
        self._read_into(memoryview(data))
        return bytes(data)

    # -- writing ----------------------------------------------------------------

    def _send(self, *reply: Any) -> None:
        """Queue one reply (its buffers); the first sender sends it and whatever
        queues meanwhile.

        Replies are serialised without a lock: every request of a connection
        is a coroutine of the connection's context, so one flag, read and set
        without a switch in between, says whether a sender is at work. The
        sender first yields once when other requests are in flight: those
        that are ready run and queue their replies, and they all leave in one
        gather write (QEMU corks its socket for the same reason: on loopback
        a send costs more than the copy it makes). Replies that queue while a
        send waits for room go in the next one.
        """
        self._outbox.extend(reply)
        if self._sending:
            return  # the sender at work takes it
        self._sending = True
        try:
            if self._pending > 1:
                corun.sleep(0)  # the cork: let the others of this batch queue theirs
            outbox = self._outbox
            while outbox:
                if type(outbox[0]) is FileRange:
                    self._send_range(outbox.pop(0))
                    continue
                end = 1
                while end < len(outbox) and end < IOV_MAX and type(outbox[end]) is not FileRange:
                    end += 1
                batch = outbox[:end]
                del outbox[:end]
                # Data from the file follows: hold this in the socket until it comes.
                more = socket.MSG_MORE if outbox and type(outbox[0]) is FileRange else 0
                self._send_buffers(batch, more)
        finally:
            self._sending = False

    def _send_range(self, part: FileRange) -> None:
        """Part of the export, from the page cache to the socket (sendfile)."""
        sent = self.sock.sendfile(self.export.fd, part.offset, part.length)
        if sent < part.length:  # the file shrank under us: the rest reads as zeros
            self.sock.sendall(bytes(part.length - sent))

    def _send_buffers(self, buffers: list[Any], flags: int = 0) -> None:
        """All of `buffers`, in as many gather writes as the socket takes."""
        sent = self.sock.sendmsg(buffers, (), flags)
        total = sum(len(b) for b in buffers)
        while sent < total:
            # Drop what went whole; cut the first buffer that went in part.
            rest = []
            skip = sent
            for b in buffers:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                rest.append(memoryview(b)[skip:] if skip else b)
                skip = 0
            buffers, total = rest, total - sent
            sent = self.sock.sendmsg(buffers, (), flags)

    def _option_reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.sock.sendall(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, kind, len(data)) + data)

    def _error_reply(self, cookie: int, error: int, message: str) -> bytes:
        if self.structured:
            text = message.encode()[:4096]
            payload = struct.pack(">IH", error, len(text)) + text
            head = CHUNK.pack(
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                len(payload),
            )
            return head + payload
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    # -- the handshake ----------------------------------------------------------

    def negotiate(self) -> None:
        """Fixed newstyle option haggling, up to the transmission phase.

        Disconnect if the client aborts, breaks the framing, or asks for an
        export that does not exist with NBD_OPT_EXPORT_NAME.
        """
        self.sock.sendall(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        (client_flags,) = struct.unpack(">I", self._read_bytes(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise Disconnect(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
        while not self.ready:
            magic, option, length = OPTION_HEADER.unpack(self._read_bytes(OPTION_HEADER.size))
            if magic != IHAVEOPT:
                raise Disconnect(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise Disconnect(f"option {option} carries {length} bytes")
            self._option(option, self._read_bytes(length))

    def _option(self, option: int, data: bytes) -> None:
        export = self.export
        if option == OPT_EXPORT_NAME:
            if not export.matches(data):
                raise Disconnect(f"unknown export {data!r}")
            tail = b"" if self.no_zeroes else bytes(124)
            self.sock.sendall(struct.pack(">QH", export.size, export.flags(self.structured)) + tail)
            self.ready = True
        elif option == OPT_ABORT:
            self._option_reply(option, REP_ACK)
            raise Disconnect("the client aborted the handshake")
        elif option == OPT_LIST:
            if data:
                return self._option_reply(option, REP_ERR_INVALID, b"LIST takes no data")
            name = export.name.encode()
            entry = struct.pack(">I", len(name)) + name + export.description.encode()
            self._option_reply(option, REP_SERVER, entry)
            self._option_reply(option, REP_ACK)
        elif option in (OPT_INFO, OPT_GO):
            self._info(option, data)
        elif option == OPT_STRUCTURED_REPLY:
            if data:
                return self._option_reply(option, REP_ERR_INVALID, b"takes no data")
            if self.structured:
                return self._option_reply(option, REP_ERR_INVALID, b"already negotiated")
            self.structured = True
            self._option_reply(option, REP_ACK)
        elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option == OPT_STARTTLS:
            self._option_reply(option, REP_ERR_POLICY, b"TLS is not supported")
        else:
            self._option_reply(option, REP_ERR_UNSUP, f"option {option} unknown".encode())
        return None

    def _info(self, option: int, data: bytes) -> None:
        try:
            (name_len,) = struct.unpack_from(">I", data)
            if name_len > len(data) - 6:
                raise ValueError("name overruns the option")
            name = data[4 : 4 + name_len]
            (count,) = struct.unpack_from(">H", data, 4 + name_len)
            if len(data) != 6 + name_len + 2 * count:
                raise ValueError("request count does not match the length")
            requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
        except (struct.error, ValueError) as exc:
            return self._option_reply(option, REP_ERR_INVALID, str(exc).encode())
        export = self.export
        if not export.matches(name):
            return self._option_reply(option, REP_ERR_UNKNOWN, b"no such export: " + name)
        flags = export.flags(self.structured)
        self._option_reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size, flags))
        if INFO_NAME in requests:
            self._option_reply(
                option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode()
            )
        if INFO_DESCRIPTION in requests:
            text = export.description.encode()
            self._option_reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + text)
        # Always sent: a client that did not ask still learns our limits.
        block = struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD)
        self._option_reply(option, REP_INFO, block)
        self._option_reply(option, REP_ACK)
        if option == OPT_GO:
            self.ready = True
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            return self._option_reply(
                option, REP_ERR_INVALID, b"negotiate structured replies first"
            )
        try:
            (name_len,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + name_len]
            if len(name) != name_len:
                raise ValueError("name overruns the option")
            pos = 4 + name_len
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                query = data[pos + 4 : pos + 4 + qlen]
                if len(query) != qlen:
                    raise ValueError("query overruns the option")
                queries.append(query)
                pos += 4 + qlen
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
        except (struct.error, ValueError) as exc:
            return self._option_reply(option, REP_ERR_INVALID, str(exc).encode())
        if not self.export.matches(name):
            return self._option_reply(option, REP_ERR_UNKNOWN, b"no such export: " + name)
        listing = option == OPT_LIST_META_CONTEXT
        if listing and not queries:
            selected = True  # no query lists everything
        else:
            # base:allocation by name; LIST also takes the bare namespace
            # as a wildcard. Other namespaces are not ours: ignored.
            wanted = {ALLOCATION, b"base:"} if listing else {ALLOCATION}
            selected = any(q in wanted for q in queries)
        if not listing:
            self.allocation = selected
        if selected:
            context_id = 0 if listing else ALLOCATION_ID  # LIST's ids are reserved (0)
            self._option_reply(option, REP_META_CONTEXT, struct.pack(">I", context_id) + ALLOCATION)
        self._option_reply(option, REP_ACK)
        return None

    # -- the transmission phase -------------------------------------------------

    def serve(self) -> None:
        """Read requests until DISC or hang-up; each runs in a coroutine of its own."""
        with corun.TaskGroup() as group:
            try:
                while not self._broken:
                    while self._pending >= MAX_INFLIGHT:  # back-pressure: stop reading
                        self._room.clear()
                        self._room.wait()
                    request = self._next_request()
                    if request is None:
                        return  # DISC: the group waits for the requests in flight
                    self._pending += 1
                    try:
                        group.spawn(self._run, *request)
                    except BaseException:
                        self._pending -= 1
                        raise
            except (EOFError, ConnectionError):
                return  # the client is gone: what is in flight finishes, its replies fail
            except Disconnect:
                # A broken framing: a hard disconnect now, not after the
                # requests in flight (their replies fail and they end).
                self._broken = True
                self.sock.shutdown(socket.SHUT_RDWR)
                return

    def _next_request(self) -> tuple[int, int, int, int, int, Any] | None:
        start = self._take(REQUEST.size)
        magic, flags, kind, cookie, offset, length = REQUEST.unpack_from(self._buf, start)
        if magic != REQUEST_MAGIC:
            raise Disconnect(f"bad request magic {magic:#x}")
        if kind == CMD_DISC:
            return None
        payload: Any = None
        if kind == CMD_WRITE:
            if length > MAX_PAYLOAD:
                self._skip(length)  # stay in step with the stream, then refuse
                payload = RequestError(NBD_EINVAL, f"write of {length} bytes > {MAX_PAYLOAD}")
            else:
                spares = self._spares
                if spares and len(spares[-1]) == length:
                    buf = spares.pop()
                    self._spare_bytes -= length
                else:
                    buf = bytearray(length)
                payload = memoryview(buf)
                self._read_into(payload)
        return flags, kind, cookie, offset, length, payload

    def _run(
        self, flags: int, kind: int, cookie: int, offset: int, length: int, payload: Any
    ) -> None:
        """One request, start to reply. A coroutine in the connection's group."""
        try:
            try:
                reply = self._execute(flags, kind, cookie, offset, length, payload)
            except RequestError as exc:
                reply = (self._error_reply(cookie, exc.error, str(exc)),)
            except OSError as exc:
                reply = (self._error_reply(cookie, nbd_error(exc), str(exc)),)
            if isinstance(payload, memoryview) and self._spare_bytes + length <= SPARE_BYTES:
                # The write is over (also in a worker: it returned or raised),
                # so nothing reads the buffer now: the next WRITE of this size
                # takes it, not zero-filled memory.
                self._spares.append(payload.obj)
                self._spare_bytes += length
            self._send(*reply)
        except OSError:
            # The reply cannot go (the client reset or hung up): stop reading,
            # so the connection ends once what is in flight has finished.
            self._broken = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader: it sees the end
            except OSError:
                pass
        finally:
            self._pending -= 1
            if self._pending == MAX_INFLIGHT - 1:
                self._room.set()  # the reader may be waiting for room

    def _check_range(self, offset: int, length: int, error: int, what: str) -> None:
        if offset + length > self.export.size:
            raise RequestError(
                error, f"{what} of {length} bytes at {offset} ends past {self.export.size}"
            )

    def _check_writable(self, what: str) -> None:
        if self.export.readonly:
            raise RequestError(NBD_EPERM, f"{what} on a read-only export")

    def _execute(
        self, flags: int, kind: int, cookie: int, offset: int, length: int, payload: Any
    ) -> tuple[Any, ...]:
        """Do the request; return its reply's buffers. RequestError for a refusal."""
        export = self.export
        fua = bool(flags & CMD_FLAG_FUA)
        if kind == CMD_READ:
            self._check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_DF, "READ")
            if length > MAX_PAYLOAD:
                raise RequestError(NBD_EINVAL, f"read of {length} bytes > {MAX_PAYLOAD}")
            self._check_range(offset, length, NBD_EINVAL, "read")
            if self.structured:
                if length == 0:  # a data chunk must carry data: an empty reply
                    return (CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, 0, cookie, 0),)
                data = self._read(offset, length)
                head = DATA_CHUNK.pack(
                    STRUCTURED_REPLY_MAGIC,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + length,
                    offset,
                )
            else:
                data = self._read(offset, length)
                head = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
            return head, data
        if kind == CMD_WRITE:
            self._check_flags(flags, CMD_FLAG_FUA, "WRITE")
            if isinstance(payload, RequestError):
                raise payload
            self._check_writable("write")
            self._check_range(offset, length, NBD_ENOSPC, "write")
            if fua:
                corun.run_in_thread(export.write, payload, offset, True)
            else:
                self.io(export.write, payload, offset, False)
        elif kind == CMD_FLUSH:
            self._check_flags(flags, CMD_FLAG_FUA, "FLUSH")
            corun.run_in_thread(export.flush)
        elif kind == CMD_TRIM:
            self._check_flags(flags, CMD_FLAG_FUA, "TRIM")
            self._check_writable("trim")
            self._check_range(offset, length, NBD_EINVAL, "trim")
            (corun.run_in_thread if fua else self.io)(export.trim, offset, length, fua)
        elif kind == CMD_WRITE_ZEROES:
            self._check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, "WRITE_ZEROES")
            self._check_writable("write zeroes")
            self._check_range(offset, length, NBD_ENOSPC, "write zeroes")
            may_trim = not flags & CMD_FLAG_NO_HOLE
            (corun.run_in_thread if fua else self.io)(
                export.write_zeroes, offset, length, may_trim, fua
            )
        elif kind == CMD_BLOCK_STATUS:
            self._check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, "BLOCK_STATUS")
            if not self.allocation:
                raise RequestError(NBD_EINVAL, "BLOCK_STATUS without base:allocation selected")
            if length == 0:
                raise RequestError(NBD_EINVAL, "BLOCK_STATUS of 0 bytes")
            self._check_range(offset, length, NBD_EINVAL, "block status")
            runs = self.io(export.extents, offset, length, bool(flags & CMD_FLAG_REQ_ONE))
            body = b"".join(EXTENT.pack(n, status) for n, status in runs)
            chunk = CHUNK.pack(
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                4 + len(body),
            )
            return (chunk + struct.pack(">I", ALLOCATION_ID) + body,)
        else:
            raise RequestError(NBD_EINVAL, f"unknown command {kind}")
        return (SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie),)

    def _read(self, offset: int, length: int) -> Any:
        """A READ's data: bytes, or a FileRange the sender takes with sendfile.

        Inline, a large read goes from the page cache to the socket when its
        reply is sent, with no copy through Python; a small one is a pread,
        whose bytes join the other replies of the batch in one gather write.
        With threads, a worker reads it (sendfile would block the loop on a
        disk read).
        """
        if length >= SENDFILE_MIN and not self.threads:
            return FileRange(offset, length)
        return self.io(self.export.read, offset, length)

    def _check_flags(self, flags: int, allowed: int, what: str) -> None:
        if flags & ~allowed:
            raise RequestError(NBD_EINVAL, f"{what}: unknown flags {flags & ~allowed:#x}")
        if flags & CMD_FLAG_DF and not self.structured:
            raise RequestError(NBD_EINVAL, f"{what}: DF needs structured replies")


# -- the server -------------------------------------------------------------------


class NBDServer:
    """An export served by corun.serve(): `.address`, `.export`, `.close()`."""

    def __init__(
        self,
        export: Export,
        host: str = "127.0.0.1",
        port: int = 0,
        iothreads: int = 1,
        io: str = "inline",
        thread_pool_size: int | None = None,
    ) -> None:
        if io not in ("inline", "threads"):
            raise ValueError(f"io must be 'inline' or 'threads', got {io!r}")
        self.export = export
        self.threads = io == "threads"
        self._server = corun.serve(
            self._handle,
            host,
            port,
            iothreads=iothreads,
            stream=False,
            thread_pool_size=thread_pool_size,
        )
        #: The (host, port) it listens on.
        self.address = self._server.address

    def _handle(self, sock: corun.Socket, addr: Any) -> None:
        conn = Connection(self.export, sock, self.threads)
        try:
            with corun.timeout(HANDSHAKE_TIMEOUT):
                conn.negotiate()
            conn.serve()
        except (Disconnect, EOFError, ConnectionError, TimeoutError):
            return  # the server closes the socket

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._server.accepted

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self._server.connections

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no connection is open; False on timeout."""
        return self._server.wait_idle(timeout)

    def close(self, grace: float = 2.0) -> None:
        """Stop accepting, let connections finish for `grace` seconds, close the export."""
        try:
            self._server.close(grace)
        finally:
            self.export.close()

    def __enter__(self) -> NBDServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start(
    path: str,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    name: str = "",
    readonly: bool = False,
    iothreads: int = 1,
    io: str = "inline",
    thread_pool_size: int | None = None,
) -> NBDServer:
    """Export `path` on (host, port); port 0 picks a free one."""
    export = Export(path, name=name, readonly=readonly)
    try:
        return NBDServer(export, host, port, iothreads, io, thread_pool_size)
    except BaseException:
        export.close()
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="file or block device to export")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=10809, help="port (default: 10809)")
    parser.add_argument("--name", default="", help="export name (default: empty)")
    parser.add_argument("--readonly", action="store_true", help="refuse writes (EPERM)")
    parser.add_argument("--iothreads", type=int, default=1, help="IOThreads (default: 1)")
    parser.add_argument(
        "--io",
        choices=("inline", "threads"),
        default="inline",
        help="disk I/O on the loop or in each IOThread's thread pool (default: inline)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=None, help="worker threads per IOThread (--io threads)"
    )
    args = parser.parse_args(argv)

    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # the IOThreads inherit the mask
    try:
        server = start(
            args.path,
            args.port,
            host=args.host,
            name=args.name,
            readonly=args.readonly,
            iothreads=args.iothreads,
            io=args.io,
            thread_pool_size=args.pool_size,
        )
    except (OSError, ValueError) as exc:
        sys.exit(f"nbdserver: {exc}")
    host, port = server.address[:2]
    print(f"listening on {host}:{port}, exporting {server.export!r}", flush=True)
    signo = signal.sigwait(stop)
    print(f"{signal.Signals(signo).name}: closing", flush=True)
    server.close()


if __name__ == "__main__":
    main()
