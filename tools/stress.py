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
  so, as in QEMU, the traffic dies out once every coroutine is parked: a
  few operations, then 0 ops/s. That is the test by design, not a stall,
  and its live line and summary say so. The wake-ups by the stop (QEMU's
  finish_cb) are counted apart (`finish_wakes`), not as operations.
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
- queue: producers (a coroutine on each context and two plain threads)
  put unique (producer, seq) items into one bounded corun.Queue (`--maxsize`,
  default 16; 0: unbounded); consumers (two coroutines per context and two
  plain threads, half of them with `get(timeout=...)`, some producers with
  `put(timeout=...)`) take them. A canceller thread cancels a random
  consumer coroutine every few milliseconds and spawns a replacement, and
  the pace changes every 20 ms (free, producers napping so getters wait,
  consumers napping so putters wait), so cancels and timeouts land while
  items are being handed over. At the stop the producers stop, the queue
  drains and `close()` ends the stream. Checks: every item put was
  received exactly once; per producer, each consumer got its items in
  increasing seq; `qsize()` never exceeded maxsize as observed; every
  cancelled consumer finished with Cancelled and every other one at end of
  stream; the queue ends empty and closed with no stale waiter in it; no
  IOThread died; every coroutine finished.
- faults (not part of `all`): `--producers` threads submit work of every
  kind to the IOThreads (call_soon, coroutines that sleep(0) or reschedule
  themselves and yield, bottom halves, call_later timers, cross-thread
  spawn().join()), and a share `--faults P` (default 0.02) of the callbacks
  and coroutine steps raise: ValueError, GeneratorExit, a user subclass of
  BaseException, or (from a coroutine's fn) greenlet.GreenletExit, each
  carrying its item's id. A quarter of the way in one more IOThread is
  joined while the producers keep submitting to it. Checks: every accepted
  item ran exactly once or its submission was refused with RuntimeError;
  every fault reached the exception handler exactly once and nothing else
  did; no IOThread died; every coroutine is done and its join gives its
  value or its own exception. `--sigint N` adds a main-thread AioContext
  (`poll(True)` in a loop that catches KeyboardInterrupt) fed by the
  producers while a thread sends it N real SIGINTs: every call_soon it
  accepted must run exactly once, and it must still wake for another
  thread's call_soon afterwards.

Every run also checks that no exception escaped to a context's exception
handler (in faults: none but the injected ones), that every coroutine
finished after the stop, and that the IOThreads joined.

While a run goes, a progress line per second shows elapsed time, operations
so far and the rate over the last second (on stderr; a stall shows at
once), and a last line the run's totals. At the end a summary table shows
operations (the same count as the last line), rate, retries, eventfd writes
per wake-up (from `AioContext.stats()`) and invariant checks passed;
`--json` prints JSON Lines instead: one JSON object per run, each key
explained by the command's `--help`. Exit status: 0 when every check
passed, 1 when one failed (it is named on stderr), 2 for a bad command
line, 130 when stopped with Ctrl-C (the summary is still printed).

Usage: tools/stress.py [COMMAND] [OPTIONS]: the commands are all (the
default), schedule, mutex, rwlock, fanin, queue and faults, and each takes
only the options that apply to its runs (`tools/stress.py COMMAND --help`);
an option that does not apply, or a value out of range, is refused with a
message that names it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import sys
import textwrap
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from greenlet import GreenletExit

import corun
from corun import AioContext, Coroutine, IOThread, current_coroutine, yield_

logger = logging.getLogger("corun.tools.stress")

# How long the stop of a run may take before it counts as a hang (a lost
# wake-up leaves a coroutine suspended forever: this bound turns that into a
# failed check instead of a stuck script).
STOP_TIMEOUT = 10.0

# What a cancelled coroutine's join() raises (nothing to catch in a corun without it).
_CANCELLED: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(corun, "Cancelled", None),) if c is not None
)

# handler(ctx, exc, origin), as AioContext.set_exception_handler takes it.
ExceptionHandler = Callable[[AioContext, BaseException, object], object]

# What the live line and the summary say of schedule/storm, whose traffic
# stops once every coroutine has parked: QEMU's test as written, not a stall.
DIES_OUT = "QEMU's storm: dies out by design"
# The summary's footnote for each note.
NOTE_WHY = {
    DIES_OUT: "a pick that finds an empty slot parks the picker too, so the traffic "
    "stops once all have parked; schedule/constant keeps it flowing",
}


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
    note: str = ""
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
    once the work has stopped), `wait()` is how the main thread spends the
    run, `stop()` asks the work to end and waits for it (bounded),
    `checks()` lists the invariants.
    """

    name = "storm"
    # The name of run_storm's check on what reached the exception handlers.
    handler_check = "no exception escaped to a context's handler"
    # What the live line and the summary say about the run, if anything
    # (schedule/storm: that its traffic stopping is no stall).
    note = ""

    def __init__(self, ctxs: Sequence[AioContext]) -> None:
        self.ctxs = list(ctxs)
        self.stopping = False
        self.coroutines: list[Coroutine[Any]] = []
        # The IOThreads that own `ctxs` (set by run_storm before start()).
        self.iothreads: list[IOThread] = []

    def exception_handler(self, record: ExceptionHandler) -> ExceptionHandler:
        """The handler for the storm's contexts; `record` fails the handler check."""
        return record

    def wait(self, interrupt: Interrupt, timeout: float) -> bool:
        """Spend up to `timeout` s of the run in the main thread; True on Ctrl-C."""
        return interrupt.event.wait(timeout)

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
            except BaseException as exc:
                if not isinstance(exc, _CANCELLED):
                    raise
                # Finished by cancellation (the queue storm's cancelled consumers).
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
        if not constant:
            self.note = DIES_OUT
        self.seed = seed
        # to_schedule[i]: empty, or the one coroutine parked on context i.
        # Only that coroutine appends to its slot (and only while the slot is
        # empty); anybody pops. pop() is the atomic "exchange with NULL".
        self.slots: list[list[Coroutine[Any]]] = [[] for _ in range(n)]
        # Per-context counters, each written only by its context's thread.
        self.scheduled = [0] * n
        # Coroutines woken by the stop (finish_cb): part of the protocol, not
        # of the storm, so not counted in ops() (the live line could not show
        # them: they come after its last tick).
        self.finish_wakes = [0] * n
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

    def _finish(self, i: int) -> None:
        try:
            co = self.slots[i].pop()
        except IndexError:
            return  # not parked: it sees `stopping` and leaves
        self.finish_wakes[i] += 1
        self.ctxs[i].schedule(co)

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
        # Each successful schedule_next, each wake-up by the stop, and the
        # first schedule of each coroutine is exactly one loop entry from a
        # schedule list.
        finish = sum(self.finish_wakes)
        expected = self.ops() + finish + len(self.coroutines)
        got = delta.get("co_scheduled", 0)
        return [
            Check(
                "scheduled == entered from the schedule list",
                got == expected,
                f"scheduled {expected} ({self.ops()} by the storm, {finish} by the stop, "
                f"{len(self.coroutines)} first runs), loops entered {got}",
            )
        ]

    def info(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "dies_out": not self.constant,
            "finish_wakes": sum(self.finish_wakes),
        }


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


