"""A small NBD client by hand, for tests/test_nbdserver.py (imported as `nbdclient`).

Speaks the fixed newstyle handshake and the transmission phase over a
plain blocking socket, one byte-exact message at a time, so a test can
send anything (bad magic, unknown commands, half a payload) and see
exactly what the server answers. It keeps no state the protocol does
not need: which cookies are reads (a simple reply carries their data
with no length of its own) is all it remembers.

Numbers are from the NBD spec (doc/proto.md); they are spelled out here
rather than imported from the server, so a wrong constant in the server
shows up as a failing test.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

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

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

EPERM = 1
EINVAL = 22
ENOSPC = 28

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length


class ProtocolError(AssertionError):
    """The server sent something the spec does not allow here."""


@dataclass
class OptionReply:
    option: int
    kind: int
    data: bytes


@dataclass
class Reply:
    """One request's whole answer: a simple reply, or its structured chunks up to DONE."""

    cookie: int
    error: int = 0
    structured: bool = False
    data: bytes = b""  # a read's bytes (simple, or the OFFSET_DATA chunks in offset order)
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)  # (flags, type, payload)
    message: bytes = b""  # a structured error's text

    def extents(self) -> tuple[int, list[tuple[int, int]]]:
        """A BLOCK_STATUS reply: (context id, [(length, status), ...])."""
        (payload,) = [p for _, kind, p in self.chunks if kind == REPLY_TYPE_BLOCK_STATUS]
        (context,) = struct.unpack_from(">I", payload)
        body = payload[4:]
        runs = [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]
        return context, runs


