#!/usr/bin/env python3
"""A RESP (Redis protocol) server on corun next to its peers, driven by redis-benchmark.

What it measures. The same minimal key-value logic (PING, ECHO, SET, GET,
INCR, DEL, EXISTS, and CONFIG GET answered with an empty array, which is
what redis-benchmark asks before it starts) runs on:

- corun: `corun.serve(handler, iothreads=N)` with N = 1, 2 and 4; the
  handler reads chunks with `Socket.recv`, parses every complete command in
  them and answers them all with one `sendall`;
- asyncio streams (`asyncio.start_server`, `reader.read`, `writer.write` +
  `drain`), and the same code on uvloop's loop;
- gevent's `StreamServer` (the connection's gevent socket: `recv`,
  `sendall`);
- the real redis-server (the C ceiling), when it is installed; Debian's
  redis-tools ships the same binary as `redis-check-rdb`, which runs as
  the server when started under the name `redis-server`, so the tool uses
  that when there is no `redis-server` on PATH.

Every Python server shares the parser and the command table, reads up to
64 KiB at a time and answers all the commands of a read with one write. The
corun servers guard INCR's read-modify-write with a `threading.Lock` (the
critical section never suspends, so no CoMutex is needed; with N IOThreads,
INCR would lose updates without it); the single-threaded peers need none.
With `--servers corun-stream` a corun server written with `Stream.readuntil`
and `Stream.readexactly`, one `write` per reply, can be measured too (not in
the default set).

`--command CMD` runs one command instead of the four tests, for example
`--command "SHA256 256"`: a command of these servers (not Redis's) that
hashes 256 KiB with hashlib, which releases the GIL while it hashes: the
case where more IOThreads help (see the README, "Networking").

How. Each server runs in its own subprocess bound to 127.0.0.1 on a port
the kernel picks, and is stopped by the tool (its stdin closes; SIGKILL if
it lingers). Against each server, once warmed up, redis-benchmark runs
`-c CLIENTS -n N -t ping,set,get,incr --csv -q` without pipelining (P=1)
and with `-P 16` (N times PIPELINED_SCALE requests there). Every run is
bounded in requests and in time (`--timeout`). After both runs the tool
checks that the INCR counter equals the number of INCRs sent (no request
lost). `--repeat` rounds interleave the servers (a noisy moment of the
machine hurts everyone alike) and medians are reported: k requests per
second per test, "all" being the requests of the five tests over their
total time, then the ratios corun 1 IOThread / asyncio, / uvloop,
/ gevent, corun 2 / corun 1 and corun 4 / corun 1 and the targets (issue
10): corun with 1 IOThread >= 1.0x asyncio streams and >= 1.0x gevent at
P=1 and P=16, corun with 2 IOThreads >= 1.0x corun with 1.

Exit status: 0 when every run finished (a missed target is not a
failure), 1 when a run failed (named on stderr), 2 for a bad command line
or no redis-benchmark (Debian: `apt-get install redis-tools`).

Usage: tools/serverbench.py [--servers S,...] [--repeat N] [--requests N]
[--clients N] [--timeout S] [--command CMD] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

# -- the protocol: one parser and one command table for every Python server ----

TESTS = ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR")
PIPELINES = (1, 16)
# Pipelined runs send this many times --requests (each costs a sixteenth of a round trip).
PIPELINED_SCALE = 8
# redis-benchmark's INCR key without -r.
COUNTER_KEY = b"counter:__rand_int__"

_OK = b"+OK\r\n"
_PONG = b"+PONG\r\n"
_NIL = b"$-1\r\n"
# The lock of the single-threaded servers.
NO_LOCK: AbstractContextManager[Any] = contextlib.nullcontext()
# What SHA256 KIB hashes: work that releases the GIL (hashlib does, past 2 KiB).
_BLOB = bytes(1 << 20)


class ProtocolError(Exception):
    """The client sent something that is not RESP."""


def execute(
    args: list[bytes], store: dict[bytes, bytes], lock: AbstractContextManager[Any]
) -> bytes:
    """Run one command on `store`; return its RESP reply.

    `lock` guards INCR's read-modify-write (a dict's get and set are each
    atomic already): a threading.Lock where several threads share `store`.
    """
    name = args[0].upper()
    n = len(args)
    if name == b"GET" and n == 2:
        value = store.get(args[1])
        return _NIL if value is None else b"$%d\r\n%b\r\n" % (len(value), value)
    if name == b"SET" and n >= 3:
        store[args[1]] = args[2]
        return _OK
    if name == b"INCR" and n == 2:
        with lock:
            try:
                number = int(store.get(args[1], b"0")) + 1
            except ValueError:
                return b"-ERR value is not an integer or out of range\r\n"
            store[args[1]] = b"%d" % number
        return b":%d\r\n" % number
    if name == b"PING":
        return _PONG if n == 1 else b"$%d\r\n%b\r\n" % (len(args[1]), args[1])
    if name == b"ECHO" and n == 2:
        return b"$%d\r\n%b\r\n" % (len(args[1]), args[1])
    if name == b"DEL" or name == b"EXISTS":
        if name == b"DEL":
            count = sum(store.pop(key, None) is not None for key in args[1:])
        else:
            count = sum(key in store for key in args[1:])
        return b":%d\r\n" % count
    if name == b"CONFIG":
        return b"*0\r\n"  # redis-benchmark asks for `save` and `appendonly`
    if name == b"SHA256" and n == 2 and args[1].isdigit():
        # Not Redis's: hash KIB KiB (up to 1024), with the GIL released.
        digest = hashlib.sha256(memoryview(_BLOB)[: int(args[1]) << 10]).hexdigest()
        return b"$64\r\n%b\r\n" % digest.encode()
    return b"-ERR unknown command or wrong number of arguments\r\n"


def process(
    data: bytes, store: dict[bytes, bytes], lock: AbstractContextManager[Any] = NO_LOCK
) -> tuple[bytes, int]:
    """Run every complete command at the start of `data`.

    Returns the replies, joined, and how many bytes of `data` they used (the
    rest is the start of a command still on its way). Commands are RESP
    arrays of bulk strings, or inline (`PING\\r\\n`), as redis-benchmark sends.
    """
    replies: list[bytes] = []
    pos = 0
    end = len(data)
    find = data.find
    while pos < end:
        if data[pos] == 42:  # b"*": an array of bulk strings
            nl = find(b"\r\n", pos)
            if nl < 0:
                break
            p = nl + 2
            args: list[bytes] = []
            for _ in range(int(data[pos + 1 : nl])):
                nl = find(b"\r\n", p)
                if nl < 0:
                    break
                if data[p] != 36:  # b"$"
                    raise ProtocolError(f"expected a bulk string at byte {p}")
                start = nl + 2
                stop = start + int(data[p + 1 : nl])
                if stop + 2 > end:
                    break
                args.append(data[start:stop])
                p = stop + 2
            else:
                if args:
                    replies.append(execute(args, store, lock))
                pos = p
                continue
            break  # incomplete
        nl = find(b"\n", pos)
        if nl < 0:
            break
        args = data[pos:nl].split()
        if args:
            replies.append(execute(args, store, lock))
        pos = nl + 1
    return b"".join(replies), pos


# -- the servers (each runs in its own child process: `--serve KEY`) ------------


def _announce(port: int) -> None:
    """Tell the parent the port, and exit as soon as the parent lets go of stdin."""
    print(port, flush=True)

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # EOF: the tool closed our stdin, or died
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()


def serve_corun(iothreads: int) -> None:
    import corun

    store: dict[bytes, bytes] = {}
    # Shared by the IOThreads; never held across a suspension: no CoMutex needed.
    lock = threading.Lock()

    def handler(sock: corun.Socket, addr: Any) -> None:
        recv, sendall = sock.recv, sock.sendall
        pending = b""
        try:
            while True:
                data = recv(65536)
                if not data:
                    return
                if pending:
                    data = pending + data
                out, used = process(data, store, lock)
                pending = data[used:]
                if out:
                    sendall(out)
        except ConnectionError:
            pass  # the client went away

    server = corun.serve(handler, "127.0.0.1", 0, iothreads=iothreads, stream=False)
    _announce(server.address[1])
    threading.Event().wait()


def serve_corun_stream() -> None:
    """corun with the Stream API: readuntil/readexactly, one write per reply."""
    import corun
    from corun.net import IncompleteReadError

    store: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def handler(stream: corun.Stream, addr: Any) -> None:
        readuntil, readexactly, write = stream.readuntil, stream.readexactly, stream.write
        while True:
            try:
                line = readuntil(b"\r\n")
            except IncompleteReadError:
                return
            if line[0] == 42:  # b"*"
                args = []
                for _ in range(int(line[1:-2])):
                    header = readuntil(b"\r\n")
                    args.append(readexactly(int(header[1:-2]) + 2)[:-2])
            else:
                args = line.split()
                if not args:
                    continue
            reply = execute(args, store, lock)
            write(reply)

    server = corun.serve(handler, "127.0.0.1", 0, iothreads=1)
    _announce(server.address[1])
    threading.Event().wait()


def serve_asyncio(use_uvloop: bool) -> None:
    store: dict[bytes, bytes] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                if pending:
                    data = pending + data
                out, used = process(data, store)
                pending = data[used:]
                if out:
                    writer.write(out)
                    await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        _announce(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def serve_gevent() -> None:
    # Imported by name: gevent ships no type stubs (its objects are Any here).
    StreamServer = importlib.import_module("gevent.server").StreamServer
    store: dict[bytes, bytes] = {}

    def handle(sock: Any, addr: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        recv, sendall = sock.recv, sock.sendall
        pending = b""
        try:
            while True:
                data = recv(65536)
                if not data:
                    return
                if pending:
                    data = pending + data
                out, used = process(data, store)
                pending = data[used:]
                if out:
                    sendall(out)
        except ConnectionError:
            pass  # the client went away

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    _announce(server.server_port)
    server.serve_forever()


def serve_child(key: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if key.startswith("corun-") and key[6:].isdigit():
        serve_corun(int(key[6:]))
    elif key == "corun-stream":
        serve_corun_stream()
    elif key in ("asyncio", "uvloop"):
        serve_asyncio(key == "uvloop")
    elif key == "gevent":
        serve_gevent()
    else:
        raise SystemExit(f"serverbench.py: no server {key!r}")


# -- the parent: start, drive, check, stop -------------------------------------


@dataclass
class ServerSpec:
    key: str
    label: str
    needs: tuple[str, ...] = ()  # modules it cannot run without
    default: bool = True


SERVERS = [
    ServerSpec("corun-1", "corun, 1 IOThread"),
    ServerSpec("corun-2", "corun, 2 IOThreads"),
    ServerSpec("corun-4", "corun, 4 IOThreads"),
    ServerSpec("corun-stream", "corun, Stream.readuntil, 1 IOThread", default=False),
    ServerSpec("asyncio", "asyncio streams"),
    ServerSpec("uvloop", "asyncio streams on uvloop", needs=("uvloop",)),
    ServerSpec("gevent", "gevent StreamServer", needs=("gevent",)),
    ServerSpec("redis", "redis-server (C)"),
]
BY_KEY = {s.key: s for s in SERVERS}

# (numerator, denominator, target or None): ratios of the "all" medians.
RATIOS: list[tuple[str, str, float | None]] = [
    ("corun-1", "asyncio", 1.0),
    ("corun-1", "gevent", 1.0),
    ("corun-1", "uvloop", None),
    ("corun-2", "corun-1", 1.0),
    ("corun-4", "corun-1", None),
    ("corun-1", "redis", None),
]


def find_redis_server() -> tuple[str, str] | None:
    """(executable, argv[0]) for redis-server, or None.

    Debian's redis-tools has no redis-server, but its redis-check-rdb is the
    same binary: Redis picks its mode by the name it was started under.
    """
    path = shutil.which("redis-server")
    if path:
        return path, path
    check = shutil.which("redis-check-rdb")
    if check:
        try:
            out = subprocess.run(
                ["redis-server", "--version"],
                executable=check,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.startswith("Redis server"):
            return check, "redis-server"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RunningServer:
    """A server's child process; stop() ends it whatever state it is in."""

    def __init__(self, spec: ServerSpec, start_timeout: float) -> None:
        self.spec = spec
        # A file, not a pipe: a server that logs a lot must never block on it.
        self.errors = tempfile.TemporaryFile()
        if spec.key == "redis":
            found = find_redis_server()
            assert found is not None
            executable, argv0 = found
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [argv0, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
                executable=executable,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.errors,
                cwd=tempfile.gettempdir(),
            )  # fmt: skip
            self._wait_until_accepting(start_timeout)
            return
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", spec.key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
        )
        assert self.proc.stdout is not None
        line = _readline_within(self.proc.stdout, start_timeout)
        if not line.strip().isdigit():
            why = f"did not start: {line!r} {self.stderr()}"
            self.stop()
            raise RuntimeError(why)
        self.port = int(line)

    def _wait_until_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if command(self.port, [b"PING"]) == b"+PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"did not start: {self.stderr()}"
                self.stop()
                raise RuntimeError(why)
            time.sleep(0.05)

    def stderr(self) -> str:
        """The end of what the server wrote on stderr so far."""
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace").strip()[-2000:]

    def stop(self) -> None:
        proc = self.proc
        if proc.stdin is not None:
            proc.stdin.close()  # the child exits at EOF
        else:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self.errors.close()


