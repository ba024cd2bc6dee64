"""examples/kvserver.py against real Redis clients (issue 10).

- the protocol by hand (no external tool): pipelined commands answered in
  order, inline commands, errors, QUIT, a protocol error, the command line
  (`python examples/kvserver.py --port 0`) and its exit on SIGINT/SIGTERM;
- redis-py (the `test` extra): binary values up to 64 KiB; INCR from 16
  threads, some pipelined, gives every value from 1 to the total exactly
  once, also with 4 IOThreads and INCR yielding inside its critical section
  (`--yield-in-incr`: the CoMutex keeps it exact);
- redis-benchmark (Debian's redis-tools; .ci/run installs it): a bounded
  run of ping/set/get/incr, with and without pipelining, completes and the
  counter it increments ends exact.

Every server binds 127.0.0.1 and is closed by its test.
"""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import corun

ROOT = Path(__file__).resolve().parent.parent
QUICK = 5.0
KVSERVER_CMD = [sys.executable, str(ROOT / "examples" / "kvserver.py")]

pytestmark = pytest.mark.timeout(30)


def load_kvserver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvserver", ROOT / "examples" / "kvserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kvserver = load_kvserver()


@pytest.fixture
def start() -> Iterator[Callable[..., corun.Server]]:
    """start(**kwargs) -> a running kvserver on a free port, closed after the test."""
    servers: list[corun.Server] = []

    def starter(**kwargs: Any) -> corun.Server:
        server = kvserver.start(**kwargs)
        servers.append(server)
        return server

    yield starter
    for server in servers:
        server.close(grace=0.5)


