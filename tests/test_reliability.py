"""Reliability regression tests (issue 7): nothing lost, no loop killed, never deaf.

The rule behind every test here: whatever a caller, a callback, a fork or a
shutdown race does, a context either runs each accepted item exactly once
or hands it back with a clear error; its loop never dies of something a
single item did; and it never goes deaf. Items 6 and 7 (signals) live in
tests/test_signals.py.

Every wait is bounded (a timeout on join/call_sync, an Event with a
timeout), so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextvars
import gc
import itertools
import json
import math
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import greenlet
import pytest
from helpers import drain, socket_pair

import corun
from corun import AioContext, CoMutex, CoQueue, Coroutine, CoRwLock, CoSleep, IOThread

CORUN_DIR = os.path.dirname(os.path.abspath(corun.__file__)) + os.sep
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
THIRTY_DAYS = 30 * 86400.0

Reports = list[tuple[BaseException, object]]
Tracer = Callable[[FrameType, str, Any], Any]


class Boom(BaseException):
    """A user BaseException that is neither KeyboardInterrupt nor SystemExit."""


def noop() -> None:
    pass


def one() -> int:
    return 1


def recording_handler(ctx: AioContext, event: threading.Event | None = None) -> Reports:
    """Install an exception handler on ctx that records (exc, origin); return the record."""
    seen: Reports = []

    def handler(_ctx: AioContext, exc: BaseException, origin: object) -> None:
        seen.append((exc, origin))
        if event is not None:
            event.set()

    ctx.set_exception_handler(handler)
    return seen


def settle(t: IOThread) -> None:
    """Two call_sync round trips: everything submitted before has run (or the loop is dead)."""
    for _ in range(2):
        assert t.ctx.call_sync(one, timeout=2) == 1


def assert_serving(t: IOThread, rounds: int = 3) -> None:
    """t's loop is alive and runs callbacks and coroutines."""
    assert t.is_alive(), f"{t!r} died"
    for _ in range(rounds):
        assert t.ctx.call_sync(one, timeout=5) == 1
        assert t.ctx.spawn(one).join(timeout=5) == 1
    assert t.is_alive(), f"{t!r} died"


