"""KeyboardInterrupt at the awkward moments an adversarial review found.

Each test turns one of the review's reproducers into a check of the fixed
behaviour. Most inject the interrupt deterministically: a trace function
raises KeyboardInterrupt at a chosen line of corun code (or at every line
of close(), one line per run), where a Ctrl-C could land once in a while.
One test sends real SIGINTs, in a short, bounded storm.

- a main-thread producer interrupted right after it took the context's
  eventfd arm, before it wrote the eventfd, must not leave an IOThread deaf
  (nor, under a storm of SIGINTs, make call_soon raise);
- schedule() and a same-thread wake() interrupted between taking the
  coroutine's flag and queueing it must leave the coroutine wakeable;
- an interrupt inside _absorb (a chain of deferred wakes) must not queue a
  coroutine twice;
- close() interrupted anywhere must still release the context, finish what
  it had queued, and say which callbacks it dropped;
- an AioContext() that fails half-way must not complain from __del__.

Every KeyboardInterrupt raised here is caught by the test itself; none may
reach pytest (it would end the whole session).
"""

from __future__ import annotations

import dis
import errno
import gc
import inspect
import linecache
import logging
import os
import resource
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import pytest
from helpers import drain, in_other_thread

import corun
from corun import AioContext, Coroutine, IOThread, wake

CORUN_DIR = os.path.dirname(os.path.abspath(corun.__file__)) + os.sep
CONTEXT_MODULE = sys.modules["corun.context"]
COROUTINE_MODULE = sys.modules["corun.coroutine"]

Tracer = Callable[[FrameType, str, Any], Any]


def line_of(fn: Callable[..., Any], text: str) -> int:
    """The number of the first line of `fn`'s source that contains `text`.

    Skips the test when `fn` is compiled (corun.compiled): compiled code
    runs no trace function, so there is no line to inject at; the suite's
    pure-Python run (CORUN_PURE_PYTHON=1) covers that point.
    """
    if not inspect.isfunction(inspect.unwrap(fn)):
        pytest.skip(
            f"{fn.__qualname__} is compiled: no line events to inject at "
            "(covered by the pure-Python run)"
        )
    lines, start = inspect.getsourcelines(fn)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(f"{fn.__qualname__} has no line containing {text!r}")


class InjectAt:
    """Raises KeyboardInterrupt at the `nth` time `code` reaches line `lineno`.

    `when(frame)`, if given, must also hold for the injection. Records
    whether it fired: a test whose injection point vanished would test
    nothing.
    """

    def __init__(
        self,
        code: CodeType,
        lineno: int,
        nth: int = 1,
        when: Callable[[FrameType], bool] | None = None,
    ) -> None:
        self.code = code
        self.lineno = lineno
        self.nth = nth
        self.when = when
        self.hits = 0
        self.fired = False

    def trace(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if event == "call":
            return self.trace if frame.f_code is self.code and not self.fired else None
        if event == "line" and not self.fired and frame.f_lineno == self.lineno:
            if self.when is None or self.when(frame):
                self.hits += 1
                if self.hits == self.nth:
                    self.fired = True
                    # Raising from the trace function unsets it: no further injection.
                    raise KeyboardInterrupt(f"injected at {frame.f_code.co_name}:{self.lineno}")
        return self.trace


def traced(injector: InjectAt | Injector, fn: Callable[[], Any]) -> KeyboardInterrupt | None:
    """Run fn() under injector's trace function; return the KeyboardInterrupt it raised."""
    previous = sys.gettrace()
    sys.settrace(injector.trace)
    try:
        fn()
    except KeyboardInterrupt as exc:
        return exc
    finally:
        sys.settrace(previous)
    return None


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc_fd = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts open fds in /proc/self/fd"
)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def unwedge_and_join(t: IOThread, timeout: float = 5.0) -> None:
    """Join `t`, first freeing its eventfd arm if a regression left it taken for good."""
    ctx = t.ctx
    if ctx._event_armed.locked() and ctx._notify_me:
        try:
            ctx._event_armed.release()
        except RuntimeError:
            pass
        ctx.notify()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        t.join(timeout)