def _readline_within(f: io.BufferedReader | Any, timeout: float) -> bytes:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(f.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else b"(no port within %gs)" % timeout


def command(port: int, args: list[bytes], timeout: float = 5.0) -> bytes:
    """Send one command with a plain socket; return the reply's first line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args))
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"$") and not data.startswith(b"$-1"):
            size = int(data[1 : data.index(b"\r\n")])
            while len(data) < data.index(b"\r\n") + 2 + size + 2:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = data[data.index(b"\r\n") + 2 :]
            return body[:size]
        return data.split(b"\r\n", 1)[0]


def redis_benchmark(
    port: int, pipeline: int, requests: int, clients: int, timeout: float, what: list[str]
) -> dict[str, float]:
    """One redis-benchmark run of `what` (`-t TESTS`, or a command): requests/s per test."""
    argv = [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
        "-n", str(requests), "-P", str(pipeline), "--csv", "-q", *what,
    ]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"`{' '.join(argv)}` did not finish within {timeout:g} s (killed)"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return parse_csv(proc.stdout)


def parse_csv(text: str) -> dict[str, float]:
    """redis-benchmark --csv output -> {test: requests per second}."""
    rates: dict[str, float] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] != "test":
            try:
                rates[row[0]] = float(row[1])
            except ValueError:
                continue
    return rates


def overall(rates: dict[str, float]) -> float:
    """Requests of all the tests over their total time (equal -n per test)."""
    return len(rates) / sum(1 / r for r in rates.values()) if rates else math.nan


@dataclass
class Result:
    """One server at one pipeline depth: each round's rates."""

    spec: ServerSpec
    pipeline: int
    runs: list[dict[str, float]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # server CPU µs per request, per round
    error: str | None = None

    def median(self, test: str) -> float:
        values = [r[test] for r in self.runs if test in r]
        return statistics.median(values) if values else math.nan

    def median_all(self) -> float:
        values = [overall(r) for r in self.runs]
        return statistics.median(values) if values else math.nan

    def median_cpu(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Settings:
    servers: list[ServerSpec]
    repeat: int = 3
    requests: int = 50_000
    clients: int = 50
    timeout: float = 120.0
    json: bool = False
    command: list[str] | None = None  # instead of -t ping,set,get,incr
    skipped: dict[str, str] = field(default_factory=dict)

    def what(self) -> list[str]:
        return self.command or ["-t", "ping,set,get,incr"]


def one_server_round(spec: ServerSpec, s: Settings, results: dict[tuple[str, int], Result]) -> None:
    """Start the server, warm it up, run P=1 and P=16, check INCR, stop it."""
    try:
        server = RunningServer(spec, start_timeout=30)
    except RuntimeError as exc:
        for p in PIPELINES:
            results[spec.key, p].error = str(exc)
        return
    try:
        redis_benchmark(server.port, 1, 2000, s.clients, s.timeout, ["-t", "ping"])  # warm-up
        incrs = 0
        for p in PIPELINES:
            n = requests_at(s, p)
            cpu_before = cpu_seconds(server.proc.pid)
            try:
                rates = redis_benchmark(server.port, p, n, s.clients, s.timeout, s.what())
                cpu_after = cpu_seconds(server.proc.pid)
            except RuntimeError as exc:
                results[spec.key, p].error = str(exc)
                continue
            missing = set(TESTS) - set(rates) if s.command is None else set()
            if not rates or missing:
                results[spec.key, p].error = f"no rate for {sorted(missing)} in the output"
                continue
            results[spec.key, p].runs.append(rates)
            if cpu_before is not None and cpu_after is not None:
                results[spec.key, p].cpu.append((cpu_after - cpu_before) * 1e6 / (n * len(rates)))
            incrs += n if s.command is None else 0
        got = command(server.port, [b"GET", COUNTER_KEY])
        if incrs and got != b"%d" % incrs:
            err = f"INCR counter is {got!r}, {incrs} INCRs were sent"
            for p in PIPELINES:
                results[spec.key, p].error = results[spec.key, p].error or err
    except (RuntimeError, OSError) as exc:
        for p in PIPELINES:
            results[spec.key, p].error = results[spec.key, p].error or f"{exc}"
    finally:
        server.stop()


def requests_at(s: Settings, pipeline: int) -> int:
    """redis-benchmark's -n at this pipeline depth."""
    return s.requests * (PIPELINED_SCALE if pipeline > 1 else 1)


def run_all(s: Settings) -> dict[tuple[str, int], Result]:
    results = {(spec.key, p): Result(spec, p) for spec in s.servers for p in PIPELINES}
    for round_ in range(s.repeat):
        for spec in s.servers:
            if any(results[spec.key, p].error for p in PIPELINES):
                continue  # failed once: not again
            if not s.json:
                print(
                    f"round {round_ + 1}/{s.repeat}: {spec.label} ...", file=sys.stderr, flush=True
                )
            one_server_round(spec, s, results)
    return results


# -- reporting -------------------------------------------------------------------


def columns(results: dict[tuple[str, int], Result]) -> list[str]:
    """The tests that were measured, in redis-benchmark's order."""
    seen: dict[str, None] = {}
    for r in results.values():
        for run in r.runs:
            seen.update(dict.fromkeys(run))
    return list(seen)


def ratio_rows(
    results: dict[tuple[str, int], Result], with_targets: bool = True
) -> list[dict[str, Any]]:
    tests = columns(results)
    rows: list[dict[str, Any]] = []
    for p in PIPELINES:
        for num, den, target in RATIOS:
            a, b = results.get((num, p)), results.get((den, p))
            if a is None or b is None or not a.runs or not b.runs:
                continue
            value = a.median_all() / b.median_all()
            per_test = {t: a.median(t) / b.median(t) for t in tests}
            if not with_targets:
                target = None
            rows.append(
                {
                    "ratio": f"{BY_KEY[num].label} / {BY_KEY[den].label}",
                    "numerator": num,
                    "denominator": den,
                    "pipeline": p,
                    "value": value,
                    "per_test": per_test,
                    "target": target,
                    "met": None if target is None else value >= target,
                }
            )
    return rows


def table(results: dict[tuple[str, int], Result], s: Settings) -> str:
    tests = columns(results)
    cols = [*tests, "all"] if len(tests) > 1 else tests
    cw = max(12, *(len(c) + 2 for c in cols))
    width = max(len(spec.label) for spec in s.servers) + 2
    out: list[str] = []
    for p in PIPELINES:
        out.append(
            f"P={p} (-n {requests_at(s, p)} -c {s.clients}): k requests/s, medians of "
            f"{s.repeat} interleaved runs; server CPU µs per request"
        )
        out.append(f"{'server':<{width}}" + "".join(f"{c:>{cw}}" for c in cols) + f"{'CPU µs':>10}")
        out.append("-" * (width + cw * len(cols) + 10))
        for spec in s.servers:
            r = results[spec.key, p]
            if not r.runs:
                out.append(f"{spec.label:<{width}}  FAILED: {r.error}")
                continue
            values = [r.median(t) for t in tests]
            if len(cols) > len(tests):
                values.append(r.median_all())
            line = f"{spec.label:<{width}}" + "".join(f"{v / 1000:>{cw}.1f}" for v in values)
            line += f"{r.median_cpu():>10.1f}" if r.cpu else f"{'-':>10}"
            if r.error:
                line += f"  ({r.error})"
            out.append(line)
        out.append("")
    rows = ratio_rows(results, with_targets=s.command is None)
    if rows:
        out.append(f"ratios (of the `{cols[-1]}` column; per test in brackets)")
        rwidth = max(len(row["ratio"]) for row in rows) + 8
        for row in rows:
            name = f"{row['ratio']}  P={row['pipeline']}"
            verdict = ""
            if row["target"] is not None:
                verdict = f"  >= {row['target']:.1f} {'met' if row['met'] else 'MISSED'}"
            per = " ".join(f"{row['per_test'][t]:.2f}" for t in tests)
            out.append(f"  {name:<{rwidth}} {row['value']:>6.3f}  [{per}]{verdict}")
    for key, why in s.skipped.items():
        out.append(f"note: skipped {key}: {why}")
    out.append(
        f"note: {os.cpu_count()} CPUs, shared with redis-benchmark (one thread, which "
        "bounds every server at P=1: compare redis-server's row)"
    )
    return "\n".join(out)


def json_lines(results: dict[tuple[str, int], Result], s: Settings) -> list[str]:
    tests = columns(results)
    lines = []
    for spec in s.servers:
        for p in PIPELINES:
            r = results[spec.key, p]
            lines.append(
                json.dumps(
                    {
                        "server": spec.key,
                        "label": spec.label,
                        "pipeline": p,
                        "requests": requests_at(s, p),
                        "median": {t: r.median(t) for t in tests} if r.runs else None,
                        "all": r.median_all() if r.runs else None,
                        "runs": r.runs,
                        "cpu_us": r.median_cpu() if r.cpu else None,
                        "error": r.error,
                    }
                )
            )
    lines += [json.dumps(row) for row in ratio_rows(results, with_targets=s.command is None)]
    return lines


JSON_KEYS = [
    ("server", "the server's key (as --servers takes it)"),
    ("label", "the table's name for it"),
    ("pipeline", "redis-benchmark's -P (1 or 16)"),
    ("requests", "its -n (requests per test)"),
    ("median", "{test: median requests/s} (null if every run failed)"),
    ("all", "median of the runs' requests/s over all their tests"),
    ("runs", "each round's {test: requests/s}"),
    (
        "cpu_us",
        "median CPU time of the server process per request, in µs (user + system, "
        "all threads; null where /proc is missing)",
    ),
    ("error", "null, or why a run failed"),
]
JSON_RATIO_KEYS = [
    ("ratio", "as the text shows it"),
    ("numerator", "a server key"),
    ("denominator", "a server key"),
    ("pipeline", "1 or 16"),
    ("value", "median `all` of the numerator / the denominator's"),
    ("per_test", "{test: ratio of the medians}"),
    ("target", "the issue's minimum, or null"),
    ("met", "true/false, or null without a target"),
]


def _keys_text(keys: list[tuple[str, str]]) -> list[str]:
    lines: list[str] = []
    for key, doc in keys:
        lines += textwrap.wrap(
            doc, width=79, initial_indent=f"  {key:<11} ", subsequent_indent=" " * 14
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    keys = ", ".join(s.key for s in SERVERS)
    defaults = ",".join(s.key for s in SERVERS if s.default)
    parser = argparse.ArgumentParser(
        prog="serverbench.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run the same RESP key-value server on corun (1, 2, 4 IOThreads), asyncio "
            "streams, uvloop, gevent and redis-server, drive each with redis-benchmark "
            "at -P 1 and -P 16, and report k requests/s and ratios.",
            width=79,
        ),
        epilog="\n".join(
            [
                textwrap.fill(f"Servers: {keys}. Peers that are not installed are skipped.", 79),
                "",
                textwrap.fill(
                    "--json prints JSON Lines: one object per server and pipeline depth, "
                    "then one per ratio. A server's keys:",
                    79,
                ),
                *_keys_text(JSON_KEYS),
                "A ratio's keys:",
                *_keys_text(JSON_RATIO_KEYS),
                "",
                textwrap.fill(
                    "Exit status: 0 every run finished (a missed target is not a failure), "
                    "1 a run failed, 2 a bad command line or no redis-benchmark.",
                    79,
                ),
            ]
        ),
    )
    parser.add_argument(
        "--servers",
        default=defaults,
        metavar="S,...",
        help=f"servers to run, comma-separated (default: {defaults})",
    )
    parser.add_argument(
        "--repeat", type=_positive(int), default=3, metavar="N",
        help="interleaved rounds; medians are reported (default: 3)",
    )  # fmt: skip
    parser.add_argument(
        "--requests", type=_positive(int), default=50_000, metavar="N",
        help=f"redis-benchmark -n at P=1; P=16 sends {PIPELINED_SCALE}x (default: 50000)",
    )  # fmt: skip
    parser.add_argument(
        "--clients", type=_positive(int), default=50, metavar="N",
        help="redis-benchmark -c (default: 50)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=_positive(float), default=120.0, metavar="S",
        help="seconds one redis-benchmark run may take before it is killed (default: 120)",
    )  # fmt: skip
    parser.add_argument(
        "--command",
        metavar="CMD",
        help="run this command instead of -t ping,set,get,incr, for example 'SHA256 256' "
        "(hash 256 KiB: work that releases the GIL); no targets, no INCR check",
    )
    parser.add_argument("--json", action="store_true", help="JSON Lines (keys below)")
    parser.add_argument("--serve", metavar="KEY", help=argparse.SUPPRESS)
    return parser


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: > 0)")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a refused command line (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.serve:
        serve_child(args.serve)
        return 0
    wanted = [k for k in args.servers.split(",") if k]
    unknown = [k for k in wanted if k not in BY_KEY]
    if unknown or not wanted:
        print(
            f"serverbench.py: error: unknown server(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(BY_KEY)}",
            file=sys.stderr,
        )
        return 2
    if shutil.which("redis-benchmark") is None:
        print(
            "serverbench.py: error: no redis-benchmark on PATH "
            "(Debian: apt-get install redis-tools)",
            file=sys.stderr,
        )
        return 2
    s = Settings(
        servers=[],
        repeat=args.repeat,
        requests=args.requests,
        clients=args.clients,
        timeout=args.timeout,
        json=args.json,
        command=args.command.split() if args.command else None,
    )
    for key in wanted:
        spec = BY_KEY[key]
        missing = [m for m in spec.needs if importlib.util.find_spec(m) is None]
        if missing:
            s.skipped[key] = f"{', '.join(missing)} is not installed"
        elif key == "redis" and find_redis_server() is None:
            s.skipped[key] = "no redis-server (nor redis-tools' redis-check-rdb)"
        else:
            s.servers.append(spec)
    results = run_all(s)
    if args.json:
        for line in json_lines(results, s):
            print(line)
    else:
        print(table(results, s))
    failed = [r for r in results.values() if r.error]
    for r in failed:
        print(f"FAILED {r.spec.label} P={r.pipeline}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
