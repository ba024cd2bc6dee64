"""Tests for corun's observability: dump(), dump_on_signal(), ctx.coroutines()
and the stall watchdog (ctx.set_slow_callback_duration).

Issue 13, section 1: the dump of a program with coroutines parked on each
kind of wait names each wait and its holder (and the chain of holders across
IOThreads, deadlocks named); the signal handler writes it; the stall
detector catches a blocking call inside a coroutine, once per stall.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import corun
from corun import (
    AioContext,
    Cancelled,
    CoMutex,
    CoQueue,
    Coroutine,
    CoRwLock,
    CoSleep,
    Event,
    IOThread,
    Queue,
    Semaphore,
    TaskGroup,
    current_coroutine,
    run_in_thread,
    wait_readable,
    wake,
    yield_,
)

THIS_FILE = os.path.basename(__file__)


# -- helpers -------------------------------------------------------------------


def noop() -> None:
    pass


def barrier(t: IOThread) -> None:
    """Return once everything queued on `t` so far has run one step (FIFO)."""
    t.ctx.call_sync(noop, timeout=5)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Bounded poll, for states no Event can announce (a coroutine that parked)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def finish(co: Coroutine[Any]) -> None:
    """Join `co` (already told to end), accepting that it ended cancelled."""
    with contextlib.suppress(Cancelled):
        co.join(5)
    assert co.done


@contextlib.contextmanager
def iothreads(*names: str) -> Iterator[list[IOThread]]:
    threads = [IOThread(name) for name in names]
    try:
        yield threads
    finally:
        for t in threads:
            t.join(5)


def parse_dump(text: str) -> dict[str, tuple[str, str]]:
    """Map each coroutine name of a dump to (its context header, its block of lines)."""
    out: dict[str, tuple[str, str]] = {}
    header = ""
    name: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if name is not None:
            out[name] = (header, "\n".join(lines))

    for line in text.splitlines():
        if line.startswith("== "):
            flush()
            name, lines = None, []
            header = line
        elif line.startswith("  <Coroutine "):
            flush()
            match = re.match(r"  <Coroutine '([^']*)'", line)
            assert match is not None, line
            name, lines = match.group(1), [line]
        elif name is not None:
            lines.append(line)
    flush()
    return out


def dump_text() -> str:
    buf = io.StringIO()
    corun.dump(file=buf)
    return buf.getvalue()


def stack_mentions(block: str, fn_name: str) -> bool:
    """Whether a dump block has a stack line of this file's function `fn_name`."""
    pattern = rf'File ".*{re.escape(THIS_FILE)}", line \d+, in {fn_name}\b'
    return re.search(pattern, block) is not None


# -- dump(): every kind of wait ------------------------------------------------