# -- a producer interrupted after it took the eventfd arm ----------------------------------------


@pytest.mark.timeout(20)
def test_producer_interrupted_after_taking_event_arm_leaves_iothread_wakeable() -> None:
    t = IOThread("deaf-producer")
    try:
        ctx = t.ctx
        # The loop is about to block (or blocks): a producer must write the eventfd.
        assert wait_until(lambda: ctx._notify_me and not ctx._event_armed.locked())
        ran: list[str] = []
        injector = InjectAt(
            AioContext.call_soon.__code__, line_of(AioContext.call_soon, "self._write_event()")
        )
        interrupt = traced(injector, lambda: ctx.call_soon(ran.append, "interrupted"))
        assert injector.fired and interrupt is not None, "the injection point was not reached"

        # The IOThread must still hear a producer on another thread.
        woke = threading.Event()
        other = threading.Thread(target=ctx.call_soon, args=(woke.set,))
        other.start()
        other.join(5)
        assert woke.wait(2.0), (
            "the IOThread is deaf: a cross-thread call_soon did not wake it "
            f"(_event_armed held: {ctx._event_armed.locked()})"
        )
        # The item was queued before the interrupt: it ran too.
        assert ran == ["interrupted"]
        t.join(5)
        assert not t.is_alive()
    finally:
        unwedge_and_join(t)


# -- the same with real signals: a storm of SIGINTs at a main-thread producer -------------------

STORM_ROUNDS = 5
STORM_SIGNALS = 150

main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signals are delivered to the main thread",
)


def _ignore_sigint(signum: int, frame: FrameType | None) -> None:
    pass


def ignore_sigint_guarded() -> None:
    """Make SIGINT harmless, even if one is pending or arrives meanwhile."""
    while True:
        try:
            signal.signal(signal.SIGINT, _ignore_sigint)
            return
        except KeyboardInterrupt:
            continue


def producer_storm(ctx: AioContext) -> tuple[int, list[str]]:
    """SIGINTs at the main thread while it feeds `ctx` (another thread's) with call_soon.

    Returns (interrupts taken, what call_soon raised besides KeyboardInterrupt).
    """
    main_ident = threading.main_thread().ident
    assert main_ident is not None
    go = threading.Event()
    over = threading.Event()
    halt = threading.Event()

    def storm() -> None:
        if go.wait(10):
            for _ in range(STORM_SIGNALS):
                if halt.is_set():
                    break
                signal.pthread_kill(main_ident, signal.SIGINT)
                time.sleep(0.0001)
        over.set()

    interrupts = 0
    errors: list[str] = []
    stormer = threading.Thread(target=storm)
    # The handler raises only while the producer is inside call_soon's try
    # below, and disarms itself first: a signal landing anywhere else (an
    # except clause, the clean-up) is dropped, never escapes the test (3.13
    # checks for signals at more points than 3.11).
    armed = [False]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    # No garbage collection during the storm: a signal landing in a finalizer the
    # collector runs (an older context's __del__) is not what this test is about.
    gc.collect()
    gc.disable()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        stormer.start()
        go.set()
        while not over.is_set():
            try:
                armed[0] = True
                ctx.call_soon(int)
                armed[0] = False
            except KeyboardInterrupt:
                interrupts += 1
            except Exception as exc:
                armed[0] = False
                errors.append(repr(exc))
            for _ in range(300):
                pass  # lets the IOThread go back to sleep: the next call writes
    finally:
        armed[0] = False
        halt.set()
        go.set()
        stormer.join(10)
        for _ in range(1000):
            pass  # a signal still pending runs its (now harmless) handler here
        signal.signal(signal.SIGINT, previous)
        gc.enable()
    return interrupts, errors


