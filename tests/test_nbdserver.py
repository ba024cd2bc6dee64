"""examples/nbdserver.py against real NBD clients and the protocol by hand.

- real clients (Debian's libnbd-bin and qemu-utils; .ci/run installs them):
  `nbdinfo` sees the export's size and flags (read-write and read-only,
  `--list`); `qemu-img convert` out and back is byte-identical (zero runs
  go as WRITE_ZEROES onto a non-zero export); `qemu-io` write/read with
  patterns, write -z, discard, flush, write -f (FUA); `nbdcopy` with four
  connections over two IOThreads, both ways; `qemu-img map` reports a
  sparse file's holes through BLOCK_STATUS; a `nbdcopy` or `qemu-img`
  killed with SIGKILL while one of its writes is on the disk leaves the
  server serving others. Parametrised over `io="inline"` and `"threads"`.
- the protocol by hand (tests/nbdclient.py): the fixed newstyle handshake
  (LIST, INFO on an unknown export then a GO that works, an unknown
  option, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, EXPORT_NAME with and
  without NO_ZEROES, ABORT); bad requests get the spec's error and the
  connection lives on, in simple and structured replies; an oversized
  write's payload is skipped; 200 pipelined reads and writes are each
  answered once; DISC lets in-flight replies out first; a bad magic ends
  the connection; a stalled handshake or a client gone mid-payload does
  not stop others; malformed options are refused and haggling goes on;
  close() ends connections in every phase and may be called twice; the
  command line serves until SIGINT/SIGTERM.

Every server binds 127.0.0.1, exports a file in tmp_path of a few MiB and
is closed by its test.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdclient import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EPERM,
    FLAG_CAN_MULTI_CONN,
    FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES,
    FLAG_READ_ONLY,
    FLAG_SEND_DF,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_ERROR,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    NBDClient,
    Reply,
)

ROOT = Path(__file__).resolve().parent.parent
QUICK = 10.0
TOOL_TIMEOUT = 25.0
KiB = 1024
MiB = 1024 * KiB
MAX_PAYLOAD = 32 * MiB
NBDSERVER_CMD = [sys.executable, str(ROOT / "examples" / "nbdserver.py")]

pytestmark = pytest.mark.timeout(30)


def load_nbdserver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nbdserver", ROOT / "examples" / "nbdserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nbdserver = load_nbdserver()


@pytest.fixture
def start() -> Iterator[Callable[..., Any]]:
    """start(path, **kwargs) -> a running NBDServer on a free port, closed after the test."""
    servers: list[Any] = []

    def starter(path: Path, **kwargs: Any) -> Any:
        server = nbdserver.start(str(path), **kwargs)
        servers.append(server)
        return server

    yield starter
    for server in servers:
        server.close(grace=0.5)


def wait_idle(server: Any) -> None:
    """Wait until the server has no connection open (every handler has returned)."""
    assert server.wait_idle(QUICK), f"{server!r} still has {server.connections} connection(s)"
    assert server.connections == 0


def make_disk(tmp_path: Path, size: int, name: str = "disk.img", fill: bytes | None = None) -> Path:
    """A file of `size` bytes: sparse zeros, or `fill` repeated."""
    path = tmp_path / name
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write((fill * (size // len(fill) + 1))[:size])
    return path


def random_disk(tmp_path: Path, size: int, name: str, seed: int) -> Path:
    path = tmp_path / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def uri(server: Any, name: str = "") -> str:
    host, port = server.address[:2]
    return f"nbd://{host}:{port}/{name}"


def needs(tool: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} is not installed (Debian: apt-get install {package}; .ci/run installs it)",
    )


needs_nbdinfo = needs("nbdinfo", "libnbd-bin")
needs_nbdcopy = needs("nbdcopy", "libnbd-bin")
needs_qemu_img = needs("qemu-img", "qemu-utils")
needs_qemu_io = needs("qemu-io", "qemu-utils")

io_modes = pytest.mark.parametrize("io", ["inline", "threads"])


def run(*argv: str) -> str:
    """Run a client to completion; its stdout. Fails the test on a non-zero exit."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    assert done.returncode == 0, f"{argv} exited {done.returncode}: {done.stderr}{done.stdout}"
    return done.stdout


