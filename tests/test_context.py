"""Tests for corun.context: AioContext, wake, current_context.

Ports QEMU's /aio/coroutine/queue-chaining and
/aio/coroutine/worker-thread-co-enter (tests/unit/test-aio.c); the rest
checks the AioContext contract of API.md: poll's result, notify, the
schedule/wake/enter rules, call_soon and call_sync, the exception handler,
stats, close, and that every misuse raises a RuntimeError naming the
culprit and leaves the context working.
"""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
from helpers import drain, in_other_thread

import corun
from corun import AioContext, Coroutine, IOThread, current_context, current_coroutine, yield_

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-ctx") as c:
        yield c


@pytest.fixture
def iothread():
    with IOThread(name="test-ctx-io") as t:
        yield t


def assert_still_works(ctx: AioContext) -> None:
    """The context can still run new work (a spawned coroutine and a callback)."""
    ran = []
    ctx.call_soon(ran.append, "callback")
    co = ctx.spawn(lambda: "alive")
    assert co.join(timeout=10) == "alive"
    while len(ran) < 1:
        ctx.poll(True)
    assert ran == ["callback"]


def pin(ctx: AioContext):
    """Keep ctx's loop busy inside a callback until the returned Event is set."""
    started = threading.Event()
    release = threading.Event()

    def blocker():
        started.set()
        release.wait(20)

    ctx.call_soon(blocker)
    assert started.wait(10)
    return release


# -- poll and notify -----------------------------------------------------------


def test_poll_on_fresh_context_is_false(ctx):
    result = ctx.poll(False)
    assert result is False


def test_poll_returns_true_bool_after_progress(ctx):
    ctx.call_soon(lambda: None)
    result = ctx.poll(False)
    assert result is True
    assert ctx.poll(False) is False


@pytest.mark.parametrize(
    "kind", ["call_soon", "bh", "coroutine", "timer", "resumed coroutine", "fd handler"]
)
def test_each_kind_of_work_counts_as_progress(ctx, kind):
    if kind == "call_soon":
        ctx.call_soon(lambda: None)
    elif kind == "bh":
        ctx.bh(lambda: None).schedule()
    elif kind == "coroutine":
        ctx.spawn(lambda: None)
    elif kind == "timer":
        ctx.call_at(ctx.time() - 1, lambda: None)
    elif kind == "resumed coroutine":
        co = ctx.spawn(yield_)
        assert ctx.poll(False) is True
        ctx.schedule(co)
    else:
        e = corun.EventNotifier()
        ctx.add_reader(e, e.test_and_clear)
        e.set()
    assert ctx.poll(False) is True
    assert ctx.poll(False) is False
    if kind == "fd handler":
        ctx.remove_reader(e)
        e.close()


def test_drained_context_poll_is_false(ctx):
    for _ in range(3):
        ctx.call_soon(lambda: None)
        ctx.spawn(lambda: None)
    while ctx.poll(False):
        pass
    assert ctx.poll(False) is False


def test_notify_is_housekeeping(ctx):
    """notify() makes poll(True) return at once, without reporting progress."""
    ctx.notify()
    assert ctx.poll(True) is False
    ctx.notify()
    ctx.notify()
    assert ctx.poll(False) is False


def test_notify_from_another_thread_wakes_blocked_poll(ctx):
    # Whether the notify lands before or during the poll, the poll must return.
    t = threading.Thread(target=ctx.notify)
    t.start()
    assert ctx.poll(True) is False
    t.join(10)


def test_call_soon_from_another_thread_wakes_blocked_poll(ctx):
    ran = []
    t = threading.Thread(target=ctx.call_soon, args=(ran.append, "remote"))
    t.start()
    while not ran:
        ctx.poll(True)
    t.join(10)
    assert ran == ["remote"]


# -- current_context, one context per thread, naming ------------------------------


def test_current_context():
    assert current_context() is None
    with AioContext("mine") as ctx:
        assert current_context() is ctx
        ok, value = in_other_thread(current_context)
        assert ok and value is None
    assert current_context() is None


def test_one_open_context_per_thread():
    with AioContext("first") as first:
        with pytest.raises(RuntimeError) as info:
            AioContext("second")
        assert repr(first) in str(info.value)
        assert current_context() is first
        assert_still_works(first)
    # Once closed, the thread may open another.
    with AioContext("third") as third:
        assert current_context() is third


def test_contexts_in_different_threads(ctx):
    def other():
        with AioContext("other") as mine:
            assert current_context() is mine
            return mine.name

    assert in_other_thread(other) == (True, "other")
    assert current_context() is ctx


