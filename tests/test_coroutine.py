"""Tests for corun.coroutine: create, enter, yield, self, entered, join, results.

The /basic/* tests port QEMU's tests/unit/test-coroutine.c; the rest check
the Python-side contract of API.md (exceptions, repr, misuse errors).
"""

from __future__ import annotations

import gc
import re
import threading

import pytest
from helpers import in_other_thread

import corun
from corun import AioContext, Coroutine, current_coroutine, in_coroutine, yield_

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def ctx():
    with AioContext("test-coroutine") as c:
        yield c


def run_in_thread(fn):
    """Run fn() in a fresh plain thread (no context); return or raise its outcome."""
    ok, value = in_other_thread(fn)
    if not ok:
        raise value
    return value


# -- QEMU /basic/* -----------------------------------------------------------


def test_lifecycle():
    """/basic/lifecycle: create, enter, return; twice, to see no state leaks."""
    for _ in range(2):
        done = []
        co = Coroutine(done.append, True)
        assert not co.done
        co.enter()
        assert done == [True]
        assert co.done
        assert co.result() is None
        assert co.exception() is None


def test_yield():
    """/basic/yield: a coroutine that yields 5 times needs 6 enters."""
    state = {"done": False}

    def yield_5_times():
        for _ in range(5):
            yield_()
        state["done"] = True

    co = Coroutine(yield_5_times)
    enters = -1  # one extra enter to return from the coroutine
    while not state["done"]:
        co.enter()
        enters += 1
    assert enters == 5
    assert co.done


def test_nesting():
    """/basic/nesting: coroutines entering coroutines, 128 levels deep."""
    nd = {"n_enter": 0, "n_return": 0, "max": 128}

    def nest():
        nd["n_enter"] += 1
        if nd["n_enter"] < nd["max"]:
            Coroutine(nest).enter()
        nd["n_return"] += 1

    Coroutine(nest).enter()
    assert nd["n_enter"] == 128
    assert nd["n_return"] == 128


def test_self():
    """/basic/self: current_coroutine() is the running coroutine."""
    seen = []
    co = Coroutine(lambda: seen.append(current_coroutine()))
    assert current_coroutine() is None
    co.enter()
    assert seen == [co]
    assert current_coroutine() is None


def test_entered():
    """/basic/entered: entered is True while running or while it entered a running one."""
    checks = []

    def step_2(caller):
        me = current_coroutine()
        checks.append(("step2", caller.entered, me.entered))
        yield_()
        # Once more, after yielding.
        checks.append(("step2-again", caller.entered, me.entered))

    def step_1():
        me = current_coroutine()
        checks.append(("step1", me.entered))
        co = Coroutine(step_2, me)
        checks.append(("child-before", co.entered))
        co.enter()
        checks.append(("child-yielded", co.entered))
        co.enter()
        checks.append(("child-done", co.entered))

    co = Coroutine(step_1)
    assert not co.entered
    co.enter()
    assert not co.entered
    assert checks == [
        ("step1", True),
        ("child-before", False),
        ("step2", True, True),
        ("child-yielded", False),
        ("step2-again", True, True),
        ("child-done", False),
    ]


def test_in_coroutine():
    """/basic/in_coroutine."""
    seen = []
    assert in_coroutine() is False
    Coroutine(lambda: seen.append(in_coroutine())).enter()
    assert seen == [True]
    assert in_coroutine() is False


def test_order():
    """/basic/order: control moves exactly as enter/yield say."""
    records = []

    def co_order_test():
        records.append((2, 1, in_coroutine()))
        yield_()
        records.append((2, 2, in_coroutine()))

    co = Coroutine(co_order_test)
    records.append((1, 1, in_coroutine()))
    co.enter()
    records.append((1, 2, in_coroutine()))
    co.enter()
    records.append((1, 3, in_coroutine()))
    assert records == [
        (1, 1, False),
        (2, 1, True),
        (1, 2, False),
        (2, 2, True),
        (1, 3, False),
    ]