@pytest.mark.timeout(30)
def test_dump_names_every_kind_of_wait() -> None:
    gate = threading.Event()  # holds the blocked callee and the worker function
    callee_running = threading.Event()
    hold = Event()  # holders wait here while others wait on what they hold
    ev = Event()
    mutex = CoMutex()
    rw = CoRwLock()
    cq = CoQueue()
    cs = CoSleep()
    queue: Queue[int] = Queue()
    sem = Semaphore(0)
    sa, sb = socket.socketpair()
    cos: dict[str, Coroutine[Any]] = {}

    def mutex_holder() -> None:
        with mutex:
            hold.wait()

    def rw_reader() -> None:
        with rw.reader():
            hold.wait()

    def event_waiter() -> None:
        ev.wait()

    def blocked_in_thread() -> None:
        gate.wait(10)

    def thread_user() -> None:
        run_in_thread(blocked_in_thread)

    def queue_getter() -> None:
        queue.get()

    def sem_acquirer() -> None:
        sem.acquire()

    def bare_yielder() -> None:
        yield_()

    def tg_child() -> None:
        ev.wait()

    def tg_owner() -> None:
        with TaskGroup() as tg:
            tg.spawn(tg_child, name="tg-child")

    def mutex_waiter() -> None:
        with mutex:
            pass

    def rw_writer() -> None:
        with rw.writer():
            pass

    def coqueue_waiter() -> None:
        cq.wait()

    def sleeper() -> None:
        corun.sleep(100)

    def cosleeper() -> None:
        cs.sleep(100)

    def fd_waiter() -> None:
        wait_readable(sa)

    def joiner() -> None:
        cos["event-waiter"].join()

    def blocked_callee() -> None:
        callee_running.set()
        gate.wait(10)

    def sync_caller() -> None:
        a.ctx.call_sync(blocked_callee)

    with iothreads("dbg-a", "dbg-b") as (a, b), sa, sb:
        try:
            # On dbg-b: the holders and the waits that need no holder.
            for name, fn in [
                ("mutex-holder", mutex_holder),
                ("rw-reader", rw_reader),
                ("event-waiter", event_waiter),
                ("thread-user", thread_user),
                ("queue-getter", queue_getter),
                ("sem-acquirer", sem_acquirer),
                ("bare-yielder", bare_yielder),
                ("tg-owner", tg_owner),
            ]:
                cos[name] = b.ctx.spawn(fn, name=name)
            barrier(b)
            barrier(b)  # the TaskGroup's child, spawned by the owner's first step
            # On dbg-a: the waits on what dbg-b's coroutines hold, and the rest.
            for name, fn in [
                ("mutex-waiter", mutex_waiter),
                ("rw-writer", rw_writer),
                ("coqueue-waiter", coqueue_waiter),
                ("sleeper", sleeper),
                ("cosleeper", cosleeper),
                ("fd-waiter", fd_waiter),
                ("joiner", joiner),
            ]:
                cos[name] = a.ctx.spawn(fn, name=name)
            barrier(a)
            # Last: a call_sync from dbg-b into dbg-a whose callee blocks dbg-a.
            cos["sync-caller"] = b.ctx.spawn(sync_caller, name="sync-caller")
            assert callee_running.wait(5)
            barrier(b)  # the caller's step (it parks right after queueing the call)
            child = next(co for co in b.ctx.coroutines() if co.name == "tg-child")
            cos["tg-child"] = child
            # A sleeper keeps its schedule flag while it sleeps (QEMU's
            # co->scheduled), so its state reads "scheduled".
            sleepers = {"sleeper", "cosleeper"}
            for name, co in cos.items():
                allowed = {"suspended", "scheduled"} if name in sleepers else {"suspended"}
                assert co._state() in allowed, co

            text = dump_text()
            blocks = parse_dump(text)

            assert text.startswith(f"corun dump, pid {os.getpid()}, ")
            on_a = {"mutex-waiter", "rw-writer", "coqueue-waiter", "sleeper", "cosleeper"}
            on_a |= {"fd-waiter", "joiner"}
            for name, co in cos.items():
                assert name in blocks, f"{name} missing from the dump:\n{text}"
                header, block = blocks[name]
                home = "dbg-a" if name in on_a else "dbg-b"
                assert header.startswith(f"== <AioContext {home!r} "), (name, header)
                assert block.startswith(f"  <Coroutine {name!r} {co._state()} ctx={home!r}>")
                fn_name = "tg_child" if name == "tg-child" else co._fn.__name__
                assert stack_mentions(block, fn_name), f"no stack line for {name}:\n{block}"

            def waits(name: str) -> str:
                block = blocks[name][1]
                match = re.search(r"^    waits on: (.*)$", block, re.MULTILINE)
                assert match is not None, block
                return match.group(1)

            assert "locked by 'mutex-holder'" in waits("mutex-waiter")
            assert "on 'dbg-b'" in waits("mutex-waiter")
            mutex_block = blocks["mutex-waiter"][1]
            assert "-> 'mutex-holder' on 'dbg-b' (suspended) waits on <Event" in mutex_block
            assert "<CoRwLock" in waits("rw-writer")
            assert "1 reader(s)" in waits("rw-writer")
            assert "<CoQueue" in waits("coqueue-waiter")
            left = re.search(r"^sleep, (\d+\.\d{3}) s left", waits("sleeper"))
            assert left is not None, waits("sleeper")
            assert 90.0 < float(left.group(1)) <= 100.0
            assert "<CoSleep" in waits("cosleeper")
            assert "sleeping: 'cosleeper'" in waits("cosleeper")
            assert f"wait_readable(fd {sa.fileno()})" in waits("fd-waiter")
            assert "join of <Coroutine 'event-waiter'" in waits("joiner")
            assert (
                "-> 'event-waiter' on 'dbg-b' (suspended) waits on <Event" in (blocks["joiner"][1])
            )
            assert re.search(r"run_in_thread\(\S*blocked_in_thread\)", waits("thread-user"))
            assert re.search(r"call_sync\(\S*blocked_callee\) on 'dbg-a'", waits("sync-caller"))
            assert "<Queue" in waits("queue-getter")
            assert "1 getting" in waits("queue-getter")
            assert "<Event" in waits("event-waiter")
            assert "<Semaphore" in waits("sem-acquirer")
            assert "<TaskGroup" in waits("tg-owner")
            assert "bare yield_()" in waits("bare-yielder")

            # Durations: every wait but the bare yield has one, none negative.
            for name in cos:
                w = waits(name)
                match = re.search(r"\(for (-?\d+\.\d+) s\)$", w)
                if name == "bare-yielder":
                    assert match is None, w
                else:
                    assert match is not None, (name, w)
                    assert float(match.group(1)) >= 0.0, (name, w)
            assert "DEADLOCK" not in text.split("== <AioContext 'dbg-a'")[1]
        finally:
            gate.set()
            hold.set()
            ev.set()
            for co in cos.values():
                co.cancel()
            if "bare-yielder" in cos and not cos["bare-yielder"].done:
                wake(cos["bare-yielder"])  # a bare yield_() is resumed only by a wake
            for co in cos.values():
                finish(co)