def file_extents(path: Path) -> list[tuple[int, int, bool]] | None:
    """(start, length, is_data) runs of a file from SEEK_DATA/SEEK_HOLE; None without them."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        runs: list[tuple[int, int, bool]] = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    data = size
                else:
                    return None
            if data > pos:
                runs.append((pos, data - pos, False))
                pos = data
            else:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                runs.append((pos, hole - pos, True))
                pos = hole
        return runs
    finally:
        os.close(fd)


def sparse_disk(tmp_path: Path) -> tuple[Path, list[tuple[int, int, bool]]]:
    """A 4 MiB file with three data extents; its runs as the file system reports them.

    Skips when the file system cannot tell holes (no SEEK_DATA, or it
    reports the holes as data): there is nothing for BLOCK_STATUS to show.
    """
    path = make_disk(tmp_path, 4 * MiB, "sparse.img")
    written = [(64 * KiB, 64 * KiB), (1 * MiB, 4 * KiB), (3 * MiB, 1 * MiB)]
    with open(path, "r+b") as f:
        for offset, length in written:
            f.seek(offset)
            f.write(b"\xa5" * length)
    intended = [
        (0, 64 * KiB, False),
        (64 * KiB, 64 * KiB, True),
        (128 * KiB, 1 * MiB - 128 * KiB, False),
        (1 * MiB, 4 * KiB, True),
        (1 * MiB + 4 * KiB, 2 * MiB - 4 * KiB, False),
        (3 * MiB, 1 * MiB, True),
    ]
    runs = file_extents(path)
    if runs is None:
        pytest.skip(f"lseek(SEEK_DATA) is not supported on {tmp_path}'s file system")
    if not any(not is_data for _, _, is_data in runs):
        pytest.skip(f"{tmp_path}'s file system reports no holes in a sparse file")
    if runs != intended:  # coarser allocation than 4 KiB: the file system's runs are the truth
        assert sum(length for _, length, _ in runs) == 4 * MiB
    return path, runs


# -- real clients: nbdinfo -----------------------------------------------------------


@needs_nbdinfo
@pytest.mark.parametrize("readonly", [False, True], ids=["read-write", "read-only"])
def test_nbdinfo_lists_the_export_size_and_flags(
    start: Callable[..., Any], tmp_path: Path, readonly: bool
) -> None:
    size = 3 * MiB + 512  # not a power of two: the size is the file's, not rounded
    server = start(make_disk(tmp_path, size), name="disk0", readonly=readonly)
    (info,) = json.loads(run("nbdinfo", "--json", uri(server, "disk0")))["exports"]
    assert info["export-name"] == "disk0"
    assert info["export-size"] == size
    assert info["is_read_only"] is readonly
    assert info["can_flush"] is True
    assert info["can_fua"] is True
    assert info["can_multi_conn"] is True
    assert info["can_trim"] is not readonly
    assert info["can_zero"] is not readonly
    assert info["can_df"] is True  # nbdinfo negotiates structured replies
    assert "base:allocation" in info["contexts"]
    assert info["block_size_minimum"] == 1
    assert info["block_size_preferred"] == 4096
    assert info["block_size_maximum"] == MAX_PAYLOAD

    listing = json.loads(run("nbdinfo", "--list", "--json", uri(server)))
    assert listing["protocol"] == "newstyle-fixed"
    assert listing["structured"] is True
    (listed,) = listing["exports"]
    assert listed["export-name"] == "disk0"
    assert listed["description"] == f"corun NBD export of {tmp_path / 'disk.img'}"
    assert listed["export-size"] == size
    assert listed["is_read_only"] is readonly


# -- real clients: qemu-img, qemu-io ---------------------------------------------------


@needs_qemu_img
@io_modes
def test_qemu_img_convert_out_and_back_is_byte_identical(
    start: Callable[..., Any], tmp_path: Path, io: str
) -> None:
    size = 4 * MiB
    source = bytearray(random.Random(2).randbytes(size))
    source[1 * MiB : 2 * MiB] = bytes(MiB)  # a zero run: qemu-img sends it as WRITE_ZEROES
    src = tmp_path / "src.img"
    src.write_bytes(source)
    export = make_disk(tmp_path, size, "export.img", fill=b"\xff")  # not zero to begin with
    server = start(export, io=io)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(server))
    assert export.read_bytes() == source
    back = tmp_path / "back.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(server), str(back))
    assert back.read_bytes() == source


@needs_qemu_io
@io_modes
def test_qemu_io_patterns_zeroes_discard_flush_fua(
    start: Callable[..., Any], tmp_path: Path, io: str
) -> None:
    export = make_disk(tmp_path, 4 * MiB, fill=b"\x11")
    server = start(export, io=io)
    commands = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -z 1M 64k",  # WRITE_ZEROES (may punch a hole)
        "read -P 0 1M 64k",
        "discard 0 64k",  # TRIM: a hole, read back as zeros
        "read -P 0 0 64k",
        "read -P 0xab 64k 960k",
        "flush",
        "write -f -P 0xcd 2M 4k",  # FUA
        "read -P 0xcd 2M 4k",
        "read -P 0x11 3M 1M",
    ]
    argv = ["qemu-io", "-f", "raw", "-d", "unmap"]
    for command in commands:
        argv += ["-c", command]
    out = run(*argv, uri(server))
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    assert len(re.findall(r"^read (\d+)/\1 bytes", out, re.M)) == 6, out
    assert len(re.findall(r"^wrote (\d+)/\1 bytes", out, re.M)) == 3, out
    assert "discard 65536/65536 bytes at offset 0" in out, out
    expected = bytearray(b"\x11" * 4 * MiB)
    expected[0 : 1 * MiB] = b"\xab" * MiB
    expected[0 : 64 * KiB] = bytes(64 * KiB)
    expected[1 * MiB : 1 * MiB + 64 * KiB] = bytes(64 * KiB)
    expected[2 * MiB : 2 * MiB + 4 * KiB] = b"\xcd" * 4 * KiB
    assert export.read_bytes() == expected


# -- real clients: nbdcopy -------------------------------------------------------------


@needs_nbdcopy
@io_modes
def test_nbdcopy_four_connections_over_two_iothreads(
    start: Callable[..., Any], tmp_path: Path, io: str
) -> None:
    size = 4 * MiB
    src = random_disk(tmp_path, size, "src.img", seed=4)
    export = make_disk(tmp_path, size, "export.img")
    server = start(export, iothreads=2, io=io)
    run("nbdcopy", "--connections=4", "--threads=4", str(src), uri(server))
    assert export.read_bytes() == src.read_bytes()
    copied = server.accepted
    # Four connections (nbdcopy caps them at its threads: --threads=4 on two cores).
    assert copied >= 4
    back = make_disk(tmp_path, size, "back.img", fill=b"\x77")
    run("nbdcopy", "--connections=4", "--threads=4", uri(server), str(back))
    assert back.read_bytes() == src.read_bytes()
    assert server.accepted >= copied + 4
    wait_idle(server)


# -- real clients: qemu-img map (BLOCK_STATUS) ----------------------------------------


def merge_map(entries: list[dict[str, Any]]) -> list[tuple[int, int, bool]]:
    """qemu-img map's JSON as (start, length, is_data) runs, adjacent alike runs merged."""
    runs: list[tuple[int, int, bool]] = []
    for e in entries:
        is_data = bool(e["data"])
        assert e["zero"] is not is_data, e  # base:allocation: a hole reads as zeros
        if runs and runs[-1][2] == is_data and runs[-1][0] + runs[-1][1] == e["start"]:
            start_, length, _ = runs.pop()
            runs.append((start_, length + e["length"], is_data))
        else:
            runs.append((e["start"], e["length"], is_data))
    return runs


