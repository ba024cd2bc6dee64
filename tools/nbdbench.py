#!/usr/bin/env python3
"""examples/nbdserver.py (an NBD server on corun) next to nbdkit and qemu-nbd.

What it measures. The same data file, served over TCP on 127.0.0.1 by:

- corun: `examples/nbdserver.py FILE --iothreads N --io MODE` with N = 1
  and 2 IOThreads, disk I/O inline on the loop or in the thread pool;
- nbdkit's file plugin (`nbdkit -f --exit-with-parent file FILE`), at its
  default of 16 threads per connection (thread model parallel);
- qemu-nbd (`qemu-nbd -f raw -t --shared=8 --cache=writeback --aio=threads
  FILE`). qemu-nbd 7.2 never sets TCP_NODELAY on its sockets: with Nagle on
  the server and delayed ACKs on the client, replies stall about 40 ms
  each once more than one request is in flight (a few hundred IOPS at
  depth 16). To compare servers rather than socket options, the tool
  compiles a small LD_PRELOAD shim with gcc at run time (C source below,
  built in the temporary directory) that sets TCP_NODELAY on every TCP
  socket qemu-nbd accepts; nothing else of qemu-nbd changes. Without gcc
  that row is skipped, with a message. `--servers qemu-nbd-plain` runs the
  stock qemu-nbd too, to show the stall.

Cases, against each server in turn:

- 4k IOPS: `qemu-img bench -f raw -s 4096 -c COUNT -d DEPTH [-w]`, reads
  and writes, at depth 1 and 16. qemu-img bench has no random mode (it is
  sequential: each request starts STEP bytes after the previous one,
  wrapping at the end of the image), so the tool passes `-S` with a step of
  7919 x 4 KiB (a prime number of blocks: the offsets jump about 32 MB
  each time and visit every block before repeating): "strided", as far
  from sequential as the tool allows. IOPS = COUNT / the time qemu-img
  reports ("Run completed in X seconds").
- sequential MB/s (10^6 bytes/s): `nbdcopy --no-extents -C C -T C` of the
  whole export to `null:` (read) and of the data file to the export
  (write), with 1 and 4 connections (every server here offers multi-conn;
  `-T` too, since nbdcopy caps connections at its thread count, the number
  of cores by default). The time is the tool's own wall clock around
  nbdcopy.

How. The data file (random bytes, fully allocated: --size, default 1 GiB)
is made once in a temporary directory (under --dir if given). Each server,
in each round, gets a fresh copy of it (written and fsync'ed, so its pages
are clean and cached), is started on a free port bound to 127.0.0.1,
warmed up with a short read run, put through every case, and stopped; then
its copy must equal the data file (the last case wrote it all back), or
the run is marked failed. `--repeat` rounds interleave the servers (a
noisy moment of the machine hurts everyone alike); medians and min-max
spreads are reported, then every server's median / nbdkit's per case, and
the issue's targets for each corun row: 4k IOPS >= 0.8x nbdkit at depth
16, sequential >= 0.9x nbdkit. For every server the tool also reads the
server process's CPU time (user + system, all threads, from /proc/PID/stat)
before and after each case: for corun that is what the Python side costs.

Servers are children of this process, started with PR_SET_PDEATHSIG, and
stopped at the end of each round, on an error and on Ctrl-C (SIGTERM,
then SIGKILL); the temporary directory is removed.

Exit status: 0 when every run finished (a missed target is not a
failure), 1 when a run failed (named on stderr), 2 for a bad command line
or a missing client (qemu-img, nbdcopy), 130 when interrupted (the table
of what finished is still printed).

Usage: tools/nbdbench.py [--servers S,...] [--repeat N] [--size SIZE]
[--count N] [--dir DIR] [--timeout S] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBDSERVER = os.path.join(ROOT, "examples", "nbdserver.py")

BLOCK = 4096
# qemu-img bench's -S: a prime number of blocks, so that the offsets visit
# every block of the image before they repeat (the image has 2^k blocks).
STEP = 7919 * BLOCK

# The LD_PRELOAD shim that gives qemu-nbd's accepted TCP sockets TCP_NODELAY.
NODELAY_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd)
{
    int domain = 0, one = 1;
    socklen_t len = sizeof(domain);
    if (fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
        (domain == AF_INET || domain == AF_INET6))
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int s = real(fd, addr, len);
    nodelay(s);
    return s;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int s = real(fd, addr, len, flags);
    nodelay(s);
    return s;
}
"""