# -- dump(): a deadlock across two IOThreads -------------------------------------


@pytest.mark.timeout(20)
def test_dump_names_a_deadlock_across_iothreads() -> None:
    m1 = CoMutex()
    m2 = CoMutex()
    have_m2 = Event()

    def dl_one() -> None:
        with m1:
            have_m2.wait()
            with m2:
                pass

    def dl_two() -> None:
        with m2:
            have_m2.set()
            with m1:
                pass

    with iothreads("dl-a", "dl-b") as (a, b):
        one = a.ctx.spawn(dl_one, name="dl-one")
        two: Coroutine[None] | None = None
        try:
            barrier(a)  # dl-one holds m1 and waits for the event
            assert m1.holder is one
            two = b.ctx.spawn(dl_two, name="dl-two")
            t2 = two
            wait_until(
                lambda: (
                    one._waiting is m2
                    and t2._waiting is m1
                    and one._state() == "suspended"
                    and t2._state() == "suspended"
                )
            )
            text = dump_text()
            blocks = parse_dump(text)
            one_block = blocks["dl-one"][1]
            two_block = blocks["dl-two"][1]
            assert blocks["dl-one"][0].startswith("== <AioContext 'dl-a' ")
            assert blocks["dl-two"][0].startswith("== <AioContext 'dl-b' ")
            assert "locked by 'dl-two'" in one_block
            assert "-> 'dl-two' on 'dl-b' (suspended) waits on <CoMutex" in one_block
            assert "locked by 'dl-one'" in one_block  # the chain's next hop
            assert "DEADLOCK" in one_block
            assert "locked by 'dl-one'" in two_block
            assert "-> 'dl-one' on 'dl-a' (suspended) waits on <CoMutex" in two_block
            assert "DEADLOCK" in two_block
            assert stack_mentions(one_block, "dl_one")
            assert stack_mentions(two_block, "dl_two")
        finally:
            one.cancel()
            if two is not None:
                two.cancel()
            finish(one)
            if two is not None:
                finish(two)
        assert not m1.locked() and not m2.locked()


@pytest.mark.timeout(20)
def test_dump_shows_running_coroutines_and_their_stacks() -> None:
    gate = threading.Event()
    busy_running = threading.Event()
    inside: list[str] = []

    def busy_elsewhere() -> None:
        busy_running.set()
        gate.wait(10)  # keeps its loop's thread inside this coroutine

    def dumps_itself() -> None:
        buf = io.StringIO()
        corun.dump(file=buf)
        inside.append(buf.getvalue())

    with iothreads("run-a", "run-b") as (a, b):
        busy = a.ctx.spawn(busy_elsewhere, name="busy")
        try:
            assert busy_running.wait(5)
            blocks = parse_dump(dump_text())
            block = blocks["busy"][1]
            assert block.startswith("  <Coroutine 'busy' running ctx='run-a'>"), block
            assert "waits on" not in block
            assert stack_mentions(block, "busy_elsewhere"), block
            b.ctx.spawn(dumps_itself, name="self-dumper").join(5)
            own = parse_dump(inside[0])["self-dumper"][1]
            assert own.startswith("  <Coroutine 'self-dumper' running ctx='run-b'>"), own
            assert stack_mentions(own, "dumps_itself"), own
        finally:
            gate.set()
            finish(busy)


def test_holder_chain_is_empty_without_a_holder() -> None:
    from corun.debug import describe_wait, holder_chain

    co: Coroutine[None] = Coroutine(noop, name="idle")
    assert holder_chain(co) == ([], False)
    assert describe_wait(None).startswith("a bare yield_()")
    assert describe_wait(("wait_writable", 7)) == "wait_writable(fd 7)"
    assert describe_wait("sleep(0)") == "sleep(0)"


# -- ctx.coroutines() -----------------------------------------------------------