@needs_qemu_img
@io_modes
def test_qemu_img_map_reports_the_holes_of_a_sparse_file(
    start: Callable[..., Any], tmp_path: Path, io: str
) -> None:
    path, runs = sparse_disk(tmp_path)
    server = start(path, io=io, readonly=True)
    entries = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri(server)))
    assert merge_map(entries) == runs


# -- real clients killed mid-write ------------------------------------------------------


@pytest.mark.parametrize(
    "tool",
    [
        pytest.param("nbdcopy", marks=needs_nbdcopy),
        pytest.param("qemu-img", marks=needs_qemu_img),
    ],
)
@io_modes
def test_client_killed_mid_write_leaves_the_server_serving(
    start: Callable[..., Any], tmp_path: Path, tool: str, io: str
) -> None:
    size = 8 * MiB
    src = random_disk(tmp_path, size, "src.img", seed=6)
    export = make_disk(tmp_path, size, "export.img")
    server = start(export, io=io)
    # The first WRITE to reach the disk waits there until the client is dead:
    # the kill lands while that write is in progress and others are in flight.
    export_write = server.export.write
    entered, release = threading.Event(), threading.Event()
    first = threading.Lock()

    def write(data: memoryview, offset: int, fua: bool) -> None:
        if first.acquire(blocking=False):
            entered.set()
            release.wait(QUICK)
        export_write(data, offset, fua)

    server.export.write = write
    if tool == "nbdcopy":
        argv = ["nbdcopy", str(src), uri(server)]
    else:
        argv = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(server)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert entered.wait(QUICK), f"{tool} sent no WRITE"
        proc.kill()
        assert proc.wait(QUICK) == -signal.SIGKILL
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_idle(server)  # every connection of the dead client has ended
    before = server.accepted
    with NBDClient(server.address) as c:
        c.connect()
        c.write(0, b"after" * 1000)
        assert c.read(0, 5000) == b"after" * 1000
        assert c.read(size - 4096, 4096) in (src.read_bytes()[-4096:], bytes(4096))
    assert server.accepted == before + 1
    wait_idle(server)


# -- the handshake by hand -------------------------------------------------------------


