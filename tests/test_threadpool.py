"""Tests for corun.threadpool: run_in_thread().

/thread-pool/submit-co and /thread-pool/submit-many port QEMU's
tests/unit/test-thread-pool.c (submit-many with coroutines, the only way to
submit in corun); the rest checks API.md: exceptions reach the coroutine,
the function really runs in another thread, and the coroutine resumes on
its home thread and context.
"""

from __future__ import annotations

import threading

import pytest
from helpers import wait_until

from corun import AioContext, Coroutine, IOThread, current_context, run_in_thread

pytestmark = pytest.mark.timeout(20)

EINPROGRESS = "in progress"


@pytest.fixture
def ctx():
    with AioContext("test-threadpool") as c:
        yield c


class WorkerTestData:
    def __init__(self):
        self.n = 0
        self.ret = EINPROGRESS
        self.lock = threading.Lock()


def worker_cb(data):
    """QEMU's worker_cb: qatomic_fetch_inc(&data->n)."""
    with data.lock:
        old = data.n
        data.n += 1
    return old


def test_submit_co(ctx):
    """/thread-pool/submit-co: the coroutine yields at the submit, the loop finishes it."""
    data = WorkerTestData()
    state = {"active": 0}

    def co_test_cb():
        state["active"] = 1
        data.n = 0
        data.ret = EINPROGRESS
        old = run_in_thread(worker_cb, data)
        # The test continues in test_submit_co, after co.enter()...
        assert old == 0
        assert data.n == 1
        data.ret = 0
        state["active"] -= 1
        # ...and ends there, after ctx.poll().

    co = Coroutine(co_test_cb)
    co.enter()

    # Back here once the work is submitted: the coroutine waits for it.
    assert state["active"] == 1
    assert data.ret == EINPROGRESS

    # poll() runs the rest of the coroutine.
    while data.ret == EINPROGRESS:
        ctx.poll(blocking=True)

    # Back here after the coroutine has finished.
    assert state["active"] == 0
    assert data.ret == 0
    assert co.done and co.result() is None


def test_submit_many(ctx):
    """/thread-pool/submit-many: 100 coroutines at once, more than there are workers."""
    data = [WorkerTestData() for _ in range(100)]
    state = {"active": 0}

    def submitter(d):
        d.ret = run_in_thread(worker_cb, d)
        state["active"] -= 1

    cos = [ctx.spawn(submitter, d) for d in data]
    state["active"] = 100
    while state["active"] > 0:
        ctx.poll(blocking=True)
    assert [d.n for d in data] == [1] * 100
    assert [d.ret for d in data] == [0] * 100
    assert [co.result() for co in cos] == [None] * 100


def test_submit_many_on_iothreads():
    """submit-many, with the coroutines spread over two IOThreads."""
    data = [WorkerTestData() for _ in range(100)]

    def submitter(d):
        d.ret = run_in_thread(worker_cb, d)
        return d.ret

    with IOThread("pool-a") as a, IOThread("pool-b") as b:
        cos = [(a, b)[i % 2].ctx.spawn(submitter, d) for i, d in enumerate(data)]
        results = [co.join(15) for co in cos]
    assert results == [0] * 100
    assert [d.n for d in data] == [1] * 100


def test_arguments_and_result(ctx):
    def fn(a, b, *, c):
        return (a, b, c)

    assert ctx.spawn(lambda: run_in_thread(fn, 1, 2, c=3)).join(10) == (1, 2, 3)


def test_exception_propagates_into_the_coroutine(ctx):
    raised = []
    caught = []

    def fail(msg):
        exc = ValueError(msg)
        raised.append(exc)
        raise exc

    def body():
        try:
            run_in_thread(fail, "boom")
        except ValueError as exc:
            caught.append(exc)
        # The coroutine goes on normally afterwards.
        return run_in_thread(lambda: "after")

    co = ctx.spawn(body)
    assert co.join(10) == "after"
    assert len(caught) == 1 and caught[0] is raised[0]
    assert str(caught[0]) == "boom"


def test_uncaught_exception_finishes_the_coroutine(ctx):
    def body():
        run_in_thread(int, "not a number")

    co = ctx.spawn(body)
    with pytest.raises(ValueError, match="not a number"):
        co.join(10)