def test_no_dangling_caller():
    """/basic/no-dangling-access: c2, first entered by c1, returns to its new enterer.

    c1 enters c2, c2 yields back to c1, c1 finishes. Entering c2 again must
    make it yield/return to us, never to the dead c1.
    """
    events = []

    def c2_fn():
        events.append("c2 start")
        yield_()
        events.append("c2 resumed")

    c2 = Coroutine(c2_fn)

    def c1_fn():
        events.append("c1 enters c2")
        c2.enter()
        events.append("c1 ends")

    c1 = Coroutine(c1_fn)
    c1.enter()
    assert c1.done and not c2.done
    events.append("main enters c2")
    c2.enter()
    events.append("main again")
    assert events == [
        "c1 enters c2",
        "c2 start",
        "c1 ends",
        "main enters c2",
        "c2 resumed",
        "main again",
    ]
    assert c2.done
    assert not c1.entered and not c2.entered


# -- results and exceptions ----------------------------------------------------


def test_args_kwargs_and_result():
    co = Coroutine(lambda a, b, *, c: (a, b, c), 1, 2, c=3)
    co.enter()
    assert co.result() == (1, 2, 3)
    assert co.join() == (1, 2, 3)
    assert co.exception() is None


def test_enter_reraises_exception():
    err = ValueError("boom")

    def fail():
        yield_()
        raise err

    co = Coroutine(fail)
    co.enter()
    with pytest.raises(ValueError) as info:
        co.enter()
    assert info.value is err
    assert co.done
    assert co.exception() is err
    with pytest.raises(ValueError) as info:
        co.result()
    assert info.value is err
    with pytest.raises(ValueError) as info:
        co.join()
    assert info.value is err


def test_result_and_exception_before_done_raise():
    co = Coroutine(yield_, name="not-done-yet")
    with pytest.raises(RuntimeError, match="not-done-yet"):
        co.result()
    with pytest.raises(RuntimeError, match="not-done-yet"):
        co.exception()
    co.enter()  # suspended now
    with pytest.raises(RuntimeError, match="not-done-yet"):
        co.result()
    with pytest.raises(RuntimeError, match="not-done-yet"):
        co.exception()
    co.enter()
    assert co.result() is None


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_propagate_out_of_enter(exc_type):
    after = []

    def interrupted():
        yield_()
        raise exc_type()
        after.append("unreachable")  # pragma: no cover

    co = Coroutine(interrupted)
    co.enter()
    with pytest.raises(exc_type):
        co.enter()
    assert co.done
    assert not co.entered
    assert isinstance(co.exception(), exc_type)
    assert after == []
    assert current_coroutine() is None


def test_keyboard_interrupt_from_nested_coroutine_reaches_outer_enter():
    events = []

    def inner():
        events.append("inner")
        raise KeyboardInterrupt

    inner_co = Coroutine(inner)

    def outer():
        events.append("outer")
        inner_co.enter()
        events.append("outer after inner")  # pragma: no cover

    outer_co = Coroutine(outer)
    with pytest.raises(KeyboardInterrupt):
        outer_co.enter()
    assert events == ["outer", "inner"]
    assert inner_co.done and outer_co.done


def test_exception_from_wake_without_context_is_logged(caplog):
    """A coroutine with no context, restarted by wake(), logs its exception on `corun`."""

    def fail():
        yield_()
        raise ValueError("logged, not raised")

    box = [Coroutine(fail, name="no-ctx-failer")]

    def main():
        co = box[0]
        co.enter()
        assert co.ctx is None
        corun.wake(co)  # must not raise: the exception goes to the logger
        assert co.done

    with caplog.at_level("ERROR", logger="corun"):
        run_in_thread(main)
        assert [r for r in caplog.records if r.name == "corun"] == []  # still held
        box.clear()  # never retrieved: logged when it is collected
        gc.collect()
    records = [r for r in caplog.records if r.name == "corun"]
    assert len(records) == 1
    assert records[0].levelname == "ERROR"
    message = records[0].getMessage()
    assert "no-ctx-failer" in message and "ValueError: logged, not raised" in message


# -- state: name, ctx, repr ------------------------------------------------------


def test_default_name_uses_qualname():
    def some_function():
        pass

    a = Coroutine(some_function)
    b = Coroutine(some_function)
    assert "some_function" in a.name
    assert a.name != b.name
    assert Coroutine(some_function, name="custom").name == "custom"


def test_coroutine_needs_callable():
    with pytest.raises(TypeError):
        Coroutine(42)