def test_handshake_list_info_unknown_export_then_go(
    start: Callable[..., Any], tmp_path: Path
) -> None:
    size = 1 * MiB + 4096
    path = make_disk(tmp_path, size, fill=b"hello!")
    server = start(path, name="disk0")
    description = f"corun NBD export of {path}".encode()
    with NBDClient(server.address) as c:
        assert c.handshake() == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

        (server_entry, ack) = c.option(OPT_LIST)
        assert server_entry.kind == REP_SERVER
        assert server_entry.data == struct.pack(">I", 5) + b"disk0" + description
        assert ack.kind == REP_ACK and ack.data == b""

        (unknown,) = c.option(OPT_INFO, c.info_data(b"nope", (INFO_NAME,)))
        assert unknown.kind == REP_ERR_UNKNOWN

        (unsupported,) = c.option(99, b"whatever")
        assert unsupported.kind == REP_ERR_UNSUP
        (tls,) = c.option(OPT_STARTTLS)
        assert tls.kind in (REP_ERR_POLICY, REP_ERR_UNSUP)
        (bad_list,) = c.option(OPT_LIST, b"x")
        assert bad_list.kind == REP_ERR_INVALID

        # INFO answers like GO but stays in the option phase.
        wanted = (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)
        info = c.option(OPT_INFO, c.info_data(b"disk0", wanted))
        assert info[-1].kind == REP_ACK
        infos = {struct.unpack_from(">H", r.data)[0]: r.data for r in info[:-1]}
        assert all(r.kind == REP_INFO for r in info[:-1])
        simple_flags = (
            FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
        )
        assert infos == {
            INFO_EXPORT: struct.pack(">HQH", INFO_EXPORT, size, simple_flags),
            INFO_NAME: struct.pack(">H", INFO_NAME) + b"disk0",
            INFO_DESCRIPTION: struct.pack(">H", INFO_DESCRIPTION) + description,
            INFO_BLOCK_SIZE: struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_PAYLOAD),
        }

        c.start_structured()
        (again,) = c.option(OPT_STRUCTURED_REPLY)
        assert again.kind == REP_ERR_INVALID  # negotiated once only

        c.go(b"")  # "" is the default export
        assert c.size == size
        assert c.flags == simple_flags | FLAG_SEND_DF  # DF comes with structured replies
        assert c.read(size - 6, 6) == (b"hello!" * (size // 6 + 1))[size - 6 : size]


def test_meta_contexts_and_block_status_by_hand(start: Callable[..., Any], tmp_path: Path) -> None:
    path, runs = sparse_disk(tmp_path)
    server = start(path)
    with NBDClient(server.address) as c:
        c.handshake()
        query = c.meta_data(b"", [b"base:allocation"])
        (refused,) = c.option(OPT_SET_META_CONTEXT, query)
        assert refused.kind == REP_ERR_INVALID  # needs STRUCTURED_REPLY first
        c.start_structured()

        listed = c.option(OPT_LIST_META_CONTEXT, c.meta_data(b"", []))
        assert [(r.kind, r.data[4:]) for r in listed] == [
            (REP_META_CONTEXT, b"base:allocation"),
            (REP_ACK, b""),
        ]
        (unknown_export,) = c.option(
            OPT_SET_META_CONTEXT, c.meta_data(b"nope", [b"base:allocation"])
        )
        assert unknown_export.kind == REP_ERR_UNKNOWN
        (none_of_ours,) = c.option(OPT_SET_META_CONTEXT, c.meta_data(b"", [b"qemu:dirty-bitmap:x"]))
        assert none_of_ours.kind == REP_ACK  # no context selected, not an error

        selected = c.option(OPT_SET_META_CONTEXT, query)
        assert [r.kind for r in selected] == [REP_META_CONTEXT, REP_ACK]
        (context_id,) = struct.unpack_from(">I", selected[0].data)
        assert selected[0].data[4:] == b"base:allocation"
        c.go()

        reply = c.call(CMD_BLOCK_STATUS, 0, c.size)
        assert reply.error == 0
        assert [flags for flags, _, _ in reply.chunks] == [REPLY_FLAG_DONE]
        got_id, extents = reply.extents()
        assert got_id == context_id
        hole = STATE_HOLE | STATE_ZERO
        assert extents == [(length, 0 if is_data else hole) for _, length, is_data in runs]

        # REQ_ONE: one extent, from the offset asked; a range that starts mid-run.
        start_, length, is_data = runs[1]
        reply = c.call(
            CMD_BLOCK_STATUS, start_ + 512, c.size - start_ - 512, flags=CMD_FLAG_REQ_ONE
        )
        assert reply.extents() == (context_id, [(length - 512, 0 if is_data else hole)])
        reply = c.call(CMD_BLOCK_STATUS, 0, 4096)  # shorter than the first run: clipped
        assert reply.extents()[1] == [(4096, 0 if runs[0][2] else hole)]
        for offset, length in [(c.size, 1), (c.size - 4096, 8192)]:
            assert c.call(CMD_BLOCK_STATUS, offset, length).error == EINVAL
        assert c.call(CMD_BLOCK_STATUS, 0, 0).error == EINVAL


@pytest.mark.parametrize("no_zeroes", [True, False], ids=["no-zeroes", "zeroes"])
def test_export_name_with_and_without_no_zeroes(
    start: Callable[..., Any], tmp_path: Path, no_zeroes: bool
) -> None:
    size = 2 * MiB
    server = start(make_disk(tmp_path, size, fill=b"\x42"), name="disk0")
    with NBDClient(server.address) as c:
        c.handshake(no_zeroes=no_zeroes)
        c.send_option(OPT_EXPORT_NAME, b"disk0")
        reply = c.recv_exact(10 if no_zeroes else 134)
        flags = (
            FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
        )
        assert reply == struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))
        # The next bytes are the read's reply: no stray zeros in between.
        assert c.read(0, 4096) == b"\x42" * 4096
    with NBDClient(server.address) as c:
        c.handshake(no_zeroes=no_zeroes)
        c.send_option(OPT_EXPORT_NAME, b"nope")  # no error reply exists: the server hangs up
        assert c.at_eof()
    with NBDClient(server.address) as c:
        c.handshake()
        assert [r.kind for r in c.option(OPT_ABORT)] == [REP_ACK]
        assert c.at_eof()
    with NBDClient(server.address) as c:
        c.recv_exact(18)
        c.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | 1 << 5))  # an unknown client flag
        assert c.at_eof()  # the spec: the server MUST drop the connection
    wait_idle(server)
    assert server.accepted == 4