def in_corun(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(CORUN_DIR)


def where(frame: FrameType) -> str:
    """file:line (function) of a frame, the file relative to corun's parent directory."""
    code = frame.f_code
    path = os.path.relpath(code.co_filename, os.path.dirname(os.path.dirname(CORUN_DIR)))
    return f"{path}:{frame.f_lineno} ({code.co_name})"


@contextmanager
def ignore_resource_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield


# -- item 1: huge timeouts ----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_call_later_30_days_keeps_iothread_alive() -> None:
    fired: list[int] = []
    with IOThread() as t:
        timer = t.ctx.call_later(THIRTY_DAYS, fired.append, 1)
        assert timer.pending
        settle(t)
        assert_serving(t)
        timer.cancel()
    assert fired == []


@pytest.mark.timeout(10)
def test_call_later_30_days_on_main_thread_context_waits() -> None:
    with AioContext() as ctx:
        ctx.call_later(THIRTY_DAYS, noop)
        woke: list[str] = []
        waker = threading.Timer(0.05, ctx.call_soon, args=(woke.append, "woke"))
        waker.start()
        try:
            assert ctx.poll(True) is True
        finally:
            waker.join(5)
        assert woke == ["woke"]


@pytest.mark.timeout(10)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_sleep_1e9_in_coroutine_keeps_iothread_alive() -> None:
    asleep = threading.Event()

    def sleeper() -> None:
        asleep.set()
        corun.sleep(1e9)

    with IOThread() as t:
        co = t.ctx.spawn(sleeper)
        assert asleep.wait(2)
        settle(t)
        assert co.scheduled and not co.done  # asleep, not failed
        assert_serving(t)


@pytest.mark.timeout(10)
def test_cosleep_inf_is_ended_by_wake_from_another_thread() -> None:
    nap = CoSleep()

    def sleeper() -> str:
        nap.sleep(math.inf)
        return "woken"

    with IOThread() as t:
        co = t.ctx.spawn(sleeper)
        settle(t)  # the coroutine ran up to its sleep; the loop went back to waiting
        assert t.is_alive(), "the IOThread died of sleep(math.inf)"
        assert not co.done
        nap.wake()
        assert co.join(timeout=2) == "woken"
        assert_serving(t)


@pytest.mark.timeout(10)
def test_wait_readable_1e9_is_ended_by_data() -> None:
    with socket_pair() as (a, b), IOThread() as t:

        def reader() -> bytes:
            assert corun.wait_readable(a, 1e9) is True
            return a.recv(16)

        co = t.ctx.spawn(reader)
        settle(t)
        assert t.is_alive(), "the IOThread died of wait_readable(fd, 1e9)"
        b.send(b"x")
        assert co.join(timeout=2) == b"x"
        assert_serving(t)


def _waiting_coroutine(q: CoQueue) -> str:
    q.wait()
    return "done"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeout", [THIRTY_DAYS, math.inf], ids=["30days", "inf"])
def test_join_huge_timeout_from_plain_thread(timeout: float) -> None:
    q = CoQueue()
    with IOThread() as t:
        co = t.ctx.spawn(_waiting_coroutine, q)
        settle(t)
        outcome: list[object] = []

        def joiner() -> None:
            try:
                outcome.append(co.join(timeout=timeout))
            except BaseException as exc:
                outcome.append(exc)

        th = threading.Thread(target=joiner)
        th.start()
        waker = threading.Timer(0.05, q.next)
        waker.start()
        th.join(5)
        waker.join(5)
        assert not th.is_alive()
        assert outcome == ["done"]
        assert_serving(t)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeout", [THIRTY_DAYS, math.inf], ids=["30days", "inf"])
def test_join_huge_timeout_from_coroutine(timeout: float) -> None:
    q = CoQueue()
    with IOThread() as t1, IOThread() as t2:
        target = t1.ctx.spawn(_waiting_coroutine, q)
        settle(t1)
        joiner = t2.ctx.spawn(target.join, timeout=timeout)
        settle(t2)  # the joiner waits now; its loop went back to sleep
        assert t2.is_alive(), "the joiner's IOThread died of join(timeout=huge)"
        assert not joiner.done
        assert q.next()
        assert joiner.join(timeout=2) == "done"
        assert_serving(t1)
        assert_serving(t2)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeout", [THIRTY_DAYS, math.inf], ids=["30days", "inf"])
def test_join_huge_timeout_on_home_thread(timeout: float) -> None:
    q = CoQueue()
    with AioContext() as ctx:
        co = ctx.spawn(_waiting_coroutine, q)
        drain(ctx)
        waker = threading.Timer(0.05, q.next)
        waker.start()
        try:
            assert co.join(timeout=timeout) == "done"
        finally:
            waker.join(5)


@pytest.mark.timeout(10)
def test_iothread_join_timeout_inf() -> None:
    t = IOThread()
    try:
        assert t.ctx.call_sync(one, timeout=2) == 1
        t.join(timeout=math.inf)
    finally:
        if t.is_alive():
            t.join(timeout=5)
    assert not t.is_alive()


# -- item 2: BaseExceptions other than KeyboardInterrupt/SystemExit ------------------------

SOURCES = ["coroutine", "call_soon", "bh", "timer", "fd_handler"]
BASE_EXCEPTIONS = [GeneratorExit, Boom]


def _submit_raiser(
    ctx: AioContext,
    source: str,
    exc_type: type[BaseException],
    sock: socket.socket,
    peer: socket.socket,
    on_home: Callable[[Callable[[], Any]], Any],
) -> list[object]:
    """Make `source` raise exc_type on ctx; return the acceptable origins."""

    def raiser() -> None:
        raise exc_type(f"from a {source}")

    if source == "coroutine":
        # Not kept: nobody retrieves its exception, so it is reported (with
        # the coroutine's repr as the origin) once the coroutine is collected.
        ctx.spawn(raiser, name="raising-coroutine")
        return ["raising-coroutine"]
    if source == "call_soon":
        ctx.call_soon(raiser)
        return [raiser]
    if source == "bh":
        bh = ctx.bh(raiser)
        bh.schedule()
        return [raiser, bh]
    if source == "timer":
        timer = ctx.call_later(0, raiser)
        return [raiser, timer]
    assert source == "fd_handler"

    def fd_raiser() -> None:
        sock.recv(16)
        ctx.remove_reader(sock)
        raise exc_type("from an fd handler")

    on_home(lambda: ctx.add_reader(sock, fd_raiser))
    peer.send(b"x")
    return [fd_raiser]


def _matches(origin: object, origins: list[object]) -> bool:
    return any(
        origin is o or (isinstance(o, str) and isinstance(origin, str) and o in origin)
        for o in origins
    )


@pytest.mark.timeout(10)
@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=lambda e: e.__name__)
@pytest.mark.parametrize("source", SOURCES)
def test_base_exception_goes_to_handler_on_iothread(
    source: str, exc_type: type[BaseException]
) -> None:
    reported = threading.Event()
    with socket_pair() as (a, b), IOThread() as t:
        seen = recording_handler(t.ctx, reported)
        origins = _submit_raiser(
            t.ctx, source, exc_type, a, b, lambda fn: t.ctx.call_sync(fn, timeout=2)
        )
        settle(t)
        assert reported.wait(2), f"the {source}'s {exc_type.__name__} was not reported"
        assert_serving(t)
        assert len(seen) == 1, seen
        exc, origin = seen[0]
        assert type(exc) is exc_type
        assert _matches(origin, origins), (origin, origins)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=lambda e: e.__name__)