def test_ctx_without_context_is_none():
    co = Coroutine(yield_)
    assert co.ctx is None
    run_in_thread(co.enter)
    assert co.ctx is None


def test_ctx_is_the_entering_threads_context(ctx):
    co = Coroutine(yield_)
    assert co.ctx is None
    co.enter()
    assert co.ctx is ctx
    co.enter()
    assert co.done


def test_repr_shows_states(ctx):
    reprs = {}

    def body():
        reprs["running"] = repr(current_coroutine())
        yield_()

    co = Coroutine(body, name="stateful")
    reprs["new"] = repr(co)
    co.enter()
    reprs["suspended"] = repr(co)
    ctx.schedule(co)
    reprs["scheduled"] = repr(co)
    assert co.scheduled
    assert ctx.poll(False) is True
    reprs["done"] = repr(co)
    for state, text in reprs.items():
        assert "stateful" in text, text
        assert re.search(rf"\b{state}\b", text), (state, text)
        others = {"new", "running", "suspended", "scheduled", "done"} - {state}
        assert not any(re.search(rf"\b{o}\b", text) for o in others), (state, text)


# -- misuse ------------------------------------------------------------------------


def test_enter_finished_raises():
    co = Coroutine(lambda: None, name="finished-one")
    co.enter()
    with pytest.raises(RuntimeError, match=re.escape(repr(co))):
        co.enter()


def test_enter_running_raises():
    errors = []

    def body():
        me = current_coroutine()
        try:
            me.enter()
        except RuntimeError as exc:
            errors.append(str(exc))
        return "still fine"

    co = Coroutine(body, name="reentrant")
    co.enter()
    assert co.result() == "still fine"
    assert len(errors) == 1
    assert "reentrant" in errors[0]


def test_enter_caller_raises():
    """Entering the coroutine that entered us would be a cycle."""
    errors = []

    def child(parent):
        try:
            parent.enter()
        except RuntimeError as exc:
            errors.append(str(exc))

    def parent_fn():
        Coroutine(child, current_coroutine()).enter()

    parent = Coroutine(parent_fn, name="the-parent")
    parent.enter()
    assert parent.done
    assert len(errors) == 1 and "the-parent" in errors[0]


def test_enter_scheduled_raises(ctx):
    ran = []
    co = Coroutine(ran.append, 1, name="queued-one")
    ctx.schedule(co)
    with pytest.raises(RuntimeError) as info:
        co.enter()
    assert "queued-one" in str(info.value)
    assert ctx.name in str(info.value)
    # Still scheduled, and still runs exactly once.
    assert co.scheduled
    assert ctx.poll(False) is True
    assert ran == [1]


def test_enter_from_another_thread_raises():
    co = Coroutine(yield_, name="bound-elsewhere")
    run_in_thread(co.enter)  # binds it to that (now finished) thread
    with pytest.raises(RuntimeError, match="bound-elsewhere"):
        co.enter()
    assert not co.done


def test_yield_outside_coroutine_raises():
    with pytest.raises(RuntimeError, match="yield_"):
        yield_()


def test_join_self_raises():
    errors = []

    def body():
        try:
            current_coroutine().join()
        except RuntimeError as exc:
            errors.append(str(exc))

    co = Coroutine(body, name="self-joiner")
    co.enter()
    assert co.done
    assert len(errors) == 1 and "self-joiner" in errors[0]


def test_join_own_thread_without_context_raises():
    """Blocking on a coroutine only this (context-less) thread could run: an error."""
    co = Coroutine(yield_, name="would-deadlock")
    co.enter()
    with pytest.raises(RuntimeError, match="would-deadlock"):
        co.join()
    co.enter()
    assert co.join() is None


# -- join ----------------------------------------------------------------------------


def test_join_on_home_thread_runs_the_loop(ctx):
    events = []

    def worker():
        events.append("worker 1")
        ctx.call_soon(events.append, "callback")
        yield_after_schedule()
        events.append("worker 2")
        return 7

    def yield_after_schedule():
        ctx.schedule(current_coroutine())
        yield_()

    co = ctx.spawn(worker)
    assert co.join() == 7
    assert events == ["worker 1", "callback", "worker 2"]


def test_join_on_home_thread_timeout(ctx):
    co = ctx.spawn(yield_, name="stuck")
    with pytest.raises(TimeoutError, match="stuck"):
        co.join(timeout=0.05)
    assert co.entered is False and not co.done
    ctx.schedule(co)
    assert co.join(timeout=5) is None