def test_malformed_options_are_refused_and_haggling_goes_on(
    start: Callable[..., Any], tmp_path: Path
) -> None:
    server = start(make_disk(tmp_path, 1 * MiB, fill=b"o"))
    with NBDClient(server.address) as c:
        c.handshake()
        malformed = [
            (OPT_INFO, b""),
            (OPT_INFO, struct.pack(">I", 100) + b"abc"),  # the name overruns the option
            (OPT_INFO, c.info_data(b"", (INFO_NAME,))[:-1]),  # the count does not match
            (OPT_STRUCTURED_REPLY, b"x"),
        ]
        for option, data in malformed:
            (reply,) = c.option(option, data)
            assert (option, data, reply.kind) == (option, data, REP_ERR_INVALID)
        c.start_structured()
        for data in [b"", struct.pack(">I", 0), c.meta_data(b"", [b"base:allocation"]) + b"!"]:
            (reply,) = c.option(OPT_SET_META_CONTEXT, data)
            assert (data, reply.kind) == (data, REP_ERR_INVALID)
        c.go()
        assert c.read(0, 2) == b"oo"


# -- bad requests by hand ----------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_bad_requests_get_the_spec_error_and_the_connection_lives(
    start: Callable[..., Any], tmp_path: Path, structured: bool
) -> None:
    size = 40 * MiB  # sparse: room for a read longer than the maximum payload
    path = make_disk(tmp_path, size)
    with open(path, "r+b") as f:
        f.write(b"start" * 1000)
    server = start(path)
    with NBDClient(server.address) as c:
        c.connect(structured=structured)
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("read past the end", {"kind": CMD_READ, "offset": size - 512, "length": 1024}, EINVAL),
            ("read at the end", {"kind": CMD_READ, "offset": size, "length": 1}, EINVAL),
            ("read at 2^63", {"kind": CMD_READ, "offset": 1 << 63, "length": 1}, EINVAL),
            (
                "write past the end",
                {"kind": CMD_WRITE, "offset": size - 512, "length": 1024, "payload": b"w" * 1024},
                ENOSPC,
            ),
            (
                "write zeroes past the end",
                {"kind": CMD_WRITE_ZEROES, "offset": size, "length": 4096},
                ENOSPC,
            ),
            ("trim past the end", {"kind": CMD_TRIM, "offset": size - 1, "length": 2}, EINVAL),
            ("unknown command", {"kind": 99, "offset": 0, "length": 512}, EINVAL),
            ("unknown command 5", {"kind": 5, "offset": 0, "length": 0}, EINVAL),
            (
                "unknown read flag",
                {"kind": CMD_READ, "offset": 0, "length": 512, "flags": 1 << 7},
                EINVAL,
            ),
            (
                "NO_HOLE on a write",
                {
                    "kind": CMD_WRITE,
                    "offset": 0,
                    "length": 4,
                    "flags": CMD_FLAG_NO_HOLE,
                    "payload": b"nope",
                },
                EINVAL,
            ),
            (
                "unknown flush flag",
                {"kind": CMD_FLUSH, "flags": 1 << 9},
                EINVAL,
            ),
            (
                "read over the maximum payload",
                {"kind": CMD_READ, "offset": 0, "length": MAX_PAYLOAD + 1},
                EINVAL,
            ),
            (
                "block status without a meta context",
                {"kind": CMD_BLOCK_STATUS, "offset": 0, "length": 4096},
                EINVAL,
            ),
        ]
        if not structured:
            cases.append(
                (
                    "DF without structured replies",
                    {"kind": CMD_READ, "offset": 0, "length": 512, "flags": CMD_FLAG_DF},
                    EINVAL,
                )
            )
        for what, request, error in cases:
            reply = c.call(**request)
            assert (what, reply.error, reply.data) == (what, error, b"")
            if structured:
                ((flags, kind, _),) = reply.chunks
                assert (what, flags, kind) == (what, REPLY_FLAG_DONE, REPLY_TYPE_ERROR)
                assert reply.message, what
            else:
                assert not reply.structured, what
            # In step with the stream: the next request gets the right answer.
            assert c.read(0, 5000) == b"start" * 1000, what

        # Zero-length requests: unspecified, but the server must not hang up.
        for kind in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_FLUSH):
            reply = c.call(kind, 4096, 0)
            assert reply.data == b""
            assert c.read(0, 5000) == b"start" * 1000, kind
        # The maximum payload itself is fine.
        data = c.read(0, MAX_PAYLOAD)
        assert data[:5000] == b"start" * 1000 and data[5000:] == bytes(MAX_PAYLOAD - 5000)
        del data
        # A write larger than the maximum payload: its payload is read and dropped.
        cookie = c.send(CMD_WRITE, 0, MAX_PAYLOAD + 4096, payload=b"\x5a" * (MAX_PAYLOAD + 4096))
        reply = c.reply()
        assert (reply.cookie, reply.error) == (cookie, EINVAL)
        assert c.read(0, 5000) == b"start" * 1000
        c.write(size - 4096, b"e" * 4096, flags=CMD_FLAG_FUA)  # the last block is writable
        assert c.read(size - 4096, 4096) == b"e" * 4096
    with open(path, "rb") as f:
        assert f.read(5000) == b"start" * 1000
        f.seek(size - 4096)
        assert f.read() == b"e" * 4096


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_read_only_export_refuses_writes_with_eperm(
    start: Callable[..., Any], tmp_path: Path, structured: bool
) -> None:
    path = make_disk(tmp_path, 1 * MiB, fill=b"ro")
    server = start(path, readonly=True)
    with NBDClient(server.address) as c:
        c.connect(structured=structured)
        assert c.flags & FLAG_READ_ONLY
        assert not c.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES)
        assert c.call(CMD_WRITE, 0, 4, payload=b"nope").error == EPERM
        assert c.call(CMD_WRITE, 0, 4, flags=CMD_FLAG_FUA, payload=b"nope").error == EPERM
        assert c.call(CMD_TRIM, 0, 4096).error == EPERM
        assert c.call(CMD_WRITE_ZEROES, 0, 4096).error == EPERM
        assert c.call(CMD_FLUSH).error == 0
        assert c.read(0, 4096) == b"ro" * 2048
    assert path.read_bytes() == b"ro" * (MiB // 2)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_error_reply_bytes(start: Callable[..., Any], tmp_path: Path, structured: bool) -> None:
    size = 1 * MiB
    server = start(make_disk(tmp_path, size, fill=b"x"))
    with NBDClient(server.address) as c:
        c.connect(structured=structured)
        c.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 0xC0FFEE, size, 512))
        if structured:
            head = c.recv_exact(20)
            magic, flags, kind, cookie, length = struct.unpack(">IHHQI", head)
            assert (magic, flags, kind, cookie) == (
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                0xC0FFEE,
            )
            payload = c.recv_exact(length)
            error, message_length = struct.unpack_from(">IH", payload)
            assert error == EINVAL
            assert 0 < message_length == length - 6  # the whole payload is the message
            payload[6:].decode()  # a human-readable string: UTF-8
        else:
            assert c.recv_exact(16) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, 0xC0FFEE)
        # Nothing more came with it: the next bytes are the next reply.
        assert c.read(0, 10) == b"x" * 10