def command(*args: bytes | str) -> bytes:
    """One command as clients send it: an array of bulk strings."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def exchange(sock: socket.socket, payload: bytes, expected: bytes) -> bytes:
    """Send `payload`; read as many bytes as `expected` has (or until EOF)."""
    sock.sendall(payload)
    got = b""
    while len(got) < len(expected):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


class RawClient:
    """RESP by hand over a plain socket: call() sends a command, returns its reply."""

    def __init__(self, address: Any) -> None:
        self.sock = socket.create_connection(address, timeout=QUICK)
        self.file = self.sock.makefile("rb")

    def call(self, *args: bytes | str) -> bytes:
        self.sock.sendall(command(*args))
        return self.reply()

    def reply(self) -> bytes:
        """One whole reply, as the server wrote it."""
        line = self.file.readline()
        if line[:1] == b"$" and line != b"$-1\r\n":
            line += self.file.read(int(line[1:]) + 2)
        elif line[:1] == b"*":
            for _ in range(int(line[1:])):
                line += self.reply()
        return line

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_raw(address: Any, key: str) -> bytes:
    with RawClient(address) as c:
        return c.call("GET", key)


# -- the protocol by hand -------------------------------------------------------------


def test_pipelined_commands_are_answered_in_order(start: Callable[..., corun.Server]) -> None:
    server = start()
    batch = b"".join(
        [
            command("PING"),
            command("SET", "k", "v1"),
            command("GET", "k"),
            command("INCR", "n"),
            command("INCRBY", "n", "41"),
            command("DECR", "n"),
            command("DECRBY", "n", "2"),
            command("ECHO", b"a\r\nb"),
            command("EXISTS", "k", "n", "missing"),
            command("DEL", "k", "missing"),
            command("GET", "k"),
            command("SET", "text", "abc"),
            command("INCR", "text"),
            command("NOSUCH", "x"),
            command("GET"),
            command("HELLO", "3"),
            command("SELECT", "0"),
            command("CONFIG", "GET", "save"),
            command("CLIENT", "SETNAME", "me"),
            command("COMMAND"),
            command("PING", "hi"),
        ]
    )
    expected = b"".join(
        [
            b"+PONG\r\n",
            b"+OK\r\n",
            b"$2\r\nv1\r\n",
            b":1\r\n",
            b":42\r\n",
            b":41\r\n",
            b":39\r\n",
            b"$4\r\na\r\nb\r\n",
            b":2\r\n",
            b":1\r\n",
            b"$-1\r\n",
            b"+OK\r\n",
            b"-ERR value is not an integer or out of range\r\n",
            b"-ERR unknown command 'NOSUCH'\r\n",
            b"-ERR wrong number of arguments for 'get' command\r\n",
            b"-NOPROTO this server speaks RESP2 only (redis-py >= 8: protocol=2)\r\n",
            b"+OK\r\n",
            b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n",
            b"+OK\r\n",
            b"*0\r\n",
            b"$2\r\nhi\r\n",
        ]
    )
    with socket.create_connection(server.address, timeout=QUICK) as s:
        assert exchange(s, batch, expected) == expected
        # The same batch one byte at a time: commands split anywhere still parse.
        s.sendall(command("DEL", "n", "text"))
        assert s.recv(100) == b":2\r\n"
        for byte in batch:
            s.send(bytes([byte]))
        got = b""
        while len(got) < len(expected):
            got += s.recv(65536)
        assert got == expected


def test_inline_commands_quit_and_protocol_errors(start: Callable[..., corun.Server]) -> None:
    server = start()
    with socket.create_connection(server.address, timeout=QUICK) as s:
        assert exchange(s, b"PING\r\nSET a 1\r\nINCR a\r\n", b"+PONG\r\n+OK\r\n:2\r\n") == (
            b"+PONG\r\n+OK\r\n:2\r\n"
        )
        assert exchange(s, command("QUIT") + command("PING"), b"+OK\r\n") == b"+OK\r\n"
        assert s.recv(100) == b""  # hung up after QUIT; the PING after it was not run
        # (Both came in one segment, read by one recv: the server closes with
        # nothing unread, so the client sees a FIN, not a reset.)
    with socket.create_connection(server.address, timeout=QUICK) as s:
        s.sendall(b"*1\r\n+PING\r\n")  # a simple string where a bulk string must be
        reply = b""
        while data := s.recv(100):  # the server answers, then hangs up
            reply += data
        assert reply == b"-ERR Protocol error: expected '$', got '+'\r\n"
    with socket.create_connection(server.address, timeout=QUICK) as s:
        assert exchange(s, command("GET", "a"), b"$1\r\n2\r\n") == b"$1\r\n2\r\n"  # still serving


def test_set_with_expiry(start: Callable[..., corun.Server]) -> None:
    server = start()
    with RawClient(server.address) as c:
        assert c.call("SET", "t", "v", "PX", "100") == b"+OK\r\n"
        assert c.call("SET", "u", "v", "EX", "100") == b"+OK\r\n"
        assert c.call("GET", "t") == b"$1\r\nv\r\n"
        time.sleep(0.15)
        assert c.call("GET", "t") == b"$-1\r\n"
        assert c.call("EXISTS", "t", "u") == b":1\r\n"
        assert c.call("SET", "u", "w") == b"+OK\r\n"  # a plain SET drops the deadline
        assert c.call("SET", "t", "v", "EX", "0") == (
            b"-ERR invalid expire time in 'set' command\r\n"
        )
        assert c.call("SET", "t", "v", "EX", "soon") == (
            b"-ERR value is not an integer or out of range\r\n"
        )
        assert c.call("SET", "t", "v", "KEEPTTL") == b"-ERR syntax error\r\n"
        assert c.call("HELLO") == c.call("HELLO", "2")
        assert c.call("HELLO", "3").startswith(b"-NOPROTO ")


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_command_line_serves_until_a_signal(signo: int) -> None:
    proc = subprocess.Popen(
        [*KVSERVER_CMD, "--port", "0", "--iothreads", "2", "--grace", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", first)
        assert match, first
        address = ("127.0.0.1", int(match.group(1)))
        with socket.create_connection(address, timeout=QUICK) as s:
            assert exchange(s, command("PING"), b"+PONG\r\n") == b"+PONG\r\n"
            idle = socket.create_connection(address, timeout=QUICK)  # stays connected
            proc.send_signal(signo)
            out, err = proc.communicate(timeout=10)
            idle.close()
        assert proc.returncode == 0, err
        assert out == f"{signal.Signals(signo).name}: closing\n"
        assert err == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- redis-py ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis() -> ModuleType:
    return pytest.importorskip(
        "redis", reason="redis-py is not installed: pip install -e '.[test]' (redis>=5)"
    )


def connect(redis: Any, port: int) -> Any:
    """A redis-py client. RESP2: redis-py >= 8 asks for RESP3 unless told (kvserver.py)."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=QUICK, protocol=2)