def test_name_and_repr():
    with AioContext("named") as ctx:
        assert ctx.name == "named"
        assert "named" in repr(ctx)
        assert "open" in repr(ctx)
    assert "closed" in repr(ctx)
    with AioContext() as a:
        default_name = a.name
    with AioContext() as b:
        assert isinstance(default_name, str) and default_name
        assert b.name != default_name


# -- schedule ----------------------------------------------------------------------


def test_schedule_is_fifo(ctx):
    events = []
    cos = [Coroutine(events.append, i) for i in range(5)]
    for i in (2, 0, 4, 1, 3):
        ctx.schedule(cos[i])
    assert ctx.poll(False) is True
    assert events == [2, 0, 4, 1, 3]


def test_schedule_sets_ctx_and_scheduled(ctx):
    co = Coroutine(lambda: None)
    assert co.ctx is None and not co.scheduled
    ctx.schedule(co)
    assert co.ctx is ctx
    assert co.scheduled
    ctx.poll(False)
    assert not co.scheduled and co.done


def test_schedule_from_other_threads_is_fifo_per_thread(ctx):
    events = []

    def produce(tag):
        for i in range(200):
            ctx.spawn(events.append, (tag, i))

    threads = [threading.Thread(target=produce, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    while len(events) < 400:
        ctx.poll(True)
    for tag in "ab":
        assert [i for t, i in events if t == tag] == list(range(200))


def test_new_coroutine_binds_to_the_thread_of_the_context_it_is_scheduled_on(ctx, iothread):
    where = []

    def body():
        where.append(threading.current_thread().name)
        yield_()

    co = Coroutine(body, name="travels")
    iothread.ctx.schedule(co)
    assert co.ctx is iothread.ctx
    iothread.ctx.call_sync(lambda: None)  # the scheduled coroutine has run
    assert where == ["test-ctx-io"]
    # It lives there now: it cannot be scheduled here nor entered from here.
    with pytest.raises(RuntimeError) as info:
        ctx.schedule(co)
    assert "travels" in str(info.value) and ctx.name in str(info.value)
    with pytest.raises(RuntimeError, match="travels"):
        co.enter()
    corun.wake(co)  # from another thread: scheduled on its home context
    assert co.join(timeout=10) is None
    assert_still_works(ctx)


def test_running_coroutine_may_schedule_itself_then_yield(ctx):
    """Publish-then-yield: the loop enters it again only after it yielded."""
    events = []

    def body():
        events.append("before")
        ctx.schedule(current_coroutine())
        events.append(("scheduled while running", current_coroutine().scheduled))
        yield_()
        events.append("after")

    co = ctx.spawn(body)
    assert ctx.poll(False) is True
    events.append("pass")
    assert ctx.poll(False) is True
    assert events == ["before", ("scheduled while running", True), "pass", "after"]
    assert co.done


def test_schedule_from_another_thread_while_running(iothread):
    """A coroutine publishes itself, another thread schedules it before it yields."""
    published = threading.Event()
    proceed = threading.Event()
    events = []

    def body():
        events.append("publish")
        published.set()
        proceed.wait(10)  # the other thread schedules us meanwhile
        events.append(("still running", current_coroutine().scheduled))
        yield_()
        events.append("resumed")

    co = iothread.ctx.spawn(body)
    assert published.wait(10)
    iothread.ctx.schedule(co)
    proceed.set()
    co.join(timeout=10)
    assert events == ["publish", ("still running", True), "resumed"]


# -- wake and ctx.enter ------------------------------------------------------------


def test_wake_on_home_thread_enters_at_once(ctx):
    events = []

    def body():
        events.append("start")
        yield_()
        events.append("woken")

    co = ctx.spawn(body)
    ctx.poll(False)
    events.append("before wake")
    corun.wake(co)
    events.append("after wake")
    assert events == ["start", "before wake", "woken", "after wake"]
    assert co.done


def test_wake_from_another_thread_schedules(ctx):
    events = []

    def body():
        events.append("start")
        yield_()
        events.append(("woken in", threading.current_thread() is threading.main_thread()))

    co = ctx.spawn(body)
    ctx.poll(False)
    ok, _ = in_other_thread(lambda: corun.wake(co))
    assert ok
    assert co.scheduled
    assert events == ["start"]
    assert ctx.poll(False) is True
    assert events == ["start", ("woken in", True)]


def test_deferred_wake_inside_coroutine_does_not_nest(ctx):
    """wake() of a coroutine of the same context runs it after the waker yields."""
    events = []

    def sleeper():
        events.append("B start")
        yield_()
        events.append(("B woken, A entered?", a.entered))

    def waker():
        events.append("A before wake")
        corun.wake(b)
        events.append(("A after wake, B scheduled?", b.scheduled, "B entered?", b.entered))
        yield_()
        events.append("A resumed")

    b = ctx.spawn(sleeper)
    ctx.poll(False)
    a = ctx.spawn(waker)
    assert ctx.poll(False) is True
    assert events == [
        "B start",
        "A before wake",
        ("A after wake, B scheduled?", True, "B entered?", False),
        ("B woken, A entered?", False),
    ]
    assert b.done and not a.done
    ctx.schedule(a)
    a.join()
    assert events[-1] == "A resumed"


def test_deferred_wakes_run_in_order_after_waker_finishes(ctx):
    events = []

    def sleeper(tag):
        yield_()
        events.append(tag)

    sleepers = [ctx.spawn(sleeper, i) for i in range(3)]
    ctx.poll(False)

    def waker():
        for s in (sleepers[2], sleepers[0], sleepers[1]):
            ctx.enter(s)
        events.append("waker done")

    ctx.spawn(waker)
    ctx.poll(False)
    assert events == ["waker done", 2, 0, 1]


def test_ctx_enter_outside_coroutine_enters_at_once(ctx):
    events = []
    co = Coroutine(events.append, "ran")
    ctx.enter(co)
    assert events == ["ran"]
    assert co.done and co.ctx is ctx


def test_ctx_enter_from_another_thread_schedules(ctx):
    events = []
    co = Coroutine(lambda: events.append(threading.current_thread() is threading.main_thread()))
    ok, _ = in_other_thread(lambda: ctx.enter(co))
    assert ok and co.scheduled and events == []
    assert ctx.poll(False) is True
    assert events == [True]


def test_wake_without_context(ctx):
    """A coroutine with no context is woken from its own thread only."""

    def main():
        events = []

        def sleeper():
            yield_()
            events.append("sleeper woken")

        def waker(s):
            corun.wake(s)  # deferred: this coroutine is running
            events.append("waker after wake")

        s = Coroutine(sleeper)
        s.enter()
        assert s.ctx is None
        Coroutine(waker, s).enter()
        assert events == ["waker after wake", "sleeper woken"]

        s2 = Coroutine(sleeper)
        s2.enter()
        corun.wake(s2)  # outside coroutines: entered at once
        assert events[-1] == "sleeper woken" and s2.done

        s3 = Coroutine(sleeper, name="no-home")
        s3.enter()
        return s3

    ok, s3 = in_other_thread(main)
    assert ok
    # From any other thread: no context to schedule it on.
    with pytest.raises(RuntimeError, match="no-home"):
        corun.wake(s3)
    assert_still_works(ctx)


def test_wake_self_raises(ctx):
    errors = []

    def body():
        try:
            corun.wake(current_coroutine())
        except RuntimeError as exc:
            errors.append(str(exc))

    co = ctx.spawn(body, name="self-waker")
    co.join()
    assert len(errors) == 1 and "self-waker" in errors[0]
    assert_still_works(ctx)


# -- QEMU /aio/coroutine/* ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_queue_chaining(ctx):
    """/aio/coroutine/queue-chaining: 25,000 mutual ctx.enter + yield_, no recursion."""

    class ChainData:
        def __init__(self) -> None:
            self.other: Coroutine | None = None
            self.i = 0
            self.max = 25_000

    def chain(data: ChainData) -> None:
        data.i = 0
        while data.i < data.max:
            assert data.other is not None
            ctx.enter(data.other)  # queue up the other coroutine...
            yield_()  # ...and give control to it
            data.i += 1

    data_a = ChainData()
    data_b = ChainData()
    data_b.other = Coroutine(chain, data_a)
    data_a.other = Coroutine(chain, data_b)

    data_b.other.enter()  # RecursionError here if chains nested

    assert data_a.i == data_a.max
    assert data_b.i == data_b.max - 1

    # Allow the second coroutine to terminate.
    data_a.other.enter()
    assert data_b.i == data_b.max
    assert data_a.other.done and data_b.other.done


def test_worker_thread_co_enter(ctx):
    """/aio/coroutine/worker-thread-co-enter: ctx.enter from a worker schedules here."""
    main_thread = threading.current_thread()
    seen = []
    co = Coroutine(lambda: seen.append(threading.current_thread() is main_thread))

    worker = threading.Thread(target=ctx.enter, args=(co,), name="test_acquire_thread")
    worker.start()
    worker.join(10)
    assert not worker.is_alive()

    assert ctx.poll(True) is True
    assert ctx.poll(False) is False
    assert seen == [True]
    assert co.done


# -- call_soon ------------------------------------------------------------------------


def test_call_soon_order_and_args(ctx):
    events = []
    for i in range(5):
        ctx.call_soon(events.append, i)
    ctx.call_soon(lambda *a: events.append(a), "x", 2)
    assert ctx.poll(False) is True
    assert events == [0, 1, 2, 3, 4, ("x", 2)]


def test_call_soon_from_callback_runs_at_next_poll(ctx):
    events = []

    def first():
        events.append("first")
        ctx.call_soon(events.append, "queued by first")

    ctx.call_soon(first)
    ctx.call_soon(events.append, "second")
    assert ctx.poll(False) is True
    assert events == ["first", "second"]
    assert ctx.poll(False) is True
    assert events == ["first", "second", "queued by first"]


# -- call_sync --------------------------------------------------------------------------


def test_call_sync_from_plain_thread(iothread):
    def fn(a, *, b):
        return (threading.current_thread().name, a, b)

    assert iothread.ctx.call_sync(fn, 1, b=2) == ("test-ctx-io", 1, 2)


def test_call_sync_from_home_thread_calls_directly(ctx):
    events = []

    def fn(x):
        events.append(("in fn", current_context() is ctx))
        return x * 2

    assert ctx.call_sync(fn, 21) == 42
    assert events == [("in fn", True)]  # no poll needed

    def in_coroutine():
        return ctx.call_sync(fn, 1)

    assert ctx.spawn(in_coroutine).join() == 2


def test_call_sync_from_coroutine_on_another_context_yields(iothread):
    """The caller's loop keeps running while its coroutine waits for the answer."""
    with IOThread(name="caller-io") as caller:
        caller_loop_ran = threading.Event()

        def fn():
            # Only true if the caller's loop ran a callback meanwhile, i.e.
            # the calling coroutine yielded instead of blocking its thread.
            return caller_loop_ran.wait(10), threading.current_thread().name

        def body():
            caller.ctx.call_soon(caller_loop_ran.set)
            result = iothread.ctx.call_sync(fn)
            return result, threading.current_thread().name

        co = caller.ctx.spawn(body)
        assert co.join(timeout=15) == ((True, "test-ctx-io"), "caller-io")


def test_call_sync_exception_goes_to_caller_only(iothread):
    seen = []
    iothread.ctx.set_exception_handler(lambda c, exc, origin: seen.append(exc))
    err = KeyError("only for the caller")

    def fail():
        raise err

    with pytest.raises(KeyError) as info:
        iothread.ctx.call_sync(fail)
    assert info.value is err
    assert iothread.ctx.call_sync(lambda: "still running") == "still running"
    assert seen == []


def test_call_sync_exception_from_coroutine_caller(iothread, ctx):
    seen = []
    iothread.ctx.set_exception_handler(lambda c, exc, origin: seen.append(exc))
    ctx.set_exception_handler(lambda c, exc, origin: seen.append(exc))

    def fail():
        raise ValueError("remote")

    def body():
        try:
            iothread.ctx.call_sync(fail)
        except ValueError as exc:
            return str(exc)

    assert ctx.spawn(body).join(timeout=10) == "remote"
    assert seen == []


def test_call_sync_timeout_from_plain_thread(iothread):
    release = pin(iothread.ctx)
    late = []
    try:
        with pytest.raises(TimeoutError):
            iothread.ctx.call_sync(late.append, "late", timeout=0.05)
    finally:
        release.set()
    # The loop goes on; the abandoned call may still run, its outcome dropped.
    assert iothread.ctx.call_sync(lambda: "after") == "after"
    assert late == ["late"]


def test_call_sync_timeout_from_coroutine(iothread, ctx):
    release = pin(iothread.ctx)
    try:

        def body():
            try:
                iothread.ctx.call_sync(lambda: None, timeout=0.05)
            except TimeoutError:
                return "timed out"

        assert ctx.spawn(body).join(timeout=10) == "timed out"
    finally:
        release.set()
    assert iothread.ctx.call_sync(lambda: 1) == 1


def test_call_sync_on_closed_context_raises():
    ctx = AioContext("closed-for-sync")
    ctx.close()
    with pytest.raises(RuntimeError, match="closed-for-sync"):
        ctx.call_sync(lambda: None)
    ok, exc = in_other_thread(lambda: ctx.call_sync(lambda: None))
    assert not ok and isinstance(exc, RuntimeError) and "closed-for-sync" in str(exc)


# -- exception handler ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[AioContext, BaseException, object]] = []

    def __call__(self, ctx, exc, origin):
        self.calls.append((ctx, exc, origin))


def failing(exc):
    def fn(*args):
        raise exc

    return fn


def test_handler_gets_coroutine_exceptions_and_loop_goes_on(ctx):
    """A coroutine's exception that nobody retrieves goes to the handler once dropped."""
    rec = Recorder()
    ctx.set_exception_handler(rec)
    err = ValueError("from coroutine")
    events = []
    ctx.spawn(failing(err), name="bad-co")  # nobody keeps it
    good = ctx.spawn(events.append, "good")
    ctx.call_soon(events.append, "callback")
    assert ctx.poll(False) is True
    assert events == ["good", "callback"]  # one FIFO: submission order
    assert good.done
    drain(ctx)  # the report runs at the next pass
    assert len(rec.calls) == 1
    c, exc, origin = rec.calls[0]
    assert c is ctx and exc is err and "bad-co" in str(origin)


def test_exception_retrieved_by_join_is_not_reported(ctx):
    """asyncio's rule: a join(), result() or exception() takes the exception."""
    rec = Recorder()
    ctx.set_exception_handler(rec)
    err = ValueError("joined")
    bad = ctx.spawn(failing(err), name="joined-co")
    drain(ctx)
    assert rec.calls == []  # still held, may still be retrieved
    with pytest.raises(ValueError) as info:
        bad.join()
    assert info.value is err
    assert bad.exception() is err
    del bad
    drain(ctx)
    assert rec.calls == []


def test_exception_held_then_dropped_unretrieved_is_reported(ctx):
    rec = Recorder()
    ctx.set_exception_handler(rec)
    err = ValueError("dropped later")
    bad = ctx.spawn(failing(err), name="held-co")
    drain(ctx)
    assert rec.calls == []
    del bad  # never retrieved: reported now (at the next pass)
    drain(ctx)
    assert [(exc, "held-co" in str(origin)) for _, exc, origin in rec.calls] == [(err, True)]


def test_handler_gets_exceptions_of_woken_coroutines(ctx):
    rec = Recorder()
    ctx.set_exception_handler(rec)
    err = RuntimeError("after wake")

    def sleeper():
        yield_()
        raise err

    def reported(name):
        drain(ctx)
        return [str(origin) for _, exc, origin in rec.calls if exc is err and name in str(origin)]

    # Woken from the home thread: wake() itself does not raise.
    s1 = ctx.spawn(sleeper, name="s1")
    ctx.poll(False)
    corun.wake(s1)
    del s1
    assert len(reported("s1")) == 1

    # Woken by a coroutine (deferred): the waker is unaffected.
    s2 = ctx.spawn(sleeper, name="s2")
    ctx.poll(False)

    def waker(sleeping):
        corun.wake(sleeping)
        return "waker ok"

    w = ctx.spawn(waker, s2)
    del s2
    ctx.poll(False)
    assert w.result() == "waker ok"
    w = None  # its argument held s2
    assert len(reported("s2")) == 1

    # A deferred wake-up inside an explicit co.enter(): only the entered
    # coroutine's own exception would re-raise there.
    s3 = ctx.spawn(sleeper, name="s3")
    ctx.poll(False)
    outer = Coroutine(waker, s3)
    del s3
    outer.enter()
    assert outer.result() == "waker ok"
    outer = None
    assert len(reported("s3")) == 1
    assert len(rec.calls) == 3


@pytest.mark.parametrize("kind", ["call_soon", "bh", "timer", "fd"])
def test_handler_gets_callback_exceptions(ctx, kind):
    rec = Recorder()
    ctx.set_exception_handler(rec)
    err = ValueError(kind)
    cb = failing(err)
    events = []
    notifier = None
    if kind == "call_soon":
        ctx.call_soon(cb)
        ctx.call_soon(events.append, "next")
    elif kind == "bh":
        ctx.bh(cb).schedule()
        ctx.bh(events.append, "next").schedule()
    elif kind == "timer":
        when = ctx.time() - 1
        ctx.call_at(when, cb)
        ctx.call_at(when, events.append, "next")
    else:
        notifier = corun.EventNotifier()
        notifier.set()
        raise_it = cb

        def fd_cb():
            notifier.test_and_clear()
            raise_it()

        cb = fd_cb
        ctx.add_reader(notifier, fd_cb)
        ctx.call_at(ctx.time() - 1, events.append, "next")
    assert ctx.poll(False) is True
    assert rec.calls == [(ctx, err, cb)]
    assert events == ["next"]
    if notifier is not None:
        ctx.remove_reader(notifier)
        notifier.close()
    assert_still_works(ctx)


def test_default_handler_logs_on_corun_logger(ctx, caplog):
    err = ValueError("logged by default")
    ctx.spawn(failing(err), name="logged-coroutine")  # never retrieved

    def named_callback():
        raise KeyError("callback failure")

    ctx.call_soon(named_callback)
    with caplog.at_level(logging.ERROR, logger="corun"):
        drain(ctx)
    records = [r for r in caplog.records if r.name == "corun"]
    assert len(records) == 2
    assert all(r.levelno == logging.ERROR for r in records)
    by_exc = {type(r.exc_info[1]): r for r in records}
    assert "named_callback" in by_exc[KeyError].getMessage()
    assert by_exc[ValueError].exc_info[1] is err
    assert "logged-coroutine" in by_exc[ValueError].getMessage()
    # The traceback is logged too.
    assert "Traceback" in caplog.text and "logged by default" in caplog.text


def test_set_exception_handler_none_restores_default(ctx, caplog):
    rec = Recorder()
    ctx.set_exception_handler(rec)
    ctx.set_exception_handler(None)
    ctx.call_soon(failing(ValueError("back to logging")))
    with caplog.at_level(logging.ERROR, logger="corun"):
        ctx.poll(False)
    assert rec.calls == []
    assert [r.exc_info[1].args for r in caplog.records if r.name == "corun"] == [
        ("back to logging",)
    ]


def test_failing_handler_is_logged_and_loop_goes_on(ctx, caplog):
    def bad_handler(c, exc, origin):
        raise RuntimeError("handler broke")

    ctx.set_exception_handler(bad_handler)
    ctx.call_soon(failing(ValueError("original")))
    with caplog.at_level(logging.ERROR, logger="corun"):
        ctx.poll(False)
    logged = {str(r.exc_info[1]) for r in caplog.records if r.name == "corun"}
    assert logged == {"handler broke", "original"}
    assert_still_works(ctx)


def test_exception_handler_must_be_callable(ctx):
    with pytest.raises(TypeError):
        ctx.set_exception_handler(42)


def test_handler_set_from_another_thread(iothread):
    rec = Recorder()
    iothread.ctx.set_exception_handler(rec)
    err = ValueError("io")
    iothread.ctx.spawn(failing(err), name="io-bad")  # never retrieved
    iothread.ctx.call_sync(lambda: None)  # it has finished and been dropped
    iothread.ctx.call_sync(lambda: None)  # the report queued then has run
    assert [(c, exc) for c, exc, _ in rec.calls] == [(iothread.ctx, err)]
    assert "io-bad" in str(rec.calls[0][2])


def test_keyboard_interrupt_propagates_out_of_poll(ctx):
    events = []

    def interrupt():
        raise KeyboardInterrupt

    co = ctx.spawn(interrupt)
    later = ctx.spawn(events.append, "later")
    with pytest.raises(KeyboardInterrupt):
        ctx.poll(False)
    assert co.done
    assert isinstance(co.exception(), KeyboardInterrupt)
    # Nothing is lost: the rest of the queue runs at the next poll.
    while not later.done:
        ctx.poll(False)
    assert events == ["later"]
    assert_still_works(ctx)


# -- stats ------------------------------------------------------------------------------


def test_stats_keys_and_snapshot(ctx):
    stats = ctx.stats()
    for key in ("polls", "notify_writes", "bh_calls", "co_entered", "co_scheduled"):
        assert isinstance(stats[key], int), key
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())
    stats["polls"] = -1
    assert ctx.stats()["polls"] != -1


def test_stats_count(ctx):
    before = ctx.stats()
    ctx.call_soon(lambda: None)
    ctx.bh(lambda: None).schedule()
    co = ctx.spawn(yield_)
    ctx.poll(False)
    ctx.schedule(co)
    ctx.poll(False)
    after = ctx.stats()
    assert after["polls"] - before["polls"] == 2
    assert after["bh_calls"] - before["bh_calls"] == 2
    assert after["co_scheduled"] - before["co_scheduled"] == 2
    assert after["co_entered"] - before["co_entered"] == 2
    # Same-thread work with a running loop needs no wake-up write.
    assert after["notify_writes"] == before["notify_writes"]


def test_stats_notify_writes_counts_wakeups_of_a_sleeping_loop(ctx):
    before = ctx.stats()["notify_writes"]
    # This thread's own poll is not blocked, so notify() never writes.
    for _ in range(10):
        ctx.notify()
    assert ctx.stats()["notify_writes"] == before
    # A blocked poll woken from another thread costs at most one write.
    t = threading.Thread(target=ctx.notify)
    t.start()
    ctx.poll(True)
    t.join(10)
    assert ctx.stats()["notify_writes"] - before <= 1


# -- close ------------------------------------------------------------------------------


def test_close_drains_queued_work():
    events = []
    ctx = AioContext("draining")

    def cb():
        events.append(("callback", current_context() is ctx))
        ctx.call_soon(events.append, "queued by callback")

    def co_fn():
        events.append(("coroutine", current_context() is ctx))
        ctx.spawn(events.append, "spawned by coroutine")

    ctx.call_soon(cb)
    ctx.bh(events.append, "bh").schedule()
    ctx.spawn(co_fn)
    ctx.call_later(3600, events.append, "never")  # armed timers are not queued work
    ctx.close()
    assert sorted(map(str, events)) == sorted(
        map(
            str,
            [
                ("callback", True),
                "bh",
                ("coroutine", True),
                "queued by callback",
                "spawned by coroutine",
            ],
        )
    )
    assert "never" not in events
    assert current_context() is None


def _stubborn() -> None:
    """Refuses to be cancelled: waits again whenever it is."""
    while True:
        try:
            yield_()
        except corun.Cancelled:
            pass


def test_close_cancels_suspended_coroutines_and_warns_about_stubborn_ones():
    ctx = AioContext("leaky")
    events = []

    def clean():
        try:
            yield_()
        finally:
            events.append("clean ran its finally")

    ctx.spawn(_stubborn, name="left-behind-1")
    ctx.spawn(_stubborn, name="left-behind-2")
    cancelled = ctx.spawn(clean, name="cancelled-cleanly")
    finished = ctx.spawn(lambda: None, name="finished-fine")
    ctx.poll(False)
    with pytest.warns(ResourceWarning) as record:
        ctx.close(grace=0.2)
    messages = [str(w.message) for w in record if issubclass(w.category, ResourceWarning)]
    assert len(messages) == 1
    assert "left-behind-1" in messages[0] and "left-behind-2" in messages[0]
    assert "finished-fine" not in messages[0] and "cancelled-cleanly" not in messages[0]
    assert "leaky" in messages[0]
    assert finished.done
    assert cancelled.cancelled() and events == ["clean ran its finally"]


def test_close_without_suspended_coroutines_does_not_warn():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with AioContext() as ctx:
            ctx.spawn(lambda: None)
            co = ctx.spawn(yield_)
            ctx.poll(False)
            ctx.schedule(co)
    assert [w for w in record if issubclass(w.category, ResourceWarning)] == []


def _queueing_calls(ctx: AioContext):
    timer = ctx.timer(lambda: None)
    bh = ctx.bh(lambda: None)
    return {
        "schedule": lambda: ctx.schedule(Coroutine(lambda: None)),
        "spawn": lambda: ctx.spawn(lambda: None),
        "enter": lambda: ctx.enter(Coroutine(lambda: None)),
        "call_soon": lambda: ctx.call_soon(lambda: None),
        "call_sync": lambda: ctx.call_sync(lambda: None),
        "call_later": lambda: ctx.call_later(0, lambda: None),
        "call_at": lambda: ctx.call_at(0, lambda: None),
        "timer.mod": lambda: timer.mod(0),
        "bh.schedule": bh.schedule,
        "bh.schedule_idle": bh.schedule_idle,
    }


QUEUEING = [
    "schedule",
    "spawn",
    "enter",
    "call_soon",
    "call_sync",
    "call_later",
    "call_at",
    "timer.mod",
    "bh.schedule",
    "bh.schedule_idle",
]


@pytest.mark.parametrize("what", QUEUEING)
def test_every_queueing_call_raises_after_close(what):
    ctx = AioContext("closed-ctx")
    calls = _queueing_calls(ctx)
    ctx.close()
    with pytest.raises(RuntimeError) as info:
        calls[what]()
    assert repr(ctx) in str(info.value)
    ok, exc = in_other_thread(calls[what])
    assert not ok and isinstance(exc, RuntimeError), exc
    assert repr(ctx) in str(exc)


def test_close_is_idempotent_and_notify_is_a_noop_afterwards():
    ctx = AioContext("closed-twice")
    ctx.close()
    ctx.close()
    ctx.notify()
    ok, _ = in_other_thread(ctx.notify)
    assert ok
    with pytest.raises(RuntimeError, match="closed-twice"):
        ctx.poll(False)
    assert current_context() is None


def test_close_from_another_thread_raises(ctx):
    ok, exc = in_other_thread(ctx.close)
    assert not ok and isinstance(exc, RuntimeError)
    assert repr(ctx) in str(exc)
    assert current_context() is ctx
    assert_still_works(ctx)


def test_close_inside_coroutine_raises(ctx):
    def body():
        try:
            ctx.close()
        except RuntimeError as exc:
            return str(exc)

    message = ctx.spawn(body).join()
    assert ctx.name in message
    assert_still_works(ctx)


@pytest.mark.timeout(30)
def test_close_racing_producers_drops_nothing():
    """Every call_soon/spawn racing close() either runs or raises, never vanishes."""
    ctx = AioContext("racing")
    ran = []
    accepted = [0, 0]
    started = threading.Barrier(3)

    def produce(slot):
        started.wait()
        for i in range(20_000):
            try:
                if i % 2:
                    ctx.call_soon(ran.append, 1)
                else:
                    ctx.spawn(ran.append, 1)
            except RuntimeError:
                return
            accepted[slot] += 1

    threads = [threading.Thread(target=produce, args=(slot,)) for slot in range(2)]
    for t in threads:
        t.start()
    started.wait()
    ctx.poll(False)
    ctx.close()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert len(ran) == sum(accepted)


# -- misuse: RuntimeError naming the culprit, context left working ---------------------


def test_schedule_already_scheduled_names_coroutine_and_context(ctx):
    co = ctx.spawn(lambda: None, name="twice")
    with pytest.raises(RuntimeError) as info:
        ctx.schedule(co)
    assert "twice" in str(info.value)
    assert repr(ctx) in str(info.value)
    assert_still_works(ctx)
    assert co.done


def test_schedule_already_scheduled_elsewhere(ctx, iothread):
    co = Coroutine(lambda: None, name="double-booked")
    ctx.schedule(co)
    with pytest.raises(RuntimeError) as info:
        iothread.ctx.schedule(co)
    assert "double-booked" in str(info.value)
    assert repr(ctx) in str(info.value)  # where it is scheduled
    ctx.poll(False)
    assert co.done and co.ctx is ctx
    assert_still_works(ctx)


def test_schedule_finished_raises(ctx):
    co = Coroutine(lambda: None, name="over")
    co.enter()
    with pytest.raises(RuntimeError) as info:
        ctx.schedule(co)
    assert "over" in str(info.value) and repr(ctx) in str(info.value)
    with pytest.raises(RuntimeError, match="over"):
        ctx.enter(co)
    with pytest.raises(RuntimeError, match="over"):
        corun.wake(co)
    assert_still_works(ctx)


def test_schedule_coroutine_bound_to_another_thread_raises(ctx):
    co = Coroutine(yield_, name="foreign")
    ok, _ = in_other_thread(co.enter)
    assert ok
    with pytest.raises(RuntimeError) as info:
        ctx.schedule(co)
    assert "foreign" in str(info.value) and repr(ctx) in str(info.value)
    assert not co.scheduled
    assert_still_works(ctx)


def test_wake_scheduled_coroutine_raises(ctx):
    co = ctx.spawn(yield_, name="already-queued")
    with pytest.raises(RuntimeError) as info:
        corun.wake(co)
    assert "already-queued" in str(info.value) and ctx.name in str(info.value)
    ctx.poll(False)
    ctx.schedule(co)
    co.join()
    assert_still_works(ctx)


def test_poll_from_another_thread_raises(ctx):
    ok, exc = in_other_thread(lambda: ctx.poll(False))
    assert not ok and isinstance(exc, RuntimeError)
    assert repr(ctx) in str(exc)
    assert_still_works(ctx)


def test_poll_inside_coroutine_raises(ctx):
    def body():
        try:
            ctx.poll(False)
        except RuntimeError as exc:
            return str(exc)

    co = ctx.spawn(body, name="poller")
    message = co.join()
    assert ctx.name in message and "poller" in message
    assert_still_works(ctx)


def test_misuse_inside_coroutine_leaves_it_running(ctx):
    """A misuse caught inside a coroutine does not break it or its loop."""

    def body():
        errors = 0
        for bad in (
            lambda: ctx.schedule(current_coroutine()) or ctx.schedule(current_coroutine()),
            lambda: corun.wake(current_coroutine()),
            lambda: current_coroutine().join(),
        ):
            try:
                bad()
            except RuntimeError:
                errors += 1
        yield_()  # consumes the one successful self-schedule above
        return errors

    co = ctx.spawn(body)
    assert co.join(timeout=10) == 3
    assert_still_works(ctx)


# -- regressions from the review ---------------------------------------------------


def test_close_from_work_the_loop_runs_is_refused_and_the_loop_goes_on():
    with IOThread("closer") as t:

        def close_me():
            t.ctx.close()

        with pytest.raises(RuntimeError, match="its own loop is running"):
            t.ctx.call_sync(close_me)
        assert t.ctx.call_sync(lambda: 7) == 7
        assert t.is_alive()


def test_a_failed_eventfd_write_disarms_the_notifier(ctx):
    class Boom(Exception):
        pass

    class BrokenNotifier:
        def set(self):
            raise Boom

    real = ctx._notifier
    ctx._notifier = BrokenNotifier()
    ctx._notify_me = True  # as if the loop were about to sleep
    try:
        with pytest.raises(Boom):
            ctx.notify()
    finally:
        ctx._notifier = real
        ctx._notify_me = False
    assert not ctx._event_armed.locked()


def test_timed_out_joins_do_not_accumulate(ctx):
    sleeper = ctx.spawn(yield_)
    ctx.poll(blocking=False)

    def join_briefly():
        with pytest.raises(TimeoutError):
            sleeper.join(timeout=0.001)

    for _ in range(20):
        t = threading.Thread(target=join_briefly)
        t.start()
        t.join()
    assert not sleeper._waiters
    corun.wake(sleeper)
