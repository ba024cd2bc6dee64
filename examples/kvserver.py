"""A key-value server speaking the Redis protocol (RESP2), on corun.serve().

    python examples/kvserver.py --port 6380 --iothreads 2
    redis-benchmark -p 6380 -t ping,set,get,incr -q
    redis-cli -p 6380 incr visits

Each connection is a coroutine on one of N IOThreads; it reads what the
client sent, answers every complete command in the buffer in order (so
pipelined clients get one write per batch), and waits for more. The store
is shared by all IOThreads: a dict per shard, each guarded by a CoMutex, so
a read-modify-write such as INCR is atomic however the connections are
spread over threads. With --yield-in-incr, INCR yields to the loop between
its read and its write, while it holds the lock: the total stays exact
(take the lock away and concurrent INCRs lose updates).

Commands: PING, ECHO, SET (EX/PX), GET, INCR, DECR, INCRBY, DECRBY, DEL,
EXISTS, QUIT, plus what redis-benchmark and redis-py ask on connecting
(CONFIG GET, CLIENT SETNAME/SETINFO, COMMAND, SELECT 0). It speaks RESP2
only: `HELLO 3` is refused, so clients that try RESP3 fall back to RESP2;
redis-py >= 8 asks for RESP3 and does not fall back, so give it
`redis.Redis(port=6380, protocol=2)`.

Importable: start(port=0, iothreads=1) returns the running corun.Server
(server.address, server.close()).
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Callable
from typing import Any

import corun

# -- the store --------------------------------------------------------------------


class Shard:
    """Part of the keyspace: its values, their deadlines, and the lock over both."""

    __slots__ = ("data", "expires", "lock")

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.expires: dict[bytes, float] = {}  # key -> time.monotonic() deadline
        self.lock = corun.CoMutex()

    def get(self, key: bytes) -> bytes | None:
        """The live value of `key` (an expired key is dropped). Hold the lock."""
        deadline = self.expires.get(key)
        if deadline is not None and deadline <= time.monotonic():
            del self.expires[key]
            del self.data[key]
            return None
        return self.data.get(key)


class Store:
    """The keyspace, in shards by key hash: keys in different shards never contend."""

    def __init__(self, shards: int = 16, yield_in_incr: bool = False) -> None:
        self.shards = [Shard() for _ in range(shards)]
        self.yield_in_incr = yield_in_incr

    def shard(self, key: bytes) -> Shard:
        return self.shards[hash(key) % len(self.shards)]

    def get(self, key: bytes) -> bytes | None:
        shard = self.shard(key)
        with shard.lock:
            return shard.get(key)

    def set(self, key: bytes, value: bytes, ttl: float | None = None) -> None:
        shard = self.shard(key)
        with shard.lock:
            shard.data[key] = value
            if ttl is None:
                shard.expires.pop(key, None)
            else:
                shard.expires[key] = time.monotonic() + ttl

    def incrby(self, key: bytes, delta: int) -> int:
        """Add `delta` to the integer at `key` (0 if missing); ValueError if not one."""
        shard = self.shard(key)
        with shard.lock:  # read, (yield), write: atomic because of the lock
            old = shard.get(key)
            value = 0 if old is None else parse_int(old)
            if self.yield_in_incr:
                corun.sleep(0)  # let every other coroutine of this thread run
            value += delta
            if not -(2**63) <= value < 2**63:
                raise ValueError("increment or decrement would overflow")
            shard.data[key] = b"%d" % value
            return value

    def delete(self, key: bytes) -> bool:
        shard = self.shard(key)
        with shard.lock:
            if shard.get(key) is None:
                return False
            del shard.data[key]
            shard.expires.pop(key, None)
            return True

    def exists(self, key: bytes) -> bool:
        return self.get(key) is not None


def parse_int(raw: bytes) -> int:
    """A RESP integer argument, or ValueError with Redis's message."""
    try:
        return int(raw)
    except ValueError:
        raise ValueError("value is not an integer or out of range") from None


# -- RESP: parsing ----------------------------------------------------------------


class ProtocolError(Exception):
    """The client sent something that is not RESP: answer it, then hang up."""


MAX_BULK = 512 * 1024 * 1024  # Redis's proto-max-bulk-len
MAX_INLINE = 64 * 1024  # an unfinished line longer than this is an error