@pytest.mark.parametrize("source", SOURCES)
def test_base_exception_does_not_escape_poll(source: str, exc_type: type[BaseException]) -> None:
    with socket_pair() as (a, b), AioContext() as ctx:
        seen = recording_handler(ctx)
        origins = _submit_raiser(ctx, source, exc_type, a, b, lambda fn: fn())
        safety = ctx.call_later(2, noop)  # bounds the blocking polls below
        try:
            for _ in range(3):
                while ctx.poll(False):
                    pass
                if seen:
                    break
                ctx.poll(True)  # fd readiness / timer: at most a moment away
        except BaseException as escaped:
            pytest.fail(f"poll() raised {escaped!r} from a {source}")
        safety.cancel()
        assert len(seen) == 1, seen
        exc, origin = seen[0]
        assert type(exc) is exc_type
        assert _matches(origin, origins), (origin, origins)
        later: list[int] = []
        ctx.call_soon(later.append, 1)
        drain(ctx)
        assert later == [1]


# -- item 3: GreenletExit raised by a coroutine's function ---------------------------------


def _raise_greenlet_exit() -> None:
    raise greenlet.GreenletExit("from fn")


@pytest.mark.timeout(10)
def test_greenlet_exit_finishes_coroutine_on_iothread() -> None:
    with IOThread() as t:
        recording_handler(t.ctx)
        co = t.ctx.spawn(_raise_greenlet_exit)
        with pytest.raises(greenlet.GreenletExit):
            co.join(timeout=2)
        assert co.done
        assert isinstance(co.exception(), greenlet.GreenletExit)
        assert_serving(t)


@pytest.mark.timeout(10)
def test_greenlet_exit_finishes_coroutine_on_main_context() -> None:
    with AioContext() as ctx:
        recording_handler(ctx)
        co = ctx.spawn(_raise_greenlet_exit)
        try:
            drain(ctx)
        except BaseException as exc:
            pytest.fail(f"poll() raised {exc!r}")
        assert co.done, co
        assert isinstance(co.exception(), greenlet.GreenletExit)
        with pytest.raises(greenlet.GreenletExit):
            co.join(timeout=1)


# -- item 4: call_sync(sys.exit) and KeyboardInterrupt go to the caller only -----------------


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt("for the caller of call_sync")


@pytest.mark.timeout(10)
def test_call_sync_sys_exit_goes_to_caller_and_iothread_lives() -> None:
    with IOThread() as t:
        seen = recording_handler(t.ctx)
        with pytest.raises(SystemExit) as info:
            t.ctx.call_sync(sys.exit, 3, timeout=2)
        assert info.value.code == 3
        assert_serving(t)
        assert seen == []


@pytest.mark.timeout(10)
def test_call_sync_keyboard_interrupt_goes_to_caller_and_iothread_lives() -> None:
    with IOThread() as t:
        seen = recording_handler(t.ctx)
        try:
            t.ctx.call_sync(_raise_keyboard_interrupt, timeout=2)
        except KeyboardInterrupt:
            pass
        else:
            pytest.fail("call_sync did not raise KeyboardInterrupt to its caller")
        assert_serving(t)
        assert seen == []


# -- item 5: an exception handler that raises ----------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("escape", [SystemExit, KeyboardInterrupt], ids=lambda e: e.__name__)
def test_deferred_wakeups_run_when_exception_handler_raises(
    escape: type[BaseException],
) -> None:
    log: list[str] = []

    def sleeper(tag: str) -> None:
        log.append(f"{tag}1")
        corun.yield_()
        log.append(f"{tag}2")
        corun.yield_()
        log.append(f"{tag}3")

    with AioContext() as ctx:
        seen: list[BaseException] = []

        def handler(_ctx: AioContext, exc: BaseException, origin: object) -> None:
            seen.append(exc)
            if isinstance(exc, ValueError):
                raise escape("raised by the exception handler")

        ctx.set_exception_handler(handler)
        b = ctx.spawn(sleeper, "B")
        c = ctx.spawn(sleeper, "C")
        drain(ctx)
        assert log == ["B1", "C1"]

        def waker() -> None:
            corun.wake(b)  # same thread: deferred until this coroutine finishes
            corun.wake(c)
            raise ValueError("A failed")

        ctx.spawn(waker)
        escaped = None
        try:
            drain(ctx)
        except (SystemExit, KeyboardInterrupt) as exc:
            escaped = exc
        assert isinstance(escaped, escape), f"{escape.__name__} did not propagate out of poll()"
        try:
            drain(ctx)
        except BaseException as exc:
            pytest.fail(f"the next poll() raised {exc!r}")
        assert sorted(log) == ["B1", "B2", "C1", "C2"], log
        assert not b.scheduled and not c.scheduled, (b, c)
        corun.wake(b)
        corun.wake(c)
        drain(ctx)
        assert sorted(log) == ["B1", "B2", "B3", "C1", "C2", "C3"], log
        assert b.done and c.done
        assert [type(e) for e in seen] == [ValueError]


