"""KeyboardInterrupt at awkward moments (issue 7, items 6 and 7).

After a KeyboardInterrupt has propagated out of poll(), the context must
still run every item it accepted exactly once, and must still be woken by
other threads. Two kinds of test:

- item 6, real signals: SIGINTs sent with pthread_kill at a main-thread
  loop that other threads keep feeding;
- item 7, deterministic injection: a trace function raises
  KeyboardInterrupt at the k-th line of corun code that one loop pass runs,
  for every k, and the outcome is checked after each.

Every KeyboardInterrupt raised here is caught by the test itself; none may
reach pytest (it would end the whole session).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pytest
from helpers import drain, in_other_thread

import corun
from corun import AioContext, Coroutine

CORUN_DIR = os.path.dirname(os.path.abspath(corun.__file__)) + os.sep

Tracer = Callable[[FrameType, str, Any], Any]

main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signals are delivered to the main thread",
)


def noop() -> None:
    pass


def in_corun(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(CORUN_DIR)


def where(frame: FrameType) -> str:
    """file:line (function), the file relative to corun's parent directory."""
    code = frame.f_code
    path = os.path.relpath(code.co_filename, os.path.dirname(os.path.dirname(CORUN_DIR)))
    return f"{path}:{frame.f_lineno} ({code.co_name})"


# -- item 6: a storm of real SIGINTs -----------------------------------------------------------

STORM_SIGNALS = 200


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


@contextmanager
def sigint_raises(stop_senders: Callable[[], None]) -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt inside the block; then it is made harmless and restored.

    The block must call ignore_sigint_guarded() itself, inside its own
    `except KeyboardInterrupt` guard, before it leaves normally: no signal may
    raise outside the test's guards. If the block fails, `stop_senders()`
    stops the threads sending signals before the old handler comes back.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        ignore_sigint_guarded()
        stop_senders()
        for _ in range(1000):
            pass  # a signal still pending runs its (now harmless) handler here
        signal.signal(signal.SIGINT, previous)


@main_thread_only
@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_sigint_storm_leaves_context_wakeable_and_loses_nothing() -> None:
    main_ident = threading.main_thread().ident
    assert main_ident is not None
    ran: list[int] = []
    accepted: list[int] = []
    refused: list[int] = []
    storm_over = threading.Event()
    interrupts = 0
    failure: Exception | None = None

    with AioContext() as ctx:
        tick = ctx.timer(noop)  # bounds each poll(True) of the storm, even if deaf

        def storm() -> None:
            if not go.wait(10):
                return
            for i in range(STORM_SIGNALS):
                if halt.is_set():
                    break
                try:
                    # A C-level callback: a KeyboardInterrupt cannot land inside it,
                    # so it either ran (and is counted) or it did not.
                    ctx.call_soon(ran.append, i)
                except RuntimeError:
                    refused.append(i)
                else:
                    accepted.append(i)
                signal.pthread_kill(main_ident, signal.SIGINT)
                time.sleep(0.0005)  # pacing, not synchronisation
            storm_over.set()
            ctx.notify()

        go = threading.Event()
        halt = threading.Event()
        stormer = threading.Thread(target=storm)
        stormer.start()

        def stop_storm() -> None:
            halt.set()
            go.set()
            stormer.join(10)

        with sigint_raises(stop_storm):
            while True:
                try:
                    go.set()  # no signal is sent before we are inside this guard
                    while not storm_over.is_set():
                        try:
                            if not tick.pending:
                                tick.mod(ctx.time() + 0.05)
                            ctx.poll(True)
                        except KeyboardInterrupt:
                            interrupts += 1
                        except Exception as exc:
                            # Stop the storm first: raising now could let a
                            # later signal reach pytest.
                            failure = failure or exc
                            halt.set()
                    stormer.join(10)
                    ignore_sigint_guarded()
                    break
                except KeyboardInterrupt:
                    interrupts += 1
        assert not stormer.is_alive()
        if failure is not None:
            raise failure
        tick.cancel()
        assert interrupts >= 1, "no SIGINT reached the loop: the test exercised nothing"

        # Everything accepted runs, exactly once.
        for _ in range(3):
            drain(ctx)
        assert refused == []
        counts = Counter(ran)
        lost = [i for i in accepted if counts[i] == 0]
        twice = {i: n for i, n in counts.items() if n > 1}
        assert lost == [] and twice == {}, (
            f"after {interrupts} interrupts: lost {lost}, ran more than once {twice}"
        )

        # Still wakeable from another thread.
        woke: list[str] = []
        safety_fired: list[str] = []
        safety = ctx.call_later(2.0, safety_fired.append, "safety")
        waker = threading.Timer(0.05, ctx.call_soon, args=(woke.append, "woke"))
        waker.start()
        try:
            while not woke and not safety_fired:
                ctx.poll(True)
        finally:
            waker.join(5)
            safety.cancel()
        assert woke == ["woke"] and safety_fired == [], (
            f"after {interrupts} interrupts the context is deaf: a cross-thread call_soon "
            "did not wake poll(True)"
        )