# -- the servers and the cases ---------------------------------------------------


@dataclass
class ServerSpec:
    key: str
    label: str
    default: bool = True
    iothreads: int = 0  # corun only
    io: str = ""  # corun only

    @property
    def is_corun(self) -> bool:
        return self.key.startswith("corun-")


SERVERS = [
    ServerSpec("corun-1-inline", "corun 1 IOThread inline", iothreads=1, io="inline"),
    ServerSpec("corun-1-threads", "corun 1 IOThread threads", iothreads=1, io="threads"),
    ServerSpec("corun-2-inline", "corun 2 IOThreads inline", iothreads=2, io="inline"),
    ServerSpec("corun-2-threads", "corun 2 IOThreads threads", iothreads=2, io="threads"),
    ServerSpec("nbdkit", "nbdkit file"),
    ServerSpec("qemu-nbd", "qemu-nbd +NODELAY shim"),
    ServerSpec("qemu-nbd-plain", "qemu-nbd as shipped", default=False),
]
BY_KEY = {s.key: s for s in SERVERS}
REFERENCE = "nbdkit"


@dataclass
class Case:
    key: str
    header: str  # the table's column
    kind: str  # "iops" (qemu-img bench) or "seq" (nbdcopy)
    write: bool
    depth: int = 0  # iops: qemu-img bench -d
    connections: int = 0  # seq: nbdcopy -C and -T
    target: float | None = None  # the minimum for corun / nbdkit

    @property
    def unit(self) -> str:
        return "IOPS" if self.kind == "iops" else "MB/s"


CASES = [
    Case("read-4k-d1", "rd4k d1", "iops", False, depth=1),
    Case("read-4k-d16", "rd4k d16", "iops", False, depth=16, target=0.8),
    Case("write-4k-d1", "wr4k d1", "iops", True, depth=1),
    Case("write-4k-d16", "wr4k d16", "iops", True, depth=16, target=0.8),
    Case("seq-read-c1", "seqrd c1", "seq", False, connections=1, target=0.9),
    Case("seq-read-c4", "seqrd c4", "seq", False, connections=4, target=0.9),
    Case("seq-write-c1", "seqwr c1", "seq", True, connections=1, target=0.9),
    Case("seq-write-c4", "seqwr c4", "seq", True, connections=4, target=0.9),
]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the tool dies, whatever the way."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the tool's own cleanup still runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_argv(spec: ServerSpec, path: str, port: int, shim: str | None) -> list[str]:
    """The command line that starts `spec` on `path` (port 0: corun picks one)."""
    if spec.is_corun:
        return [
            sys.executable, NBDSERVER, path, "--port", "0",
            "--iothreads", str(spec.iothreads), "--io", spec.io,
        ]  # fmt: skip
    if spec.key == "nbdkit":
        return ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port),
                "file", path]  # fmt: skip
    argv = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-t", "--shared=8",
            "--cache=writeback", "--aio=threads", path]  # fmt: skip
    if spec.key == "qemu-nbd":
        assert shim is not None
        return ["env", f"LD_PRELOAD={shim}", *argv]  # shown so; run without env
    return argv


class RunningServer:
    """One server's child process on its own copy of the data; stop() ends it."""

    def __init__(self, spec: ServerSpec, path: str, shim: str | None, timeout: float) -> None:
        self.spec = spec
        # A file, not a pipe: a server that logs a lot must never block on it.
        self.errors = tempfile.TemporaryFile()
        port = 0 if spec.is_corun else _free_port()
        argv = server_argv(spec, path, port, shim)
        env = None
        if argv[0] == "env":
            env = {**os.environ, "LD_PRELOAD": argv[1].split("=", 1)[1]}
            argv = argv[2:]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if spec.is_corun else subprocess.DEVNULL,
            stderr=self.errors,
            env=env,
            preexec_fn=_die_with_parent,
        )
        try:
            self.port = self._read_port(timeout) if spec.is_corun else port
            self._wait_until_accepting(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def _read_port(self, timeout: float) -> int:
        """Wait for nbdserver.py's "listening on HOST:PORT, ..." line."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"no 'listening on' line within {timeout:g} s {self.stderr()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"exited before listening: {self.stderr()}")
            data += chunk
        line = data.split(b"\n", 1)[0].decode(errors="replace")
        match = re.match(r"listening on [\d.]+:(\d+)", line)
        if not match:
            raise RuntimeError(f"unexpected first line {line!r} {self.stderr()}")
        return int(match.group(1))

    def _wait_until_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not accepting within {timeout:g} s: {self.stderr()}")
            time.sleep(0.05)

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid)

    def stderr(self) -> str:
        """The end of what the server wrote on stderr so far."""
        try:
            self.errors.seek(0)
            return self.errors.read().decode(errors="replace").strip()[-2000:]
        except ValueError:
            return ""  # closed

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self.errors.close()


# -- the clients -----------------------------------------------------------------


def _run_client(argv: list[str], timeout: float) -> tuple[str, float]:
    """Run a client to the end; its stdout and its wall time in seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"`{' '.join(argv)}` did not finish within {timeout:g} s (killed)"
        ) from None
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()[-1000:]}"
        )
    return proc.stdout, wall