# -- items 8-10: fork ------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
ignore_fork_warning = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")


def _reap(pid: int, deadline: float) -> None:
    while True:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.005)


def run_in_child(child: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Fork; the child runs child() and reports its JSON-able result through a pipe.

    Returns the child's result; fails the test if the child raised, or did not
    report within `timeout` (it is then killed).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(r)
            try:
                payload: dict[str, Any] = {"ok": child()}
            except BaseException as exc:
                payload = {
                    "error": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                }
            view = memoryview(json.dumps(payload, default=repr).encode())
            while view:
                view = view[os.write(w, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the forked child did not report within {timeout} s")
            ready, _, _ = select.select([r], [], [], remaining)
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        _reap(pid, deadline + 2)
    if not chunks:
        pytest.fail("the forked child died without reporting")
    payload = json.loads(b"".join(chunks))
    if "error" in payload:
        pytest.fail(f"the forked child raised:\n{payload['error']}")
    return payload["ok"]


@contextmanager
def producer_busy(t: IOThread) -> Iterator[None]:
    """Keep t's loop busy: a thread call_soon()s in a tight loop meanwhile."""
    stop = threading.Event()
    started = threading.Event()
    counts = [0, 0]  # accepted, ran (ran is written by t's thread only)

    def count() -> None:
        counts[1] += 1

    def producer() -> None:
        while not stop.is_set():
            try:
                t.ctx.call_soon(count)
            except RuntimeError:
                return
            counts[0] += 1
            if counts[0] == 100:
                started.set()

    th = threading.Thread(target=producer)
    th.start()
    try:
        assert started.wait(5)
        yield
    finally:
        stop.set()
        th.join(5)
    settle(t)
    assert counts[0] == counts[1], f"accepted {counts[0]} callbacks, ran {counts[1]}"


CHILD_ACTIONS = ["join", "stop", "spawn", "call_soon", "leave_with"]


def _child_touches(t: IOThread, action: str) -> Callable[[], str]:
    def child() -> str:
        try:
            if action == "join":
                t.join(timeout=2)
            elif action == "stop":
                t.stop()
            elif action == "spawn":
                t.ctx.spawn(noop)
            elif action == "call_soon":
                t.ctx.call_soon(noop)
            else:
                assert action == "leave_with"
                t.__exit__(None, None, None)
        except RuntimeError as exc:
            return f"RuntimeError: {exc}"
        return "returned"

    return child


@needs_fork
@ignore_fork_warning
@pytest.mark.timeout(30)
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
@pytest.mark.parametrize("action", CHILD_ACTIONS)
def test_forked_child_does_not_disturb_parent_iothread(action: str, busy: bool) -> None:
    with IOThread() as t:
        settle(t)
        if busy:
            with producer_busy(t):
                run_in_child(_child_touches(t, action))
        else:
            run_in_child(_child_touches(t, action))
        assert_serving(t, rounds=100)


def _queueing_ops(ctx: AioContext) -> dict[str, Callable[[], object]]:
    """What a child must not be able to do to an inherited context."""
    return {
        "spawn": lambda: ctx.spawn(noop),
        "call_soon": lambda: ctx.call_soon(noop),
        "call_later": lambda: ctx.call_later(0.01, noop),
        "bh.schedule": lambda: ctx.bh(noop).schedule(),
        "poll": lambda: ctx.poll(False),
    }


@needs_fork
@ignore_fork_warning
@pytest.mark.timeout(20)
def test_forked_child_refuses_work_on_inherited_contexts() -> None:
    with IOThread() as t, AioContext() as main_ctx:
        settle(t)

        def child() -> dict[str, Any]:
            out: dict[str, Any] = {}

            def attempt(label: str, fn: Callable[[], Any]) -> None:
                try:
                    fn()
                except RuntimeError as exc:
                    out[label] = f"RuntimeError: {exc}"
                except BaseException as exc:
                    out[label] = f"{type(exc).__name__}: {exc}"
                else:
                    out[label] = "accepted"

            for name, ctx in (("main", main_ctx), ("iothread", t.ctx)):
                for op, fn in _queueing_ops(ctx).items():
                    attempt(f"{name}.{op}", fn)
            quiet: dict[str, str] = {}
            for label, fn in (
                ("main.close", main_ctx.close),
                ("iothread.join", lambda: t.join(timeout=2)),
            ):
                try:
                    fn()
                except BaseException as exc:
                    quiet[label] = f"{type(exc).__name__}: {exc}"
                else:
                    quiet[label] = "ok"
            return {
                "refusals": out,
                "quiet": quiet,
                "current_context": repr(corun.current_context()),
                "run": corun.run(lambda: 42),
            }

        report = run_in_child(child)
        bad = {
            label: outcome
            for label, outcome in report["refusals"].items()
            if not (outcome.startswith("RuntimeError") and "fork" in outcome.lower())
        }
        assert bad == {}, f"not refused with a RuntimeError naming fork: {bad}"
        assert report["quiet"] == {"main.close": "ok", "iothread.join": "ok"}
        assert report["current_context"] == "None"
        assert report["run"] == 42
        assert_serving(t)


@needs_fork
@ignore_fork_warning
@pytest.mark.timeout(20)
def test_fork_inside_coroutine_child_starts_clean() -> None:
    def child() -> dict[str, Any]:
        out: dict[str, Any] = {
            "in_coroutine": corun.in_coroutine(),
            "current_coroutine": repr(corun.current_coroutine()),
            "current_context": repr(corun.current_context()),
        }
        try:
            out["run"] = corun.run(lambda: 42)
        except BaseException as exc:
            out["run"] = f"{type(exc).__name__}: {exc}"
        return out

    report = corun.run(run_in_child, child)
    assert report == {
        "in_coroutine": False,
        "current_coroutine": "None",
        "current_context": "None",
        "run": 42,
    }


# -- item 11: IOThread.join() is bounded under producers that never stop -------------------


@pytest.mark.timeout(30)
def test_iothread_join_bounded_while_producers_never_stop() -> None:
    t = IOThread()
    ran = [0]  # written by t's thread only
    accepted = [0, 0]
    ended_by: list[BaseException | None] = [None, None]
    give_up = threading.Event()
    warmed_up = threading.Barrier(3)

    def count() -> None:
        # A little work: the loop drains slower than the producers submit,
        # so a close() that drains until empty would never end.
        sum(range(200))
        ran[0] += 1

    def producer(i: int) -> None:
        warmed = False
        while not give_up.is_set():
            try:
                t.ctx.call_soon(count)
            except RuntimeError as exc:
                ended_by[i] = exc
                break
            accepted[i] += 1
            if not warmed and accepted[i] >= 1000:
                warmed = True
                warmed_up.wait(5)
        if not warmed:
            warmed_up.abort()

    producers = [threading.Thread(target=producer, args=(i,)) for i in range(2)]
    for p in producers:
        p.start()
    try:
        warmed_up.wait(5)
        try:
            t.join(timeout=10)
        except TimeoutError:
            pytest.fail("IOThread.join() did not finish while producers kept submitting")
    finally:
        # Once the context is closed every producer's next call_soon is
        # refused and ends it; give_up only bounds a failing run (setting it
        # at once raced a producer that had not submitted since the close).
        for p in producers:
            p.join(5)
        give_up.set()
        for p in producers:
            p.join(5)
        if t.is_alive():
            t.join(timeout=10)
    for i in range(2):
        assert isinstance(ended_by[i], RuntimeError), f"producer {i} was never refused"
    assert ran[0] == sum(accepted), f"accepted {sum(accepted)} callbacks, ran {ran[0]}"


# -- item 12: work accepted just before close runs whole -----------------------------------


def _body(ctx: AioContext, marks: list[int], i: int) -> int:
    corun.sleep(0)
    ctx.call_soon(marks.append, i)
    return i


@pytest.mark.timeout(10)
def test_coroutine_spawned_by_last_callback_before_stop_runs_whole() -> None:
    marks: list[int] = []
    spawned: list[Coroutine[int]] = []
    reported = threading.Event()
    t = IOThread()
    try:
        seen = recording_handler(t.ctx, reported)
        gate = threading.Event()
        blocked = threading.Event()

        def blocker() -> None:
            blocked.set()
            gate.wait(5)

        def spawner() -> None:
            spawned.append(t.ctx.spawn(_body, t.ctx, marks, 7))

        t.ctx.call_soon(blocker)
        assert blocked.wait(2)
        t.ctx.call_soon(t.stop)  # the loop leaves after this pass...
        t.ctx.call_soon(spawner)  # ...which spawns a coroutine: close() must run it whole
        gate.set()
        t.join(timeout=5)
    finally:
        if t.is_alive():
            t.join(timeout=5)
    assert len(spawned) == 1
    co = spawned[0]
    assert co.done, co
    assert co.exception() is None, repr(co.exception())
    assert co.result() == 7
    assert marks == [7]
    assert seen == []


@pytest.mark.timeout(30)
def test_spawn_racing_close_runs_whole_at_every_line() -> None:
    """A spawn from another thread lands at each line the IOThread runs while it closes.

    The IOThread is traced; at each distinct line of corun code it runs
    (outside coroutines) after join() asked it to stop, it waits while a
    helper thread spawns a coroutine on its context. Each spawn is either
    refused (RuntimeError) or accepted; every accepted coroutine must run
    whole: its sleep(0) and its call_soon work, it returns its value, and
    nothing reaches the exception handler.
    """
    t = IOThread()
    ctx = t.ctx
    seen = recording_handler(ctx)
    marks: list[int] = []
    armed = threading.Event()
    seen_lines: set[tuple[str, int]] = set()
    numbers = itertools.count()
    requests: queue.Queue[tuple[int, str, threading.Event] | None] = queue.Queue()
    accepted: dict[int, tuple[str, Coroutine[int]]] = {}
    refused: dict[int, str] = {}
    stuck: list[str] = []

    def spawner() -> None:
        while (request := requests.get()) is not None:
            i, line, done = request
            try:
                accepted[i] = (line, ctx.spawn(_body, ctx, marks, i))
            except RuntimeError as exc:
                refused[i] = f"{line}: {exc}"
            done.set()

    helper = threading.Thread(target=spawner)
    helper.start()

    def tracer(frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if event == "call":
            return tracer if in_corun(frame) else None
        if event == "line" and armed.is_set() and not corun.in_coroutine():
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in seen_lines:
                seen_lines.add(key)
                done = threading.Event()
                requests.put((next(numbers), where(frame), done))
                if not done.wait(1):
                    stuck.append(where(frame))
                    if len(stuck) >= 3:
                        armed.clear()
        return tracer

    def install() -> None:
        sys.settrace(tracer)
        frame = sys._getframe(1)
        while frame is not None:
            if in_corun(frame):
                frame.f_trace = tracer
            frame = frame.f_back  # type: ignore[assignment]

    try:
        ctx.call_sync(install, timeout=2)
        armed.set()
        t.join(timeout=20)
    finally:
        armed.clear()
        if t.is_alive():
            t.join(timeout=5)
        requests.put(None)
        helper.join(5)
    assert accepted, "no spawn was accepted at all: the test did not exercise anything"
    problems = []
    for i, (line, co) in sorted(accepted.items()):
        if not co.done:
            problems.append(f"spawn at {line}: never finished ({co!r})")
        elif co.exception() is not None:
            problems.append(f"spawn at {line}: raised {co.exception()!r}")
        elif co.result() != i or marks.count(i) != 1:
            problems.append(f"spawn at {line}: result {co.result()!r}, marks {marks.count(i)}")
    assert problems == [], "\n".join(problems)
    assert seen == []
    assert stuck == [], f"spawn() blocked while the IOThread was paused at {stuck}"


# -- item 13: timer.cancel() racing close --------------------------------------------------


def _cancel_paused_at_line(k: int) -> tuple[str | None, BaseException | None]:
    """Cancel a timer from a thread paused at its k-th line of corun code; join meanwhile.

    Returns where it paused (None: cancel() ran fewer than k lines) and what
    cancel() raised (None if nothing).
    """
    t = IOThread()
    timer = t.ctx.call_later(3600, noop)
    settle(t)
    checkpoint = threading.Event()
    resume = threading.Event()
    paused_at: list[str] = []
    outcome: list[BaseException | None] = []
    count = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Tracer | None:
        nonlocal count
        if event == "call":
            return tracer if in_corun(frame) else None
        if event == "line":
            count += 1
            if count == k:
                paused_at.append(where(frame))
                checkpoint.set()
                resume.wait(10)
        return tracer

    def canceller() -> None:
        sys.settrace(tracer)
        try:
            timer.cancel()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            sys.settrace(None)
            checkpoint.set()

    # join() from a third thread: stop() or close() may wait a moment for a lock
    # that the paused cancel holds; that is allowed, so we never wait on it blindly.
    joiner = threading.Thread(target=t.join, kwargs={"timeout": 10})
    th = threading.Thread(target=canceller)
    th.start()
    try:
        assert checkpoint.wait(5)
        if paused_at:
            joiner.start()
            joiner.join(0.1)  # usually the IOThread is closed by now
    finally:
        resume.set()
        th.join(5)
        if joiner.ident is not None:
            joiner.join(10)
        t.join(timeout=5)
    assert outcome, "the cancelling thread did not finish"
    return (paused_at[0] if paused_at else None), outcome[0]


@pytest.mark.timeout(60)
def test_timer_cancel_paused_at_every_line_while_iothread_joins() -> None:
    """timer.cancel() from a thread, paused at its k-th line while the IOThread closes.

    For k = 1, 2, ... the cancelling thread is stopped at the k-th line of
    corun code it runs, the IOThread is joined meanwhile, then the cancel
    goes on: it must never raise.
    """
    failures: list[str] = []
    for k in itertools.count(1):
        assert k < 500, "cancel() never finished without reaching the pause point"
        paused_at, raised = _cancel_paused_at_line(k)
        if raised is not None:
            failures.append(f"k={k} paused at {paused_at}: cancel() raised {raised!r}")
        if paused_at is None:
            break
    assert failures == [], "\n".join(failures)


@pytest.mark.timeout(10)
def test_cancel_and_delete_on_closed_context_are_noops() -> None:
    t = IOThread()
    timer = t.ctx.call_later(3600, noop)
    unarmed = t.ctx.timer(noop)
    bh = t.ctx.bh(noop)
    bh2 = t.ctx.bh(noop)
    t.join(timeout=5)
    timer.cancel()
    unarmed.cancel()
    bh.cancel()
    bh2.delete()
    assert not timer.pending
    assert not bh.scheduled and not bh2.scheduled
    with AioContext() as ctx:
        timer = ctx.call_later(3600, noop)
        bh = ctx.bh(noop)
        bh.schedule()
    timer.cancel()
    bh.cancel()
    bh.delete()


# -- item 14: an AioContext never closed is closed when collected ---------------------------


def _loop_fds() -> int:
    """How many eventfd and epoll fds this process holds."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target in ("anon_inode:[eventfd]", "anon_inode:[eventpoll]"):
            n += 1
    return n


@pytest.mark.timeout(10)
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_unclosed_context_is_closed_when_collected() -> None:
    gc.collect()
    before = _loop_fds()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(20):
            th = threading.Thread(target=AioContext, args=(f"leaked-{i}",))
            th.start()
            th.join(5)
        gc.collect()
    leaked = _loop_fds() - before
    assert leaked <= 0, f"{leaked} eventfd/epoll fds leaked by 20 unclosed contexts"
    resource_warnings = [w for w in record if issubclass(w.category, ResourceWarning)]
    assert len(resource_warnings) >= 1, "collecting unclosed contexts warned nothing"


# -- item 15: orphaned waiters are skipped iteratively -------------------------------------

ORPHANS = 1500


def _orphans(t: IOThread, fn: Callable[[], Any], count: int = ORPHANS) -> list[Coroutine[Any]]:
    """`count` coroutines on t running fn (they end up waiting), then t is joined."""
    cos = [t.ctx.spawn(fn) for _ in range(count)]
    settle(t)
    with ignore_resource_warnings():
        t.join(timeout=10)
    return cos


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["enter_next", "next", "restart_all"])
def test_orphaned_coqueue_waiters_do_not_recurse(how: str) -> None:
    q = CoQueue()
    with IOThread() as live:
        seen = recording_handler(live.ctx)
        orphans = _orphans(IOThread(), q.wait)
        dead = [co for co in orphans if not co.done]

        def wake_one() -> object:
            return getattr(q, how)()

        result: object = "RecursionError"
        try:
            result = live.ctx.spawn(wake_one).join(timeout=10)
        except RecursionError:
            pass  # failed below, outside the handler: the traceback is thousands of frames
        assert result != "RecursionError", f"CoQueue.{how}() recursed over {len(dead)} dead waiters"
        assert result in (False, 0)
        assert q.empty()
        if dead:
            assert len(seen) >= 1, "the dead waiters were skipped silently"
        # The queue still works.
        waiter = live.ctx.spawn(q.wait)
        settle(live)
        assert live.ctx.spawn(q.next).join(timeout=2) is True
        assert waiter.join(timeout=2) is True  # woken, not timed out


def _rwlock_round(lock: CoRwLock, write: bool) -> str:
    if write:
        lock.wrlock()
    else:
        lock.rdlock()
    lock.unlock()
    return "w" if write else "r"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kinds", ["readers", "writers", "mixed"])
def test_orphaned_corwlock_waiters_do_not_recurse(kinds: str) -> None:
    lock = CoRwLock()
    with IOThread() as live:
        seen = recording_handler(live.ctx)
        holding = threading.Event()
        release = CoQueue()

        def writer_holds() -> None:
            lock.wrlock()
            holding.set()
            release.wait()
            lock.unlock()

        holder = live.ctx.spawn(writer_holds)
        assert holding.wait(2)
        modes = itertools.cycle(
            {"readers": [False], "writers": [True], "mixed": [False, True]}[kinds]
        )
        orphan_thread = IOThread()
        cos = [
            orphan_thread.ctx.spawn(lock.wrlock if write else lock.rdlock)
            for write in itertools.islice(modes, ORPHANS)
        ]
        settle(orphan_thread)
        with ignore_resource_warnings():
            orphan_thread.join(timeout=10)
        dead = [co for co in cos if not co.done]
        assert live.ctx.spawn(release.next).join(timeout=2) is True
        recursed = True
        try:
            holder.join(timeout=10)
            recursed = False
        except RecursionError:
            pass  # failed below, outside the handler: the traceback is thousands of frames
        assert not recursed, f"CoRwLock.unlock() recursed over {len(dead)} dead waiters"
        if dead:
            assert len(seen) >= 1, "the dead waiters were skipped silently"
        # Consistent afterwards: writers and readers get in and out (no phantom hold).
        for write in (True, False, True, False, False, True):
            co = live.ctx.spawn(_rwlock_round, lock, write)
            assert co.join(timeout=2) == ("w" if write else "r"), f"{lock!r} is wedged"


# -- item 16: a spurious wake of a coroutine parked in CoMutex.acquire -----------------------


def spurious_wake_scenario() -> None:
    """Checks with explicit raises, not assert: it also runs under `python -O`."""

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(what)

    events: list[str] = []
    reports: list[BaseException] = []
    mutex = CoMutex()
    parked = CoQueue()
    with AioContext() as ctx:
        ctx.set_exception_handler(lambda _ctx, exc, origin: reports.append(exc))

        def holder() -> None:
            mutex.acquire()
            events.append("holder in")
            parked.wait()
            events.append("holder out")
            mutex.release()

        def contender() -> None:
            mutex.acquire()
            events.append(f"contender in, holder={mutex.holder is corun.current_coroutine()}")
            mutex.release()

        h = ctx.spawn(holder, name="holder")
        c = ctx.spawn(contender, name="contender")
        drain(ctx)
        check(events == ["holder in"], f"setup: {events}")
        check(mutex.holder is h, f"setup: {mutex!r}")
        raised: list[BaseException] = []
        try:
            corun.wake(c)  # spurious: nobody released the mutex
        except RuntimeError as exc:
            raised.append(exc)
        drain(ctx)
        check(events == ["holder in"], f"the spurious wake broke mutual exclusion: {events}")
        check(mutex.holder is h, f"the holder lost the mutex: {mutex!r}")
        errors = [e for e in raised + reports if isinstance(e, RuntimeError)]
        check(errors != [], f"the spurious wake was not reported: raised={raised} {reports=}")
        check(
            any("CoMutex" in str(e) or "contender" in str(e) for e in errors),
            f"the report names neither the mutex nor the coroutine: {errors}",
        )
        check(
            all(isinstance(e, RuntimeError) for e in reports),
            f"other exceptions reported: {reports}",
        )
        check(parked.next(), "the holder was not waiting")
        drain(ctx)
        check(
            events == ["holder in", "holder out", "contender in, holder=True"],
            f"after the release: {events}",
        )
        check(h.done and c.done, f"{h!r} {c!r}")
        check(c.exception() is None, f"contender raised {c.exception()!r}")


@pytest.mark.timeout(10)
def test_spurious_wake_in_comutex_acquire_keeps_exclusion() -> None:
    spurious_wake_scenario()


@pytest.mark.timeout(30)
def test_spurious_wake_in_comutex_acquire_keeps_exclusion_under_python_O() -> None:
    code = (
        "import sys\n"
        f"sys.path[:0] = [{TESTS_DIR!r}, {os.path.dirname(os.path.dirname(CORUN_DIR))!r}]\n"
        "assert False, 'asserts are on: -O was ignored'\n"
        "import corun\n"
        f"if corun.__file__ != {corun.__file__!r}: sys.exit('wrong corun: ' + corun.__file__)\n"
        "from test_reliability import spurious_wake_scenario\n"
        "spurious_wake_scenario()\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-O", "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=os.path.dirname(TESTS_DIR),
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# -- item 17: contextvars ---------------------------------------------------------------------

req: contextvars.ContextVar[str] = contextvars.ContextVar("req")


def _request(seen: list[str | None], i: int) -> None:
    seen.append(req.get(None))
    req.set(f"req-{i}")


@pytest.mark.timeout(10)
def test_contextvar_set_by_coroutine_not_seen_by_next_one() -> None:
    seen: list[str | None] = []
    with AioContext() as ctx:
        for i in range(5):
            ctx.spawn(_request, seen, i)
            drain(ctx)
    assert seen == [None] * 5


@pytest.mark.timeout(10)
def test_contextvar_not_leaked_between_coroutines_on_iothread() -> None:
    seen: list[str | None] = []
    with IOThread() as t:
        for i in range(5):
            t.ctx.spawn(_request, seen, i).join(timeout=2)
    assert seen == [None] * 5


def _read_then_set() -> str | None:
    value = req.get(None)
    req.set("set inside")
    return value


@pytest.mark.timeout(10)
def test_coroutine_starts_with_copy_of_creators_context() -> None:
    def scenario() -> None:
        req.set("creator")
        co = Coroutine(_read_then_set)
        co.enter()
        assert co.result() == "creator"
        assert req.get() == "creator"
        with AioContext() as ctx:
            spawned = ctx.spawn(_read_then_set)
            assert spawned.join(timeout=2) == "creator"
            assert req.get() == "creator"
            req.set("changed after spawn")
            later = ctx.spawn(_read_then_set)
            drain(ctx)
            assert later.result() == "changed after spawn"
        with IOThread() as t:
            remote = t.ctx.spawn(_read_then_set)
            assert remote.join(timeout=2) == "changed after spawn"
        assert req.get() == "changed after spawn"

    contextvars.copy_context().run(scenario)


@pytest.mark.timeout(10)
def test_coroutine_context_copied_at_creation_not_at_first_run() -> None:
    def scenario() -> None:
        req.set("at creation")
        with AioContext() as ctx:
            co = ctx.spawn(_read_then_set)
            req.set("after creation")
            drain(ctx)
            assert co.result() == "at creation"
        assert req.get() == "after creation"

    contextvars.copy_context().run(scenario)