class NBDClient:
    """One connection. handshake() then options, or connect() for the usual GO."""

    def __init__(self, address: Any, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.structured = False
        self.size = 0
        self.flags = 0
        self._reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length)
        self._partial: dict[int, Reply] = {}  # structured replies not DONE yet
        self._next_cookie = 1

    # -- bytes --------------------------------------------------------------------

    def recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            got = self.sock.recv(n - len(data))
            if not got:
                raise EOFError(f"the server hung up after {len(data)} of {n} bytes")
            data += got
        return bytes(data)

    def at_eof(self) -> bool:
        """Whether the server has closed: the next recv sees the end (or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the handshake ------------------------------------------------------------

    def handshake(self, no_zeroes: bool = True) -> int:
        """Read the greeting, send the client flags; return the server's handshake flags."""
        magic, ihaveopt, flags = struct.unpack(">QQH", self.recv_exact(18))
        if (magic, ihaveopt) != (NBDMAGIC, IHAVEOPT):
            raise ProtocolError(f"not a fixed newstyle greeting: {magic:#x} {ihaveopt:#x}")
        client = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)
        self.sock.sendall(struct.pack(">I", client))
        return int(flags)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> OptionReply:
        magic, option, kind, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        return OptionReply(option, kind, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; its replies up to and including the final one (ACK or error)."""
        self.send_option(option, data)
        replies = []
        while True:
            reply = self.option_reply()
            if reply.option != option:
                raise ProtocolError(f"reply to option {reply.option}, sent {option}")
            replies.append(reply)
            if reply.kind == REP_ACK or reply.kind & (1 << 31):
                return replies

    @staticmethod
    def info_data(name: bytes = b"", requests: tuple[int, ...] = ()) -> bytes:
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
        return data + b"".join(struct.pack(">H", r) for r in requests)

    def go(self, name: bytes = b"", requests: tuple[int, ...] = ()) -> list[OptionReply]:
        """NBD_OPT_GO; on success, remember the size and flags the server gave."""
        replies = self.option(OPT_GO, self.info_data(name, requests))
        if replies[-1].kind != REP_ACK:
            raise ProtocolError(f"GO refused: {replies[-1]}")
        for reply in replies:
            if reply.kind == REP_INFO and struct.unpack_from(">H", reply.data)[0] == INFO_EXPORT:
                _, self.size, self.flags = struct.unpack(">HQH", reply.data)
        return replies

    def start_structured(self) -> None:
        (reply,) = self.option(OPT_STRUCTURED_REPLY)
        if reply.kind != REP_ACK:
            raise ProtocolError(f"STRUCTURED_REPLY refused: {reply}")
        self.structured = True

    @staticmethod
    def meta_data(name: bytes, queries: list[bytes]) -> bytes:
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        return data + b"".join(struct.pack(">I", len(q)) + q for q in queries)

    def connect(self, structured: bool = True, allocation: bool = False) -> None:
        """The usual way in: handshake, STRUCTURED_REPLY?, SET_META_CONTEXT?, GO."""
        self.handshake()
        if structured:
            self.start_structured()
        if allocation:
            replies = self.option(OPT_SET_META_CONTEXT, self.meta_data(b"", [b"base:allocation"]))
            assert [r.kind for r in replies] == [REP_META_CONTEXT, REP_ACK], replies
        self.go()

    # -- transmission -------------------------------------------------------------

    def cookie(self) -> int:
        self._next_cookie += 1
        return self._next_cookie

    def request_bytes(
        self,
        kind: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        cookie: int | None = None,
        payload: bytes = b"",
    ) -> tuple[int, bytes]:
        """(cookie, the request's bytes), noted as in flight but not sent."""
        if cookie is None:
            cookie = self.cookie()
        if kind == CMD_READ:
            self._reads[cookie] = (offset, length)
        return cookie, REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload

    def send(self, kind: int, offset: int = 0, length: int = 0, **kw: Any) -> int:
        cookie, data = self.request_bytes(kind, offset, length, **kw)
        self.sock.sendall(data)
        return cookie

    def reply(self) -> Reply:
        """The next request's whole reply (structured chunks gathered up to DONE)."""
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv_exact(12))
                offset_length = self._reads.pop(cookie, None)
                data = b""
                if offset_length is not None and error == 0:
                    data = self.recv_exact(offset_length[1])
                return Reply(cookie, error, False, data)
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolError(f"bad reply magic {magic:#x}")
            if not self.structured:
                raise ProtocolError("a structured reply without STRUCTURED_REPLY negotiated")
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            reply = self._partial.setdefault(cookie, Reply(cookie, structured=True))
            reply.chunks.append((flags, kind, payload))
            if kind & (1 << 15):
                error, msglen = struct.unpack_from(">IH", payload)
                reply.error = error
                reply.message = payload[6 : 6 + msglen]
            if flags & REPLY_FLAG_DONE:
                del self._partial[cookie]
                offset_length = self._reads.pop(cookie, None)
                if offset_length is not None and reply.error == 0:
                    reply.data = self._assemble(offset_length, reply.chunks)
                return reply

    @staticmethod
    def _assemble(offset_length: tuple[int, int], chunks: list[tuple[int, int, bytes]]) -> bytes:
        start, length = offset_length
        data = bytearray(length)
        covered = 0
        for _, kind, payload in chunks:
            if kind == REPLY_TYPE_OFFSET_DATA:
                (offset,) = struct.unpack_from(">Q", payload)
                body = payload[8:]
                data[offset - start : offset - start + len(body)] = body
                covered += len(body)
            elif kind == 2:  # NBD_REPLY_TYPE_OFFSET_HOLE: zeros
                offset, size = struct.unpack_from(">QI", payload)
                covered += size
        if covered != length:
            raise ProtocolError(f"a read of {length} bytes answered with {covered}")
        return bytes(data)

    def call(self, kind: int, offset: int = 0, length: int = 0, **kw: Any) -> Reply:
        """One request, its reply (nothing else may be in flight)."""
        cookie = self.send(kind, offset, length, **kw)
        reply = self.reply()
        if reply.cookie != cookie:
            raise ProtocolError(f"reply to cookie {reply.cookie}, sent {cookie}")
        return reply

    def read(self, offset: int, length: int) -> bytes:
        reply = self.call(CMD_READ, offset, length)
        if reply.error:
            raise ProtocolError(f"read of {length} at {offset} failed: {reply}")
        return reply.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        reply = self.call(CMD_WRITE, offset, len(data), flags=flags, payload=data)
        if reply.error:
            raise ProtocolError(f"write of {len(data)} at {offset} failed: {reply}")