def test_runs_in_another_thread_and_resumes_at_home():
    seen = {}

    def body():
        seen["home"] = (threading.get_ident(), current_context())
        seen["worker"] = run_in_thread(threading.get_ident)
        seen["after"] = (threading.get_ident(), current_context())

    with IOThread("pool-home") as t:
        t.ctx.spawn(body).join(10)
        iothread_ident = t.ctx.call_sync(threading.get_ident)
        home_ctx = t.ctx
    assert seen["home"] == (iothread_ident, home_ctx)
    assert seen["worker"] not in (iothread_ident, threading.get_ident())
    assert seen["after"] == seen["home"]


def test_blocking_work_does_not_block_the_loop():
    """While the worker blocks, other coroutines of the same IOThread run."""
    release = threading.Event()
    events = []

    def blocker():
        events.append("blocker submits")
        result = run_in_thread(release.wait, 10)
        events.append("blocker resumed")
        return result

    def other():
        events.append("other runs")
        release.set()

    with IOThread("pool-loop") as t:
        b = t.ctx.spawn(blocker)
        o = t.ctx.spawn(other)
        assert b.join(15) is True
        o.join(10)
    assert events == ["blocker submits", "other runs", "blocker resumed"]


def test_outside_a_coroutine():
    with pytest.raises(RuntimeError, match=r"run_in_thread\(\) called outside a coroutine"):
        run_in_thread(print)


def test_arguments_are_let_go_on_the_home_thread():
    """The worker drops its references to the call before it completes the
    future, so the caller's are the last: a large buffer is freed by the
    thread that allocated it (freed in the worker, glibc trimmed the
    allocating thread's heap and the next buffer faulted every page back
    in: ~100k page faults per GiB written through the pool)."""
    freed_in = []

    class Probe:
        def __del__(self):
            freed_in.append(threading.get_ident())

    def body():
        for _ in range(200):
            run_in_thread(lambda probe: None, Probe())
        return threading.get_ident()

    with IOThread("pool-free") as t:
        home = t.ctx.spawn(body).join(15)
    assert len(freed_in) == 200
    assert set(freed_in) == {home}


def test_set_thread_pool_size_bounds_the_workers():
    """With 2 workers, at most 2 calls run at once however many are submitted;
    a new size takes effect for new calls while queued ones finish."""
    lock = threading.Lock()
    running = 0
    peak = 0
    gate = threading.Event()

    def work():
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gate.wait(10)
        with lock:
            running -= 1
        return threading.get_ident()

    with IOThread("pool-size") as t:
        t.ctx.call_sync(t.ctx.set_thread_pool_size, 2)
        cos = [t.ctx.spawn(run_in_thread, work) for _ in range(6)]
        wait_until(lambda: running == 2)
        t.ctx.call_sync(t.ctx.set_thread_pool_size, 3)  # the 4 queued stay where they are
        gate.set()
        idents = {co.join(10) for co in cos}
        assert len(idents) <= 2
        gate.clear()
        cos = [t.ctx.spawn(run_in_thread, work) for _ in range(6)]
        wait_until(lambda: running == 3)
        gate.set()
        idents = {co.join(10) for co in cos}
    assert len(idents) == 3
    assert peak == 3


@pytest.mark.parametrize(
    ("size", "error", "match"),
    [
        (0, ValueError, r"set_thread_pool_size\(\): max_workers must be >= 1, got 0"),
        (-3, ValueError, r"max_workers must be >= 1, got -3"),
        (2.0, TypeError, r"max_workers must be an int, got 2.0"),
        (True, TypeError, r"max_workers must be an int, got True"),
    ],
)
def test_set_thread_pool_size_rejects_bad_sizes(ctx, size, error, match):
    with pytest.raises(error, match=match):
        ctx.set_thread_pool_size(size)
    assert ctx.spawn(lambda: run_in_thread(lambda: 7)).join(10) == 7  # the pool still works


def test_set_thread_pool_size_from_another_thread_is_refused():
    with IOThread("pool-other") as t, pytest.raises(RuntimeError, match="only its home thread"):
        t.ctx.set_thread_pool_size(4)