def bench_argv(uri: str, write: bool, depth: int, count: int) -> list[str]:
    return [
        "qemu-img", "bench", "-f", "raw", "-s", str(BLOCK), "-S", str(STEP),
        "-c", str(count), "-d", str(depth), *(["-w"] if write else []), uri,
    ]  # fmt: skip


def qemu_img_bench(uri: str, write: bool, depth: int, count: int, timeout: float) -> float:
    """IOPS of one `qemu-img bench` run, from the time it reports."""
    argv = bench_argv(uri, write, depth, count)
    out, _ = _run_client(argv, timeout)
    match = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not match:
        raise RuntimeError(f"`{' '.join(argv)}` printed no run time: {out.strip()[-500:]!r}")
    return count / max(float(match.group(1)), 1e-6)


def copy_argv(uri: str, write: bool, connections: int, data: str) -> list[str]:
    src, dst = (data, uri) if write else (uri, "null:")
    c = str(connections)
    return ["nbdcopy", "--no-extents", "-C", c, "-T", c, src, dst]


def nbdcopy(uri: str, write: bool, connections: int, data: str, size: int, timeout: float) -> float:
    """MB/s (10^6 bytes per second) of one whole-export nbdcopy, by wall clock."""
    _, wall = _run_client(copy_argv(uri, write, connections, data), timeout)
    return size / wall / 1e6


# -- a round: start, drive, stop, check ----------------------------------------------