def cross_thread_call_soon_wakes(ctx: AioContext, bound: float = 2.0) -> bool:
    woke = threading.Event()
    other = threading.Thread(target=ctx.call_soon, args=(woke.set,))
    other.start()
    other.join(5)
    return woke.wait(bound)


@main_thread_only
@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_sigint_storm_on_a_producer_leaves_iothread_wakeable() -> None:
    t = IOThread("producer-storm")
    try:
        ctx = t.ctx
        total = 0
        for round_ in range(STORM_ROUNDS):
            assert wait_until(lambda: ctx._notify_me)
            interrupts, errors = producer_storm(ctx)
            total += interrupts
            assert errors == [], f"round {round_}: call_soon raised {len(errors)}x: {errors[:3]}"
            time.sleep(0.05)  # let the IOThread fall asleep
            assert cross_thread_call_soon_wakes(ctx), (
                f"round {round_}: after {interrupts} interrupts the IOThread is deaf "
                f"(_event_armed held: {ctx._event_armed.locked()})"
            )
        assert total > 0, "no SIGINT reached the producer: the test exercised nothing"
        t.join(5)
    finally:
        unwedge_and_join(t)


# -- schedule() / wake() interrupted between taking the flag and queueing ------------------------


@pytest.mark.timeout(20)
def test_cross_thread_wake_interrupted_after_taking_the_flag_leaves_coroutine_wakeable() -> None:
    t = IOThread("schedule-wedge")
    try:
        steps: list[int] = []
        stepped = threading.Event()

        def pinger() -> None:
            while True:
                corun.yield_()
                steps.append(1)
                stepped.set()

        co = t.ctx.spawn(pinger, name="pinger")
        # Parked in yield_(), not queued, and the loop idle.
        assert wait_until(lambda: not co.entered and not co.scheduled)
        assert wait_until(lambda: t.ctx._notify_me)
        injector = InjectAt(
            AioContext.schedule.__code__, line_of(AioContext.schedule, "co._sched_where = self")
        )
        interrupt = traced(injector, lambda: wake(co))
        assert injector.fired and interrupt is not None, "the injection point was not reached"
        assert not co.done

        # Not left 'scheduled' in no queue: a later wake is accepted and it runs.
        try:
            wake(co)
        except RuntimeError as exc:
            pytest.fail(f"a later wake() was refused: {exc}")
        assert stepped.wait(2.0), f"woken again, {co!r} never ran"
        assert steps == [1]
    finally:
        unwedge_and_join(t)


def in_fresh_thread(scenario: Callable[[], None]) -> None:
    """Run `scenario` in a fresh thread, which owns the context it creates; re-raise its failure.

    A context left broken by a regression then cannot poison the thread
    running the tests (nor one left behind by an earlier test this one).
    """
    ok, value = in_other_thread(scenario)
    if not ok:
        raise value


def _same_thread_wake_scenario() -> None:
    log: list[str] = []
    interrupts: list[KeyboardInterrupt | None] = []
    injector = InjectAt(
        CONTEXT_MODULE._defer.__code__,
        line_of(CONTEXT_MODULE._defer, "co._sched_where = me"),
    )
    with AioContext() as ctx:

        def sleeper() -> None:
            corun.yield_()
            log.append("sleeper")

        s = ctx.spawn(sleeper, name="sleeper")
        drain(ctx)

        def waker() -> None:
            # A deferred wake: the path of a CoMutex hand-off or a CoQueue wake-up.
            interrupts.append(traced(injector, lambda: wake(s)))

        ctx.spawn(waker, name="waker")
        drain(ctx)
        assert injector.fired and interrupts[0] is not None, "the injection point was not reached"
        assert log == [] and not s.done
        assert not s.scheduled, f"{s!r} was left 'scheduled' in no queue"
        try:
            wake(s)
        except RuntimeError as exc:
            pytest.fail(f"a later wake() was refused: {exc}")
        drain(ctx)
        assert log == ["sleeper"]
        assert s.done