# -- pipelining and DISC --------------------------------------------------------------------


def send_from_thread(c: NBDClient, data: bytes) -> threading.Thread:
    """sendall() in a thread, so replies can be read while requests still go out."""
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            c.sock.sendall(data)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sender)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("io", ["inline", "threads"])
def test_pipelined_requests_are_each_answered_once(
    start: Callable[..., Any], tmp_path: Path, structured: bool, io: str
) -> None:
    size = 4 * MiB
    content = random.Random(8).randbytes(size)
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    server = start(path, io=io)
    rng = random.Random(9)
    with NBDClient(server.address) as c:
        c.connect(structured=structured)
        # Reads in the first half, writes in the second: no request depends on another.
        reads: dict[int, tuple[int, int]] = {}
        writes: dict[int, tuple[int, bytes]] = {}
        batch = []
        for i in range(260):
            if i % 13 == 12:
                offset = 2 * MiB + len(writes) * 8 * KiB
                data = bytes([len(writes) + 1]) * (4 * KiB + len(writes))
                cookie, request = c.request_bytes(
                    CMD_WRITE, offset, len(data), payload=data, cookie=(1 << 40) + i
                )
                writes[cookie] = (offset, data)
            else:
                offset, length = rng.randrange(0, MiB), rng.choice([1, 512, 4096, 65536])
                cookie, request = c.request_bytes(CMD_READ, offset, length, cookie=(1 << 40) + i)
                reads[cookie] = (offset, length)
            batch.append(request)
        assert len(reads) >= 200
        sender = send_from_thread(c, b"".join(batch))
        answered: list[Reply] = [c.reply() for _ in range(len(reads) + len(writes))]
        sender.join(QUICK)
        assert not sender.errors  # type: ignore[attr-defined]
        cookies = [r.cookie for r in answered]
        assert sorted(cookies) == sorted([*reads, *writes])  # each exactly once
        for r in answered:
            assert r.error == 0, r
            if r.cookie in reads:
                offset, length = reads[r.cookie]
                assert r.data == content[offset : offset + length], r.cookie
        for offset, data in writes.values():
            assert c.read(offset, len(data)) == data
        c.send(CMD_DISC)
        assert c.at_eof()


