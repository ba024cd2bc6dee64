"""Tests for corun.run (the asyncio.run of corun) and for os.fork() (API.md, Processes)."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

import corun
from corun import AioContext, IOThread, current_context, current_coroutine, run, yield_

pytestmark = pytest.mark.timeout(20)


def test_run_returns_result():
    seen = {}

    def main(a, *, b):
        seen["ctx"] = current_context()
        seen["co"] = current_coroutine()
        return a + b

    assert run(main, 40, b=2) == 42
    assert isinstance(seen["ctx"], AioContext)
    assert seen["co"] is not None
    # The context is closed and forgotten afterwards.
    assert current_context() is None
    with pytest.raises(RuntimeError):
        seen["ctx"].call_soon(lambda: None)


def test_run_raises_exception_only_to_the_caller(caplog):
    err = ValueError("for the caller")

    def main():
        yield_later()
        raise err

    def yield_later():
        current_context().call_soon(corun.wake, current_coroutine())
        yield_()

    with caplog.at_level(logging.DEBUG, logger="corun"):
        with pytest.raises(ValueError) as info:
            run(main)
    assert info.value is err
    assert [r for r in caplog.records if r.name == "corun"] == []
    assert current_context() is None


def test_run_drives_the_loop_for_the_coroutine():
    """fn can wait for other coroutines, callbacks and timers of its context."""
    events = []

    def child(tag):
        events.append(tag)
        return tag * 2

    def main():
        ctx = current_context()
        ctx.call_soon(events.append, "callback")
        children = [ctx.spawn(child, i) for i in range(3)]
        results = [c.join() for c in children]
        sleeper = ctx.spawn(sleep_on_timer, ctx)
        sleeper.join()
        return results

    def sleep_on_timer(ctx):
        ctx.call_later(0.01, corun.wake, current_coroutine())
        yield_()
        events.append("timer woke sleeper")

    assert run(main) == [0, 2, 4]
    assert events == ["callback", 0, 1, 2, "timer woke sleeper"]


def test_run_finishes_queued_work_before_returning():
    events = []

    def main():
        current_context().spawn(events.append, "spawned, never joined")
        return "done"

    assert run(main) == "done"
    assert events == ["spawned, never joined"]


def test_run_with_open_context_raises():
    with AioContext("already-open") as ctx:
        with pytest.raises(RuntimeError, match="already-open"):
            run(lambda: 1)
        assert current_context() is ctx
        assert ctx.spawn(lambda: "ok").join() == "ok"


def test_run_in_other_threads():
    results = []
    lock = threading.Lock()

    def worker(i):
        value = run(lambda: threading.current_thread().name)
        with lock:
            results.append((i, value))

    threads = [threading.Thread(target=worker, args=(i,), name=f"runner-{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [(i, f"runner-{i}") for i in range(3)]


def test_run_twice_in_a_row():
    assert run(lambda: 1) == 1
    assert run(lambda: 2) == 2


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_run_in_forked_child():
    """After IOThreads ran in the parent (one still running), a child can run()."""
    with IOThread(name="parent-io-1") as done_before:
        assert done_before.ctx.call_sync(lambda: 1) == 1
    r, w = os.pipe()
    with AioContext("parent-ctx"), IOThread(name="parent-io-2") as live:
        assert live.ctx.call_sync(lambda: 2) == 2
        pid = os.fork()
        if pid == 0:  # child: report through the pipe, always leave with _exit
            status = 1
            try:
                signal.alarm(20)  # never outlive the test
                os.close(r)
                checks = [
                    ("no current context", current_context() is None),
                    ("run returns", run(lambda: 42) == 42),
                ]
                with IOThread(name="child-io") as t:
                    checks.append(("child iothread", t.ctx.call_sync(lambda: 7) == 7))
                checks.append(("run again", run(lambda: 43) == 43))
                failed = [name for name, ok in checks if not ok]
                os.write(w, ("ok" if not failed else "failed: " + ", ".join(failed)).encode())
                status = 0
            except BaseException as exc:
                try:
                    os.write(w, f"error: {exc!r}".encode())
                except BaseException:
                    pass
            finally:
                os._exit(status)
        os.close(w)
        try:
            chunks = []
            while True:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(r)
            _, wait_status = os.waitpid(pid, 0)
        report = b"".join(chunks).decode()
        assert report == "ok"
        assert os.waitstatus_to_exitcode(wait_status) == 0
        # The parent's own context and IOThread are unaffected.
        assert live.ctx.call_sync(lambda: 3) == 3