@pytest.mark.timeout(20)
def test_same_thread_wake_interrupted_after_taking_the_flag_leaves_coroutine_wakeable() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        in_fresh_thread(_same_thread_wake_scenario)


# -- _absorb interrupted: a coroutine queued twice ----------------------------------------------


def _absorb_scenario() -> None:
    log: list[str] = []
    with AioContext() as ctx:
        cos: dict[str, Coroutine[Any]] = {}

        def leaf() -> None:
            corun.yield_()
            log.append("leaf")

        def mid() -> None:
            corun.yield_()
            log.append("mid")
            wake(cos["leaf"])  # deferred: entered by _settle after mid yields

        def root() -> None:
            corun.yield_()
            log.append("root")
            wake(cos["mid"])

        for name, fn in (("leaf", leaf), ("mid", mid), ("root", root)):
            cos[name] = Coroutine(fn, name=name)
            ctx.enter(cos[name])  # runs to its yield_()
        absorb = COROUTINE_MODULE._absorb
        # Absorbing mid (which woke leaf), between `pending.extendleft(...)`
        # and `to._wakeups = None`: both hold leaf.
        injector = InjectAt(
            absorb.__code__,
            line_of(absorb, "to._wakeups = None"),
            when=lambda frame: frame.f_locals.get("to") is cos["mid"],
        )
        interrupt = traced(injector, lambda: ctx.enter(cos["root"]))
        assert injector.fired and interrupt is not None, "the injection point was not reached"

        queued = Counter(id(item) for item in ctx._ready)
        assert queued[id(cos["leaf"])] <= 1, "leaf was queued twice"
        for _ in range(4):
            try:
                ctx.poll(False)
            except RuntimeError as exc:
                pytest.fail(f"poll() raised after the interrupt: {exc!r}")
        assert Counter(log) == {"root": 1, "mid": 1, "leaf": 1}
        assert all(co.done for co in cos.values())
        assert not any(co.scheduled for co in cos.values())


@pytest.mark.timeout(20)
def test_interrupt_inside_absorb_does_not_queue_a_coroutine_twice() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        in_fresh_thread(_absorb_scenario)


# -- close() interrupted at every line ------------------------------------------------------------


def in_corun(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(CORUN_DIR)


def where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} ({code.co_name})"


_line_starts: dict[CodeType, dict[int, int]] = {}


def leaves_a_with_block(frame: FrameType) -> bool:
    """Whether this line event is the one a `with` statement's line gets on its way out.

    A trace function may raise there, before __exit__ is called and outside
    the block's cleanup: the context manager is never exited (a lock stays
    held). No signal can land there (CPython runs signal handlers only at
    calls and backward jumps), so it is not an injection point.
    """
    code = frame.f_code
    starts = _line_starts.get(code)
    if starts is None:
        starts = {}
        for offset, lineno in dis.findlinestarts(code):
            if lineno is not None and lineno not in starts:
                starts[lineno] = offset
        _line_starts[code] = starts
    lineno = frame.f_lineno
    text = linecache.getline(code.co_filename, lineno).lstrip()
    first = starts.get(lineno)
    return text.startswith("with ") and first is not None and frame.f_lasti > first