@dataclass
class Result:
    """One server in one case: each round's rate and server CPU per unit."""

    spec: ServerSpec
    case: Case
    runs: list[float] = field(default_factory=list)
    # Server CPU µs per 4k request (iops) or per MiB (seq), per round.
    cpu: list[float] = field(default_factory=list)
    error: str | None = None

    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else math.nan

    def median_cpu(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan


@dataclass
class Settings:
    servers: list[ServerSpec]
    cases: list[Case] = field(default_factory=lambda: list(CASES))
    repeat: int = 3
    size: int = 1 << 30
    count: int = 20_000
    timeout: float = 300.0
    json: bool = False
    quick: bool = False
    workdir: str = ""
    data: str = ""  # the data file every server's copy is made from
    shim: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False


def fresh_copy(src: str, dst: str) -> None:
    """Copy `src` to `dst` and fsync it: its pages end up clean and cached."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_contents(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def run_case(server: RunningServer, case: Case, s: Settings) -> tuple[float, float | None]:
    """One case against a running server: its rate and server CPU µs per unit."""
    before = server.cpu()
    if case.kind == "iops":
        rate = qemu_img_bench(server.uri, case.write, case.depth, s.count, s.timeout)
        units = s.count
    else:
        rate = nbdcopy(server.uri, case.write, case.connections, s.data, s.size, s.timeout)
        units = s.size >> 20
    after = server.cpu()
    if before is None or after is None:
        return rate, None
    return rate, (after - before) * 1e6 / units


def one_server_round(spec: ServerSpec, s: Settings, results: dict[tuple[str, str], Result]) -> None:
    """Fresh copy, start, warm up, every case, stop, check the copy, delete it."""
    path = os.path.join(s.workdir, f"{spec.key}.img")
    server: RunningServer | None = None

    def fail(why: str) -> None:
        for case in s.cases:
            results[spec.key, case.key].error = results[spec.key, case.key].error or why

    try:
        fresh_copy(s.data, path)
        try:
            server = RunningServer(spec, path, s.shim, timeout=30)
        except RuntimeError as exc:
            fail(f"did not start: {exc}")
            return
        qemu_img_bench(server.uri, False, 16, min(s.count, 2000), s.timeout)  # warm-up
        for case in s.cases:
            r = results[spec.key, case.key]
            try:
                rate, cpu = run_case(server, case, s)
            except RuntimeError as exc:
                r.error = str(exc)
                continue
            r.runs.append(rate)
            if cpu is not None:
                r.cpu.append(cpu)
            if server.proc.poll() is not None:
                fail(f"exited with {server.proc.returncode} during {case.key}: {server.stderr()}")
                return
        server.stop()
        if any(c.kind == "seq" and c.write for c in s.cases) and not same_contents(s.data, path):
            fail("data check: the export differs from the data file after nbdcopy wrote it")
    except RuntimeError as exc:
        fail(str(exc))
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(OSError):
            os.unlink(path)


def run_all(s: Settings) -> dict[tuple[str, str], Result]:
    results = {(spec.key, case.key): Result(spec, case) for spec in s.servers for case in s.cases}
    try:
        for round_ in range(s.repeat):
            for spec in s.servers:
                if all(results[spec.key, c.key].error for c in s.cases):
                    continue  # failed entirely once: not again
                if not s.json:
                    print(
                        f"round {round_ + 1}/{s.repeat}: {spec.label} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                one_server_round(spec, s, results)
    except KeyboardInterrupt:
        s.interrupted = True  # the servers were stopped on the way out
    return results


# -- reporting -----------------------------------------------------------------------


def ratio_rows(results: dict[tuple[str, str], Result], s: Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for spec in s.servers:
        if spec.key == REFERENCE:
            continue
        for case in s.cases:
            a, b = results[spec.key, case.key], results.get((REFERENCE, case.key))
            if b is None or not a.runs or not b.runs:
                continue
            value = a.median() / b.median()
            target = case.target if spec.is_corun else None
            rows.append(
                {
                    "ratio": f"{spec.label} / {BY_KEY[REFERENCE].label}",
                    "numerator": spec.key,
                    "denominator": REFERENCE,
                    "case": case.key,
                    "value": value,
                    "target": target,
                    "met": None if target is None else value >= target,
                }
            )
    return rows


def _fmt_rate(case: Case, value: float) -> str:
    return f"{value / 1000:.1f}k" if case.kind == "iops" else f"{value:.0f}"


def shown_argv(spec: ServerSpec, s: Settings) -> str:
    """How `spec` was started, as a user would type it from the project's root."""
    argv = server_argv(spec, "FILE", 0, s.shim and "nodelay.so")
    text = " ".join("python" if a == sys.executable else a for a in argv)
    return text.replace(NBDSERVER, "examples/nbdserver.py").replace("-p 0 ", "-p PORT ")


def table(results: dict[tuple[str, str], Result], s: Settings) -> str:
    cw = max(11, *(len(c.header) + 2 for c in s.cases))
    width = max(len(spec.label) for spec in s.servers) + 2
    head = f"{'server':<{width}}" + "".join(f"{c.header:>{cw}}" for c in s.cases)
    rule = "-" * len(head)

    def block(title: str, cell: Callable[[Result], str]) -> list[str]:
        lines = [title, head, rule]
        for spec in s.servers:
            line = f"{spec.label:<{width}}"
            line += "".join(f"{cell(results[spec.key, c.key]):>{cw}}" for c in s.cases)
            lines.append(line)
        return [*lines, ""]

    out = [
        f"nbdbench: {s.size >> 20} MiB export, qemu-img bench -c {s.count} (4k, strided), "
        f"nbdcopy of the whole export; medians of {s.repeat} interleaved rounds"
        + (" (--quick: indicative only)" if s.quick else ""),
        "",
    ]
    out += block(
        "median: IOPS (rd4k/wr4k: qemu-img bench, d = depth), MB/s (seq: nbdcopy, c = connections)",
        lambda r: _fmt_rate(r.case, r.median()) if r.runs else "FAILED",
    )
    if s.repeat > 1:
        out += block(
            "spread: min-max of the rounds",
            lambda r: (
                f"{_fmt_rate(r.case, min(r.runs)).rstrip('k')}-{_fmt_rate(r.case, max(r.runs))}"
                if r.runs
                else "-"
            ),
        )
    out += block(
        "server CPU (user+sys of the server process): µs per 4k request; µs per MiB for seq",
        lambda r: f"{r.median_cpu():.0f}" if r.cpu else "-",
    )
    rows = ratio_rows(results, s)
    if rows:
        by = {(row["numerator"], row["case"]): row for row in rows}
        out.append(f"ratio: median / {BY_KEY[REFERENCE].label}'s median")
        out += [head, rule]
        for spec in s.servers:
            if spec.key == REFERENCE:
                continue
            cells = []
            for c in s.cases:
                row = by.get((spec.key, c.key))
                cells.append("-" if row is None else f"{row['value']:.2f}")
            out.append(f"{spec.label:<{width}}" + "".join(f"{x:>{cw}}" for x in cells))
        out.append("")
        targeted = [row for row in rows if row["target"] is not None]
        if targeted:
            qualifier = " (indicative only: --quick)" if s.quick else ""
            out.append(
                "targets: corun >= 0.8x nbdkit for 4k IOPS at depth 16, >= 0.9x for "
                f"sequential{qualifier}"
            )
            for spec in s.servers:
                mine = [row for row in targeted if row["numerator"] == spec.key]
                if not mine:
                    continue
                missed = [row["case"] for row in mine if not row["met"]]
                verdict = "all met" if not missed else "MISSED: " + ", ".join(missed)
                out.append(
                    f"  {spec.label:<{width}} {len(mine) - len(missed)}/{len(mine)} {verdict}"
                )
            out.append("")
    out.append("how the servers were run (FILE: a fresh copy of the data, PORT: a free port):")
    for spec in s.servers:
        out.append(f"  {spec.key}: {shown_argv(spec, s)}")
    for note in s.notes:
        out.append(f"note: {note}")
    for key, why in s.skipped.items():
        out.append(f"note: skipped {key}: {why}")
    out.append(
        f"note: {os.cpu_count()} CPUs, shared by server and client; 4k cases: "
        f"{' '.join(bench_argv('URI', False, 16, s.count))} (and -d 1, -w); seq: "
        f"{' '.join(copy_argv('URI', False, 4, 'DATA'))} (and DATA URI, -C/-T 1)"
    )
    if s.interrupted:
        out.append("note: interrupted (Ctrl-C): the rounds that finished are shown")
    return "\n".join(out)


def json_lines(results: dict[tuple[str, str], Result], s: Settings) -> list[str]:
    lines = [
        json.dumps(
            {
                "setup": {
                    "size": s.size,
                    "count": s.count,
                    "repeat": s.repeat,
                    "quick": s.quick,
                    "servers": {spec.key: shown_argv(spec, s) for spec in s.servers},
                    "skipped": s.skipped,
                    "notes": s.notes,
                    "interrupted": s.interrupted,
                }
            }
        )
    ]
    for spec in s.servers:
        for case in s.cases:
            r = results[spec.key, case.key]
            lines.append(
                json.dumps(
                    {
                        "server": spec.key,
                        "label": spec.label,
                        "case": case.key,
                        "unit": case.unit,
                        "median": r.median() if r.runs else None,
                        "min": min(r.runs) if r.runs else None,
                        "max": max(r.runs) if r.runs else None,
                        "runs": r.runs,
                        "cpu_us": r.median_cpu() if r.cpu else None,
                        "error": r.error,
                    }
                )
            )
    lines += [json.dumps(row) for row in ratio_rows(results, s)]
    return lines


JSON_SETUP_KEYS = [
    ("setup", "{size, count, repeat, quick, servers: {key: command line}, skipped, notes, "
     "interrupted}: the first line"),
]  # fmt: skip
JSON_KEYS = [
    ("server", "the server's key (as --servers takes it)"),
    ("label", "the table's name for it"),
    ("case", "read-4k-d1 ... write-4k-d16 (qemu-img bench), seq-read-c1 ... seq-write-c4 "
     "(nbdcopy)"),
    ("unit", "IOPS or MB/s (10^6 bytes per second)"),
    ("median", "of the rounds (null if every round failed)"),
    ("min", "the slowest round"),
    ("max", "the fastest round"),
    ("runs", "each round's rate"),
    ("cpu_us", "median CPU time of the server process (user + system, all threads) per 4k "
     "request (IOPS cases) or per MiB (MB/s cases), in µs"),
    ("error", "null, or why a run failed"),
]  # fmt: skip
JSON_RATIO_KEYS = [
    ("ratio", "as the text shows it"),
    ("numerator", "a server key"),
    ("denominator", "nbdkit"),
    ("case", "a case key"),
    ("value", "median of the numerator / the denominator's"),
    ("target", "the issue's minimum (corun rows, depth-16 and sequential cases), or null"),
    ("met", "true/false, or null without a target"),
]


def _keys_text(keys: list[tuple[str, str]]) -> list[str]:
    lines: list[str] = []
    for key, doc in keys:
        lines += textwrap.wrap(
            doc, width=79, initial_indent=f"  {key:<11} ", subsequent_indent=" " * 14
        )
    return lines


# -- the command line ------------------------------------------------------------------


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


def parse_size(text: str) -> int:
    """ "1G", "256M", "64m": a size in whole MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([MmGg])(?:i?B)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M or 1G")
    size = int(match.group(1)) << (20 if match.group(2) in "Mm" else 30)
    if size < 16 << 20:
        raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: >= 16M)")
    return size


def build_parser() -> argparse.ArgumentParser:
    keys = ", ".join(s.key for s in SERVERS)
    defaults = ",".join(s.key for s in SERVERS if s.default)
    parser = argparse.ArgumentParser(
        prog="nbdbench.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Serve the same data file with examples/nbdserver.py (corun: 1 and 2 IOThreads, "
            "I/O inline and in threads), nbdkit's file plugin and qemu-nbd; measure 4k "
            "IOPS with qemu-img bench (depth 1 and 16, read and write) and sequential "
            "MB/s with nbdcopy (1 and 4 connections); report medians, spreads, server "
            "CPU and ratios to nbdkit.",
            width=79,
        ),
        epilog="\n".join(
            [
                textwrap.fill(
                    f"Servers: {keys}. qemu-nbd runs with an LD_PRELOAD shim (built with "
                    "gcc at run time) that sets TCP_NODELAY, which qemu-nbd 7.2 never does; "
                    "qemu-nbd-plain (not in the default set) runs it as shipped. Servers "
                    "that are not installed are skipped.",
                    79,
                ),
                "",
                textwrap.fill(
                    "--json prints JSON Lines: a setup object, then one object per server "
                    "and case, then one per ratio. The first line's key:",
                    79,
                ),
                *_keys_text(JSON_SETUP_KEYS),
                "A server and case's keys:",
                *_keys_text(JSON_KEYS),
                "A ratio's keys:",
                *_keys_text(JSON_RATIO_KEYS),
                "",
                textwrap.fill(
                    "Exit status: 0 every run finished (a missed target is not a failure), "
                    "1 a run failed, 2 a bad command line or no qemu-img/nbdcopy, 130 "
                    "interrupted.",
                    79,
                ),
            ]
        ),
    )
    parser.add_argument(
        "--servers", default=defaults, metavar="S,...",
        help=f"servers to run, comma-separated (default: {defaults})",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=_positive(int), default=None, metavar="N",
        help="interleaved rounds; medians are reported (default: 3; --quick: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=parse_size, default=None, metavar="SIZE",
        help="the export's size, e.g. 256M or 1G (default: 1G; --quick: 64M)",
    )  # fmt: skip
    parser.add_argument(
        "--count", type=_positive(int), default=None, metavar="N",
        help="qemu-img bench -c: requests per 4k run (default: 20000; --quick: 2000)",
    )  # fmt: skip
    parser.add_argument(
        "--dir", metavar="DIR",
        help="where the data file and the servers' copies go (default: the system's "
        "temporary directory); a directory of its own is made in it and removed at the end",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=_positive(float), default=300.0, metavar="S",
        help="seconds one client run may take before it is killed (default: 300)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a small fast run (64M, 2000 requests, 1 round): a smoke test, not a measurement",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="JSON Lines (keys below)")
    return parser


def make_data_file(path: str, size: int) -> None:
    """Random bytes, written out in full: no holes, nothing to compress or skip."""
    chunk = 1 << 20
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        f.flush()
        os.fsync(f.fileno())


def build_shim(workdir: str) -> tuple[str | None, str]:
    """Compile NODELAY_SHIM_C into workdir: (its path, "") or (None, why not)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None, "no gcc to build the TCP_NODELAY shim (apt-get install gcc)"
    src = os.path.join(workdir, "nodelay.c")
    out = os.path.join(workdir, "nodelay.so")
    with open(src, "w") as f:
        f.write(NODELAY_SHIM_C)
    proc = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", out, src, "-ldl"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None, f"the TCP_NODELAY shim did not compile: {proc.stderr.strip()[-500:]}"
    return out, ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a refused command line (2)
        return exc.code if isinstance(exc.code, int) else 2
    wanted = [k for k in args.servers.split(",") if k]
    unknown = [k for k in wanted if k not in BY_KEY]
    if unknown or not wanted:
        print(
            f"nbdbench.py: error: unknown server(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(BY_KEY)}",
            file=sys.stderr,
        )
        return 2
    for tool in ("qemu-img", "nbdcopy"):
        if shutil.which(tool) is None:
            print(
                f"nbdbench.py: error: no {tool} on PATH "
                "(Debian: apt-get install qemu-utils libnbd-bin)",
                file=sys.stderr,
            )
            return 2
    if args.dir is not None and not os.path.isdir(args.dir):
        print(f"nbdbench.py: error: --dir {args.dir}: no such directory", file=sys.stderr)
        return 2
    s = Settings(
        servers=[],
        repeat=args.repeat or (1 if args.quick else 3),
        size=args.size or ((64 << 20) if args.quick else (1 << 30)),
        count=args.count or (2000 if args.quick else 20_000),
        timeout=args.timeout,
        json=args.json,
        quick=args.quick,
    )
    # SIGTERM ends the tool as Ctrl-C does: the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    s.workdir = tempfile.mkdtemp(prefix="nbdbench-", dir=args.dir)
    try:
        for key in wanted:
            spec = BY_KEY[key]
            binary = "nbdkit" if key == "nbdkit" else "qemu-nbd" if "qemu" in key else None
            if binary and shutil.which(binary) is None:
                s.skipped[key] = f"no {binary} on PATH"
                continue
            if key == "qemu-nbd" and s.shim is None:
                s.shim, why = build_shim(s.workdir)
                if s.shim is None:
                    s.skipped[key] = f"{why}; --servers qemu-nbd-plain runs it as shipped"
                    continue
            s.servers.append(spec)
        if not s.servers:
            print("nbdbench.py: error: no server to run: " + "; ".join(
                f"{k}: {why}" for k, why in s.skipped.items()), file=sys.stderr)  # fmt: skip
            return 2
        if REFERENCE not in [spec.key for spec in s.servers]:
            s.notes.append("nbdkit not run: no ratios")
        if any(spec.key == "qemu-nbd" for spec in s.servers):
            s.notes.append(
                "qemu-nbd 7.2 sets no TCP_NODELAY; its row runs with LD_PRELOAD=nodelay.so, "
                "a shim built here (gcc -shared -fPIC -O2) from the C source in "
                "tools/nbdbench.py that sets TCP_NODELAY on every TCP socket qemu-nbd accepts"
            )
        if any(spec.key == "qemu-nbd-plain" for spec in s.servers):
            s.notes.append(
                "qemu-nbd-plain: stock qemu-nbd, no TCP_NODELAY (Nagle + delayed ACK "
                "stall replies at depth > 1)"
            )
        s.notes.append(
            "4k offsets are strided, not random: qemu-img bench has no random mode; "
            f"-S {STEP} ({STEP // BLOCK} blocks) jumps ~{STEP / 1e6:.0f} MB per request"
        )
        s.notes.append("nbdkit: its default 16 threads per connection (thread model parallel)")
        s.data = os.path.join(s.workdir, "data.img")
        if not s.json:
            print(f"making {s.size >> 20} MiB of random data ...", file=sys.stderr, flush=True)
        try:
            make_data_file(s.data, s.size)
        except KeyboardInterrupt:
            return 130
        results = run_all(s)
    finally:
        shutil.rmtree(s.workdir, ignore_errors=True)
    if args.json:
        for line in json_lines(results, s):
            print(line)
    else:
        print(table(results, s))
    sys.stdout.flush()  # before a late SIGTERM could cut the output short
    failed = [r for r in results.values() if r.error]
    for r in failed:
        print(f"FAILED {r.spec.label} {r.case.key}: {r.error}", file=sys.stderr)
    if s.interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