@pytest.mark.timeout(20)
def test_coroutines_lists_exactly_the_live_ones() -> None:
    gate = threading.Event()
    blocking = threading.Event()
    ev = Event()
    seen_inside: list[bool] = []

    def parked() -> None:
        ev.wait()

    def sees_itself() -> None:
        me = current_coroutine()
        seen_inside.append(me is not None and me in t.ctx.coroutines())

    def block_loop() -> None:
        blocking.set()
        gate.wait(10)

    with iothreads("cos-a") as (t,):
        assert t.ctx.coroutines() == []
        done = t.ctx.spawn(noop, name="done")
        done.join(5)
        waiting = t.ctx.spawn(parked, name="parked")
        barrier(t)
        never_scheduled: Coroutine[None] = Coroutine(noop, name="never")
        try:
            # Queued to start: the loop is blocked in a callback meanwhile.
            t.ctx.call_soon(block_loop)
            assert blocking.wait(5)
            queued = t.ctx.spawn(noop, name="queued")
            live = t.ctx.coroutines()  # from another thread than the home one
            assert len(live) == 2
            assert set(live) == {waiting, queued}
            assert done not in live and never_scheduled not in live
            gate.set()
            queued.join(5)
            assert t.ctx.coroutines() == [waiting]
            # From the home thread, and from inside a running coroutine.
            assert t.ctx.call_sync(t.ctx.coroutines, timeout=5) == [waiting]
            t.ctx.spawn(sees_itself).join(5)
            assert seen_inside == [True]
        finally:
            gate.set()
            ev.set()
            finish(waiting)
        assert t.ctx.coroutines() == []


@pytest.mark.timeout(20)
def test_coroutines_of_a_plain_context_from_another_thread() -> None:
    ev = Event()

    def parked() -> None:
        ev.wait()

    with AioContext("cos-plain") as ctx:
        co = ctx.spawn(parked, name="plain-parked")
        other: list[list[Coroutine[Any]]] = []
        reader = threading.Thread(target=lambda: other.append(ctx.coroutines()))
        reader.start()
        reader.join(5)
        assert other == [[co]]  # queued to start, not started yet
        assert ctx.coroutines() == [co]
        ctx.poll(blocking=False)
        assert co._state() == "suspended"
        assert ctx.coroutines() == [co]
        ev.set()
        co.join(5)
        assert ctx.coroutines() == []


# -- dump_on_signal() -----------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="Unix only")
def test_dump_on_signal_writes_the_dump_and_returns_the_old_handler() -> None:
    ev = Event()
    buf = io.StringIO()
    calls: list[int] = []

    def sentinel(signo: int, frame: object) -> None:
        calls.append(signo)

    def parked_for_signal() -> None:
        ev.wait()

    original = signal.getsignal(signal.SIGUSR1)
    with iothreads("sig-a") as (t,):
        co = t.ctx.spawn(parked_for_signal, name="sig-parked")
        try:
            barrier(t)
            signal.signal(signal.SIGUSR1, sentinel)
            previous = corun.dump_on_signal(signal.SIGUSR1, file=buf)
            assert previous is sentinel
            os.kill(os.getpid(), signal.SIGUSR1)
            text = buf.getvalue()
            assert text.startswith(f"corun dump, pid {os.getpid()}, ")
            blocks = parse_dump(text)
            assert "sig-parked" in blocks
            assert blocks["sig-parked"][0].startswith("== <AioContext 'sig-a' ")
            assert "waits on: <Event" in blocks["sig-parked"][1]
            assert stack_mentions(blocks["sig-parked"][1], "parked_for_signal")
            assert calls == []  # replaced, not chained
            # Restoring with the return value puts the old handler back.
            signal.signal(signal.SIGUSR1, previous)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert calls == [signal.SIGUSR1]
            assert buf.getvalue() == text
        finally:
            signal.signal(signal.SIGUSR1, original)
            ev.set()
            finish(co)


SUBPROCESS_PROGRAM = """
import os, signal, corun
t = corun.IOThread("sub-a")
ev = corun.Event()
def sub_parked():
    ev.wait()
co = t.ctx.spawn(sub_parked, name="sub-parked")
t.ctx.call_sync(lambda: None)
corun.dump_on_signal(signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR1)
print("after", flush=True)
ev.set()
co.join(5)
t.join(5)
"""


