#!/usr/bin/env python3
"""Hammer corun from many threads at once and check that nothing is lost.

What it measures. Each run starts fresh IOThreads, lets a storm of
cross-thread traffic loose on them for `--seconds`, stops it, and then
checks invariants that only hold if no wake-up was lost, doubled or
reordered. The storms follow QEMU's tests/unit/test-aio-multithread.c:

- schedule/storm: one coroutine per context. Each picks a random context,
  takes the coroutine parked in that context's slot (an atomic exchange
  with "empty": `list.pop()`), schedules it there, then parks itself in
  its own slot and yields. A coroutine can be scheduled while it is still
  running on its way to `yield_()`: that is the race under test. A pick
  that finds an empty slot counts as a retry and the picker parks anyway,
  so, as in QEMU, the traffic dies down once every coroutine is parked.
- schedule/constant: the same, except that a coroutine that finds an empty
  slot retries (after a `time.sleep(0)` that lets other threads have the
  GIL) instead of parking. Half the coroutines are active at any time, so
  wake traffic flows for the whole run.
- mutex/contended and mutex/handoff: one coroutine per context (all of
  them, then only 2) increments a shared counter under a lock (`--impl
  comutex`, the default, or a plain `threading.Lock` for comparison), then
  a per-context counter outside it; at the end `counter ==
  atomic_counter`. The lock's holder is also recorded inside the critical
  section, so two holders at once are seen directly.
- rwlock: coroutines on every context take a CoRwLock as readers (mostly),
  as writers, or as readers that upgrade to writer and downgrade again,
  yield inside the critical section, and check that no reader ever
  overlaps a writer.
- fanin: `--producers` plain threads feed one context, half of them with
  `call_soon` and half with `spawn`; every item records its sequence
  number, and each item must run exactly once and in its producer's order.

Every run also checks that no exception escaped to a context's exception
handler, that every coroutine finished after the stop, and that the
IOThreads joined.

While a run goes, a progress line per second shows elapsed time, operations
so far and the rate over the last second (on stderr; a stall shows at
once). At the end a summary table shows operations, rate, retries, eventfd
writes per wake-up (from `AioContext.stats()`) and invariant checks passed;
`--json` prints one JSON object per run instead. Exit status: 0 when every
check passed, 1 when one failed (it is named on stderr), 130 when stopped
with Ctrl-C (the summary is still printed).

Usage: python tools/stress.py [all|schedule|mutex|rwlock|fanin] [--seconds S]
[--contexts N] [--impl comutex|threading] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import corun
from corun import AioContext, Coroutine, IOThread, current_coroutine, yield_

logger = logging.getLogger("corun.tools.stress")

# How long the stop of a run may take before it counts as a hang (a lost
# wake-up leaves a coroutine suspended forever: this bound turns that into a
# failed check instead of a stuck script).
STOP_TIMEOUT = 10.0


# -- results -------------------------------------------------------------------


@dataclass
class Check:
    """One invariant: its name, whether it held, and the numbers behind it."""

    name: str
    passed: bool
    detail: str = ""


@dataclass
class RunResult:
    """What one run did and which invariants held."""

    run: str
    contexts: int
    seconds: float = 0.0
    ops: int = 0
    retries: int | None = None
    wakes: int = 0
    notify_writes: int = 0
    checks: list[Check] = field(default_factory=list)
    interrupted: bool = False
    skipped: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def writes_per_wake(self) -> float | None:
        return self.notify_writes / self.wakes if self.wakes else None

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "contexts": self.contexts,
            "seconds": round(self.seconds, 4),
            "ops": self.ops,
            "rate": round(self.rate, 1),
            "retries": self.retries,
            "wakes": self.wakes,
            "notify_writes": self.notify_writes,
            "notify_writes_per_wake": (
                None if self.writes_per_wake is None else round(self.writes_per_wake, 4)
            ),
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
            "checks_passed": sum(c.passed for c in self.checks),
            "checks_total": len(self.checks),
            "ok": self.ok,
            "interrupted": self.interrupted,
            "skipped": self.skipped,
            **self.info,
        }


# -- the storms ----------------------------------------------------------------


class Storm:
    """Traffic over a set of contexts; subclasses define the work and the checks.

    `start()` launches the work (from the main thread), `ops()` may be read
    at any time for progress (an unlocked sum of per-thread counters: exact
    once the work has stopped), `stop()` asks the work to end and waits for
    it (bounded), `checks()` lists the invariants.
    """

    name = "storm"

    def __init__(self, ctxs: Sequence[AioContext]) -> None:
        self.ctxs = list(ctxs)
        self.stopping = False
        self.coroutines: list[Coroutine[Any]] = []

    def start(self) -> None:
        raise NotImplementedError

    def ops(self) -> int:
        raise NotImplementedError

    def stop(self) -> list[Check]:
        """Stop the work; return the checks about stopping itself."""
        self.stopping = True
        return [self._join_coroutines()]

    def _join_coroutines(self) -> Check:
        deadline = time.monotonic() + STOP_TIMEOUT
        stuck = []
        for co in self.coroutines:
            try:
                co.join(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                stuck.append(co)
            except Exception:
                pass  # reported by the exception handler check
        detail = f"{len(self.coroutines)} coroutines"
        if stuck:
            names = ", ".join(repr(co) for co in stuck[:5])
            detail = f"{len(stuck)} of {len(self.coroutines)} still suspended: {names}"
        return Check(f"every coroutine finished within {STOP_TIMEOUT:g} s", not stuck, detail)

    def checks(self) -> list[Check]:
        return []

    def retries(self) -> int | None:
        return None

    def wakes(self, delta: dict[str, int]) -> int:
        """Cross-thread wake-ups during the run, given the summed stats delta."""
        return max(delta.get("co_scheduled", 0) - len(self.coroutines), 0)

    def info(self) -> dict[str, Any]:
        return {}


class ScheduleStorm(Storm):
    """QEMU's /aio/multi/schedule, and its constant-population variant."""

    def __init__(self, ctxs: Sequence[AioContext], constant: bool, seed: int) -> None:
        super().__init__(ctxs)
        n = len(self.ctxs)
        self.name = "schedule/constant" if constant else "schedule/storm"
        self.constant = constant
        self.seed = seed
        # to_schedule[i]: empty, or the one coroutine parked on context i.
        # Only that coroutine appends to its slot (and only while the slot is
        # empty); anybody pops. pop() is the atomic "exchange with NULL".
        self.slots: list[list[Coroutine[Any]]] = [[] for _ in range(n)]
        # Per-context counters, each written only by its context's thread.
        self.scheduled = [0] * n
        self.retry_counts = [0] * n
        self.stale_slot = [0] * n  # woke up and found its own slot still full
        # With the constant population, coroutines below this index start
        # active; the others start parked. Some must be parked or the active
        # ones would only ever find empty slots.
        self.active = max(1, n // 2) if constant else n

    def _schedule_next(self, me: int, n: int) -> bool:
        try:
            co = self.slots[n].pop()
        except IndexError:
            self.retry_counts[me] += 1
            return False
        self.scheduled[me] += 1
        self.ctxs[n].schedule(co)
        return True

    def _body(self, i: int) -> None:
        me = current_coroutine()
        assert me is not None
        my_slot = self.slots[i]
        rng = random.Random(self.seed * 1000 + i)
        n = len(self.ctxs)
        schedule_next = self._schedule_next
        if i >= self.active and not self.stopping:
            my_slot.append(me)
            yield_()
        # Stop protocol (as QEMU's finish_cb): stop() sets `stopping`, then
        # runs _finish on each context's own thread. We test `stopping`,
        # park and yield without yielding in between, so _finish, which runs
        # in this same thread, sees us either before the test (then we see
        # `stopping` and leave) or parked (then it wakes us and we leave).
        while not self.stopping:
            if self.constant:
                while not schedule_next(i, rng.randrange(n)):
                    if self.stopping:
                        return
                    # Every slot we can find is empty because its coroutine is
                    # scheduled and waits for its thread to get the GIL; let
                    # go of it (a plain spin would hold it for a whole switch
                    # interval and cut the wake rate tenfold).
                    time.sleep(0)
            else:
                schedule_next(i, rng.randrange(n))
            my_slot.append(me)
            yield_()
            if my_slot:
                self.stale_slot[i] += 1

    def _finish(self, i: int) -> None:
        self._schedule_next(i, i)

    def start(self) -> None:
        # Create every coroutine before any runs: a context's coroutine may
        # run (and pick slots) while the others are still being scheduled.
        self.coroutines = [
            Coroutine(self._body, i, name=f"{self.name}-{i}") for i in range(len(self.ctxs))
        ]
        for ctx, co in zip(self.ctxs, self.coroutines, strict=True):
            ctx.schedule(co)

    def ops(self) -> int:
        return sum(self.scheduled)

    def stop(self) -> list[Check]:
        self.stopping = True
        wake_errors = []
        for i, ctx in enumerate(self.ctxs):
            try:
                ctx.call_sync(self._finish, i, timeout=STOP_TIMEOUT)
            except Exception as exc:
                wake_errors.append(f"context {i}: {exc!r}")
        checks = [
            Check(
                "each context woken from its last wait (finish_cb)",
                not wake_errors,
                "; ".join(wake_errors),
            ),
            self._join_coroutines(),
        ]
        return checks

    def checks(self) -> list[Check]:
        left = [i for i, slot in enumerate(self.slots) if slot]
        stale = sum(self.stale_slot)
        return [
            Check(
                "every slot empty at the end",
                not left,
                f"slots still holding a coroutine: {left}" if left else "",
            ),
            Check(
                "a woken coroutine's own slot is empty",
                stale == 0,
                f"{stale} wake-ups found the slot full" if stale else "",
            ),
        ]

    def retries(self) -> int:
        return sum(self.retry_counts)

    def wakes(self, delta: dict[str, int]) -> int:
        return self.ops()

    def stats_checks(self, delta: dict[str, int]) -> list[Check]:
        # Each successful schedule_next, plus the first schedule of each
        # coroutine, is exactly one loop entry from a schedule list.
        expected = self.ops() + len(self.coroutines)
        got = delta.get("co_scheduled", 0)
        return [
            Check(
                "scheduled == entered from the schedule list",
                got == expected,
                f"scheduled {expected}, loops entered {got}",
            )
        ]

    def info(self) -> dict[str, Any]:
        return {"active": self.active}


class MutexStorm(Storm):
    """QEMU's /aio/multi/mutex: counter under the lock, atomic_counter outside."""

    def __init__(self, ctxs: Sequence[AioContext], label: str, impl: str, per_context: int) -> None:
        super().__init__(ctxs)
        self.name = f"mutex/{label}"
        self.impl = impl
        self.per_context = per_context
        self.lock: Any = corun.CoMutex() if impl == "comutex" else threading.Lock()
        # Written only while holding the lock.
        self.counter = 0
        self.owner: object = None
        # Per-context counters, each written only by its context's thread.
        self.atomic_counter = [0] * len(self.ctxs)
        self.overlaps = [0] * len(self.ctxs)
        self.bad_holder = [0] * len(self.ctxs)

    def _body(self, i: int) -> None:
        lock = self.lock
        atomic = self.atomic_counter
        check_holder = self.impl == "comutex"
        me = current_coroutine()
        while not self.stopping:
            with lock:
                if self.owner is not None:
                    self.overlaps[i] += 1
                self.owner = me
                if check_holder and lock.holder is not me:
                    self.bad_holder[i] += 1
                value = self.counter
                self.counter = value + 1
                if self.owner is not me:
                    self.overlaps[i] += 1
                self.owner = None
            # After the release, as in QEMU: otherwise the stop could find the
            # counters equal while a woken coroutine has yet to run.
            atomic[i] += 1

    def start(self) -> None:
        self.coroutines = [
            Coroutine(self._body, i, name=f"{self.name}-{i}.{k}")
            for i in range(len(self.ctxs))
            for k in range(self.per_context)
        ]
        for j, co in enumerate(self.coroutines):
            self.ctxs[j // self.per_context].schedule(co)

    def ops(self) -> int:
        return sum(self.atomic_counter)

    def checks(self) -> list[Check]:
        atomic = sum(self.atomic_counter)
        checks = [
            Check(
                "counter == atomic_counter",
                self.counter == atomic,
                f"counter={self.counter} atomic_counter={atomic}",
            ),
            Check(
                "one holder at a time",
                sum(self.overlaps) == 0,
                f"{sum(self.overlaps)} overlapping critical sections",
            ),
        ]
        if self.impl == "comutex":
            checks.append(
                Check(
                    "holder is the coroutine inside",
                    sum(self.bad_holder) == 0,
                    f"{sum(self.bad_holder)} wrong holders",
                )
            )
            checks.append(
                Check(
                    "unlocked at the end",
                    not self.lock.locked() and self.lock.holder is None,
                    f"locked()={self.lock.locked()} holder={self.lock.holder!r}",
                )
            )
        return checks

    def info(self) -> dict[str, Any]:
        return {"impl": self.impl, "coroutines_per_context": self.per_context}


class RwLockStorm(Storm):
    """Readers, writers and upgraders over every context; no reader meets a writer."""

    name = "rwlock"

    def __init__(
        self, ctxs: Sequence[AioContext], per_context: int, write_ratio: float, seed: int
    ) -> None:
        super().__init__(ctxs)
        self.per_context = per_context
        self.write_ratio = write_ratio
        self.seed = seed
        self.lock = corun.CoRwLock()
        n = len(self.ctxs)
        # Readers inside, per context (each written only by its own thread);
        # the writer inside (written only while holding the lock as writer).
        self.readers_in = [0] * n
        self.writer: object = None
        self.reads = [0] * n
        self.writes = [0] * n
        self.upgrades = [0] * n
        self.overlaps = [0] * n

    def _reader_section(self, i: int) -> None:
        self.readers_in[i] += 1
        if self.writer is not None:
            self.overlaps[i] += 1
        corun.sleep(0)
        if self.writer is not None:
            self.overlaps[i] += 1
        self.readers_in[i] -= 1

    def _writer_section(self, i: int, me: object) -> None:
        if self.writer is not None or any(self.readers_in):
            self.overlaps[i] += 1
        self.writer = me
        corun.sleep(0)
        if self.writer is not me or any(self.readers_in):
            self.overlaps[i] += 1
        self.writer = None

    def _body(self, i: int, k: int) -> None:
        lock = self.lock
        me = current_coroutine()
        rng = random.Random(self.seed * 1000 + i * 100 + k)
        upgrade_ratio = self.write_ratio / 2
        while not self.stopping:
            r = rng.random()
            if r < self.write_ratio:
                with lock.writer():
                    self._writer_section(i, me)
                self.writes[i] += 1
            elif r < self.write_ratio + upgrade_ratio:
                lock.rdlock()
                try:
                    self._reader_section(i)
                    lock.upgrade()
                    self._writer_section(i, me)
                    lock.downgrade()
                    self._reader_section(i)
                finally:
                    lock.unlock()
                self.upgrades[i] += 1
            else:
                with lock.reader():
                    self._reader_section(i)
                self.reads[i] += 1

    def start(self) -> None:
        self.coroutines = [
            Coroutine(self._body, i, k, name=f"rwlock-{i}.{k}")
            for i in range(len(self.ctxs))
            for k in range(self.per_context)
        ]
        for j, co in enumerate(self.coroutines):
            self.ctxs[j // self.per_context].schedule(co)

    def ops(self) -> int:
        return sum(self.reads) + sum(self.writes) + sum(self.upgrades)

    def checks(self) -> list[Check]:
        overlaps = sum(self.overlaps)
        return [
            Check(
                "no reader overlaps a writer",
                overlaps == 0,
                f"{overlaps} overlaps in {self.ops()} critical sections",
            ),
            Check(
                "nobody inside at the end",
                self.writer is None and not any(self.readers_in),
                f"writer={self.writer!r} readers={self.readers_in}",
            ),
        ]

    def info(self) -> dict[str, Any]:
        return {
            "reads": sum(self.reads),
            "writes": sum(self.writes),
            "upgrades": sum(self.upgrades),
            "coroutines_per_context": self.per_context,
        }


class FaninStorm(Storm):
    """Producer threads feed one context; every item runs once, in producer order."""

    name = "fanin"

    # Items a producer may have in flight before it waits for the consumer,
    # so a slow consumer bounds memory instead of growing its queue forever.
    WINDOW = 2000

    def __init__(self, ctx: AioContext, producers: int) -> None:
        super().__init__([ctx])
        self.producers = producers
        self.submitted = [0] * producers  # written by producer p only
        self.consumed = [0] * producers  # written by the consumer only
        self.out_of_order = [0] * producers  # written by the consumer only
        self.submit_errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def _consume(self, p: int, seq: int) -> None:
        if seq != self.consumed[p]:
            self.out_of_order[p] += 1
        self.consumed[p] += 1

    def _produce(self, p: int) -> None:
        ctx = self.ctxs[0]
        use_spawn = p % 2 == 1
        consume = self._consume
        submitted = self.submitted
        consumed = self.consumed
        seq = 0
        try:
            while not self.stopping:
                if seq - consumed[p] >= self.WINDOW:
                    time.sleep(0.0002)
                    continue
                if use_spawn:
                    ctx.spawn(consume, p, seq)
                else:
                    ctx.call_soon(consume, p, seq)
                seq += 1
                submitted[p] = seq
        except Exception as exc:
            self.submit_errors.append(f"producer {p}: {exc!r}")

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=self._produce, args=(p,), name=f"producer-{p}", daemon=True)
            for p in range(self.producers)
        ]
        for t in self.threads:
            t.start()

    def ops(self) -> int:
        return sum(self.consumed)

    def stop(self) -> list[Check]:
        self.stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        alive = [t.name for t in self.threads if t.is_alive()]
        # Everything submitted must drain; a lost item shows up as a timeout here.
        while sum(self.consumed) < sum(self.submitted) and time.monotonic() < deadline:
            time.sleep(0.005)
        return [
            Check("producers stopped", not alive, f"still running: {alive}" if alive else ""),
            Check("no submission failed", not self.submit_errors, "; ".join(self.submit_errors)),
        ]

    def checks(self) -> list[Check]:
        lost = {
            p: s - c
            for p, (s, c) in enumerate(zip(self.submitted, self.consumed, strict=True))
            if s != c
        }
        disorder = sum(self.out_of_order)
        return [
            Check(
                "every item ran exactly once",
                not lost,
                f"{sum(self.submitted)} items; submitted-ran per producer: {lost}" if lost else "",
            ),
            Check(
                "items ran in their producer's order",
                disorder == 0,
                f"{disorder} out-of-order items" if disorder else "",
            ),
        ]

    def wakes(self, delta: dict[str, int]) -> int:
        return self.ops()

    def info(self) -> dict[str, Any]:
        return {"producers": self.producers}


# -- running -------------------------------------------------------------------


class Interrupt:
    """Ctrl-C handling: the first one asks the current run to stop; a second one kills."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print("\ninterrupted: stopping the current run (Ctrl-C again to kill)", file=sys.stderr)


class Progress:
    """A live line per second on stderr: rewritten in place on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def show(self, run: str, elapsed: float, ops: int, rate: float) -> None:
        """Elapsed seconds, operations so far, and the rate over the last second."""
        if not self.enabled:
            return
        line = f"{run:<18} {elapsed:6.1f} s {ops:>12,} ops {rate:>12,.0f} ops/s (last second)"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _sum_stats(ctxs: Sequence[AioContext]) -> dict[str, int]:
    total: dict[str, int] = {}
    for ctx in ctxs:
        for key, value in ctx.stats().items():
            total[key] = total.get(key, 0) + value
    return total


def run_storm(
    make: Callable[[list[AioContext]], Storm],
    run: str,
    contexts: int,
    seconds: float,
    progress: Progress,
    interrupt: Interrupt,
) -> RunResult:
    """Start `contexts` IOThreads, run the storm on them for `seconds`, stop, check."""
    result = RunResult(run=run, contexts=contexts)
    errors: list[str] = []

    def record(ctx: AioContext, exc: BaseException, origin: object) -> None:
        errors.append(f"{origin!r} on {ctx.name}: {exc!r}")
        logger.error("exception in %r on %r", origin, ctx, exc_info=exc)

    threads = [IOThread(f"{run}-{i}") for i in range(contexts)]
    try:
        ctxs = [t.ctx for t in threads]
        for ctx in ctxs:
            ctx.set_exception_handler(record)
        storm = make(ctxs)
        before = _sum_stats(ctxs)
        start = time.perf_counter()
        storm.start()
        deadline = start + seconds
        next_tick = start + 1.0
        last_ops, last_time = 0, start
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            if interrupt.event.wait(min(deadline, next_tick) - now):
                result.interrupted = True
                break
            now = time.perf_counter()
            if now >= next_tick:
                ops = storm.ops()
                progress.show(run, now - start, ops, (ops - last_ops) / (now - last_time))
                last_ops, last_time = ops, now
                next_tick += 1.0
        result.checks += storm.stop()
        result.seconds = time.perf_counter() - start
        progress.done()
        delta = {k: v - before.get(k, 0) for k, v in _sum_stats(ctxs).items()}
        result.ops = storm.ops()
        result.retries = storm.retries()
        result.wakes = storm.wakes(delta)
        result.notify_writes = delta.get("notify_writes", 0)
        result.checks += storm.checks()
        if isinstance(storm, ScheduleStorm):
            result.checks += storm.stats_checks(delta)
        result.info = storm.info()
    finally:
        stuck = []
        for t in threads:
            try:
                t.join(timeout=STOP_TIMEOUT)
            except TimeoutError:
                stuck.append(t.name)
    result.checks.append(
        Check(
            "no exception escaped to a context's handler",
            not errors,
            f"{len(errors)}: {errors[0]}" if errors else "",
        )
    )
    result.checks.append(
        Check("IOThreads joined", not stuck, f"still running: {stuck}" if stuck else "")
    )
    return result


def plan(args: argparse.Namespace) -> list[tuple[str, int, Callable[[list[AioContext]], Storm]]]:
    """The runs a command stands for: (name, contexts, storm factory)."""
    command = args.command
    seed = args.seed
    impl = args.impl
    per_context = args.coroutines
    rw_per_context = max(args.coroutines, 2)
    write_ratio = args.write_ratio
    producers = args.producers
    runs: list[tuple[str, int, Callable[[list[AioContext]], Storm]]] = []
    if command in ("schedule", "all"):
        runs.append(
            ("schedule/storm", args.contexts, lambda c: ScheduleStorm(c, constant=False, seed=seed))
        )
        runs.append(
            (
                "schedule/constant",
                args.contexts,
                lambda c: ScheduleStorm(c, constant=True, seed=seed),
            )
        )
    if command in ("mutex", "all"):
        runs.append(
            (
                "mutex/contended",
                args.contexts,
                lambda c: MutexStorm(c, "contended", impl, per_context),
            )
        )
        runs.append(
            (
                "mutex/handoff",
                min(2, args.contexts),
                lambda c: MutexStorm(c, "handoff", impl, per_context),
            )
        )
    if command in ("rwlock", "all"):
        runs.append(
            ("rwlock", args.contexts, lambda c: RwLockStorm(c, rw_per_context, write_ratio, seed))
        )
    if command in ("fanin", "all"):
        runs.append(("fanin", 1, lambda c: FaninStorm(c[0], producers)))
    return runs


def missing_api(run: str, impl: str) -> str | None:
    """Why a run cannot go yet (the corun it needs is not there), or None."""
    if run.startswith("mutex") and impl == "comutex" and not hasattr(corun, "CoMutex"):
        return "skipped: corun.CoMutex is not available in this corun yet"
    if run == "rwlock" and not (hasattr(corun, "CoRwLock") and hasattr(corun, "sleep")):
        return "skipped: corun.CoRwLock/corun.sleep are not available in this corun yet"
    return None


# -- output --------------------------------------------------------------------


def _fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def summary_table(results: Sequence[RunResult]) -> str:
    header = (
        "run",
        "ctx",
        "seconds",
        "ops",
        "ops/s",
        "retries",
        "wakes",
        "writes/wake",
        "checks",
        "status",
    )
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.skipped:
            rows.append((r.run, str(r.contexts), "-", "-", "-", "-", "-", "-", "-", "skipped"))
            continue
        wpw = r.writes_per_wake
        status = "ok" if r.ok else "FAIL"
        if r.interrupted:
            status += " (interrupted)"
        rows.append(
            (
                r.run,
                str(r.contexts),
                f"{r.seconds:.2f}",
                _fmt_int(r.ops),
                f"{r.rate:,.0f}",
                _fmt_int(r.retries),
                _fmt_int(r.wakes),
                "-" if wpw is None else f"{wpw:.3f}",
                f"{sum(c.passed for c in r.checks)}/{len(r.checks)}",
                status,
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    left = {0, 9}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stress.py",
        description=(
            "Hammer corun's cross-thread scheduling, CoMutex, CoRwLock and fan-in from "
            "many IOThreads and check that no wake-up is lost (QEMU's "
            "test-aio-multithread storms)."
        ),
        epilog=(
            "Exit status: 0 all checks passed, 1 an invariant failed (named on stderr), "
            "130 interrupted with Ctrl-C."
        ),
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="all",
        choices=("all", "schedule", "mutex", "rwlock", "fanin"),
        help="which storm to run (default: all of them, one after the other)",
    )
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="duration of each run (default: 2)"
    )
    parser.add_argument("--contexts", type=int, default=5, help="number of IOThreads (default: 5)")
    parser.add_argument(
        "--impl",
        choices=("comutex", "threading"),
        default="comutex",
        help="mutex runs: corun.CoMutex (default) or threading.Lock inside coroutines",
    )
    parser.add_argument(
        "--coroutines",
        type=int,
        default=1,
        help="coroutines per context in the mutex runs (default: 1, as QEMU; rwlock uses "
        "at least 2)",
    )
    parser.add_argument(
        "--write-ratio",
        type=float,
        default=0.2,
        help="rwlock: share of operations that take the lock as writer (default: 0.2)",
    )
    parser.add_argument(
        "--producers", type=int, default=8, help="fanin: producer threads (default: 8)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per run instead of a table"
    )
    parser.add_argument("--quiet", action="store_true", help="no live progress line on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.seconds <= 0 or args.contexts < 2 or args.coroutines < 1 or args.producers < 1:
        print(
            "stress.py: --seconds must be > 0, --contexts >= 2, --coroutines and --producers >= 1",
            file=sys.stderr,
        )
        return 2
    progress = Progress(not args.quiet)
    interrupt = Interrupt()
    interrupt.install()
    results: list[RunResult] = []
    try:
        for name, contexts, make in plan(args):
            if interrupt.event.is_set():
                break
            why = missing_api(name, args.impl)
            if why is not None:
                result = RunResult(run=name, contexts=contexts, skipped=why)
                print(f"{name}: {why}", file=sys.stderr)
            else:
                logger.info("starting %s on %d contexts for %g s", name, contexts, args.seconds)
                result = run_storm(make, name, contexts, args.seconds, progress, interrupt)
            results.append(result)
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
    finally:
        interrupt.uninstall()
    if not args.json:
        print(summary_table(results))
    failed = False
    for r in results:
        for check in r.failures:
            failed = True
            print(f"FAILED {r.run}: {check.name}: {check.detail}", file=sys.stderr)
    if failed:
        return 1
    if interrupt.event.is_set():
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