def test_disc_after_pipelined_requests_answers_them_all_first(
    start: Callable[..., Any], tmp_path: Path
) -> None:
    size = 2 * MiB
    content = random.Random(11).randbytes(size)
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    server = start(path, io="threads")
    with NBDClient(server.address) as c:
        c.connect()
        batch = []
        reads = {}
        for i in range(100):  # more than the server reads ahead (64): it must come back for DISC
            offset = i * 16 * KiB
            cookie, request = c.request_bytes(CMD_READ, offset, 16 * KiB)
            reads[cookie] = offset
            batch.append(request)
        flush_cookie, flush = c.request_bytes(CMD_FLUSH)
        batch.append(flush)
        batch.append(c.request_bytes(CMD_DISC)[1])
        c.sock.sendall(b"".join(batch))
        seen = set()
        for _ in range(len(reads) + 1):
            reply = c.reply()
            assert reply.error == 0 and reply.cookie not in seen
            seen.add(reply.cookie)
            if reply.cookie != flush_cookie:
                offset = reads[reply.cookie]
                assert reply.data == content[offset : offset + 16 * KiB]
        assert seen == {*reads, flush_cookie}
        assert c.at_eof()  # then the server hangs up
    wait_idle(server)


def test_bad_request_magic_ends_the_connection(start: Callable[..., Any], tmp_path: Path) -> None:
    server = start(make_disk(tmp_path, 1 * MiB, fill=b"m"))
    with NBDClient(server.address) as c:
        c.connect()
        assert c.read(0, 3) == b"mmm"
        c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 7, 0, 512))
        assert c.at_eof()
    with NBDClient(server.address) as c:  # others are served
        c.connect()
        assert c.read(0, 3) == b"mmm"
    wait_idle(server)
    assert server.accepted == 2


# -- clients that stall or vanish ------------------------------------------------------------


def test_a_stalled_handshake_does_not_block_other_clients(
    start: Callable[..., Any], tmp_path: Path
) -> None:
    server = start(make_disk(tmp_path, 1 * MiB, fill=b"s"), iothreads=1)
    silent = socket.create_connection(server.address, timeout=QUICK)  # sends nothing
    partial = NBDClient(server.address)
    try:
        partial.handshake()
        partial.sock.sendall(struct.pack(">QI", 0x49484156454F5054, OPT_LIST))  # half a header
        for _ in range(3):
            with NBDClient(server.address) as c:
                c.connect()
                c.write(4096, b"ok")
                assert c.read(4095, 4) == b"sok" + b"s"
    finally:
        silent.close()
        partial.close()
    wait_idle(server)
    assert server.accepted == 5