def test_join_from_coroutine_yields(ctx):
    """A joining coroutine yields; the loop runs other work meanwhile."""
    events = []

    def target():
        events.append("target 1")
        ctx.schedule(current_coroutine())
        yield_()
        events.append("target 2")
        return "result"

    def joiner(co):
        events.append("joiner waits")
        value = co.join()
        events.append(("joiner got", value))

    t = ctx.spawn(target)
    j = ctx.spawn(joiner, t)
    j.join()
    assert events == ["target 1", "joiner waits", "target 2", ("joiner got", "result")]


def test_join_from_coroutine_timeout(ctx):
    outcome = []

    def joiner(co):
        try:
            co.join(timeout=0.05)
        except TimeoutError:
            outcome.append("timeout")

    stuck = ctx.spawn(yield_)
    j = ctx.spawn(joiner, stuck)
    j.join()
    assert outcome == ["timeout"]
    ctx.schedule(stuck)
    stuck.join()


def test_join_from_plain_thread_blocks_until_done(ctx):
    """A thread that is not the coroutine's home blocks until the loop finishes it."""
    started = threading.Event()
    results = []

    co = ctx.spawn(lambda: "value")

    def joiner():
        started.set()
        results.append(co.join(timeout=10))

    t = threading.Thread(target=joiner)
    t.start()
    started.wait()
    while not co.done:
        ctx.poll(True)
    t.join(10)
    assert results == ["value"]


def test_join_from_plain_thread_timeout(ctx):
    co = ctx.spawn(yield_, name="never-runs-in-time")
    with pytest.raises(TimeoutError, match="never-runs-in-time"):
        run_in_thread(lambda: co.join(timeout=0.05))
    ctx.poll(False)
    ctx.schedule(co)
    co.join()


# -- regressions from the review ---------------------------------------------------


@pytest.mark.timeout(30)
def test_a_long_chain_of_joins_does_not_nest(ctx):
    """Each coroutine joins the previous one: 2,000 links, no RecursionError."""
    errors = []
    ctx.set_exception_handler(lambda c, exc, origin: errors.append(exc))
    first = Coroutine(yield_, name="link-0")
    chain = [first]
    for i in range(1, 2000):
        chain.append(ctx.spawn(chain[-1].join, name=f"link-{i}"))
    ctx.schedule(first)
    while ctx.poll(blocking=False):
        pass
    corun.wake(first)
    while ctx.poll(blocking=False):
        pass
    assert errors == []
    assert all(co.done for co in chain)


def test_joining_a_failed_coroutine_often_does_not_grow_its_traceback(ctx):
    def fail():
        raise ValueError("boom")

    co = ctx.spawn(fail)
    ctx.set_exception_handler(lambda *args: None)
    ctx.poll(blocking=False)

    def depth():
        with pytest.raises(ValueError) as info:
            co.join()
        return len(info.traceback)

    first = depth()
    for _ in range(100):
        with pytest.raises(ValueError):
            co.result()
    assert depth() == first


# -- the greenlet pool ----------------------------------------------------------


def test_finished_greenlets_are_reused_and_keep_nothing_alive(ctx):
    import gc
    import weakref

    from corun.coroutine import POOL_SIZE

    class Payload:
        pass

    refs = []

    def make():
        payload = Payload()
        refs.append(weakref.ref(payload))
        return payload

    first = ctx.spawn(make)
    ctx.poll(blocking=False)
    greenlet_of_first = ctx._co_pool[-1]
    assert first.result() is not None
    del first
    gc.collect()
    assert refs[0]() is None  # neither the pooled greenlet nor its frame holds it

    seen = []
    second = ctx.spawn(lambda: seen.append(current_coroutine()))
    ctx.poll(blocking=False)
    assert seen == [second]
    assert ctx._co_pool[-1] is greenlet_of_first  # the same greenlet, reused

    many = [ctx.spawn(yield_) for _ in range(POOL_SIZE + 50)]
    ctx.poll(blocking=False)
    for co in many:
        corun.wake(co)
    assert all(co.done for co in many)
    assert len(ctx._co_pool) == POOL_SIZE  # bounded