class Injector:
    """Raises KeyboardInterrupt at the k-th 'line' event in corun code, then stops."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.lines = 0
        self.where: str | None = None

    def trace(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if event == "call":
            return self.trace if in_corun(frame) and frame.f_code.co_name != "__del__" else None
        if event == "line" and self.where is None and not leaves_a_with_block(frame):
            self.lines += 1
            if self.lines == self.k:
                self.where = where(frame)
                raise KeyboardInterrupt(f"injected at line event {self.k}: {self.where}")
        return self.trace


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# Callbacks with names of their own, so that a log message naming a dropped one can be told.
def dropped_cb_0(log: list[object]) -> None:
    log.append("cb0")


def dropped_cb_1(log: list[object]) -> None:
    log.append("cb1")


def dropped_cb_2(log: list[object]) -> None:
    log.append("cb2")


def dropped_bh(log: list[object]) -> None:
    log.append("bh")


CALLBACKS: dict[str, Callable[[list[object]], None]] = {
    "cb0": dropped_cb_0,
    "cb1": dropped_cb_1,
    "cb2": dropped_cb_2,
}


def _stepper(log: list[object]) -> None:
    log.append("s1")
    corun.yield_()
    log.append("s2")


def _interrupted_close(k: int, records: Records) -> tuple[str | None, list[str]]:
    """Queue work of every kind, interrupt close() at its k-th line; return (where, problems).

    Runs in a fresh thread (see run_interrupted_close), which owns the context.
    """
    problems: list[str] = []
    log: list[object] = []
    base = count_fds()
    ctx = AioContext()
    stepper = ctx.spawn(_stepper, log, name="stepper")
    drain(ctx)
    log.clear()
    for fn in CALLBACKS.values():
        ctx.call_soon(fn, log)
    cos = {f"co{i}": ctx.spawn(log.append, f"co{i}", name=f"co{i}") for i in range(2)}
    cos["s2"] = stepper
    ctx.schedule(stepper)
    ctx.bh(dropped_bh, log).schedule()
    del records.messages[:]

    injector = Injector(k)
    # No garbage collection meanwhile: it would run finalizers (an older
    # context's __del__) at a point that varies from run to run, and an
    # interrupt raised by a trace function inside a finalizer run by the
    # collector is not one a signal could raise (it can even crash CPython).
    gc.disable()
    try:
        traced(injector, ctx.close)
    finally:
        gc.enable()
    if not ctx._closed:
        # Interrupted before close() began: as if the interrupt came before
        # the call. The context is open and whole; the retry does it all.
        ctx.close()

    # The context is released: its fds, and the thread's slot.
    if count_fds() != base:
        problems.append(f"{count_fds() - base} fd(s) not released")
    if corun.current_context() is not None:
        problems.append(f"current_context() is still {corun.current_context()!r}")

    counts = Counter(log)
    twice = sorted(str(item) for item, n in counts.items() if n > 1)
    if twice:
        problems.append(f"ran more than once: {twice}")
    # Every queued coroutine ran or finished (cancelled), so its joiners are told.
    for tag, co in cos.items():
        if not co.done:
            problems.append(f"{co!r} never finished: a join() would hang")
            continue
        if counts[tag] == 0 and co.exception() is None:
            problems.append(f"{co!r} finished without running or an exception")
        joined = _join_elsewhere(co)
        if joined != "done":
            problems.append(f"join of {co!r}: {joined}")
    # Every callback ran, or was named in a log message: none dropped silently.
    logged = "\n".join(records.messages)
    silent = []
    for tag, fn in [*CALLBACKS.items(), ("bh", dropped_bh)]:
        if counts[tag] == 0 and fn.__name__ not in logged:
            silent.append(tag)
    if silent:
        problems.append(f"callbacks dropped silently: {silent}")

    try:
        ctx.close()
    except BaseException as exc:
        problems.append(f"a second close() raised {exc!r}")
    # The thread can own a context again.
    try:
        AioContext().close()
    except RuntimeError as exc:
        problems.append(f"the thread can no longer create a context: {exc}")
    try:
        if corun.run(lambda: 1) != 1:
            problems.append("corun.run(lambda: 1) did not return 1")
    except RuntimeError as exc:
        problems.append(f"corun.run() now fails: {exc}")
    if count_fds() != base:
        problems.append(f"{count_fds() - base} fd(s) leaked in the end")
    return injector.where, problems


def _join_elsewhere(co: Coroutine[Any]) -> str:
    """Join `co` from another plain thread: "done", or what went wrong."""
    outcome: list[str] = []

    def joiner() -> None:
        try:
            co.join(timeout=0.5)
        except TimeoutError:
            outcome.append("TimeoutError")
        except BaseException:
            outcome.append("done")  # its exception: Cancelled, or the interrupt it received
        else:
            outcome.append("done")

    t = threading.Thread(target=joiner, daemon=True)
    t.start()
    t.join(5)
    return outcome[0] if outcome else "hung"


def run_interrupted_close(k: int, records: Records) -> tuple[str | None, list[str]]:
    outcome: list[tuple[str | None, list[str]]] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            outcome.append(_interrupted_close(k, records))
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=main, daemon=True)  # daemon: a hung one must not block exit
    t.start()
    t.join(5)
    if t.is_alive():
        return f"k={k}", ["the scenario hung"]
    if failure:
        return f"k={k}", [f"the scenario itself raised {failure[0]!r}"]
    return outcome[0]


MAX_FAILURES = 25


@needs_proc_fd
@pytest.mark.timeout(60)
def test_keyboard_interrupt_at_every_line_of_close_releases_and_finishes_everything() -> None:
    records = Records()
    corun_logger = logging.getLogger("corun")
    corun_logger.addHandler(records)
    propagate, corun_logger.propagate = corun_logger.propagate, False  # hundreds of records
    failures: list[str] = []
    points = 0
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for k in range(1, 3001):
                injected_at, problems = run_interrupted_close(k, records)
                if injected_at is not None and "notifier.py" in injected_at:
                    # EventNotifier.close() marks its fds closed, then closes
                    # them: interrupted between the two it leaks one. The
                    # other order would close a number that another thread
                    # may have reused since: leaking is the safer failure.
                    problems = [p for p in problems if "fd" not in p]
                if problems:
                    failures.append(f"k={k} at {injected_at}: " + "; ".join(problems))
                    if len(failures) == MAX_FAILURES or problems == ["the scenario hung"]:
                        break
                if injected_at is None:
                    break
                points += 1
            else:
                pytest.fail("close() still had an injection point after 3000 lines")
    finally:
        corun_logger.propagate = propagate
        corun_logger.removeHandler(records)
    print(f"{points} injection points in {time.monotonic() - started:.1f} s")
    # Compiled, only the pure-Python modules around the kernel (bottom
    # halves, timers, the notifier...) produce line events: close() itself
    # and the loop pass run as C. The pure-Python run counts every line.
    least = 5 if corun.compiled else 100
    assert failures or points > least, "close() ran almost no corun code: nothing was exercised"
    listing = "\n".join(failures)
    assert failures == [], f"injection points that failed:\n{listing}"


# -- AioContext() failing half-way --------------------------------------------------------------


@needs_proc_fd
@pytest.mark.timeout(20)
def test_context_failing_in_init_neither_complains_from_del_nor_leaks_fds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unraisable: list[str] = []

    def hook(info: Any) -> None:
        unraisable.append(f"{info.exc_type.__name__}: {info.exc_value} in {info.object!r}")

    gc.collect()
    base = count_fds()
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = highest + 32
    if hard != resource.RLIM_INFINITY and limit > hard:
        pytest.skip("the hard RLIMIT_NOFILE leaves no room")
    held: list[int] = []
    failure: BaseException | None = None
    monkeypatch.setattr(sys, "unraisablehook", hook)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        # Exactly one free slot: the eventfd takes it, creating the poller fails.
        os.close(held.pop())
        try:
            AioContext()
        except OSError as exc:
            failure = exc
        gc.collect()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert isinstance(failure, OSError) and failure.errno == errno.EMFILE, (
        f"AioContext() did not fail for want of fds ({failure!r}): nothing was exercised"
    )
    del failure  # its traceback holds the half-built context
    gc.collect()
    assert unraisable == []
    assert corun.current_context() is None
    assert count_fds() == base, "the half-built context leaked an fd"