def parse_command(buf: bytearray, pos: int) -> tuple[list[bytes] | None, int]:
    """Parse one command at buf[pos:]: (args, next position), or (None, pos) if
    the buffer does not hold all of it yet.

    Clients send arrays of bulk strings (`*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n`);
    a line of words (`PING\\r\\n`, as typed into telnet) is accepted too.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > MAX_INLINE:
            raise ProtocolError("too big inline request")
        return None, pos
    if buf[pos] != ord("*"):  # inline command
        return bytes(buf[pos:end]).split(), end + 2
    count = _length(buf, pos + 1, end, "multibulk length")
    args: list[bytes] = []
    at = end + 2
    for _ in range(count):
        end = buf.find(b"\r\n", at)
        if end < 0:
            return None, pos
        if buf[at] != ord("$"):
            raise ProtocolError(f"expected '$', got '{chr(buf[at])}'")
        size = _length(buf, at + 1, end, "bulk length")
        start = end + 2
        if start + size + 2 > len(buf):
            return None, pos
        args.append(bytes(buf[start : start + size]))
        at = start + size + 2
    return args, at


def _length(buf: bytearray, start: int, end: int, what: str) -> int:
    try:
        n = int(buf[start:end])
    except ValueError:
        raise ProtocolError(f"invalid {what}") from None
    if not 0 <= n <= MAX_BULK:
        raise ProtocolError(f"invalid {what}")
    return n


# -- RESP: replies ----------------------------------------------------------------

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
EMPTY_ARRAY = b"*0\r\n"


def error(message: str) -> bytes:
    return b"-%s\r\n" % message.encode()


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    return b"$%d\r\n%s\r\n" % (len(value), value)


# -- commands ---------------------------------------------------------------------


class WrongArity(Exception):
    """The command got the wrong number of arguments."""


class Quit(Exception):
    """The client said QUIT: answer OK, then hang up."""


Command = Callable[[Store, list[bytes]], bytes]
COMMANDS: dict[bytes, tuple[Command, int]] = {}  # name -> (function, arity as Redis says it)


def command(name: str, arity: int) -> Callable[[Command], Command]:
    """Register a command. `arity` counts the name: N exactly, -N at least N."""

    def register(fn: Command) -> Command:
        COMMANDS[name.encode()] = (fn, arity)
        return fn

    return register


@command("PING", -1)
def ping(store: Store, args: list[bytes]) -> bytes:
    return PONG if len(args) == 1 else bulk(args[1])


@command("ECHO", 2)
def echo(store: Store, args: list[bytes]) -> bytes:
    return bulk(args[1])


@command("GET", 2)
def get(store: Store, args: list[bytes]) -> bytes:
    return bulk(store.get(args[1]))


@command("SET", -3)
def set_(store: Store, args: list[bytes]) -> bytes:
    ttl: float | None = None
    options = args[3:]
    while options:  # SET key value [EX seconds | PX milliseconds]
        if len(options) < 2 or options[0].upper() not in (b"EX", b"PX"):
            return error("ERR syntax error")
        amount = parse_int(options[1])
        if amount <= 0:
            return error("ERR invalid expire time in 'set' command")
        ttl = amount if options[0].upper() == b"EX" else amount / 1000
        options = options[2:]
    store.set(args[1], args[2], ttl)
    return OK


@command("INCR", 2)
def incr(store: Store, args: list[bytes]) -> bytes:
    return integer(store.incrby(args[1], 1))


@command("DECR", 2)
def decr(store: Store, args: list[bytes]) -> bytes:
    return integer(store.incrby(args[1], -1))


@command("INCRBY", 3)
def incrby(store: Store, args: list[bytes]) -> bytes:
    return integer(store.incrby(args[1], parse_int(args[2])))


@command("DECRBY", 3)
def decrby(store: Store, args: list[bytes]) -> bytes:
    return integer(store.incrby(args[1], -parse_int(args[2])))


@command("DEL", -2)
def del_(store: Store, args: list[bytes]) -> bytes:
    return integer(sum(store.delete(key) for key in args[1:]))


@command("EXISTS", -2)
def exists(store: Store, args: list[bytes]) -> bytes:
    return integer(sum(store.exists(key) for key in args[1:]))


# What clients ask when they connect. redis-benchmark reads `CONFIG GET save`
# and `appendonly` (and warns unless it gets name/value pairs); redis-py
# names itself with CLIENT SETINFO. HELLO is refused, as a server without
# RESP3 does.

CONFIG = {b"save": b"", b"appendonly": b"no"}  # no persistence here


@command("CONFIG", -2)
def config(store: Store, args: list[bytes]) -> bytes:
    if args[1].upper() != b"GET":
        return OK  # CONFIG SET, RESETSTAT...: accepted, nothing to configure
    pairs = [bulk(x) for name in args[2:] if name in CONFIG for x in (name, CONFIG[name])]
    return b"*%d\r\n%s" % (len(pairs), b"".join(pairs))


@command("CLIENT", -2)
def client(store: Store, args: list[bytes]) -> bytes:
    return OK


@command("COMMAND", -1)
def command_(store: Store, args: list[bytes]) -> bytes:
    return EMPTY_ARRAY


@command("SELECT", 2)
def select(store: Store, args: list[bytes]) -> bytes:
    return OK if args[1] == b"0" else error("ERR DB index is out of range")


HELLO2 = [b"server", b"kvserver", b"version", b"0.1", b"proto", b"2", b"mode", b"standalone"]


@command("HELLO", -1)
def hello(store: Store, args: list[bytes]) -> bytes:
    """HELLO [2]: who we are; HELLO 3 (RESP3) is refused with NOPROTO."""
    if len(args) > 1 and args[1] != b"2":
        return error("NOPROTO this server speaks RESP2 only (redis-py >= 8: protocol=2)")
    return b"*%d\r\n%s" % (len(HELLO2), b"".join(bulk(x) for x in HELLO2))


@command("QUIT", -1)
def quit_(store: Store, args: list[bytes]) -> bytes:
    raise Quit


def execute(store: Store, args: list[bytes]) -> bytes:
    """Run one command; its reply (an error reply for a client's mistake)."""
    if not args:
        return b""  # an empty inline line: Redis ignores it
    name = args[0].upper()
    entry = COMMANDS.get(name)
    if entry is None:
        return error(f"ERR unknown command '{args[0].decode(errors='replace')}'")
    fn, arity = entry
    if (arity > 0 and len(args) != arity) or len(args) < abs(arity):
        return error(f"ERR wrong number of arguments for '{name.decode().lower()}' command")
    try:
        return fn(store, args)
    except ValueError as exc:
        return error(f"ERR {exc}")


# -- connections ------------------------------------------------------------------


def handle(store: Store, sock: corun.Socket, addr: Any) -> None:
    """Serve one client until it hangs up (a coroutine on one of the IOThreads)."""
    buf = bytearray()
    try:
        while True:
            data = sock.recv(65536)  # suspends this coroutine, not the thread
            if not data:
                return  # the client hung up (the server closes the socket)
            buf += data
            replies: list[bytes] = []
            pos = 0
            try:
                while True:  # every complete command in the buffer, in order
                    args, pos = parse_command(buf, pos)
                    if args is None:
                        break
                    replies.append(execute(store, args))
            except ProtocolError as exc:
                replies.append(error(f"ERR Protocol error: {exc}"))
                sock.sendall(b"".join(replies))
                return
            except Quit:
                replies.append(OK)
                sock.sendall(b"".join(replies))
                return
            del buf[:pos]
            if replies:
                sock.sendall(b"".join(replies))  # one write per batch of pipelined commands
    except ConnectionError:
        return  # reset or broken pipe: the client is gone, nobody to answer


def start(
    port: int = 0,
    iothreads: int = 1,
    *,
    host: str = "127.0.0.1",
    yield_in_incr: bool = False,
    shards: int = 16,
) -> corun.Server:
    """Start serving on (host, port) with a fresh store; port 0 picks a free one.

    Returns the running server: `server.address`, `server.close(grace)`.
    """
    store = Store(shards, yield_in_incr)

    def handler(sock: corun.Socket, addr: Any) -> None:
        handle(store, sock, addr)

    return corun.serve(handler, host, port, iothreads=iothreads, stream=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=6379, help="port (default: 6379)")
    parser.add_argument("--iothreads", type=int, default=1, help="IOThreads (default: 1)")
    parser.add_argument(
        "--yield-in-incr",
        action="store_true",
        help="INCR yields to the loop while it holds its shard's lock",
    )
    parser.add_argument(
        "--grace", type=float, default=2.0, help="seconds connections get to finish at exit"
    )
    args = parser.parse_args(argv)

    # The IOThreads inherit this mask: SIGINT and SIGTERM wait for sigwait below.
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    server = start(args.port, args.iothreads, yield_in_incr=args.yield_in_incr)
    host, port = server.address[:2]
    print(f"listening on {host}:{port}", flush=True)
    signo = signal.sigwait(stop)
    print(f"{signal.Signals(signo).name}: closing", flush=True)
    server.close(grace=args.grace)  # stop accepting, let clients finish, cancel the rest


if __name__ == "__main__":
    main()