def test_redis_py_binary_values_up_to_64k(redis: Any, start: Callable[..., corun.Server]) -> None:
    server = start(iothreads=2)
    rng = random.Random(10)
    client = connect(redis, server.address[1])
    try:
        sizes = [0, 1, 2, 3, 100, 1000, 4095, 4096, 65535, 65536]
        values = {b"key\r\n\x00%d" % n: rng.randbytes(n) for n in sizes}
        values[b"crlf"] = b"\r\n" * 1000 + b"$-1\r\n*3\r\n"  # RESP inside a value
        for key, value in values.items():
            assert client.set(key, value) is True
        for key, value in values.items():
            assert client.get(key) == value
        assert client.exists(*values) == len(values)
        assert client.get(b"nothing here") is None
        assert client.ping() is True
        assert client.echo(b"\xff\x00") == b"\xff\x00"
        assert client.delete(*values) == len(values)
        assert client.exists(*values) == 0
        client.set(b"text", b"x")
        with pytest.raises(redis.ResponseError, match="not an integer"):
            client.incr(b"text")
    finally:
        client.close()


def incr_from_threads(redis: Any, port: int, key: str, threads: int, per_thread: int) -> list[int]:
    """INCR `key` from `threads` threads; every other thread pipelines 10 at a time.

    Returns every value INCR answered.
    """
    answers: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        client = connect(redis, port)
        mine: list[int] = []
        try:
            barrier.wait(QUICK)
            if i % 2:
                for _ in range(per_thread // 10):
                    pipe = client.pipeline(transaction=False)
                    for _ in range(10):
                        pipe.incr(key)
                    mine.extend(pipe.execute())
            else:
                for _ in range(per_thread):
                    mine.append(client.incr(key))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()
        with lock:
            answers.extend(mine)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    assert not errors, errors
    return answers


@pytest.mark.parametrize(
    ("iothreads", "yield_in_incr"),
    [(1, False), (2, False), (4, True)],
    ids=["1-iothread", "2-iothreads", "4-iothreads-yield-in-incr"],
)
def test_redis_py_incr_from_16_threads_is_exact(
    redis: Any, start: Callable[..., corun.Server], iothreads: int, yield_in_incr: bool
) -> None:
    server = start(iothreads=iothreads, yield_in_incr=yield_in_incr)
    port = server.address[1]
    threads, per_thread = 16, 200
    answers = incr_from_threads(redis, port, "hits", threads, per_thread)
    total = threads * per_thread
    # Every INCR got its own value: none lost, none seen twice.
    assert sorted(answers) == list(range(1, total + 1))
    client = connect(redis, port)
    try:
        assert client.get("hits") == str(total).encode()
    finally:
        client.close()


# -- redis-benchmark ---------------------------------------------------------------------

REDIS_BENCHMARK = shutil.which("redis-benchmark")
needs_redis_benchmark = pytest.mark.skipif(
    REDIS_BENCHMARK is None,
    reason="redis-benchmark is not installed (Debian: apt-get install redis-tools; "
    ".ci/run installs it)",
)


@needs_redis_benchmark
@pytest.mark.parametrize(
    ("pipeline", "iothreads"), [(1, 1), (16, 2)], ids=["P1-1-iothread", "P16-2-iothreads"]
)
def test_redis_benchmark_run_completes_and_counts_exactly(
    start: Callable[..., corun.Server], pipeline: int, iothreads: int
) -> None:
    server = start(iothreads=iothreads)
    n = 20000
    assert REDIS_BENCHMARK is not None
    argv = [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(server.address[1])]
    argv += ["-n", str(n), "-c", "20", "-P", str(pipeline), "-t", "ping,set,get,incr", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=25, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # e.g. no "WARNING: Could not fetch server CONFIG"
    lines = [x for x in re.split(r"[\r\n]", done.stdout) if "requests per second" in x]
    tests = [line.split(":")[0].strip() for line in lines]
    assert tests == ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"], done.stdout
    # Every INCR was answered and counted: without -r the key is literally this.
    assert get_raw(server.address, "counter:__rand_int__") == b"$5\r\n%d\r\n" % n
    assert get_raw(server.address, "key:__rand_int__").startswith(b"$3\r\n")  # SET's -d 3
    assert server.accepted >= 5 * 20