# -- item 7: KeyboardInterrupt injected at every line of a loop pass -----------------------------


class Injector:
    """Raises KeyboardInterrupt at the k-th 'line' event in corun code, then stops."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.lines = 0
        self.where: str | None = None

    def trace(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if event == "call":
            return self.trace if in_corun(frame) else None
        if event == "line" and self.where is None:
            self.lines += 1
            if self.lines == self.k:
                self.where = where(frame)
                # Raising from the trace function unsets it: no further injection.
                raise KeyboardInterrupt(f"injected at line event {self.k}: {self.where}")
        return self.trace


class BlockHook:
    """A profile hook: at the loop's first C call to poll/select, run `action` in a thread.

    `action` runs to completion (the thread is joined) before the C call
    proceeds, so a cross-thread submission lands exactly while the loop is
    about to block: deterministic, with no sleeps.
    """

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.fired = False

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if (
            event == "c_call"
            and not self.fired
            and getattr(arg, "__name__", "") in ("poll", "select")
            and in_corun(frame)
        ):
            self.fired = True
            helper = threading.Thread(target=self.action)
            helper.start()
            helper.join(10)


@contextmanager
def profiled(hook: BlockHook) -> Iterator[None]:
    previous = sys.getprofile()
    sys.setprofile(hook.profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


def deafness(ctx: AioContext, label: str, bound: float = 2.0) -> str | None:
    """None if a cross-thread call_soon, landing as poll(True) is about to block, wakes it.

    Otherwise (the poll slept until a safety timer `bound` seconds away) a
    description of the failure.
    """
    woke: list[str] = []
    safety_fired: list[str] = []
    safety = ctx.call_later(bound, safety_fired.append, "safety")
    hook = BlockHook(lambda: ctx.call_soon(woke.append, "woke"))
    with profiled(hook):
        while not woke and not safety_fired:
            ctx.poll(True)
    safety.cancel()
    if woke == ["woke"] and not safety_fired:
        return None
    return f"{label}: the context is deaf (a cross-thread call_soon did not wake poll(True))"


@dataclass
class Scenario:
    """Work of every kind queued on one context, and the record of what ran."""

    ctx: AioContext
    log: list[object] = field(default_factory=list)
    expected: list[object] = field(default_factory=list)
    coroutines: dict[object, Coroutine[Any]] = field(default_factory=dict)
    submit_remote: Callable[[], None] = noop

    def outcome(self) -> list[str]:
        """What went wrong: items lost or run more than once."""
        counts = Counter(self.log)
        problems = []
        for item in self.expected:
            n = counts[item]
            co = self.coroutines.get(item)
            if n == 0 and co is not None and co.done:
                # The coroutine itself received the KeyboardInterrupt: it counts as run.
                if isinstance(co.exception(), KeyboardInterrupt):
                    continue
            if n != 1:
                problems.append(f"{item!r} ran {n} times")
        extra = set(counts) - set(self.expected)
        if extra:
            problems.append(f"unexpected entries {sorted(map(repr, extra))}")
        return problems


def _new_coroutine(log: list[object], tag: object) -> None:
    log.append(tag)


def build_scenario(ctx: AioContext, remote: bool) -> Scenario:
    """Queue callbacks, coroutines (new and resumed), a BH, an expired timer.

    remote=False: all queued now from this thread, plus a call_soon and a
    notify() from another thread. remote=True: the items are prepared here
    and `submit_remote` queues them all from another thread.
    """
    s = Scenario(ctx)
    log = s.log

    def stepper() -> None:
        log.append("step 1")
        corun.yield_()
        log.append("step 2")

    resumed = ctx.spawn(stepper, name="stepper")
    drain(ctx)
    assert log == ["step 1"]
    log.clear()
    s.coroutines["step 2"] = resumed
    bh = ctx.bh(log.append, "bh")
    timer = ctx.timer(log.append, "timer")
    callbacks = [("cb", i) for i in range(3)]
    new_cos = [("co", i) for i in range(2)]
    s.expected = [*callbacks, *new_cos, "step 2", "bh", "timer"]

    def submit_all() -> None:
        for tag in callbacks:
            ctx.call_soon(log.append, tag)
        for tag in new_cos:
            s.coroutines[tag] = ctx.spawn(_new_coroutine, log, tag)
        ctx.schedule(resumed)
        bh.schedule()
        timer.mod(ctx.time() - 1.0)

    if remote:
        s.submit_remote = submit_all
    else:
        submit_all()
        s.expected.append("remote")

        def remote_notify() -> None:
            ctx.call_soon(log.append, "remote")
            ctx.notify()

        helper = threading.Thread(target=remote_notify)
        helper.start()
        helper.join(10)
    return s


MAX_FAILURES = 25


def run_injected_pass(k: int, remote: bool) -> tuple[str | None, list[str]]:
    """One scenario with a KeyboardInterrupt at line k of the pass; return (where, problems).

    Runs in a fresh thread that owns the context, so that a context left
    unusable by a regression cannot poison the thread running the tests.
    """
    ok, value = in_other_thread(lambda: _injected_pass(k, remote))
    if not ok:
        return f"k={k}", [f"the scenario itself raised {value!r}"]
    return value  # type: ignore[no-any-return]


def _injected_pass(k: int, remote: bool) -> tuple[str | None, list[str]]:
    problems: list[str] = []
    ctx = AioContext(f"inject-{k}")
    s = build_scenario(ctx, remote)
    injector = Injector(k)
    hook = BlockHook(s.submit_remote)
    previous_trace = sys.gettrace()
    safety = ctx.call_later(2.0, noop)  # bounds the poll(True) of the remote variant
    try:
        with profiled(hook):
            sys.settrace(injector.trace)
            try:
                ctx.poll(remote)  # remote: poll(True), woken by the submissions
            finally:
                sys.settrace(previous_trace)
    except KeyboardInterrupt as exc:
        if injector.where is None:
            problems.append(f"a KeyboardInterrupt nobody injected: {exc!r}")
    finally:
        sys.settrace(previous_trace)
    if remote and not hook.fired:
        # Interrupted before the loop reached its blocking call: submit now.
        helper = threading.Thread(target=s.submit_remote)
        helper.start()
        helper.join(10)
    try:
        for _ in range(3):
            drain(ctx)
        safety.cancel()
        deaf = deafness(ctx, "after the interrupt", bound=0.5)
        if deaf is not None:
            problems.append(deaf)
        drain(ctx)
    except BaseException as exc:
        problems.append(f"the loop failed after the interrupt: {exc!r}")
    problems.extend(s.outcome())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            ctx.close()
        except BaseException as exc:
            problems.append(f"close() raised {exc!r}")
    return injector.where, problems


@pytest.mark.timeout(60)
@pytest.mark.parametrize("remote", [False, True], ids=["queued", "woken_by_other_thread"])
def test_keyboard_interrupt_at_every_line_of_a_pass_loses_nothing(remote: bool) -> None:
    if remote:
        # The deterministic wake-up needs the loop to block in a C call named poll/select.
        with AioContext() as ctx:
            probe = BlockHook(lambda: ctx.call_soon(noop))
            safety = ctx.call_later(2.0, noop)
            with profiled(probe):
                ctx.poll(True)
            safety.cancel()
        if not probe.fired:
            pytest.skip("the loop does not block in a C call named poll or select")
    failures: list[str] = []
    passes = 0
    for k in range(1, 2001):
        injected_at, problems = run_injected_pass(k, remote)
        passes += 1
        if problems:
            failures.append(f"k={k} at {injected_at}: " + "; ".join(problems))
            if len(failures) == MAX_FAILURES:
                break  # enough to go on; keeps a badly broken loop from taking minutes
        if injected_at is None:
            break
    else:
        pytest.fail("a pass still had an injection point after 2000 lines")
    assert failures or passes > 10, "the pass ran almost no corun code: nothing was exercised"
    listing = "\n".join(failures)
    stopped = f" (stopped at the first {MAX_FAILURES})" if len(failures) == MAX_FAILURES else ""
    assert failures == [], f"injection points that failed{stopped}:\n{listing}"