@pytest.mark.timeout(20)
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="Unix only")
def test_dump_on_signal_writes_to_stderr_by_default() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_PROGRAM],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "after\n"
    assert re.match(r"corun dump, pid \d+, 1 open context\(s\)\n", proc.stderr), proc.stderr
    blocks = parse_dump(proc.stderr)
    assert blocks["sub-parked"][0].startswith("== <AioContext 'sub-a' ")
    assert "waits on: <Event" in blocks["sub-parked"][1]
    assert re.search(r'File "<string>", line \d+, in sub_parked', blocks["sub-parked"][1])


# -- the stall watchdog -----------------------------------------------------------


class Collect(logging.Handler):
    """Keeps the stall reports of the `corun` logger; `got` is set at the first."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.got = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "slow_callback_duration" in record.getMessage():
            self.records.append(record)
            self.got.set()


@pytest.fixture
def stall_log() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("corun")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def stalling() -> None:
    time.sleep(0.3)  # blocks the loop: the point of the test


@pytest.mark.timeout(20)
def test_stall_is_reported_once_with_context_coroutine_and_stack(stall_log: Collect) -> None:
    with iothreads("stall-a") as (t,):
        t.ctx.set_slow_callback_duration(0.1)
        try:
            assert t.ctx.slow_callback_duration == 0.1
            co = t.ctx.spawn(stalling, name="stall-co")
            assert stall_log.got.wait(5), "no stall report"
            co.join(5)
            barrier(t)  # the stalled pass is over
            # Once per stall: nothing more was said while it went on.
            assert len(stall_log.records) == 1, [r.getMessage() for r in stall_log.records]
            # ...but the next stall is a new one, and is reported too.
            stall_log.got.clear()
            t.ctx.spawn(stalling, name="stall-co-2").join(5)
            assert stall_log.got.wait(5), "no report of the second stall"
            barrier(t)
        finally:
            t.ctx.set_slow_callback_duration(None)
    assert len(stall_log.records) == 2, [r.getMessage() for r in stall_log.records]
    assert "'stall-co-2'" in stall_log.records[1].getMessage()
    record = stall_log.records[0]
    assert record.name == "corun"
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "<AioContext 'stall-a' " in message
    assert "'stall-co'" in message
    assert "slow_callback_duration 0.100 s" in message
    assert re.search(rf'File ".*{re.escape(THIS_FILE)}", line \d+, in stalling', message)
    match = re.search(r"has been running for (\d+\.\d+) s", message)
    assert match is not None and float(match.group(1)) >= 0.1


@pytest.mark.timeout(20)
def test_no_stall_reported_for_idle_or_unpolled_contexts(stall_log: Collect) -> None:
    unpolled_ready = threading.Event()
    release = threading.Event()
    contexts: list[AioContext] = []

    def own_unpolled_contexts() -> None:
        # A context that is never polled, in a thread that does other things.
        with AioContext("stall-unpolled") as ctx:
            contexts.append(ctx)
            ctx.set_slow_callback_duration(0.05)
            unpolled_ready.set()
            release.wait(10)
            ctx.set_slow_callback_duration(None)

    owner = threading.Thread(target=own_unpolled_contexts)
    owner.start()
    with iothreads("stall-idle") as (t,), AioContext("stall-polled-once") as once:
        try:
            assert unpolled_ready.wait(5)
            t.ctx.set_slow_callback_duration(0.05)  # idle: blocked in epoll
            once.poll(blocking=False)
            once.set_slow_callback_duration(0.05)  # polled once, then left alone
            time.sleep(0.3)  # the absence of reports over 6 thresholds is the point
            assert t.ctx.call_sync(lambda: 42, timeout=5) == 42
            assert stall_log.records == []
        finally:
            t.ctx.set_slow_callback_duration(None)
            once.set_slow_callback_duration(None)
            release.set()
            owner.join(5)
    assert contexts and not owner.is_alive()


@pytest.mark.timeout(20)
def test_stall_watchdog_stops_with_none(stall_log: Collect) -> None:
    with iothreads("stall-off") as (t,):
        t.ctx.set_slow_callback_duration(0.1)
        t.ctx.set_slow_callback_duration(None)
        assert t.ctx.slow_callback_duration is None
        t.ctx.spawn(stalling, name="stall-off-co").join(5)
        barrier(t)
    assert stall_log.records == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan")])
def test_slow_callback_duration_refuses_bad_values(bad: float) -> None:
    with AioContext("stall-bad") as ctx:
        ctx.set_slow_callback_duration(0.5)
        with pytest.raises(ValueError, match="slow_callback_duration"):
            ctx.set_slow_callback_duration(bad)
        with pytest.raises(ValueError):
            ctx.slow_callback_duration = bad
        assert ctx.slow_callback_duration == 0.5
        ctx.set_slow_callback_duration(None)