@pytest.mark.parametrize("hang_up", ["fin", "rst"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_client_gone_mid_write_payload_leaves_the_server_serving(
    start: Callable[..., Any], tmp_path: Path, hang_up: str, structured: bool
) -> None:
    path = make_disk(tmp_path, 2 * MiB, fill=b"\x00\x01")
    server = start(path, iothreads=2)
    c = NBDClient(server.address)
    c.connect(structured=structured)
    in_flight = [c.request_bytes(CMD_READ, i * 4096, 4096)[1] for i in range(8)]
    header = REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 99, 0, 1 * MiB)
    c.sock.sendall(b"".join(in_flight) + header + b"\xee" * (MiB // 2))
    if hang_up == "rst":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    wait_idle(server)  # the connection ended: the half-sent write was dropped
    with NBDClient(server.address) as other:
        other.connect()
        assert other.read(0, 4096) == b"\x00\x01" * 2048
        other.write(0, b"fine")
        assert other.read(0, 4) == b"fine"
    wait_idle(server)
    assert server.accepted == 2
    assert path.read_bytes()[4 : 1 * MiB] == (b"\x00\x01" * (MiB // 2))[4:]


@pytest.mark.parametrize("io", ["inline", "threads"])
def test_close_ends_connections_in_every_phase(
    start: Callable[..., Any], tmp_path: Path, io: str
) -> None:
    server = start(make_disk(tmp_path, 1 * MiB, fill=b"c"), iothreads=2, io=io)
    haggling = NBDClient(server.address)
    haggling.handshake()
    idle = NBDClient(server.address)
    idle.connect()
    busy = NBDClient(server.address)
    busy.connect(structured=False)
    try:
        assert busy.read(0, 1) == b"c"
        header = REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, 5, 0, 64 * KiB)
        busy.sock.sendall(header + b"h" * KiB)  # a write whose payload never finishes
        assert idle.read(0, 1) == b"c"  # all three are being served
        server.close(grace=0.2)
        for client in (haggling, idle, busy):
            assert client.at_eof()
        with pytest.raises(OSError):
            socket.create_connection(server.address, timeout=QUICK).close()
        with pytest.raises(OSError):  # the export's fd is closed too
            os.fstat(server.export.fd)
    finally:
        for client in (haggling, idle, busy):
            client.close()


def test_close_is_idempotent(start: Callable[..., Any], tmp_path: Path) -> None:
    # corun.Server.close() is; so must NBDServer's be (the fixture and
    # `with` both close again). A second os.close() of the export's fd would
    # close whatever file has been given that number since.
    server = start(make_disk(tmp_path, 1 * MiB))
    server.close(grace=0.2)
    reused = os.open(tmp_path / "disk.img", os.O_RDONLY)  # likely the export's old number
    try:
        server.close(grace=0.2)
        try:
            os.fstat(reused)
        except OSError:
            pytest.fail(f"the second close() closed fd {reused}, not the export's any more")
    finally:
        with contextlib.suppress(OSError):
            os.close(reused)


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_command_line_serves_until_a_signal(tmp_path: Path, signo: int) -> None:
    path = make_disk(tmp_path, 1 * MiB, fill=b"cli")
    proc = subprocess.Popen(
        [*NBDSERVER_CMD, str(path), "--port", "0", "--iothreads", "2", "--io", "threads"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+), exporting <Export .*>\n", first)
        assert match, first
        address = ("127.0.0.1", int(match.group(1)))
        with NBDClient(address) as c:
            c.connect()
            assert c.read(0, 6) == b"clicli"
            c.write(0, b"CLI")
            c.send(CMD_DISC)
            assert c.at_eof()
        proc.send_signal(signo)
        out, err = proc.communicate(timeout=QUICK)
        assert proc.returncode == 0, err
        assert out == f"{signal.Signals(signo).name}: closing\n"
        assert err == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert path.read_bytes()[:6] == b"CLIcli"


# -- hostile clients: random requests and options -------------------------------------

_KINDS = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, 5, 8, 77]
_FLAGS = [0, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, 16, 32, 0xFFFF]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    readonly=st.booleans(),
    structured=st.booleans(),
    allocation=st.booleans(),
    requests=st.lists(
        st.tuples(
            st.sampled_from(_KINDS),
            st.sampled_from(_FLAGS),
            st.sampled_from([0, 4096, 3 * MiB - 4096, 3 * MiB, 3 * MiB + 1, 2**63, 2**64 - 1]),
            st.sampled_from([0, 1, 512, 4096, 65536, 3 * MiB, 2**32 - 1]),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_random_requests_each_get_one_reply_and_nothing_is_logged(
    tmp_path_factory: pytest.TempPathFactory,
    readonly: bool,
    structured: bool,
    allocation: bool,
    requests: list[tuple[int, int, int, int]],
) -> None:
    """Any mix of commands, flags, offsets and lengths, pipelined: every request is
    answered exactly once (an error or not), the connection goes on, and the
    server logs nothing (no exception escaped a request or the connection)."""
    path = make_disk(tmp_path_factory.mktemp("fuzz"), 3 * MiB)
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    logging.getLogger("corun").addHandler(handler)
    server = nbdserver.start(str(path), readonly=readonly)
    try:
        with NBDClient(server.address) as c:
            c.connect(structured=structured, allocation=allocation and structured)
            batch, cookies = [], []
            for kind, flags, offset, length in requests:
                if kind == CMD_WRITE:
                    length = min(length, 65536)  # the payload is sent: keep it small
                payload = bytes(length) if kind == CMD_WRITE else b""
                cookie, data = c.request_bytes(kind, offset, length, flags=flags, payload=payload)
                batch.append(data)
                cookies.append(cookie)
            sender = send_from_thread(c, b"".join(batch))
            answered = [c.reply().cookie for _ in cookies]
            sender.join(QUICK)
            assert sorted(answered) == sorted(cookies)
            assert c.read(0, 512) == bytes(512)  # still in step
            c.send(CMD_DISC)
            assert c.at_eof()
        assert server.wait_idle(QUICK)
    finally:
        server.close()
        logging.getLogger("corun").removeHandler(handler)
    assert not logged, [r.getMessage() for r in logged]