class QueueStorm(Storm):
    """Producers and consumers on IOThreads and plain threads share one bounded Queue.

    Producers (one coroutine per context and PRODUCER_THREADS plain threads)
    put unique items (producer, seq); some use put(timeout=...) and retry
    the same item after QueueFull. Consumers (CONSUMERS_PER_CONTEXT
    coroutines per context and CONSUMER_THREADS plain threads) get items,
    half of them with get(timeout=...), and log what they received. A
    canceller thread cancels a random consumer coroutine every few
    milliseconds and spawns a replacement on a random context, so cancels
    land while items are being handed to their getters.

    The stop: producers stop putting (their last put completes), the
    canceller stops, the queue drains, every cancelled consumer must have
    finished with Cancelled, then close() ends the stream and the others
    must leave with QueueShutDown. Per-consumer lists and counters are each
    written by their own consumer only (the lists of consumers: by the
    canceller, before it starts the consumer).
    """

    name = "queue"

    PRODUCER_THREADS = 2
    CONSUMER_THREADS = 2
    CONSUMERS_PER_CONTEXT = 2
    TIMEOUT = (0.0, 0.002)  # get(timeout=...) and put(timeout=...), seconds
    CANCEL_GAP = (0.0, 0.003)  # between two cancels, seconds
    SLEEP_SHARE = 1 / 8  # share of items after which a consumer coroutine sleep(0)s
    # Phases of PHASE seconds take turns: free (nobody naps); trickle
    # (producers nap up to NAP s before each put: the queue runs empty and
    # getters wait); congested (consumers nap before a share NAP_SHARE of
    # their gets: the queue fills and putters wait).
    PHASE = 0.02
    FREE, TRICKLE, CONGESTED = range(3)
    NAP = 0.001
    NAP_SHARE = 1 / 4
    SETTLE = 0.05  # seconds the drained queue is watched for stale waiters

    def __init__(self, ctxs: Sequence[AioContext], maxsize: int, seed: int) -> None:
        super().__init__(ctxs)
        self.maxsize = maxsize
        self.seed = seed
        self.queue = self.make_queue(maxsize)
        n_producers = len(self.ctxs) + self.PRODUCER_THREADS
        # Per producer: items whose put() returned (written by that producer only).
        self.produced = [0] * n_producers
        self.put_timeouts = [0] * n_producers
        self.producer_max = [0] * n_producers  # largest qsize() a producer saw
        self.producer_cos: list[Coroutine[Any]] = []
        # Per consumer c: log[c][p] = the seqs of producer p it received, in order.
        self.log: list[list[array[int]]] = []
        self.got: list[int] = []
        self.disorder: list[int] = []
        self.get_timeouts: list[int] = []
        self.consumer_max: list[int] = []
        self.ended: list[str] = []  # how each consumer left: "" while it runs
        self.late: list[int] = []  # items received with a cancel pending
        self.thread_consumers: set[int] = set()
        # Consumer coroutines: those not asked to stop, and those cancelled.
        self.live: list[Coroutine[Any]] = []
        self.cancelled: list[Coroutine[Any]] = []
        self.cancels = 0
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.consumer_threads: list[threading.Thread] = []
        self.canceller: threading.Thread | None = None
        self._stop_cancels = threading.Event()
        self.stop_problems: dict[str, str] = {}
        self.stale_waiters: str | None = None
        self.dead: list[str] = []

    @staticmethod
    def make_queue(maxsize: int) -> corun.Queue[tuple[int, int]]:
        """The queue under test (a test may swap in a broken one)."""
        return corun.Queue(maxsize)

    # -- the work ------------------------------------------------------------

    def _error(self, who: str, exc: BaseException) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{who}: {exc!r}")

    def _produce(self, p: int, use_timeout: bool, in_coroutine: bool) -> None:
        q = self.queue
        rng = random.Random(self.seed * 1000 + p)
        produced = self.produced
        seen = self.producer_max
        low, high = self.TIMEOUT
        nap = corun.sleep if in_coroutine else time.sleep
        phase = self.PHASE
        seq = 0
        try:
            while not self.stopping:
                if int(time.monotonic() / phase) % 3 == self.TRICKLE:
                    nap(rng.uniform(0.0, self.NAP))
                item = (p, seq)
                if use_timeout and rng.random() < 0.5:
                    try:
                        q.put(item, timeout=rng.uniform(low, high))
                    except corun.QueueFull:
                        self.put_timeouts[p] += 1
                        continue  # not queued: the same item again
                else:
                    q.put(item)
                seq += 1
                produced[p] = seq
                size = q.qsize()
                if size > seen[p]:
                    seen[p] = size
        except Exception as exc:
            self._error(f"producer {p}", exc)

    def _new_consumer(self) -> int:
        c = len(self.got)
        self.log.append([array("q") for _ in self.produced])
        self.disorder.append(0)
        self.get_timeouts.append(0)
        self.consumer_max.append(0)
        self.late.append(0)
        self.ended.append("")
        self.got.append(0)  # last: ops() sums got while consumers are added
        return c

    def _consume(self, c: int, use_timeout: bool, in_coroutine: bool) -> str:
        """Get items until end of stream; the cancelled ones leave with Cancelled."""
        q = self.queue
        rng = random.Random(self.seed * 1000 + 500 + c)
        log = self.log[c]
        last = [-1] * len(log)
        got, disorder, seen = self.got, self.disorder, self.consumer_max
        low, high = self.TIMEOUT
        sleep_share = self.SLEEP_SHARE if in_coroutine else 0.0
        me = current_coroutine()
        nap = corun.sleep if in_coroutine else time.sleep
        phase, nap_share = self.PHASE, self.NAP_SHARE
        try:
            while True:
                if (
                    not self.stopping
                    and int(time.monotonic() / phase) % 3 == self.CONGESTED
                    and rng.random() < nap_share
                ):
                    nap(rng.uniform(0.0, self.NAP))
                try:
                    if use_timeout:
                        p, seq = q.get(timeout=rng.uniform(low, high))
                    else:
                        p, seq = q.get()
                except corun.QueueEmpty:
                    self.get_timeouts[c] += 1
                    continue
                except corun.QueueShutDown:
                    self.ended[c] = "end of stream"
                    return "end of stream"
                # Logged before any other cancellation point: an item
                # handed over is never dropped by the consumer itself.
                log[p].append(seq)
                if seq <= last[p]:
                    disorder[c] += 1
                last[p] = seq
                got[c] += 1
                if me is not None and me.cancelling():
                    # Received although cancelled: the hand-off won the race
                    # (or the get did not wait); Cancelled comes at the next
                    # cancellation point.
                    self.late[c] += 1
                size = q.qsize()
                if size > seen[c]:
                    seen[c] = size
                if sleep_share and rng.random() < sleep_share:
                    corun.sleep(0)  # a cancellation point with no item in hand
        except Exception as exc:
            self._error(f"consumer {c}", exc)
            self.ended[c] = f"failed: {exc!r}"
            return "failed"

    def _spawn_consumer(self, ctx: AioContext, use_timeout: bool) -> Coroutine[Any]:
        c = self._new_consumer()
        co = ctx.spawn(
            self._consume,
            c,
            use_timeout,
            True,
            name=f"consumer-{c}" + ("-t" if use_timeout else ""),
        )
        self.coroutines.append(co)
        self.live.append(co)
        return co

    def _cancel_consumers(self) -> None:
        rng = random.Random(self.seed * 1000 + 999)
        low, high = self.CANCEL_GAP
        try:
            while not self._stop_cancels.wait(rng.uniform(low, high)):
                victim = self.live.pop(rng.randrange(len(self.live)))
                if victim.cancel():
                    self.cancels += 1
                self.cancelled.append(victim)
                self._spawn_consumer(rng.choice(self.ctxs), use_timeout=rng.random() < 0.5)
        except Exception as exc:
            self._error("canceller", exc)

    def start(self) -> None:
        n_ctx = len(self.ctxs)
        for ctx in self.ctxs:
            for k in range(self.CONSUMERS_PER_CONTEXT):
                self._spawn_consumer(ctx, use_timeout=k % 2 == 1)
        for t in range(self.CONSUMER_THREADS):
            c = self._new_consumer()
            self.thread_consumers.add(c)
            self.consumer_threads.append(
                threading.Thread(
                    target=self._consume,
                    args=(c, t % 2 == 1, False),
                    name=f"consumer-thread-{c}",
                    daemon=True,
                )
            )
        for p in range(n_ctx):
            co = self.ctxs[p].spawn(self._produce, p, p % 2 == 1, True, name=f"producer-{p}")
            self.producer_cos.append(co)
            self.coroutines.append(co)
        for t in range(self.PRODUCER_THREADS):
            p = n_ctx + t
            self.threads.append(
                threading.Thread(
                    target=self._produce,
                    args=(p, t % 2 == 1, False),
                    name=f"producer-thread-{p}",
                    daemon=True,
                )
            )
        self.canceller = threading.Thread(
            target=self._cancel_consumers, name="canceller", daemon=True
        )
        for thread in [*self.consumer_threads, *self.threads, self.canceller]:
            thread.start()

    def ops(self) -> int:
        return sum(self.got)

    # -- the stop ------------------------------------------------------------

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def stop(self) -> list[Check]:
        self.stopping = True
        self._stop_cancels.set()
        deadline = time.monotonic() + STOP_TIMEOUT
        helpers = [*self.threads, *([self.canceller] if self.canceller else [])]
        for thread in helpers:
            thread.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in helpers if t.is_alive()]
        for co in self.producer_cos:
            try:
                co.join(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                stuck.append(repr(co))
            except BaseException as exc:
                self._error(repr(co), exc)
        q = self.queue
        # No more puts: the consumers drain the queue, and the cancelled
        # ones meet their Cancelled at the get that finds it empty.
        drained = self._wait_until(lambda: q.qsize() == 0, deadline)
        if not drained:
            self.stop_problems["drain"] = f"{q.qsize()} items still queued"
        self._wait_until(lambda: all(co.done for co in self.cancelled), deadline)
        not_cancelled = [co for co in self.cancelled if not co.cancelled()]
        if not_cancelled:
            names = ", ".join(repr(co) for co in not_cancelled[:3])
            self.stop_problems["cancelled"] = (
                f"{len(not_cancelled)} of {len(self.cancelled)} did not finish with "
                f"Cancelled before close(): {names}"
            )
        # Every live consumer waits in get() on the empty queue now (or is
        # about to), those with a timeout timing out again and again: a
        # waiter left behind by a timeout or a cancel (nothing is put to
        # pop it any more) would soon outnumber them.
        getters = getattr(q, "_getters", None)
        if drained and getters is not None:
            time.sleep(self.SETTLE)
            consumers = len(self.live) + len(self.consumer_threads)
            if len(getters) > consumers:
                self.stale_waiters = f"{len(getters)} getters queued for {consumers} live consumers"
        q.close()
        for thread in self.consumer_threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        stuck += [t.name for t in self.consumer_threads if t.is_alive()]
        checks = [
            Check(
                "producers, consumer threads and canceller stopped",
                not stuck,
                f"still running: {stuck}" if stuck else "",
            ),
            self._join_coroutines(),
        ]
        ends: Counter[str] = Counter()
        for co in self.live:
            if co.cancelled():
                ends["cancelled"] += 1
            elif not co.done:
                ends["not done"] += 1
            else:
                ends[co.result()] += 1
        for c in self.thread_consumers:
            ends[self.ended[c] or "not done"] += 1
        bad_ends = {k: v for k, v in ends.items() if k != "end of stream"}
        others = len(self.live) + len(self.consumer_threads)
        detail = f"{len(self.cancelled)} cancelled, {others} others; "
        for name in ("cancelled", "drain"):
            if name in self.stop_problems:
                detail += self.stop_problems[name] + "; "
        checks.append(
            Check(
                "cancelled consumers finished with Cancelled, the others at end of stream",
                not bad_ends and "cancelled" not in self.stop_problems,
                detail + (f"other ends: {bad_ends}" if bad_ends else ""),
            )
        )
        for t in self.iothreads:
            try:
                if not t.is_alive():
                    raise RuntimeError("thread not alive")
                t.ctx.call_sync(lambda: None, timeout=max(deadline - time.monotonic(), 0.5))
            except BaseException as exc:
                self.dead.append(f"{t.name}: {exc!r}")
        checks.append(
            Check(
                "no IOThread died (each alive and answering call_sync until joined)",
                not self.dead,
                "; ".join(self.dead),
            )
        )
        return checks

    # -- the checks ----------------------------------------------------------

    def checks(self) -> list[Check]:
        missing = doubled = phantom = 0
        for p, produced in enumerate(self.produced):
            counts = bytearray(produced)
            for per_consumer in self.log:
                for seq in per_consumer[p]:
                    if seq >= produced:
                        phantom += 1
                    elif counts[seq] < 255:
                        counts[seq] += 1
            ones = counts.count(1)
            zeros = counts.count(0)
            missing += zeros
            doubled += produced - ones - zeros
        put = sum(self.produced)
        received = sum(self.got)
        disorder = sum(self.disorder)
        max_seen = max([*self.producer_max, *self.consumer_max, 0])
        q = self.queue
        left = q.qsize()
        checks = [
            Check(
                "every item put was received exactly once",
                not (missing or doubled or phantom),
                f"{put} put, {received} received; never: {missing}, more than once: "
                f"{doubled}, never put: {phantom}",
            ),
            Check(
                "per producer, each consumer received its items in put order",
                disorder == 0,
                f"{disorder} out-of-order items" if disorder else "",
            ),
            Check(
                "qsize() never exceeded maxsize (as observed)",
                self.maxsize <= 0 or max_seen <= self.maxsize,
                f"largest seen {max_seen}, maxsize {self.maxsize}"
                + (" (unbounded)" if self.maxsize <= 0 else ""),
            ),
            Check(
                "queue empty and closed at the end; no stale waiter left in it",
                left == 0 and q.empty() and q.closed and not self.stale_waiters,
                f"qsize()={left} empty()={q.empty()} closed={q.closed}"
                + (f"; {self.stale_waiters}" if self.stale_waiters else ""),
            ),
            Check(
                "no put or get raised anything unexpected",
                not self.errors,
                f"{len(self.errors)}: {'; '.join(self.errors[:3])}" if self.errors else "",
            ),
        ]
        return checks

    def info(self) -> dict[str, Any]:
        return {
            "maxsize": self.maxsize,
            "producers": len(self.produced),
            "consumers": len(self.got),
            "items_put": sum(self.produced),
            "received_by_threads": sum(self.got[c] for c in self.thread_consumers),
            "cancels": self.cancels,
            "cancelled": sum(co.cancelled() for co in self.cancelled),
            "received_while_cancelled": sum(self.late),
            "get_timeouts": sum(self.get_timeouts),
            "put_timeouts": sum(self.put_timeouts),
            "max_qsize": max([*self.producer_max, *self.consumer_max, 0]),
        }


# -- fault injection -----------------------------------------------------------


class StormFault(BaseException):
    """A user subclass of BaseException (not Exception), injected by the faults storm."""


# What an injected fault may be: a callback (call_soon, bottom half, timer)
# raises one of CALLBACK_FAULTS, a coroutine one of COROUTINE_FAULTS
# (GreenletExit raised by a coroutine's own fn must finish it like any
# exception). Every fault carries its item's id in `fault_id`.
CALLBACK_FAULTS: tuple[type[BaseException], ...] = (ValueError, GeneratorExit, StormFault)
COROUTINE_FAULTS: tuple[type[BaseException], ...] = (
    ValueError,
    GeneratorExit,
    StormFault,
    GreenletExit,
)

# The share of callbacks and coroutine steps that raise (`faults --faults P`).
DEFAULT_FAULT_RATE = 0.02
# How long a producer's cross-thread spawn().join() may take.
JOIN_BOUND = 3.0
# How long the stop of the faults run may wait for the signal sender, then for
# the producers, the drain and the coroutines.
FAULT_STOP_TIMEOUT = 5.0
# A safety timer for the wake-up probe: a context that needs it to wake is deaf.
WAKE_BOUND = 2.0
# How long the signal sender waits for its SIGINT to come out of the main loop.
SIGNAL_BOUND = 5.0
# sys.setswitchinterval() during a --sigint run (the default is 0.005).
SIGINT_SWITCH_INTERVAL = 0.0001


def _log_exception(ctx: AioContext, exc: BaseException, origin: object) -> None:
    logger.error("exception in %r on %r", origin, ctx, exc_info=exc)


class ItemBytes:
    """A growable array of small counts (0-255) whose entries never move.

    One thread (a producer) appends while other threads write entries it
    appended earlier. A bytearray does that under the GIL, but it is not
    thread-safe on free-threaded CPython 3.13: an append that reallocates
    copies the buffer while another thread stores into the old one, and that
    store is lost. Here entries live in fixed-size chunks that are never
    reallocated; growing appends a new chunk to a list (one atomic list
    append), and each entry still has one writer at a time.
    """

    CHUNK_BITS = 12
    CHUNK = 1 << CHUNK_BITS

    __slots__ = ("_chunks", "_len")

    def __init__(self) -> None:
        self._chunks: list[bytearray] = []
        self._len = 0  # written by the appending thread only

    def append(self, value: int) -> None:
        n = self._len
        if not n & (self.CHUNK - 1):
            self._chunks.append(bytearray(self.CHUNK))
        self._chunks[n >> self.CHUNK_BITS][n & (self.CHUNK - 1)] = value
        self._len = n + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> int:
        return self._chunks[i >> self.CHUNK_BITS][i & (self.CHUNK - 1)]

    def __setitem__(self, i: int, value: int) -> None:
        self._chunks[i >> self.CHUNK_BITS][i & (self.CHUNK - 1)] = value

    def __iter__(self) -> Iterator[int]:
        left = self._len
        for chunk in list(self._chunks):
            if left <= 0:
                return
            yield from chunk[:left] if left < self.CHUNK else chunk
            left -= self.CHUNK

    def count(self, value: int) -> int:
        return sum(1 for v in self if v == value)


class FaultStorm(Storm):
    """Faults raised by a share of the work; nothing lost, no loop killed, none deaf.

    Producer threads submit items to random IOThreads: `call_soon`
    callbacks, coroutines that `sleep(0)` or reschedule themselves and
    yield a few times, one-shot bottom halves, `call_later` timers, and
    cross-thread `spawn().join()`. Each producer plans, from its seeded RNG,
    which items fault and where: a share `rate` of the callbacks and of the
    coroutine steps raise an exception (see CALLBACK_FAULTS and
    COROUTINE_FAULTS) carrying the item's id. A quarter of the way in, an
    extra IOThread is joined while the producers keep submitting to it: from
    then on its submissions must be refused with RuntimeError.

    With `sigint` > 0 the main thread also runs an AioContext (`poll(True)`
    in a loop that catches KeyboardInterrupt) fed by the producers with
    `call_soon`, while a thread sends it that many real SIGINTs
    (`signal.pthread_kill`). The storm's own SIGINT handler raises
    KeyboardInterrupt only for the signals it sent (one at a time, and only
    while the main loop is inside its `try`, see `_drive`); any other SIGINT
    is the user's Ctrl-C and goes to the tool's handler.

    Item ids are (producer, sequence number); per producer, arrays of bytes
    (ItemBytes) indexed by sequence number hold what happened to each item. Each entry
    is written by one thread at a time: `state` and `kind` by the producer,
    `runs`, `raised` and `reported` by the thread of the context that runs it.
    """

    name = "faults"
    handler_check = "no unexpected exception reached a handler"

    WINDOW = 2000  # items in flight before a producer waits
    # With --sigint, a producer sends a burst of MAIN_BURST call_soon items to
    # the main-thread context instead of one item elsewhere with probability
    # MAIN_PICK: about a third of the items then go to the main thread.
    MAIN_BURST = 16
    MAIN_PICK = 1 / 32
    # Item kinds (codes in `kind`) and how often a producer picks each.
    CALL_SOON, SPAWN, BH, TIMER, SPAWN_JOIN = range(1, 6)
    KIND_NAMES = {1: "call_soon", 2: "spawn", 3: "bh", 4: "timer", 5: "spawn_join"}
    KIND_WEIGHTS = (3, 3, 2, 2, 1)
    # Item states (codes in `state`).
    PENDING, ACCEPTED, REFUSED, FAILED = 0, 1, 2, 3

    def __init__(
        self,
        ctxs: Sequence[AioContext],
        producers: int,
        rate: float,
        sigint: int,
        seconds: float,
        seed: int,
    ) -> None:
        super().__init__(ctxs)
        self.name = "faults/sigint" if sigint else "faults"
        self.producers = producers
        self.rate = rate
        self.sigint = sigint
        self.seconds = seconds
        self.seed = seed
        self.fault_classes: list[type[BaseException]] = list(
            dict.fromkeys(CALLBACK_FAULTS + COROUTINE_FAULTS)
        )
        self.callback_codes = [self.fault_classes.index(c) + 1 for c in CALLBACK_FAULTS]
        self.coroutine_codes = [self.fault_classes.index(c) + 1 for c in COROUTINE_FAULTS]
        n = producers
        self.state = [ItemBytes() for _ in range(n)]
        self.kind = [ItemBytes() for _ in range(n)]
        self.fault = [ItemBytes() for _ in range(n)]  # planned fault class code, 0: none
        self.runs = [ItemBytes() for _ in range(n)]
        self.raised = [ItemBytes() for _ in range(n)]
        self.reported = [ItemBytes() for _ in range(n)]
        # 1: a producer's spawn().join() got the fault (API.md lets the
        # project decide whether the handler hears of it too).
        self.retrieved = [ItemBytes() for _ in range(n)]
        # accepted[p][i]: items producer p got accepted by context i (the
        # closing IOThread is the last index); ran[i]: items context i ran.
        self.accepted: list[list[int]] = []
        self.ran: list[int] = []
        self.join_timeouts = [0] * n
        self.co_checked = [0] * (n + 1)  # the last slot is the main thread's
        self.co_bad = [0] * (n + 1)
        self.co_problems: list[str] = []
        self.submit_errors: list[str] = []
        self.pending: list[deque[tuple[Coroutine[Any], int, int]]] = [deque() for _ in range(n)]
        self.threads: list[threading.Thread] = []
        self.unexpected = 0
        self._hurry = threading.Event()  # set by stop(): no more waiting between actions
        self._abort = threading.Event()  # set at the end of stop(): helpers give up
        self._handler: ExceptionHandler | None = None
        self._interrupt: Interrupt | None = None
        # The IOThread that is joined under the producers' feet, and its race.
        self.closing: IOThread | None = None
        self.closer: threading.Thread | None = None
        self.close_race: str | None = None  # None: not run; "": passed; else what failed
        self.dead: list[str] = []
        # The main-thread context and the signal storm (sigint > 0).
        self.main_ctx: AioContext | None = None
        self.main_log: list[int] = []  # ids of main items run (list.append: C, no signal inside)
        self.main_ids: list[list[int]] = [[] for _ in range(n)]
        self.main_errors: list[str] = []
        self.sent = 0
        self.caught = 0
        self.swallowed = 0  # KeyboardInterrupts that reached an exception handler
        self.lost_signals = 0
        self._gate = threading.Lock()
        self._open = False  # the main loop is inside its try (see _drive)
        self._in_flight = False  # a SIGINT of ours is on its way
        self._signals_cut = False  # stop() stopped the sender before it sent them all
        self._ours = False  # the KeyboardInterrupt being raised is ours
        self._prev_sigint: Any = None
        self._sender: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._tick: corun.EventNotifier | None = None
        self._spin: corun.BottomHalf | None = None
        self._prev_switch: float | None = None
        self._busy = False
        self.wakeable: str | None = None
        self.main_closed: str | None = None
        # What killed an IOThread (its uncaught exception), by thread name.
        self.deaths: dict[str, str] = {}
        self._prev_excepthook: Any = None

    # -- the work ------------------------------------------------------------

    def _bump(self, counts: ItemBytes, seq: int) -> None:
        if counts[seq] < 255:
            counts[seq] += 1

    def _fault(self, p: int, seq: int) -> BaseException:
        """The planned fault of item (p, seq), counted as raised."""
        cls = self.fault_classes[self.fault[p][seq] - 1]
        exc = cls(f"injected fault {p}:{seq}")
        exc.fault_id = (p, seq)  # type: ignore[attr-defined]
        self._bump(self.raised[p], seq)
        return exc

    def _callback(self, p: int, seq: int, ci: int) -> None:
        self._bump(self.runs[p], seq)
        self.ran[ci] += 1
        if self.fault[p][seq]:
            raise self._fault(p, seq)

    @staticmethod
    def _value(p: int, seq: int) -> int:
        return p * 1_000_000_000 + seq

    def _coroutine(self, p: int, seq: int, ci: int, steps: int, fault_at: int) -> int:
        self._bump(self.runs[p], seq)
        self.ran[ci] += 1
        for step in range(steps):
            if step == fault_at:
                raise self._fault(p, seq)
            if step % 2:
                # Publish ourselves to our own loop, then yield (a coroutine
                # may be scheduled while it is still running).
                me = current_coroutine()
                assert me is not None and me.ctx is not None
                me.ctx.schedule(me)
                yield_()
            else:
                corun.sleep(0)
        if fault_at == steps:
            raise self._fault(p, seq)
        return self._value(p, seq)

    def _verify(self, co: Coroutine[Any], p: int, seq: int, slot: int) -> None:
        """A finished coroutine's join gives its value or its own fault."""
        problem = None
        try:
            value = co.join(timeout=0)
        except BaseException as exc:
            if getattr(exc, "fault_id", None) != (p, seq):
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                problem = f"{co!r}: join raised {exc!r}, not its own fault"
            else:
                # Taken by this join: a corun that reports only the
                # exceptions nobody retrieved need not report it too.
                self.retrieved[p][seq] = 1
        else:
            if self.raised[p][seq]:
                problem = f"{co!r}: join returned {value!r} but it raised its fault"
            elif value != self._value(p, seq):
                problem = f"{co!r}: join returned {value!r}, not {self._value(p, seq)}"
        self.co_checked[slot] += 1
        if problem is not None:
            self.co_bad[slot] += 1
            if len(self.co_problems) < 5:
                self.co_problems.append(problem)

    def _in_flight_items(self) -> int:
        return sum(map(sum, self.accepted)) - sum(self.ran) + self._main_in_flight()

    def _main_in_flight(self) -> int:
        if self.main_ctx is None:
            return 0
        return sum(map(len, self.main_ids)) - len(self.main_log)

    def _produce(self, p: int) -> None:
        rng = random.Random(self.seed * 1000 + p)
        targets = self.ctxs + ([self.closing.ctx] if self.closing is not None else [])
        closing_index = len(self.ctxs)
        main_ctx = self.main_ctx
        kinds = list(self.KIND_NAMES)
        state, kind_of, fault = self.state[p], self.kind[p], self.fault[p]
        arrays = (state, kind_of, fault, self.runs[p], self.raised[p], self.reported[p])
        retrieved = self.retrieved[p]
        accepted = self.accepted[p]
        pending = self.pending[p]
        rate = self.rate
        main_seq = 0
        try:
            while not self.stopping:
                if self._in_flight_items() >= self.WINDOW:
                    time.sleep(0.0002)
                    continue
                if main_ctx is not None and rng.random() < self.MAIN_PICK:
                    # A burst, so that the main loop's passes have items to
                    # take when a signal lands.
                    for _ in range(self.MAIN_BURST):
                        item_id = self._value(p, main_seq)
                        main_seq += 1
                        try:
                            main_ctx.call_soon(self.main_log.append, item_id)
                        except BaseException as exc:
                            self.submit_errors.append(f"producer {p}, main context: {exc!r}")
                        else:
                            self.main_ids[p].append(item_id)
                    continue
                ci = rng.randrange(len(targets))
                ctx = targets[ci]
                kind = rng.choices(kinds, self.KIND_WEIGHTS)[0]
                if kind == self.TIMER and ci == closing_index:
                    # A timer armed for after close() never runs (close runs
                    # what is queued, not what is due later): not for the
                    # context that closes under our feet.
                    kind = self.CALL_SOON
                seq = len(state)
                for array in arrays:
                    array.append(0)
                retrieved.append(0)
                kind_of[seq] = kind
                co: Coroutine[Any] | None = None
                try:
                    if kind in (self.SPAWN, self.SPAWN_JOIN):
                        steps = rng.randint(1, 3)
                        fault_at = -1
                        for step in range(steps + 1):
                            if rng.random() < rate:
                                fault_at = step
                                fault[seq] = rng.choice(self.coroutine_codes)
                                break
                        co = ctx.spawn(
                            self._coroutine, p, seq, ci, steps, fault_at, name=f"item-{p}:{seq}"
                        )
                    else:
                        if rng.random() < rate:
                            fault[seq] = rng.choice(self.callback_codes)
                        if kind == self.CALL_SOON:
                            ctx.call_soon(self._callback, p, seq, ci)
                        elif kind == self.BH:
                            ctx.bh(self._callback, p, seq, ci).schedule()
                        else:
                            ctx.call_later(rng.uniform(0.0, 0.002), self._callback, p, seq, ci)
                except RuntimeError:
                    state[seq] = self.REFUSED
                    continue
                except BaseException as exc:
                    state[seq] = self.FAILED
                    self.submit_errors.append(f"producer {p}, {self.KIND_NAMES[kind]}: {exc!r}")
                    continue
                state[seq] = self.ACCEPTED
                accepted[ci] += 1
                if co is None:
                    continue
                if kind == self.SPAWN:
                    pending.append((co, p, seq))
                    if len(pending) > 64:
                        while pending and pending[0][0].done:
                            self._verify(*pending.popleft(), slot=p)
                    continue
                try:
                    co.join(timeout=JOIN_BOUND)
                except TimeoutError:
                    self.join_timeouts[p] += 1
                    pending.append((co, p, seq))  # checked again at the end
                    continue
                except BaseException as exc:
                    if getattr(exc, "fault_id", None) == (p, seq):
                        retrieved[seq] = 1
                self._verify(co, p, seq, slot=p)
        except BaseException as exc:
            self.submit_errors.append(f"producer {p}: {exc!r}")

    def _close_race(self) -> None:
        """Join the closing IOThread while the producers keep submitting to it."""
        if self._hurry.wait(self.seconds / 4):
            return  # stopped first: no race this run
        t = self.closing
        assert t is not None
        if not t.is_alive():
            self.dead.append(f"{t.name} died of {self.deaths.get(t.name, 'something')}")
        try:
            t.join(timeout=FAULT_STOP_TIMEOUT)
        except TimeoutError:
            self.close_race = f"join() still running after {FAULT_STOP_TIMEOUT:g} s"
            return
        except BaseException as exc:
            self.close_race = f"join() raised {exc!r}"
            return
        stopped = self.stopping and not (self._interrupt and self._interrupt.event.is_set())
        self.close_race = "join() returned only after the stop" if stopped else ""

    # -- the main-thread context and the signal storm ------------------------

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._in_flight:
            self._in_flight = False
            self._ours = True
            raise KeyboardInterrupt
        # Not ours: the user's Ctrl-C, for the tool's own handler.
        previous = self._prev_sigint
        if callable(previous):
            previous(signum, frame)

    def _drive(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the main-thread context until done() or `timeout`; return done().

        The signal sender sends only while `_open` is True, holding `_gate`
        until the KeyboardInterrupt has been caught here. `_open` is True
        only inside the `try`, and the loop leaves the `try` only after
        taking `_gate`: so every SIGINT of ours lands inside the `try`.
        """
        ctx = self.main_ctx
        assert ctx is not None
        end = time.monotonic() + timeout
        while True:
            try:
                self._open = True
                failed = False
                try:
                    while not done() and time.monotonic() < end:
                        ctx.poll(True)  # the ticker thread wakes it every few ms
                except Exception as exc:
                    failed = True
                    if len(self.main_errors) < 5:
                        self.main_errors.append(f"poll() raised {exc!r}")
                while not self._gate.acquire(timeout=0.001):
                    pass
                self._open = False
                self._gate.release()
                if failed:
                    time.sleep(0.01)
                return done()
            except KeyboardInterrupt:
                if not self._ours:
                    raise  # the user's second Ctrl-C: the tool's handler says kill
                self._ours = False
                self._open = False
                self.caught += 1  # last: the sender waits for it before it goes on

    def _send_signals(self) -> None:
        """Send `sigint` SIGINTs to the main thread, one at a time, at random moments."""
        rng = random.Random(self.seed * 1000 + 999)
        main_ident = threading.main_thread().ident
        assert main_ident is not None
        gap = self.seconds / self.sigint
        for _ in range(self.sigint):
            if self._abort.is_set():
                return
            if self._hurry.is_set():
                time.sleep(rng.uniform(0.0, 0.0005))
            else:
                self._hurry.wait(rng.uniform(0.0, 2 * gap))
            sent = False
            while not sent:
                if self._abort.is_set():
                    return
                if not self._gate.acquire(timeout=0.01):
                    continue
                try:
                    if self._open:
                        # Pairs with _drive(): it cannot leave its try
                        # without the gate, which we hold until the
                        # KeyboardInterrupt has come out there.
                        self._in_flight = True
                        self.sent += 1
                        sent = True
                        signal.pthread_kill(main_ident, signal.SIGINT)
                        deadline = time.monotonic() + SIGNAL_BOUND
                        while self.caught + self.swallowed < self.sent:
                            if time.monotonic() > deadline:
                                self.lost_signals += 1
                                return  # a KeyboardInterrupt went missing: stop here
                            time.sleep(0.0001)
                finally:
                    self._gate.release()
                if not sent:
                    time.sleep(0.0002)

    def _run_ticker(self) -> None:
        """Wake the main loop every few ms; switch it between busy and idle phases.

        The ticks go through an fd handler, not notify(): a context that went
        deaf still wakes for them, so the storm goes on and the probe at the
        end tells. In busy phases a bottom half reschedules itself, so the
        loop never sleeps and the signals land in its passes (between taking
        an item and running it); in idle phases they land in epoll or just
        after it returns (before the wake-up is accounted for).
        """
        tick, spin = self._tick, self._spin
        assert tick is not None and spin is not None
        rng = random.Random(self.seed * 1000 + 998)
        switch = time.monotonic()
        while not self._ticker_stop.wait(0.005):
            tick.set()
            now = time.monotonic()
            if now >= switch:
                switch = now + rng.uniform(0.005, 0.03)
                self._busy = not self._busy
                if self._busy:
                    spin.schedule()
        self._busy = False

    def _spin_once(self) -> None:
        if self._busy and self._spin is not None:
            self._spin.schedule()

    def _probe_wakeable(self) -> str:
        """Can another thread's call_soon still wake a blocking poll()? "" if so."""
        ctx = self.main_ctx
        assert ctx is not None
        while ctx.poll(False):
            pass
        for attempt in range(3):
            woke: list[int] = []
            fired: list[int] = []
            safety = ctx.call_later(WAKE_BOUND, fired.append, 1)
            poke = threading.Timer(0.02, ctx.call_soon, args=(woke.append, 1))
            poke.start()
            while not woke and not fired:
                ctx.poll(True)
            # Woken by the call_soon, the safety timer is still armed; a deaf
            # context sleeps until the timer, and runs both in that pass.
            deaf = not woke or not safety.pending
            safety.cancel()
            poke.join()
            if deaf:
                return (
                    f"probe {attempt + 1}: a cross-thread call_soon did not wake poll(True); "
                    f"only the {WAKE_BOUND:g} s safety timer did"
                )
        return ""

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        """Record what kills one of our IOThreads (named by the liveness check)."""
        thread = args.thread
        ours = [*self.iothreads, *([self.closing] if self.closing is not None else [])]
        if thread is not None and any(t.name == thread.name for t in ours):
            self.deaths[thread.name] = repr(args.exc_value)
            return
        self._prev_excepthook(args)

    # -- the storm protocol --------------------------------------------------

    def exception_handler(self, record: ExceptionHandler) -> ExceptionHandler:
        def handler(ctx: AioContext, exc: BaseException, origin: object) -> None:
            fault_id = getattr(exc, "fault_id", None)
            if isinstance(fault_id, tuple):
                p, seq = fault_id
                self._bump(self.reported[p], seq)
                return
            if isinstance(exc, KeyboardInterrupt):
                self.swallowed += 1
            self.unexpected += 1
            record(ctx, exc, origin)

        self._handler = handler
        return handler

    def start(self) -> None:
        handler = self._handler
        if handler is None:  # run outside run_storm: log what is not a fault
            handler = self.exception_handler(_log_exception)
        self._prev_excepthook = threading.excepthook
        threading.excepthook = self._excepthook
        self.closing = IOThread(f"{self.name}-closing")
        self.closing.ctx.set_exception_handler(handler)
        n_ctx = len(self.ctxs) + 1
        self.accepted = [[0] * n_ctx for _ in range(self.producers)]
        self.ran = [0] * n_ctx
        if self.sigint:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("--sigint needs the faults run in the main thread")
            self.main_ctx = AioContext(f"{self.name}-main")
            self.main_ctx.set_exception_handler(handler)
            self._tick = corun.EventNotifier()
            self.main_ctx.add_reader(self._tick, self._tick.test_and_clear)
            self._spin = self.main_ctx.bh(self._spin_once, name="spin")
            self._prev_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            # The main thread mostly gives up the GIL in epoll, so that is
            # where most signals land; a short switch interval also preempts
            # it inside its passes, where they land too.
            self._prev_switch = sys.getswitchinterval()
            sys.setswitchinterval(SIGINT_SWITCH_INTERVAL)
            self._ticker = threading.Thread(target=self._run_ticker, name="ticker", daemon=True)
            self._sender = threading.Thread(
                target=self._send_signals, name="sigint-sender", daemon=True
            )
        self.threads = [
            threading.Thread(target=self._produce, args=(p,), name=f"producer-{p}", daemon=True)
            for p in range(self.producers)
        ]
        self.closer = threading.Thread(target=self._close_race, name="closer", daemon=True)
        helpers = [self.closer] + [t for t in (self._ticker, self._sender) if t is not None]
        for t in [*self.threads, *helpers]:
            t.start()

    def wait(self, interrupt: Interrupt, timeout: float) -> bool:
        self._interrupt = interrupt
        if self.main_ctx is None:
            return super().wait(interrupt, timeout)
        return self._drive(interrupt.event.is_set, timeout)

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.main_ctx is not None:
                self._drive(done, min(left, 0.1))
            else:
                time.sleep(0.002)
        return True

    def _drained(self) -> bool:
        """Has every accepted item run? (Not waiting for the loops that died.)"""
        for i, t in enumerate(self.iothreads):
            if t.is_alive() and sum(acc[i] for acc in self.accepted) > self.ran[i]:
                return False
        return self._main_in_flight() <= 0

    def stop(self) -> list[Check]:
        self.stopping = True
        self._hurry.set()
        interrupted = self._interrupt is not None and self._interrupt.event.is_set()
        if interrupted:
            self._abort.set()  # Ctrl-C: send no more signals
        deadline = time.monotonic() + FAULT_STOP_TIMEOUT
        sender = self._sender
        # First the signals still to send: they need the main loop driven.
        if sender is not None:
            self._wait_until(lambda: not sender.is_alive(), deadline)
            if sender.is_alive():
                # More signals than the run and the stop have time for: the
                # sender stops after the one in flight, which we still catch.
                self._signals_cut = not interrupted
                self._abort.set()
                self._wait_until(
                    lambda: not sender.is_alive(), time.monotonic() + SIGNAL_BOUND + 1.0
                )
            if not sender.is_alive():
                previous = self._prev_sigint
                signal.signal(
                    signal.SIGINT, previous if previous is not None else signal.default_int_handler
                )
        # Then the producers, the drain and the coroutines, within a bound of their own.
        deadline = time.monotonic() + FAULT_STOP_TIMEOUT
        helpers = [t for t in (self.closer, sender) if t is not None]
        self._wait_until(lambda: not any(t.is_alive() for t in self.threads + helpers), deadline)
        stuck = [t.name for t in [*self.threads, *helpers] if t.is_alive()]
        closing = self.closing
        assert closing is not None
        if self.closer is not None and not self.closer.is_alive() and closing.is_alive():
            try:
                closing.join(timeout=max(deadline - time.monotonic(), 0.1))
            except TimeoutError:
                stuck.append(closing.name)
        self._wait_until(self._drained, deadline)
        # Every coroutine left unchecked: wait for it (bounded), then check it.
        stuck_cos = []
        for pending in self.pending:
            while pending:
                co, p, seq = pending.popleft()
                try:
                    co.join(timeout=max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    stuck_cos.append(co)
                    continue
                except BaseException as exc:
                    if getattr(exc, "fault_id", None) is None and isinstance(
                        exc, (KeyboardInterrupt, SystemExit)
                    ):
                        raise
                self._verify(co, p, seq, slot=self.producers)
        # Liveness, and a barrier: each loop answers once it has reported
        # everything it ran before.
        for t in self.iothreads:
            try:
                if not t.is_alive():
                    raise RuntimeError("thread not alive")
                t.ctx.call_sync(lambda: None, timeout=max(deadline - time.monotonic(), 0.5))
            except BaseException as exc:
                why = self.deaths.get(t.name)
                self.dead.append(f"{t.name} died of {why}" if why else f"{t.name}: {exc!r}")
        checked = sum(self.co_checked)
        bad = sum(self.co_bad)
        detail = f"{checked} coroutines checked"
        if stuck_cos:
            names = ", ".join(repr(co) for co in stuck_cos[:3])
            detail += f"; {len(stuck_cos)} not done after the stop: {names}"
        if bad:
            detail += f"; {bad} joins gave something else: {'; '.join(self.co_problems[:3])}"
        checks = [
            Check(
                "producers and helper threads stopped",
                not stuck,
                f"still running: {stuck}" if stuck else "",
            ),
            Check(
                "every coroutine done; its join gives its value or its own exception",
                not stuck_cos and not bad,
                detail,
            ),
            Check(
                "no IOThread died (each alive and answering call_sync until joined)",
                not self.dead,
                "; ".join(self.dead),
            ),
            Check(
                "an IOThread joined while producers submit to it finishes before they stop",
                not self.close_race,
                self.close_race
                if self.close_race
                else ("the run stopped before the join" if self.close_race is None else ""),
            ),
        ]
        if self.main_ctx is not None:
            checks += self._stop_main(sender)
        self._abort.set()
        if threading.excepthook == self._excepthook:
            threading.excepthook = self._prev_excepthook
        return checks

    def _stop_main(self, sender: threading.Thread | None) -> list[Check]:
        ctx = self.main_ctx
        assert ctx is not None and self._tick is not None
        if self._prev_switch is not None:
            sys.setswitchinterval(self._prev_switch)
        self._ticker_stop.set()
        if self._ticker is not None:
            self._ticker.join(1.0)
        # After a Ctrl-C the sender stops early: then fewer than `sigint` is fine.
        expected = self.sigint if self._signals_cut or not self._abort.is_set() else self.sent
        signals_ok = (
            sender is not None
            and not sender.is_alive()
            and self.sent == self.caught == expected
            and not self.lost_signals
        )
        note = ""
        if self._signals_cut:
            note = f" (cut short {FAULT_STOP_TIMEOUT:g} s after the run: more --seconds?)"
        elif self._abort.is_set():
            note = " (stopped early by Ctrl-C)"
        checks = [
            Check(
                "every SIGINT came out of the main loop's poll as KeyboardInterrupt",
                signals_ok and not self.main_errors,
                f"sent {self.sent} of {self.sigint}, caught {self.caught}, reached a handler "
                f"{self.swallowed}, lost {self.lost_signals}"
                + note
                + (f"; {'; '.join(self.main_errors)}" if self.main_errors else ""),
            )
        ]
        if sender is not None and sender.is_alive():
            # A signal may still land: leave the context and the handler as
            # they are rather than be killed by it.
            checks.append(
                Check(
                    "main-thread context wakeable after the signal storm",
                    False,
                    "the signal sender did not finish",
                )
            )
            return checks
        try:
            ctx.remove_reader(self._tick)
            self.wakeable = self._probe_wakeable()
        except Exception as exc:
            self.wakeable = f"the probe raised {exc!r}"
        checks.append(
            Check(
                "main-thread context wakeable after the signal storm",
                not self.wakeable,
                self.wakeable or "",
            )
        )
        try:
            ctx.close()
            self.main_closed = ""
        except Exception as exc:
            self.main_closed = f"close() raised {exc!r}"
        self._tick.close()
        checks.append(
            Check("main-thread context closed cleanly", not self.main_closed, self.main_closed)
        )
        return checks

    def checks(self) -> list[Check]:
        missing: dict[str, int] = {}
        doubled: dict[str, int] = {}
        refused_ran = 0
        fault_missing = fault_doubled = fault_phantom = 0
        for p in range(self.producers):
            for state, kind, runs, raised, reported, retrieved in zip(
                self.state[p],
                self.kind[p],
                self.runs[p],
                self.raised[p],
                self.reported[p],
                self.retrieved[p],
                strict=False,  # a producer that did not stop may be appending
            ):
                if state == self.ACCEPTED:
                    if runs != 1:
                        tally = missing if runs == 0 else doubled
                        name = self.KIND_NAMES[kind]
                        tally[name] = tally.get(name, 0) + 1
                elif runs:
                    refused_ran += 1
                if reported > raised:
                    if raised:
                        fault_doubled += 1
                    else:
                        fault_phantom += 1
                elif reported < raised and not retrieved:
                    fault_missing += 1
        accepted = sum(map(sum, self.accepted))
        items_ok = not missing and not doubled and not refused_ran
        checks = [
            Check(
                "every accepted item ran exactly once; no refused one ran",
                items_ok,
                f"{accepted} accepted, {self._count(self.REFUSED)} refused"
                if items_ok
                else f"never ran: {missing}; ran more than once: {doubled}; "
                f"refused but ran: {refused_ran}",
            ),
            Check(
                "every injected fault reported to the handler exactly once",
                not (fault_missing or fault_doubled or fault_phantom),
                f"{self._injected()} injected, {self._reported()} reported; never: "
                f"{fault_missing}, twice or more: {fault_doubled}, never raised: {fault_phantom}",
            ),
            Check(
                "every submission accepted or refused with RuntimeError",
                not self.submit_errors,
                f"{len(self.submit_errors)}: {self.submit_errors[0]}" if self.submit_errors else "",
            ),
            Check(
                f"every cross-thread spawn().join() returned within {JOIN_BOUND:g} s",
                not sum(self.join_timeouts),
                f"{sum(self.join_timeouts)} timed out" if sum(self.join_timeouts) else "",
            ),
        ]
        if self.main_ctx is not None:
            ran = Counter(self.main_log)
            ids = [i for per in self.main_ids for i in per]
            lost = sum(1 for i in ids if ran[i] == 0)
            twice = sum(1 for i in ids if ran[i] > 1)
            strays = len(set(ran) - set(ids))
            checks.append(
                Check(
                    "every call_soon accepted on the main-thread context ran exactly once",
                    not (lost or twice or strays),
                    f"{len(ids)} accepted; never ran: {lost}, more than once: {twice}, "
                    f"not accepted but ran: {strays}",
                )
            )
        return checks

    def _count(self, state: int) -> int:
        return sum(s.count(state) for s in self.state)

    def _injected(self) -> int:
        return sum(map(sum, self.raised))

    def _reported(self) -> int:
        return sum(map(sum, self.reported))

    def ops(self) -> int:
        return sum(self.ran) + len(self.main_log)

    def wakes(self, delta: dict[str, int]) -> int:
        return sum(map(sum, self.accepted))

    def info(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for p in range(self.producers):
            for code, raised in zip(self.fault[p], self.raised[p], strict=False):
                if raised:
                    name = self.fault_classes[code - 1].__name__
                    by_kind[name] = by_kind.get(name, 0) + raised
        items: dict[str, int] = {}
        for kinds in self.kind:
            for code, name in self.KIND_NAMES.items():
                items[name] = items.get(name, 0) + kinds.count(code)
        info: dict[str, Any] = {
            "producers": self.producers,
            "fault_rate": self.rate,
            "faults_injected": self._injected(),
            "faults_reported": self._reported(),
            "refused": self._count(self.REFUSED),
            "faults_by_kind": by_kind,
            "items_submitted": items,
            "unexpected_exceptions": self.unexpected,
        }
        if self.sigint:
            info.update(
                sigint=self.sigint,
                sigint_sent=self.sent,
                sigint_caught=self.caught,
                main_items=len(self.main_log),
            )
        return info


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
    """A live line per second on stderr: rewritten in place on a terminal.

    Each run ends with a last line of its totals (`done`), the same numbers
    as its row in the summary.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def show(self, run: str, elapsed: float, ops: int, rate: float, note: str = "") -> None:
        """Elapsed seconds, operations so far, and the rate over the last second."""
        self._write(run, elapsed, ops, f"{rate:>12,.0f} ops/s (last second)", note)

    def done(self, run: str, elapsed: float, ops: int, note: str = "") -> None:
        """The run's totals, once it has stopped: what its summary row says."""
        rate = ops / elapsed if elapsed > 0 else 0.0
        self._write(run, elapsed, ops, f"{rate:>12,.0f} ops/s (whole run)", note)
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _write(self, run: str, elapsed: float, ops: int, rate: str, note: str) -> None:
        if not self.enabled:
            return
        line = f"{run:<18} {elapsed:6.1f} s {ops:>12,} ops {rate}"
        if note:
            line += f"  ({note})"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
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
    handler_check = Storm.handler_check
    try:
        ctxs = [t.ctx for t in threads]
        storm = make(ctxs)
        storm.iothreads = threads
        handler_check = storm.handler_check
        handler = storm.exception_handler(record)
        for ctx in ctxs:
            ctx.set_exception_handler(handler)
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
            if storm.wait(interrupt, min(deadline, next_tick) - now):
                result.interrupted = True
                break
            now = time.perf_counter()
            if now >= next_tick:
                ops = storm.ops()
                rate = (ops - last_ops) / (now - last_time)
                progress.show(run, now - start, ops, rate, storm.note)
                last_ops, last_time = ops, now
                next_tick += 1.0
        result.checks += storm.stop()
        result.seconds = time.perf_counter() - start
        delta = {k: v - before.get(k, 0) for k, v in _sum_stats(ctxs).items()}
        result.ops = storm.ops()
        result.note = storm.note
        progress.done(run, result.seconds, result.ops, storm.note)
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
            handler_check,
            not errors,
            f"{len(errors)}: {errors[0]}" if errors else "",
        )
    )
    result.checks.append(
        Check("IOThreads joined", not stuck, f"still running: {stuck}" if stuck else "")
    )
    return result


def plan(args: Settings) -> list[tuple[str, int, Callable[[list[AioContext]], Storm]]]:
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
    if command in ("queue", "all"):
        maxsize = args.maxsize
        runs.append(("queue", args.contexts, lambda c: QueueStorm(c, maxsize, seed)))
    # Not part of `all`: its timing (which item a fault or a signal hits)
    # differs from run to run, and the others check that nothing at all
    # reaches a handler.
    if command == "faults":
        rate = args.faults
        sigint = args.sigint
        seconds = args.seconds
        runs.append(
            (
                "faults/sigint" if sigint else "faults",
                args.contexts,
                lambda c: FaultStorm(c, producers, rate, sigint, seconds, seed),
            )
        )
    return runs


def missing_api(run: str, impl: str) -> str | None:
    """Why a run cannot go yet (the corun it needs is not there), or None."""
    if run.startswith("mutex") and impl == "comutex" and not hasattr(corun, "CoMutex"):
        return "skipped: corun.CoMutex is not available in this corun yet"
    if run == "rwlock" and not (hasattr(corun, "CoRwLock") and hasattr(corun, "sleep")):
        return "skipped: corun.CoRwLock/corun.sleep are not available in this corun yet"
    if run == "queue" and not all(hasattr(corun, name) for name in ("Queue", "Cancelled", "sleep")):
        return "skipped: corun.Queue/corun.Cancelled are not available in this corun yet"
    if run.startswith("faults") and not (
        hasattr(corun, "sleep") and hasattr(corun, "EventNotifier")
    ):
        return "skipped: corun.sleep/corun.EventNotifier are not available in this corun yet"
    return None


# -- output --------------------------------------------------------------------


def _fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def summary_table(results: Sequence[RunResult]) -> str:
    header: tuple[str, ...] = (
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
    # The fault counts, only when a run injected faults.
    fault_keys = ("faults_injected", "faults_reported", "refused")
    with_faults = any("faults_injected" in r.info for r in results)
    if with_faults:
        header = (*header[:-2], "injected", "reported", "refused", *header[-2:])
    # The cancels and timeouts, only when a queue run is in the table.
    queue_keys = ("cancels", "get_timeouts", "put_timeouts")
    with_queue = any("cancels" in r.info for r in results)
    if with_queue:
        header = (*header[:-2], "cancels", "get t/o", "put t/o", *header[-2:])
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.skipped:
            cells = [r.run, str(r.contexts), *["-"] * (len(header) - 3), "skipped"]
            rows.append(tuple(cells))
            continue
        wpw = r.writes_per_wake
        status = "ok" if r.ok else "FAIL"
        if r.interrupted:
            status += " (interrupted)"
        faults = [_fmt_int(r.info.get(k)) for k in fault_keys] if with_faults else []
        if with_queue:
            faults += [_fmt_int(r.info.get(k)) for k in queue_keys]
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
                *faults,
                f"{sum(c.passed for c in r.checks)}/{len(r.checks)}",
                status,
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    left = {0, len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    for r in results:
        if r.note and not r.skipped:
            why = NOTE_WHY.get(r.note)
            out.append(f"{r.run}: {r.note}" + (f" ({why})" if why else ""))
    return "\n".join(out)


# -- the command line ----------------------------------------------------------


@dataclass
class Settings:
    """What a command line asks for. An option a command does not take keeps its default."""

    command: str = "all"
    seconds: float = 2.0
    contexts: int = 5
    impl: str = "comutex"
    coroutines: int = 1
    write_ratio: float = 0.2
    producers: int = 8
    maxsize: int = 16
    faults: float = DEFAULT_FAULT_RATE
    sigint: int = 0
    seed: int = 1
    json: bool = False
    quiet: bool = False
    verbose: bool = False


COMMANDS = ("all", "schedule", "mutex", "rwlock", "fanin", "queue", "faults")

# The commands that take each option; any other command refuses it.
TAKES: dict[str, tuple[str, ...]] = {
    "--seconds": COMMANDS,
    "--contexts": ("all", "schedule", "mutex", "rwlock", "queue", "faults"),
    "--impl": ("all", "mutex"),
    "--coroutines": ("all", "mutex", "rwlock"),
    "--write-ratio": ("all", "rwlock"),
    "--producers": ("all", "fanin", "faults"),
    "--maxsize": ("all", "queue"),
    "--faults": ("faults",),
    "--sigint": ("faults",),
    "--seed": ("all", "schedule", "rwlock", "queue", "faults"),
    "--json": COMMANDS,
    "--quiet": COMMANDS,
    "--verbose": COMMANDS,
}
SHORT_OPTIONS = {"-v": "--verbose"}

# One line per command for `stress.py --help`, and a paragraph for its own --help.
SUMMARIES = {
    "all": "schedule, mutex, rwlock, fanin and queue, one after the other (the default)",
    "schedule": "QEMU's schedule test (schedule/storm) and schedule/constant",
    "mutex": "QEMU's mutex test: a counter under a CoMutex (or threading.Lock)",
    "rwlock": "readers, writers and upgraders on a CoRwLock across IOThreads",
    "fanin": "producer threads feed one IOThread with call_soon and spawn",
    "queue": "a bounded Queue with random cancels and timeouts",
    "faults": "injected exceptions (and SIGINTs): nothing lost, no loop dies; not in all",
}
DESCRIPTIONS = {
    "all": (
        "Runs schedule, mutex, rwlock, fanin and queue one after the other (not faults: "
        "which item a fault or a signal hits changes from run to run). Each option "
        "applies to the runs it belongs to (see each command's --help)."
    ),
    "schedule": (
        "QEMU's /aio/multi/schedule test (tests/unit/test-aio-multithread.c). One "
        "coroutine per context picks a random context, takes the coroutine parked in "
        "that context's slot, schedules it there, then parks itself in its own slot and "
        "yields; a coroutine can be scheduled while still on its way to yield_(): that "
        "is the race under test. schedule/storm is QEMU's test as written: a pick that "
        "finds an empty slot (a retry) parks the picker anyway, so the traffic dies out "
        "by design once every coroutine has parked (a few ops, then 0 ops/s: not a "
        f'stall; its live line and summary say "{DIES_OUT}"). schedule/constant '
        "retries instead, with half the coroutines active, so wake-ups flow for the "
        "whole run. Checks: every slot empty at the end, a woken coroutine finds its "
        "own slot empty, each schedule entered its loop exactly once."
    ),
    "mutex": (
        "QEMU's /aio/multi/mutex test: coroutines increment a shared counter under the "
        "lock, then a per-context counter outside it, on every context "
        "(mutex/contended) and on 2 (mutex/handoff); at the end counter == "
        "atomic_counter. The holder is recorded inside the critical section, so two "
        "holders at once are seen directly."
    ),
    "rwlock": (
        "Coroutines on every context take a CoRwLock as readers (mostly), as writers, "
        "or as readers that upgrade to writer and downgrade again, yield inside the "
        "critical section, and check that no reader ever overlaps a writer."
    ),
    "fanin": (
        "Plain producer threads feed one IOThread, half of them with call_soon and half "
        "with spawn; every item must run exactly once and in its producer's order. One "
        "context, so --contexts does not apply."
    ),
    "queue": (
        "Producers (a coroutine on each context and two plain threads) put unique items "
        "into one corun.Queue; consumers (two coroutines per context and two threads, "
        "half with get(timeout=...)) take them, while a canceller thread cancels a "
        "random consumer coroutine every few ms and spawns a replacement, and the pace "
        "changes every 20 ms so that getters and putters wait in turn. At the stop the "
        "queue drains and close() ends the stream. Checks: every item received exactly "
        "once and in put order per producer, qsize() <= maxsize, cancelled consumers "
        "end with Cancelled and the others at end of stream, no stale waiter left, no "
        "IOThread died."
    ),
    "faults": (
        "Producer threads submit call_soon callbacks, coroutines (sleep(0), "
        "reschedule-and-yield), bottom halves, call_later timers and cross-thread "
        "spawn().join() to the IOThreads, and a share P of the callbacks and coroutine "
        "steps raise ValueError, GeneratorExit, a user BaseException subclass or (in "
        "coroutines) greenlet.GreenletExit; a quarter of the way in, one more IOThread "
        "is joined while the producers keep submitting to it. Checks: every accepted "
        "item ran exactly once (or was refused with RuntimeError), every fault reached "
        "the exception handler (or the join that took it) exactly once, no IOThread "
        "died, every coroutine finished with its value or its own exception. Not part "
        "of `all`."
    ),
}

# The keys of a --json object: those of every run, then those of some runs.
JSON_KEYS: list[tuple[str, str]] = [
    ("run", "the run's name (schedule/storm, mutex/handoff, faults/sigint, ...)"),
    ("contexts", "IOThreads the run used (faults: plus the one joined mid-run)"),
    ("seconds", "wall time from the start to the end of the stop"),
    ("ops", "operations done (see below); the run's last live line shows the same count"),
    ("rate", "ops / seconds"),
    ("retries", "schedule runs: picks that found an empty slot; null for the others"),
    ("wakes", "coroutine wake-ups the run caused (see below)"),
    (
        "notify_writes",
        "eventfd writes that woke a sleeping loop, start to end of stop "
        "(AioContext.stats(), summed over the run's contexts)",
    ),
    (
        "notify_writes_per_wake",
        "notify_writes / wakes, the table's writes/wake: about 1 "
        "when the woken loops sleep, about 0 when they are busy; null when wakes is 0",
    ),
    ("checks", 'the invariants, in order: [{"name", "passed", "detail"}]'),
    ("checks_passed", "how many checks passed"),
    ("checks_total", "how many checks the run made"),
    ("ok", "every check passed"),
    ("interrupted", "Ctrl-C stopped the run early"),
    (
        "skipped",
        "null, or why the run did not go (this corun lacks an API it needs); the counts are then 0",
    ),
]
# What `ops` and `wakes` count, by command.
OPS_COUNT: dict[str, str] = {
    "schedule": "coroutines taken from a slot and scheduled on its context",
    "mutex": "critical sections (counter increments)",
    "rwlock": "critical sections: reads + writes + upgrades",
    "fanin": "items run by the consumer context",
    "queue": "items received by the consumers",
    "faults": "items run: callbacks and coroutines on the IOThreads, plus call_soon "
    "items on the main-thread context (--sigint)",
}
WAKES_COUNT: dict[str, str] = {
    "schedule": "= ops",
    "mutex": "coroutines entered from a schedule list, less their first start "
    "(AioContext.stats() co_scheduled): lock hand-offs",
    "rwlock": "coroutines entered from a schedule list, less their first start",
    "fanin": "= ops (every item comes from another thread)",
    "queue": "coroutines entered from a schedule list, less their first start: "
    "hand-offs to waiting getters and putters",
    "faults": "items accepted from the producer threads",
}

RUN_KEYS: dict[str, list[tuple[str, str]]] = {
    "schedule": [
        (
            "active",
            "coroutines active at the start (the others start parked): all of them "
            "in schedule/storm, half in schedule/constant",
        ),
        (
            "dies_out",
            "true for schedule/storm, QEMU's test, whose traffic stops once "
            "every coroutine has parked",
        ),
        ("finish_wakes", "parked coroutines woken by the stop (QEMU's finish_cb); not ops"),
    ],
    "mutex": [
        ("impl", "comutex or threading (--impl)"),
        ("coroutines_per_context", "--coroutines"),
    ],
    "rwlock": [
        ("reads", "read-locked sections"),
        ("writes", "write-locked sections"),
        ("upgrades", "read sections upgraded to write and downgraded again"),
        ("coroutines_per_context", "max(--coroutines, 2)"),
    ],
    "fanin": [
        ("producers", "--producers"),
    ],
    "queue": [
        ("maxsize", "the Queue's bound (--maxsize; 0: unbounded)"),
        ("producers", "producers: one coroutine per context and two threads"),
        ("consumers", "consumers ever started, replacements of cancelled ones included"),
        ("items_put", "items whose put() returned"),
        ("received_by_threads", "items received by the two consumer threads"),
        ("cancels", "consumer coroutines cancelled by the canceller"),
        ("cancelled", "consumers that finished with Cancelled"),
        ("received_while_cancelled", "items whose hand-off won the race against a cancel"),
        ("get_timeouts", "get(timeout=...) calls that raised QueueEmpty"),
        ("put_timeouts", "put(timeout=...) calls that raised QueueFull (then retried)"),
        ("max_qsize", "the largest qsize() any producer or consumer saw"),
    ],
    "faults": [
        ("producers", "--producers"),
        ("fault_rate", "--faults"),
        ("faults_injected", "faults raised"),
        (
            "faults_reported",
            "faults that reached the exception handler (one that a join() retrieved need not)",
        ),
        ("refused", "submissions refused with RuntimeError (the IOThread joined mid-run)"),
        ("faults_by_kind", "faults raised, by exception class name"),
        ("items_submitted", "items submitted, by kind: call_soon, spawn, bh, timer, spawn_join"),
        ("unexpected_exceptions", "exceptions other than the faults that reached a handler"),
        ("sigint", "--sigint (only with --sigint, as the next three)"),
        ("sigint_sent", "SIGINTs sent to the main thread"),
        ("sigint_caught", "KeyboardInterrupts that came out of the main loop's poll()"),
        ("main_items", "call_soon items the main-thread context ran"),
    ],
}
EXIT_STATUS = (
    "exit status: 0 every check passed; 1 a check failed (named on stderr); 2 a bad "
    "command line; 130 stopped with Ctrl-C (the summary is still printed)."
)


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=79, initial_indent=indent, subsequent_indent=indent)


def _keys_text(keys: Sequence[tuple[str, str]]) -> list[str]:
    lines: list[str] = []
    for key, doc in keys:
        head = f"  {key:<24} "
        if len(head) > 27:
            lines.append(head.rstrip())
            head = " " * 27
        lines += textwrap.wrap(doc, width=79, initial_indent=head, subsequent_indent=" " * 27)
    return lines


def _epilog(command: str) -> str:
    runs = [command] if command != "all" else ["schedule", "mutex", "rwlock", "fanin", "queue"]
    lines = [
        _wrap(
            "Output: a summary table on stdout and, unless --quiet, a live line per "
            "second on stderr ending with each run's totals. With --json: JSON Lines "
            "instead of the table, one JSON object per run, on one line, printed when "
            "the run ends. The keys of every run:"
        ),
        *_keys_text(JSON_KEYS),
    ]
    for run in runs:
        lines += ["", f"In {run} runs, what ops and wakes count, and their own keys:"]
        lines += _keys_text([("ops", OPS_COUNT[run]), ("wakes", WAKES_COUNT[run])])
        lines += _keys_text(RUN_KEYS[run])
    lines += ["", _wrap(EXIT_STATUS)]
    return "\n".join(lines)


NumT = TypeVar("NumT", int, float)


def _ranged(
    kind: Callable[[str], NumT], allowed: str, ok: Callable[[NumT], bool]
) -> Callable[[str], NumT]:
    """An argparse type: `kind(text)` if `ok`; otherwise a message with the allowed range."""

    def parse(text: str) -> NumT:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {what} (allowed: {allowed})"
            ) from None
        if not ok(value) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: {allowed})")
        return value

    return parse


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of `command`, and only those (see TAKES)."""
    d = Settings()

    def takes(option: str) -> bool:
        return command in TAKES[option]

    run = parser.add_argument_group("run options")
    run.add_argument(
        "--seconds",
        type=_ranged(float, "S > 0", lambda v: v > 0),
        default=d.seconds,
        metavar="S",
        help=f"duration of each run (default: {d.seconds:g})",
    )
    if takes("--contexts"):
        run.add_argument(
            "--contexts",
            type=_ranged(int, "N >= 2", lambda v: v >= 2),
            default=d.contexts,
            metavar="N",
            help=f"number of IOThreads (default: {d.contexts}"
            + ("; mutex/handoff always uses 2, fanin 1)" if command == "all" else ")")
            + ("; mutex/handoff always uses 2" if command == "mutex" else ""),
        )
    if takes("--impl"):
        run.add_argument(
            "--impl",
            choices=("comutex", "threading"),
            default=d.impl,
            help=f"{'mutex runs: ' if command == 'all' else ''}the lock: corun.CoMutex "
            "(default) or a threading.Lock taken inside the coroutines",
        )
    if takes("--coroutines"):
        run.add_argument(
            "--coroutines",
            type=_ranged(int, "N >= 1", lambda v: v >= 1),
            default=d.coroutines,
            metavar="N",
            help={
                "mutex": "coroutines per context (default: 1, as QEMU)",
                "rwlock": "coroutines per context; at least 2 are used (default: 2)",
            }.get(
                command,
                "coroutines per context in the mutex runs (default: 1, as QEMU) and the "
                "rwlock run (at least 2)",
            ),
        )
    if takes("--write-ratio"):
        run.add_argument(
            "--write-ratio",
            type=_ranged(float, "0 <= R <= 1", lambda v: 0 <= v <= 1),
            default=d.write_ratio,
            metavar="R",
            help=f"rwlock: share of operations that take the lock as writer; half as many "
            f"again upgrade from reader (default: {d.write_ratio:g})",
        )
    if takes("--producers"):
        run.add_argument(
            "--producers",
            type=_ranged(int, "N >= 1", lambda v: v >= 1),
            default=d.producers,
            metavar="N",
            help=f"{'fanin: ' if command == 'all' else ''}producer threads "
            f"(default: {d.producers})",
        )
    if takes("--maxsize"):
        run.add_argument(
            "--maxsize",
            type=_ranged(int, "N >= 0, 0: unbounded", lambda v: v >= 0),
            default=d.maxsize,
            metavar="N",
            help=f"queue: the Queue's bound, 0 for unbounded (default: {d.maxsize})",
        )
    if takes("--faults"):
        run.add_argument(
            "--faults",
            type=_ranged(float, "0 <= P < 1", lambda v: 0 <= v < 1),
            default=d.faults,
            metavar="P",
            help=f"share of callbacks and coroutine steps that raise, 0 <= P < 1 "
            f"(default: {d.faults:g})",
        )
    if takes("--sigint"):
        run.add_argument(
            "--sigint",
            type=_ranged(int, "N >= 0", lambda v: v >= 0),
            default=d.sigint,
            metavar="N",
            help="also run an AioContext in the main thread, fed by the producers, and send "
            "it N real SIGINTs at random moments; it must lose no item and stay wakeable "
            "(default: 0, no main-thread context). Ctrl-C still stops the run.",
        )
    if takes("--seed"):
        run.add_argument(
            "--seed", type=int, default=d.seed, metavar="N", help="random seed (default: 1)"
        )
    out = parser.add_argument_group("output options")
    out.add_argument(
        "--json",
        action="store_true",
        help="JSON Lines on stdout instead of the table: one JSON object per run (keys below)",
    )
    out.add_argument("--quiet", action="store_true", help="no live progress line on stderr")
    out.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's."""
    parser = argparse.ArgumentParser(
        prog="stress.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap(
            "Hammer corun's cross-thread scheduling, CoMutex, CoRwLock, fan-in and Queue "
            "from many IOThreads and check that no wake-up is lost (QEMU's "
            "test-aio-multithread storms); `faults` injects exceptions (and, with --sigint, "
            "real SIGINTs) and checks that nothing is lost and no loop dies."
        ),
        epilog="\n".join(
            [
                _wrap(
                    "With no command, runs `all`, and takes its options. Each command has "
                    "its own options, refuses the others, and explains its --json keys: "
                    "`stress.py COMMAND --help`. --json prints JSON Lines (one object per "
                    "run)."
                ),
                "",
                _wrap(EXIT_STATUS),
            ]
        ),
    )
    commands = parser.add_subparsers(
        dest="command",
        title="commands",
        metavar="COMMAND",
        required=True,
        help="the storms to run (default: all)",
    )
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for name in COMMANDS:
        sub = commands.add_parser(
            name,
            help=SUMMARIES[name],
            description=_wrap(DESCRIPTIONS[name]),
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_options(sub, name)
        subparsers[name] = sub
    return parser, subparsers


def _command_first(args: list[str]) -> list[str]:
    """The command line with its command first (`all` if it starts with an option).

    No option takes a command's name as its value, so the first such word is
    the command, wherever it stands: `--seconds 1 mutex` is `mutex --seconds 1`.
    """
    for i, word in enumerate(args):
        if word == "--":
            break
        if word in COMMANDS:
            return [word, *args[:i], *args[i + 1 :]]
    if args and not args[0].startswith("-"):
        return args  # not a command: the top-level parser says so
    if any(word in ("-h", "--help") for word in args):
        return args  # the top-level help
    return ["all", *args]


def _option_name(word: str) -> str | None:
    """The long option `word` stands for (exact, `-v`, or a unique prefix), or None."""
    name = word.split("=", 1)[0]
    name = SHORT_OPTIONS.get(name, name)
    if name in TAKES:
        return name
    if not name.startswith("--"):
        return None
    matches = [option for option in TAKES if option.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Settings from a command line; exits with status 2 and a message if it is refused."""
    parser, subparsers = build_parsers()
    args = _command_first(list(sys.argv[1:] if argv is None else argv))
    namespace, extras = parser.parse_known_args(args)
    command: str = namespace.command
    for word in extras:
        option = _option_name(word) if word.startswith("-") else None
        if option is not None:
            goes_with = ", ".join(TAKES[option])
            subparsers[command].error(
                f"{option} does not apply to {command} (it goes with: {goes_with})"
            )
    if extras:
        subparsers[command].error(f"unrecognized arguments: {' '.join(extras)}")
    return Settings(**vars(namespace))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help (0), or a refused command line (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
