#!/usr/bin/env python3
"""corun next to its peers, case by case, in one process and one run.

What it measures. Each case does the same work per operation with corun
and with every peer that is installed (greenlet, asyncio, uvloop, gevent,
aiologic, plain threads), one implementation after the other in this same
process, and reports operations per second (bytes per object for
`memory`) and the ratio corun/implementation. So a ratio above 1 means
corun does more operations per second than that peer (for `memory`: below
1 means corun uses less memory). Peers that are not installed are skipped
with a note; `pip install -e '.[bench]'` installs them.

How. Every implementation of a case first runs a warm-up (a tenth of the
work), then the implementations take turns, `--repeat` times, and the
median of the turns is reported (turns interleave so that a noisy moment
of the machine hurts everyone alike). Threads, loops and hubs are created
before the clock starts and torn down after it stops. Gevent is never
monkey-patched: each gevent hub lives in its own thread and is reached with
`hub.loop.run_callback_threadsafe`.

Cases:
- switch: one `yield_()` + `co.enter()` round trip, against a bare greenlet
  switch there and back (the floor for a coroutine switch in Python).
- lifecycle: create, run and finish a coroutine (`Coroutine(fn).enter()`,
  and `ctx.spawn(fn).join()` through the loop), against a bare greenlet,
  `gevent.spawn(fn).join()` and an asyncio task.
- pingpong: two coroutines on two IOThreads wake each other with `wake()`
  (one operation = one round trip), against asyncio and uvloop
  `call_soon_threadsafe` between two loops in two threads, gevent
  `run_callback_threadsafe` between two hubs in two threads, corun's own
  `call_soon` between two IOThreads, and the floor: two plain threads
  bouncing a pair of eventfds.
- pairs: 100 such pairs spread over 5 loops, all in flight at once.
- fanin: 4 producer threads feed one loop (`ctx.call_soon`, and
  `ctx.spawn`), against asyncio/uvloop `call_soon_threadsafe` and gevent
  `run_callback_threadsafe`; the notes give wake-up fd writes per 1,000
  items (corun: `AioContext.stats()`; asyncio: its self-pipe writes).
- mutex: a counter increment under the lock: CoMutex uncontended, and
  contended by one coroutine on each of 5, of 2 and of 8 IOThreads (more
  threads than most machines have cores: a spinning locker must not starve
  the holder); against threading.Lock in 1, 5, 2 and 8 threads,
  asyncio.Lock, and aiologic.Lock across 5, 2 and 8 asyncio loops in
  their own threads.
- queue: N items handed from a producer to a consumer through a bounded
  (maxsize 64) and an unbounded corun.Queue, the producer coroutine on one
  IOThread and the consumer coroutine on another; against queue.Queue
  between two plain threads, asyncio.Queue (and uvloop's) fed from another
  loop's thread with call_soon_threadsafe (bounded by an asyncio.Semaphore
  on the producer's loop that the consumer releases the same way),
  aiologic.Queue between two asyncio loops in two threads, and gevent
  between two hubs: gevent.queue cannot cross hubs, so a deque with
  gevent.lock.Semaphores, which can. Every consumer checks that it got all
  N items in order; the notes give corun's wake-up fd writes per 1,000.
- memory: bytes per suspended coroutine, 100,000 of them, against 100,000
  bare suspended greenlets (and gevent greenlets and asyncio tasks); each
  measured in a fresh child process by RSS growth (the headline number:
  it includes what tracemalloc cannot see, such as the frame stack chunk
  of each greenlet) and by tracemalloc (in the notes). These numbers do
  not vary between runs, so this case is measured once whatever --repeat.

The end of the output checks the performance targets of the project;
with `--quick` (tiny counts, a smoke test for CI) each verdict is marked
indicative. `--json` prints JSON Lines instead (one object per
implementation, then one per target; `--help` explains every key).
`--plot FILE.png` draws the ratios, throughput (higher is better) and
memory (lower is better) on separate axes, and says where it wrote them;
the path (and matplotlib, from the `bench` extra) is checked before
anything runs.

Exit status: 0 when every run finished, 1 if a run failed (raised, or did
not finish within a minute), 2 for a bad command line.

Usage: tools/bench.py [--cases switch,pingpong,...] [--repeat N]
[--scale F | --quick] [--json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from greenlet import getcurrent, greenlet

import corun
from corun import AioContext, Coroutine, IOThread, wake, yield_

logger = logging.getLogger("corun.tools.bench")

# No single measured run may take longer than this; past it the run counts
# as failed (a lost wake-up must not hang the benchmark).
RUN_TIMEOUT = 60.0

# --quick: this share of every iteration count. Numbers that small say whether
# each run works, not how fast: the verdicts are marked with INDICATIVE.
QUICK_SCALE = 0.02
INDICATIVE = "indicative only: --quick runs tiny counts, not a measurement"

perf_counter = time.perf_counter


# -- results -------------------------------------------------------------------


@dataclass
class Sample:
    """One measured run: the value (ops/s, or bytes per object) and extra numbers."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


def rate(ops: int, seconds: float, **extra: float) -> Sample:
    return Sample(ops / seconds if seconds > 0 else float("inf"), dict(extra))


@dataclass
class Impl:
    """One implementation of a case.

    `run(n)` does n operations and returns a Sample; `weight` scales n for
    implementations far slower than the rest (ops/s do not depend on n).
    `needs` names modules (or `corun.Name` attributes) it cannot run without;
    `note` goes to the notes column.
    """

    key: str
    label: str
    run: Callable[[int], Sample]
    needs: tuple[str, ...] = ()
    weight: float = 1.0
    note: str = ""


@dataclass
class Case:
    """A case: its implementations, the first of which is corun's reference."""

    name: str
    group: str
    ops: int
    impls: list[Impl]
    unit: str = "ops/s"
    warmup: bool = True
    max_repeat: int | None = None  # for deterministic, slow cases


@dataclass
class Row:
    case: Case
    impl: Impl
    samples: list[Sample] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    ratio: float | None = None

    @property
    def median(self) -> float | None:
        if not self.samples:
            return None
        return statistics.median(s.value for s in self.samples)

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the runs, as a fraction."""
        med = self.median
        if not med or len(self.samples) < 2:
            return None
        values = [s.value for s in self.samples]
        return (max(values) - min(values)) / med

    def extra(self) -> dict[str, float]:
        keys: dict[str, list[float]] = {}
        for s in self.samples:
            for k, v in s.extra.items():
                keys.setdefault(k, []).append(v)
        return {k: statistics.median(v) for k, v in keys.items()}


def missing(needs: Sequence[str]) -> str | None:
    """Why an implementation cannot run here, or None."""
    for need in needs:
        if need.startswith("corun."):
            if not hasattr(corun, need.removeprefix("corun.")):
                return f"{need} is not available in this corun"
        elif importlib.util.find_spec(need) is None:
            return f"{need} is not installed (pip install -e '.[bench]')"
    return None


# -- loops in threads: the peers' and corun's thread-safe call_soon ------------

LoopsT = TypeVar("LoopsT", bound="Loops")


class Loops:
    """k event loops, each running in its own thread.

    `posts[i](cb, *args)` runs cb(*args) in loop i; it may be called from
    any thread. Use as a context manager: leaving stops and joins them.
    """

    posts: list[Callable[..., Any]]

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: LoopsT) -> LoopsT:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CorunLoops(Loops):
    def __init__(self, k: int) -> None:
        self.threads = [IOThread(f"bench-{i}") for i in range(k)]
        self.ctxs = [t.ctx for t in self.threads]
        self.posts = [ctx.call_soon for ctx in self.ctxs]

    def close(self) -> None:
        for t in self.threads:
            t.join(timeout=RUN_TIMEOUT)


class AsyncioLoops(Loops):
    def __init__(self, k: int, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loops: list[asyncio.AbstractEventLoop] = []
        ready = threading.Barrier(k + 1)
        made: list[asyncio.AbstractEventLoop | None] = [None] * k

        def main(i: int) -> None:
            loop = factory()
            asyncio.set_event_loop(loop)
            made[i] = loop
            ready.wait()
            try:
                loop.run_forever()
            finally:
                asyncio.set_event_loop(None)
                loop.close()

        self.threads = [
            threading.Thread(target=main, args=(i,), name=f"asyncio-{i}", daemon=True)
            for i in range(k)
        ]
        for t in self.threads:
            t.start()
        ready.wait(timeout=RUN_TIMEOUT)
        self.loops = [loop for loop in made if loop is not None]
        self.posts = [loop.call_soon_threadsafe for loop in self.loops]

    def close(self) -> None:
        for loop in self.loops:
            loop.call_soon_threadsafe(loop.stop)
        for t in self.threads:
            t.join(timeout=RUN_TIMEOUT)


class GeventHubs(Loops):
    """One gevent hub per thread; nothing is monkey-patched."""

    def __init__(self, k: int) -> None:
        import gevent

        self.hubs: list[Any] = [None] * k
        self.stops: list[Any] = [None] * k
        ready = threading.Barrier(k + 1)

        def main(i: int) -> None:
            hub = gevent.get_hub()
            stop = hub.loop.async_()
            self.hubs[i] = hub
            self.stops[i] = stop
            ready.wait()
            try:
                hub.wait(stop)  # runs this thread's loop until `stop` is sent
            finally:
                stop.close()
                hub.destroy(destroy_loop=True)

        self.threads = [
            threading.Thread(target=main, args=(i,), name=f"gevent-{i}", daemon=True)
            for i in range(k)
        ]
        for t in self.threads:
            t.start()
        ready.wait(timeout=RUN_TIMEOUT)
        self.posts = [hub.loop.run_callback_threadsafe for hub in self.hubs]

    def close(self) -> None:
        # Send from inside each loop: by then hub.wait() has started the watcher.
        for hub, stop in zip(self.hubs, self.stops, strict=True):
            hub.loop.run_callback_threadsafe(stop.send)
        for t in self.threads:
            t.join(timeout=RUN_TIMEOUT)


def uvloop_factory() -> asyncio.AbstractEventLoop:
    import uvloop

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(RUN_TIMEOUT):
        raise TimeoutError(f"{what} did not finish within {RUN_TIMEOUT:g} s")


def _join_all(cos: Sequence[Coroutine[Any]], deadline: float) -> None:
    for co in cos:
        co.join(timeout=max(deadline - perf_counter(), 0.0))


# -- switch --------------------------------------------------------------------


def switch_corun(n: int) -> Sample:
    y = yield_

    def body() -> None:
        for _ in range(n):
            y()

    with AioContext("bench-switch"):
        co = Coroutine(body)
        enter = co.enter
        enter()  # starts it: the greenlet is created here, not timed
        start = perf_counter()
        for _ in range(n):
            enter()
        seconds = perf_counter() - start
    return rate(n, seconds)


def switch_greenlet(n: int) -> Sample:
    main = getcurrent()

    def body() -> None:
        back = main.switch
        for _ in range(n):
            back()

    g = greenlet(body)
    switch = g.switch
    switch()
    start = perf_counter()
    for _ in range(n):
        switch()
    seconds = perf_counter() - start
    return rate(n, seconds)


# -- lifecycle -----------------------------------------------------------------


def _noop() -> None:
    pass


def lifecycle_corun_enter(n: int) -> Sample:
    with AioContext("bench-lifecycle"):
        start = perf_counter()
        for _ in range(n):
            Coroutine(_noop).enter()
        seconds = perf_counter() - start
    return rate(n, seconds)


def lifecycle_corun_spawn(n: int) -> Sample:
    with AioContext("bench-lifecycle") as ctx:
        spawn = ctx.spawn
        start = perf_counter()
        for _ in range(n):
            spawn(_noop).join()
        seconds = perf_counter() - start
    return rate(n, seconds)


def lifecycle_greenlet(n: int) -> Sample:
    start = perf_counter()
    for _ in range(n):
        greenlet(_noop).switch()
    seconds = perf_counter() - start
    return rate(n, seconds)


def lifecycle_gevent(n: int) -> Sample:
    import gevent

    spawn = gevent.spawn
    start = perf_counter()
    for _ in range(n):
        spawn(_noop).join()
    seconds = perf_counter() - start
    return rate(n, seconds)


async def _async_noop() -> None:
    pass


def lifecycle_asyncio(n: int) -> Sample:
    async def main() -> float:
        create_task = asyncio.get_running_loop().create_task
        start = perf_counter()
        for _ in range(n):
            await create_task(_async_noop())
        return perf_counter() - start

    return rate(n, asyncio.run(main()))


# -- pingpong and pairs --------------------------------------------------------


def corun_wake_pairs(loops: int, pairs: int, rounds: int) -> Sample:
    """`pairs` coroutine pairs over `loops` IOThreads; each round trip is two wake()s."""
    with CorunLoops(loops) as world:
        ctxs = world.ctxs
        firsts: list[tuple[AioContext, Coroutine[Any]]] = []
        everyone: list[Coroutine[Any]] = []
        for p in range(pairs):
            home_a, home_b = ctxs[p % loops], ctxs[(p + 1) % loops]
            partner: list[Coroutine[Any]] = []

            def b_body(partner: list[Coroutine[Any]] = partner) -> None:
                a = partner[0]
                for i in range(rounds):
                    wake(a)
                    if i < rounds - 1:
                        yield_()

            b = Coroutine(b_body, name=f"pong-{p}")

            def a_body(b: Coroutine[Any] = b, home_b: AioContext = home_b) -> None:
                home_b.schedule(b)  # its first wake-up: b binds to home_b's thread
                yield_()
                for _ in range(rounds - 1):
                    wake(b)
                    yield_()

            a = Coroutine(a_body, name=f"ping-{p}")
            partner.append(a)
            firsts.append((home_a, a))
            everyone += (a, b)
        stats_before = [ctx.stats()["notify_writes"] for ctx in ctxs]
        start = perf_counter()
        for home, a in firsts:
            home.schedule(a)
        _join_all(everyone, start + RUN_TIMEOUT)
        seconds = perf_counter() - start
        writes = sum(ctx.stats()["notify_writes"] for ctx in ctxs) - sum(stats_before)
    ops = pairs * rounds
    return rate(ops, seconds, fd_writes_per_op=writes / ops)


def callback_pairs(world: Loops, pairs: int, rounds: int) -> float:
    """Callbacks bounce between loops: ping on loop p, pong on loop p+1; seconds taken."""
    posts = world.posts
    k = len(posts)
    done = threading.Event()
    finished: list[int] = []

    def make(post_a: Callable[..., Any], post_b: Callable[..., Any]) -> Callable[[int], None]:
        def ping(i: int) -> None:
            if i == rounds:
                finished.append(i)  # list.append: atomic from any loop
                if len(finished) == pairs:
                    done.set()
                return
            post_b(pong, i)

        def pong(i: int) -> None:
            post_a(ping, i + 1)

        return ping

    starts = [(posts[p % k], make(posts[p % k], posts[(p + 1) % k])) for p in range(pairs)]
    start = perf_counter()
    for post, ping in starts:
        post(ping, 0)
    _wait(done, "callback ping-pong")
    return perf_counter() - start


def make_callback_pairs(
    make_loops: Callable[[int], Loops], loops: int, pairs: int
) -> Callable[[int], Sample]:
    def run(n: int) -> Sample:
        rounds = max(n // pairs, 1)
        with make_loops(loops) as world:
            seconds = callback_pairs(world, pairs, rounds)
        return rate(pairs * rounds, seconds)

    return run


def pingpong_eventfd_threads(n: int) -> Sample:
    """The floor: two plain threads, each blocked in read() until the other writes."""
    if hasattr(os, "eventfd"):
        ping, pong = os.eventfd(0), os.eventfd(0)
        fds = [ping, pong]

        def write(fd: int) -> None:
            os.eventfd_write(fd, 1)

        def read(fd: int) -> None:
            os.eventfd_read(fd)

        ping_r = ping_w = ping
        pong_r = pong_w = pong
    else:  # pragma: no cover - no eventfd: pipes
        ping_r, ping_w = os.pipe()
        pong_r, pong_w = os.pipe()
        fds = [ping_r, ping_w, pong_r, pong_w]

        def write(fd: int) -> None:
            os.write(fd, b"x")

        def read(fd: int) -> None:
            os.read(fd, 1)

    def other() -> None:
        for _ in range(n):
            read(ping_r)
            write(pong_w)

    t = threading.Thread(target=other, name="eventfd-pong", daemon=True)
    t.start()
    start = perf_counter()
    for _ in range(n):
        write(ping_w)
        read(pong_r)
    seconds = perf_counter() - start
    t.join(RUN_TIMEOUT)
    for fd in fds:
        os.close(fd)
    return rate(n, seconds)


def pair_impls(loops: int, pairs: int, floor: bool) -> list[Impl]:
    impls = [
        Impl(
            "corun",
            "corun: wake() between coroutines",
            lambda n: corun_wake_pairs(loops, pairs, max(n // pairs, 1)),
        ),
        Impl(
            "corun-callbacks",
            "corun: ctx.call_soon between IOThreads",
            make_callback_pairs(CorunLoops, loops, pairs),
        ),
        Impl(
            "asyncio",
            "asyncio: call_soon_threadsafe between loops",
            make_callback_pairs(lambda k: AsyncioLoops(k, asyncio.new_event_loop), loops, pairs),
            weight=0.5,
        ),
        Impl(
            "uvloop",
            "uvloop: call_soon_threadsafe between loops",
            make_callback_pairs(lambda k: AsyncioLoops(k, uvloop_factory), loops, pairs),
            needs=("uvloop",),
        ),
        Impl(
            "gevent",
            "gevent: run_callback_threadsafe between hubs",
            make_callback_pairs(GeventHubs, loops, pairs),
            needs=("gevent",),
        ),
    ]
    if floor:
        impls.append(
            Impl("threads", "floor: 2 threads bouncing eventfds", pingpong_eventfd_threads)
        )
    return impls


# -- fanin ---------------------------------------------------------------------

PRODUCERS = 4


def fanin(submit: Callable[[Callable[[], None]], Any], n: int) -> tuple[int, float]:
    """PRODUCERS threads submit n items in all to one consumer; (items, seconds)."""
    per = max(n // PRODUCERS, 1)
    total = per * PRODUCERS
    done = threading.Event()
    count = [0]

    def item() -> None:  # runs in the consumer's thread only
        count[0] += 1
        if count[0] == total:
            done.set()

    go = threading.Barrier(PRODUCERS + 1)

    def produce() -> None:
        go.wait()
        for _ in range(per):
            submit(item)

    threads = [
        threading.Thread(target=produce, name=f"producer-{p}", daemon=True)
        for p in range(PRODUCERS)
    ]
    for t in threads:
        t.start()
    start = perf_counter()
    go.wait()
    _wait(done, "fan-in")
    seconds = perf_counter() - start
    for t in threads:
        t.join(RUN_TIMEOUT)
    return total, seconds


def fanin_corun(how: str) -> Callable[[int], Sample]:
    def run(n: int) -> Sample:
        with CorunLoops(1) as world:
            ctx = world.ctxs[0]
            submit = ctx.call_soon if how == "call_soon" else ctx.spawn
            before = ctx.stats()["notify_writes"]
            items, seconds = fanin(submit, n)
            writes = ctx.stats()["notify_writes"] - before
        return rate(items, seconds, fd_writes_per_1k=1000 * writes / items)

    return run


def fanin_asyncio(factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[int], Sample]:
    def run(n: int) -> Sample:
        with AsyncioLoops(1, factory) as world:
            loop = world.loops[0]
            writes: list[None] = []
            # asyncio's call_soon_threadsafe wakes its loop through the
            # self-pipe: count those writes (uvloop has no such hook).
            original = getattr(loop, "_write_to_self", None)
            if original is not None:

                def counting() -> None:
                    writes.append(None)
                    original()

                loop._write_to_self = counting  # type: ignore[attr-defined]
            items, seconds = fanin(world.posts[0], n)
        if original is None:
            return rate(items, seconds)
        return rate(items, seconds, fd_writes_per_1k=1000 * len(writes) / items)

    return run


def fanin_gevent(n: int) -> Sample:
    with GeventHubs(1) as world:
        items, seconds = fanin(world.posts[0], n)
    return rate(items, seconds)


# -- mutex ---------------------------------------------------------------------


def mutex_corun_uncontended(n: int) -> Sample:
    def body() -> float:
        lock = corun.CoMutex()
        box = [0]
        start = perf_counter()
        for _ in range(n):
            with lock:
                box[0] += 1
        return perf_counter() - start

    return rate(n, corun.run(body))


def mutex_threading_uncontended(n: int) -> Sample:
    lock = threading.Lock()
    box = [0]
    start = perf_counter()
    for _ in range(n):
        with lock:
            box[0] += 1
    return rate(n, perf_counter() - start)


def _async_lock_uncontended(make_lock: Callable[[], Any]) -> Callable[[int], Sample]:
    def run(n: int) -> Sample:
        async def main() -> float:
            lock = make_lock()
            box = [0]
            start = perf_counter()
            for _ in range(n):
                async with lock:
                    box[0] += 1
            return perf_counter() - start

        return rate(n, asyncio.run(main()))

    return run


def _aiologic_lock() -> Any:
    import aiologic

    return aiologic.Lock()


def mutex_corun_contended(k: int) -> Callable[[int], Sample]:
    """One coroutine per IOThread, all incrementing until the shared total is reached."""

    def run(n: int) -> Sample:
        lock = corun.CoMutex()
        box = [0]

        def body() -> None:
            while True:
                with lock:
                    if box[0] >= n:
                        return
                    box[0] += 1

        with CorunLoops(k) as world:
            start = perf_counter()
            cos = [ctx.spawn(body) for ctx in world.ctxs]
            _join_all(cos, start + RUN_TIMEOUT)
            seconds = perf_counter() - start
        return rate(n, seconds)

    return run


def mutex_threading_contended(k: int) -> Callable[[int], Sample]:
    def run(n: int) -> Sample:
        lock = threading.Lock()
        box = [0]
        go = threading.Barrier(k + 1)

        def body() -> None:
            go.wait()
            while True:
                with lock:
                    if box[0] >= n:
                        return
                    box[0] += 1

        threads = [threading.Thread(target=body, daemon=True) for _ in range(k)]
        for t in threads:
            t.start()
        start = perf_counter()
        go.wait()
        for t in threads:
            t.join(RUN_TIMEOUT)
        return rate(n, perf_counter() - start)

    return run


def mutex_aiologic_contended(k: int) -> Callable[[int], Sample]:
    """One task per asyncio loop (each in its own thread) sharing an aiologic.Lock."""

    def run(n: int) -> Sample:
        lock = _aiologic_lock()
        box = [0]

        async def body() -> None:
            while True:
                async with lock:
                    if box[0] >= n:
                        return
                    box[0] += 1

        with AsyncioLoops(k, asyncio.new_event_loop) as world:
            start = perf_counter()
            futures = [asyncio.run_coroutine_threadsafe(body(), loop) for loop in world.loops]
            for f in futures:
                f.result(timeout=RUN_TIMEOUT)
            seconds = perf_counter() - start
        return rate(n, seconds)

    return run


def contended_impls(k: int) -> list[Impl]:
    return [
        Impl(
            "corun",
            f"corun: CoMutex, {k} IOThreads",
            mutex_corun_contended(k),
            needs=("corun.CoMutex",),
        ),
        Impl("threading", f"threading.Lock, {k} threads", mutex_threading_contended(k)),
        Impl(
            "aiologic",
            f"aiologic.Lock, {k} asyncio loops",
            mutex_aiologic_contended(k),
            needs=("aiologic",),
            weight=0.1,
        ),
    ]


# -- queue ---------------------------------------------------------------------

QUEUE_BOUND = 64


def _check_handoff(n: int, got: int, bad: int) -> None:
    """Every peer's consumer counts what it received: all n items, in order."""
    if got != n or bad:
        raise RuntimeError(f"received {got} of {n} items, {bad} out of order")


def queue_corun(maxsize: int) -> Callable[[int], Sample]:
    """A producer coroutine on one IOThread, the consumer coroutine on another."""

    def run(n: int) -> Sample:
        q: corun.Queue[int] = corun.Queue(maxsize)
        box = [0, 0]  # received, out of order (written by the consumer only)

        def produce() -> None:
            put = q.put
            for i in range(n):
                put(i)

        def consume() -> None:
            get = q.get
            bad = 0
            for i in range(n):
                if get() != i:
                    bad += 1
            box[:] = [n, bad]

        with CorunLoops(2) as world:
            ctxs = world.ctxs
            before = sum(ctx.stats()["notify_writes"] for ctx in ctxs)
            start = perf_counter()
            cos = [ctxs[1].spawn(consume), ctxs[0].spawn(produce)]
            _join_all(cos, start + RUN_TIMEOUT)
            seconds = perf_counter() - start
            writes = sum(ctx.stats()["notify_writes"] for ctx in ctxs) - before
        _check_handoff(n, *box)
        return rate(n, seconds, fd_writes_per_1k=1000 * writes / n)

    return run


def queue_threading(maxsize: int) -> Callable[[int], Sample]:
    """queue.Queue between two plain threads."""

    def run(n: int) -> Sample:
        import queue

        q: queue.Queue[int] = queue.Queue(maxsize)
        box = [0, 0]
        go = threading.Barrier(3)

        def produce() -> None:
            put = q.put
            go.wait()
            for i in range(n):
                put(i)

        def consume() -> None:
            get = q.get
            bad = 0
            go.wait()
            for i in range(n):
                if get() != i:
                    bad += 1
            box[:] = [n, bad]

        threads = [
            threading.Thread(target=consume, name="queue-consumer", daemon=True),
            threading.Thread(target=produce, name="queue-producer", daemon=True),
        ]
        for t in threads:
            t.start()
        start = perf_counter()
        go.wait()
        for t in threads:
            t.join(RUN_TIMEOUT)
        seconds = perf_counter() - start
        _check_handoff(n, *box)
        return rate(n, seconds)

    return run


def queue_asyncio(
    maxsize: int, factory: Callable[[], asyncio.AbstractEventLoop]
) -> Callable[[int], Sample]:
    """asyncio.Queue on loop B, fed from loop A's thread with call_soon_threadsafe.

    asyncio.Queue is not thread-safe, so loop A hands each item over with
    `loop_b.call_soon_threadsafe(q.put_nowait, item)`. Bounded, an
    asyncio.Semaphore(maxsize) on loop A keeps at most maxsize items in
    flight: the consumer gives a slot back with `loop_a.call_soon_threadsafe`.
    """

    def run(n: int) -> Sample:
        bounded = maxsize > 0
        with AsyncioLoops(2, factory) as world:
            loop_a, loop_b = world.loops
            q: asyncio.Queue[int] = asyncio.Queue(maxsize)  # used on loop B only
            slots = asyncio.Semaphore(max(maxsize, 1))  # used on loop A only

            async def consume() -> tuple[int, int]:
                get = q.get
                give_back = loop_a.call_soon_threadsafe
                release = slots.release
                bad = 0
                for i in range(n):
                    if await get() != i:
                        bad += 1
                    if bounded:
                        give_back(release)
                return n, bad

            async def produce() -> None:
                post = loop_b.call_soon_threadsafe
                put = q.put_nowait  # QueueFull here would mean the bound leaked
                acquire = slots.acquire
                for i in range(n):
                    if bounded:
                        await acquire()
                    post(put, i)

            start = perf_counter()
            consumer = asyncio.run_coroutine_threadsafe(consume(), loop_b)
            producer = asyncio.run_coroutine_threadsafe(produce(), loop_a)
            got, bad = consumer.result(timeout=RUN_TIMEOUT)
            seconds = perf_counter() - start
            producer.result(timeout=RUN_TIMEOUT)
        _check_handoff(n, got, bad)
        return rate(n, seconds)

    return run


def queue_gevent(maxsize: int) -> Callable[[int], Sample]:
    """A deque and gevent.lock.Semaphores (which may cross hubs) between two hubs.

    gevent.queue cannot cross hubs: a get() in one hub's thread and a put()
    in another's end in LoopExit or a switch into the wrong thread. Its
    Semaphore is documented for multi-threaded use (gevent 20.12), so the
    textbook bounded buffer is built from it: `items` counts what is in the
    deque and, bounded, `slots` the room left.
    """

    def run(n: int) -> Sample:
        import gevent
        import gevent.lock

        bounded = maxsize > 0
        buf: deque[int] = deque()
        items = gevent.lock.Semaphore(0)
        slots = gevent.lock.Semaphore(max(maxsize, 1))
        done = threading.Event()
        box = [0, 0]

        def consume() -> None:
            acquire, release, pop = items.acquire, slots.release, buf.popleft
            bad = 0
            for i in range(n):
                acquire()
                if pop() != i:
                    bad += 1
                if bounded:
                    release()
            box[:] = [n, bad]
            done.set()

        def produce() -> None:
            acquire, release, push = slots.acquire, items.release, buf.append
            for i in range(n):
                if bounded:
                    acquire()
                push(i)
                release()

        with GeventHubs(2) as world:
            start = perf_counter()
            world.posts[1](gevent.spawn, consume)
            world.posts[0](gevent.spawn, produce)
            _wait(done, "gevent hand-off")
            seconds = perf_counter() - start
        _check_handoff(n, *box)
        return rate(n, seconds)

    return run


def queue_aiologic(maxsize: int) -> Callable[[int], Sample]:
    """aiologic.Queue between a producer task on one asyncio loop and a consumer on another."""

    def run(n: int) -> Sample:
        import aiologic

        q: aiologic.Queue[int] = aiologic.Queue(maxsize=maxsize if maxsize > 0 else None)

        async def consume() -> tuple[int, int]:
            get = q.async_get
            bad = 0
            for i in range(n):
                if await get() != i:
                    bad += 1
            return n, bad

        async def produce() -> None:
            put = q.async_put
            for i in range(n):
                await put(i)

        with AsyncioLoops(2, asyncio.new_event_loop) as world:
            loop_a, loop_b = world.loops
            start = perf_counter()
            consumer = asyncio.run_coroutine_threadsafe(consume(), loop_b)
            producer = asyncio.run_coroutine_threadsafe(produce(), loop_a)
            got, bad = consumer.result(timeout=RUN_TIMEOUT)
            seconds = perf_counter() - start
            producer.result(timeout=RUN_TIMEOUT)
        _check_handoff(n, got, bad)
        return rate(n, seconds)

    return run


def queue_impls(maxsize: int) -> list[Impl]:
    bound = f"Queue({maxsize})" if maxsize else "Queue()"
    return [
        Impl(
            "corun",
            f"corun: {bound}, coroutines on 2 IOThreads",
            queue_corun(maxsize),
            needs=("corun.Queue",),
        ),
        Impl("threading", f"queue.{bound}, 2 threads", queue_threading(maxsize)),
        Impl(
            "asyncio",
            f"asyncio.{bound}, fed by call_soon_threadsafe",
            queue_asyncio(maxsize, asyncio.new_event_loop),
            weight=0.3,
            note="bounded by a Semaphore on the producer's loop" if maxsize else "",
        ),
        Impl(
            "uvloop",
            f"uvloop: asyncio.{bound}, fed by call_soon_threadsafe",
            queue_asyncio(maxsize, uvloop_factory),
            needs=("uvloop",),
            weight=0.3,
        ),
        Impl(
            "gevent",
            "gevent: deque + lock.Semaphore, 2 hubs",
            queue_gevent(maxsize),
            needs=("gevent",),
            note="gevent.queue cannot cross hubs",
        ),
        Impl(
            "aiologic",
            f"aiologic.{bound}, 2 asyncio loops",
            queue_aiologic(maxsize),
            needs=("aiologic",),
            weight=0.3,
        ),
    ]


# -- memory --------------------------------------------------------------------

MEMORY_IMPLS = ("corun", "greenlet", "gevent", "asyncio")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - no procfs: peak RSS is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Suspended:
    """Creates and releases `count` suspended objects of one implementation."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.keep: list[Any] = []
        self.release: Callable[[], None] = lambda: None
        if impl == "corun":
            self.ctx = AioContext("bench-memory")
        elif impl == "asyncio":
            self.loop = asyncio.new_event_loop()

    def make(self, count: int) -> None:
        keep = self.keep
        if self.impl == "corun":
            ctx = self.ctx
            y = yield_

            def body() -> None:
                y()

            for _ in range(count):
                keep.append(ctx.spawn(body))
            while ctx.poll(blocking=False):
                pass

            def release() -> None:
                for co in keep:
                    wake(co)
                ctx.poll(blocking=False)

        elif self.impl == "greenlet":
            main = getcurrent()

            def gbody() -> None:
                main.switch()

            for _ in range(count):
                g = greenlet(gbody)
                g.switch()
                keep.append(g)

            def release() -> None:
                for g in keep:
                    g.switch()

        elif self.impl == "gevent":
            import gevent
            import gevent.event

            event = gevent.event.Event()
            for _ in range(count):
                keep.append(gevent.spawn(event.wait))
            gevent.sleep(0)

            def release() -> None:
                event.set()
                gevent.joinall(keep)

        else:
            loop = self.loop
            future = loop.create_future()

            async def wait() -> None:
                await future

            for _ in range(count):
                keep.append(loop.create_task(wait()))
            loop.run_until_complete(asyncio.sleep(0))

            def release() -> None:
                future.set_result(None)
                loop.run_until_complete(asyncio.gather(*keep))

        self.release = release

    def free(self) -> None:
        self.release()
        self.keep.clear()
        self.release = lambda: None

    def close(self) -> None:
        if self.impl == "corun":
            self.ctx.close()
        elif self.impl == "asyncio":
            self.loop.close()


def memory_child(impl: str, count: int, traced: bool) -> float:
    """In a fresh process: bytes per suspended object, by RSS or by tracemalloc."""
    import tracemalloc

    subject = _Suspended(impl)
    subject.make(100)  # one-time allocations (hub, context, code) are not per object
    subject.free()
    gc.collect()
    if traced:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        subject.make(count)
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / count
    before = _rss()
    subject.make(count)
    gc.collect()
    return (_rss() - before) / count


def _memory_in_child(impl: str, count: int, traced: bool) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, str(count)]
    if traced:
        cmd.append("--traced")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {impl} failed: {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def memory_impl(impl: str) -> Callable[[int], Sample]:
    def run(n: int) -> Sample:
        # tracemalloc counts what Python allocates through its allocators and
        # makes creation several times slower; bytes per object do not depend
        # on the count, so a fifth of them is enough.
        traced = _memory_in_child(impl, max(n // 5, 100), traced=True)
        return Sample(_memory_in_child(impl, n, traced=False), {"tracemalloc_bytes": traced})

    return run


# -- the cases -----------------------------------------------------------------


def build_cases() -> list[Case]:
    return [
        Case(
            "switch",
            "switch",
            300_000,
            [
                Impl("corun", "corun: yield_() + co.enter()", switch_corun),
                Impl("greenlet", "greenlet: switch there and back (floor)", switch_greenlet),
            ],
        ),
        Case(
            "lifecycle",
            "lifecycle",
            20_000,
            [
                Impl("corun", "corun: Coroutine(fn).enter()", lifecycle_corun_enter),
                Impl("corun-spawn", "corun: ctx.spawn(fn).join()", lifecycle_corun_spawn),
                Impl("greenlet", "greenlet: greenlet(fn).switch() (floor)", lifecycle_greenlet),
                Impl("gevent", "gevent: gevent.spawn(fn).join()", lifecycle_gevent, ("gevent",)),
                Impl("asyncio", "asyncio: await create_task(coro())", lifecycle_asyncio),
            ],
        ),
        Case("pingpong", "pingpong", 10_000, pair_impls(loops=2, pairs=1, floor=True)),
        Case("pairs", "pairs", 20_000, pair_impls(loops=5, pairs=100, floor=False)),
        Case(
            "fanin",
            "fanin",
            100_000,
            [
                Impl("corun", "corun: ctx.call_soon from 4 threads", fanin_corun("call_soon")),
                Impl(
                    "corun-spawn",
                    "corun: ctx.spawn from 4 threads",
                    fanin_corun("spawn"),
                    weight=0.2,
                ),
                Impl(
                    "asyncio",
                    "asyncio: call_soon_threadsafe from 4 threads",
                    fanin_asyncio(asyncio.new_event_loop),
                    weight=0.5,
                ),
                Impl(
                    "uvloop",
                    "uvloop: call_soon_threadsafe from 4 threads",
                    fanin_asyncio(uvloop_factory),
                    ("uvloop",),
                ),
                Impl(
                    "gevent",
                    "gevent: run_callback_threadsafe from 4 threads",
                    fanin_gevent,
                    ("gevent",),
                ),
            ],
        ),
        Case(
            "mutex/uncontended",
            "mutex",
            200_000,
            [
                Impl(
                    "corun",
                    "corun: CoMutex, 1 coroutine",
                    mutex_corun_uncontended,
                    ("corun.CoMutex",),
                ),
                Impl("threading", "threading.Lock, 1 thread", mutex_threading_uncontended),
                Impl("asyncio", "asyncio.Lock, 1 task", _async_lock_uncontended(asyncio.Lock)),
                Impl(
                    "aiologic",
                    "aiologic.Lock, 1 asyncio task",
                    _async_lock_uncontended(_aiologic_lock),
                    ("aiologic",),
                    weight=0.3,
                ),
            ],
        ),
        Case("mutex/contended-5", "mutex", 200_000, contended_impls(5)),
        Case("mutex/contended-2", "mutex", 200_000, contended_impls(2)),
        Case("mutex/contended-8", "mutex", 200_000, contended_impls(8)),
        Case("queue/bounded", "queue", 200_000, queue_impls(QUEUE_BOUND)),
        Case("queue/unbounded", "queue", 200_000, queue_impls(0)),
        Case(
            "memory",
            "memory",
            100_000,
            [
                Impl("corun", "corun: suspended Coroutine (in a context)", memory_impl("corun")),
                Impl("greenlet", "greenlet: bare suspended greenlet", memory_impl("greenlet")),
                Impl(
                    "gevent",
                    "gevent: Greenlet waiting on an Event",
                    memory_impl("gevent"),
                    ("gevent",),
                ),
                Impl("asyncio", "asyncio: Task awaiting a Future", memory_impl("asyncio")),
            ],
            unit="B/object",
            warmup=False,
            max_repeat=1,
        ),
    ]


GROUPS = ("switch", "lifecycle", "pingpong", "pairs", "fanin", "mutex", "queue", "memory")


@dataclass
class Target:
    """A performance target: the ratio corun/`peer` in `case` (or an extra number)."""

    case: str
    peer: str
    op: str  # ">=" or "<="
    bound: float
    extra: str | None = None  # compare this extra of corun's row instead of the ratio

    def describe(self) -> str:
        if self.extra is not None:
            return f"{self.case}: corun {self.extra} {self.op} {self.bound:g}"
        return f"{self.case}: corun/{self.peer} {self.op} {self.bound:g}"


TARGETS = [
    Target("switch", "greenlet", ">=", 0.8),
    Target("pingpong", "gevent", ">=", 1.0),
    Target("pingpong", "asyncio", ">=", 2.5),
    Target("pairs", "gevent", ">=", 1.0),
    Target("fanin", "gevent", ">=", 1.0),
    Target("fanin", "corun", "<=", 10.0, extra="fd_writes_per_1k"),
    Target("mutex/contended-5", "aiologic", ">=", 20.0),
    Target("mutex/contended-5", "threading", ">=", 0.5),
    Target("queue/bounded", "aiologic", ">=", 1.0),
    Target("queue/bounded", "threading", ">=", 0.5),
    Target("queue/unbounded", "aiologic", ">=", 1.0),
    Target("queue/unbounded", "threading", ">=", 0.5),
    Target("memory", "greenlet", "<=", 1.5),
]


# -- running and reporting -----------------------------------------------------


def run_case(case: Case, repeat: int, scale: float) -> list[Row]:
    rows = [Row(case, impl) for impl in case.impls]
    for row in rows:
        row.skipped = missing(row.impl.needs)
    live = [r for r in rows if r.skipped is None]

    def ops_for(impl: Impl) -> int:
        return max(int(case.ops * scale * impl.weight), 10)

    if case.warmup:
        for row in live:
            try:
                row.impl.run(max(ops_for(row.impl) // 10, 10))
            except Exception as exc:
                logger.exception("warm-up of %s / %s failed", case.name, row.impl.label)
                row.error = repr(exc)
    if case.max_repeat is not None:
        repeat = min(repeat, case.max_repeat)
    for turn in range(repeat):
        for row in live:
            if row.error is not None:
                continue
            gc.collect()
            logger.info("%s: %s, turn %d", case.name, row.impl.label, turn + 1)
            try:
                row.samples.append(row.impl.run(ops_for(row.impl)))
            except Exception as exc:
                logger.exception("%s / %s failed", case.name, row.impl.label)
                row.error = repr(exc)
                row.samples.clear()
    reference = rows[0].median if rows[0].impl.key == "corun" else None
    for row in rows:
        med = row.median
        if reference is not None and med:
            row.ratio = reference / med
    return rows


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} {unit}"


def _fmt_extra(extra: dict[str, float]) -> str:
    names = {
        "fd_writes_per_1k": "fd writes/1k items {:.1f}",
        "fd_writes_per_op": "fd writes/round trip {:.2f}",
        "tracemalloc_bytes": "tracemalloc {:,.0f} B",
    }
    return ", ".join(names[k].format(v) for k, v in extra.items() if k in names)


def table(rows: Sequence[Row]) -> str:
    header = ("case", "implementation", "median", "spread", "corun/this", "notes")
    lines: list[tuple[str, ...]] = []
    last_case = None
    for row in rows:
        case = row.case.name if row.case.name != last_case else ""
        last_case = row.case.name
        if row.skipped or row.error:
            note = f"skipped: {row.skipped}" if row.skipped else f"failed: {row.error}"
            lines.append((case, row.impl.label, "-", "-", "-", note))
            continue
        spread = row.spread
        ratio = row.ratio
        note = "; ".join(n for n in (row.impl.note, _fmt_extra(row.extra())) if n)
        if row.impl.key == "corun":
            note = ("reference; " + note) if note else "reference"
        lines.append(
            (
                case,
                row.impl.label,
                _fmt_value(row.median, row.case.unit),
                "-" if spread is None else f"{100 * spread:.0f}%",
                "-" if ratio is None else f"{ratio:.2f}",
                note,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {2, 3, 4}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(x) for x in lines)])


def check_targets(rows: Sequence[Row]) -> list[tuple[Target, float | None, bool | None]]:
    by_key = {(r.case.name, r.impl.key): r for r in rows}
    out: list[tuple[Target, float | None, bool | None]] = []
    for target in TARGETS:
        row = by_key.get((target.case, target.peer))
        value: float | None = None
        if row is not None and row.samples:
            value = row.extra().get(target.extra) if target.extra else row.ratio
        met = None
        if value is not None:
            met = value >= target.bound if target.op == ">=" else value <= target.bound
        if row is not None:
            out.append((target, value, met))
    return out


def targets_text(
    results: Sequence[tuple[Target, float | None, bool | None]], indicative: bool = False
) -> str:
    """The verdicts; `indicative` (--quick) marks each as not one to judge by."""
    lines = [f"targets ({INDICATIVE}):" if indicative else "targets:"]
    for target, value, met in results:
        if met is None:
            lines.append(f"  {target.describe():<42} {'n/a':>8}")
            continue
        verdict = "met" if met else "MISSED"
        if indicative:
            verdict += " (indicative)"
        lines.append(f"  {target.describe():<42} {value:8.2f}  {verdict}")
    return "\n".join(lines)


def build_info() -> dict[str, Any]:
    """Which corun ran: its kernel (compiled or pure Python), and the interpreter."""
    return {
        "corun": corun.__version__,
        "kernel": "compiled" if corun.compiled else "pure",
        "pure_reason": None if corun.compiled else corun._mode.pure_reason(),
        "gil": bool(getattr(sys, "_is_gil_enabled", lambda: True)()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def build_text(build: dict[str, Any]) -> str:
    """The header line: `corun 0.1 (compiled kernel), CPython 3.11.7 with the GIL`."""
    kernel = "compiled kernel" if build["kernel"] == "compiled" else "pure-Python kernel"
    if build["pure_reason"]:
        kernel += f": {build['pure_reason']}"
    gil = "with the GIL" if build["gil"] else "free-threaded (GIL off)"
    return f"corun {build['corun']} ({kernel}), {build['python']} {gil}"


def row_json(row: Row) -> dict[str, Any]:
    return {
        "case": row.case.name,
        "impl": row.impl.key,
        "label": row.impl.label,
        "unit": row.case.unit,
        "median": row.median,
        "runs": [s.value for s in row.samples],
        "ratio": row.ratio,
        "reference": row.impl.key == "corun",
        "extra": row.extra(),
        "skipped": row.skipped,
        "error": row.error,
    }


def check_plot_path(path: str) -> str | None:
    """Why the plot could not be written to `path`, or None; checked before anything runs."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"--plot {path}: is a directory"
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        return f"--plot {path}: no such directory: {folder}"
    existed = os.path.exists(target)
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        return f"--plot {path}: cannot write there: {exc.strerror or exc}"
    if not existed:
        os.unlink(target)
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib, which is not installed (pip install -e '.[bench]')"
    from matplotlib.figure import Figure

    formats = sorted(Figure().canvas.get_supported_filetypes())
    suffix = os.path.splitext(target)[1].lower()
    if suffix.lstrip(".") not in formats:
        what = f"{suffix!r} is not a picture format" if suffix else "no extension names the format"
        return f"--plot {path}: {what} (matplotlib writes: .{', .'.join(formats)})"
    return None


def plot_figure(rows: Sequence[Row], indicative: bool = False) -> Any:
    """The bar charts of the ratios corun/peer (a matplotlib Figure), or None if none.

    Throughput (ops/s: higher is better for corun) and memory (bytes per
    object: lower is better) go on axes of their own, never on one scale.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verdicts = {(t.case, t.peer): met for t, _, met in check_targets(rows) if t.extra is None}
    colors = {True: "tab:green", False: "tab:red", None: "tab:blue"}
    panels: dict[str, list[tuple[str, float, str]]] = {"ops/s": [], "B/object": []}
    for r in rows:
        if r.ratio is None or r.impl.key.startswith("corun"):
            continue
        colour = colors[verdicts.get((r.case.name, r.impl.key))]
        panels.setdefault(r.case.unit, []).append(
            (f"{r.case.name}\nvs {r.impl.key}", r.ratio, colour)
        )
    titles = {
        "ops/s": "throughput: corun/peer ops/s\n(higher is better for corun)",
        "B/object": "memory: corun/peer bytes per object\n(lower is better for corun)",
    }
    drawn = [(unit, bars) for unit, bars in panels.items() if bars]
    if not drawn:
        return None
    widths = [len(bars) for _, bars in drawn]
    fig, axes = plt.subplots(
        1,
        len(drawn),
        figsize=(max(6.0, 0.6 * sum(widths) + 1.5 * len(drawn)), 5.0),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    plain = matplotlib.ticker.FormatStrFormatter("%g")
    for ax, (unit, bars) in zip(axes[0], drawn, strict=True):
        ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[0] for b in bars], rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title(titles.get(unit, f"corun/peer {unit}"), fontsize=9)
    axes[0][0].set_ylabel("corun / peer")
    title = "corun next to its peers (green: target met, red: missed, blue: no target)"
    if indicative:
        title += f"\n{INDICATIVE}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot(rows: Sequence[Row], path: str, indicative: bool = False) -> str | None:
    """Write the bar charts to `path`; returns why it could not, or None."""
    fig = plot_figure(rows, indicative)
    if fig is None:
        return "no ratios to plot"
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        return f"could not write {path}: {exc}"
    finally:
        plt.close(fig)
    return None


JSON_ROW_KEYS: list[tuple[str, str]] = [
    ("case", "the case (switch, pingpong, mutex/contended-5, queue/bounded, memory, ...)"),
    (
        "impl",
        "the implementation's key: corun (the case's reference), corun-spawn, "
        "corun-callbacks, greenlet, asyncio, uvloop, gevent, aiologic, threading, threads",
    ),
    ("label", "the table's implementation column"),
    ("unit", "ops/s (higher is better), or B/object for memory (lower is better)"),
    ("median", "the median of runs; null if it did not run"),
    ("runs", "the value of each measured run (--repeat of them; memory: one)"),
    (
        "ratio",
        "corun's median / this median (the table's corun/this): above 1 corun does "
        "more ops/s; for memory, below 1 corun uses less; null if not measured",
    ),
    ("reference", "true for the case's corun row, the one the ratios divide"),
    (
        "extra",
        "medians of extra numbers: fd_writes_per_1k (wake-up eventfd writes per "
        "1,000 items), fd_writes_per_op (per round trip), tracemalloc_bytes (memory)",
    ),
    ("skipped", "null, or why it did not run (a peer not installed)"),
    ("error", "null, or what a failed run raised (exit status 1)"),
]
JSON_BUILD_KEYS: list[tuple[str, str]] = [
    ("corun", "corun's version"),
    ("kernel", '"compiled" (the Cython kernel) or "pure" (pure Python: CORUN_PURE_PYTHON=1, '
     "a free-threaded build, or no compiled kernel installed)"),
    ("pure_reason", "null, or why the kernel is pure Python"),
    ("gil", "false on a free-threaded CPython running without the GIL"),
    ("python", 'the interpreter, as "CPython 3.11.7"'),
]
JSON_TARGET_KEYS: list[tuple[str, str]] = [
    ("target", 'the target, as "case: corun/peer >= bound" (or an extra number of corun)'),
    ("value", "the measured ratio (or extra number); null if not measured"),
    ("met", "whether value meets the bound; null if not measured"),
    ("indicative", "true with --quick: tiny counts, a smoke test, not a verdict to judge by"),
]


def _keys_text(keys: Sequence[tuple[str, str]]) -> list[str]:
    lines: list[str] = []
    for key, doc in keys:
        lines += textwrap.wrap(
            doc, width=79, initial_indent=f"  {key:<11} ", subsequent_indent=" " * 14
        )
    return lines


def _epilog() -> str:
    wrap = textwrap.fill
    return "\n".join(
        [
            wrap(
                f"Cases: {', '.join(GROUPS)}. Peers not installed are skipped with a note.",
                width=79,
            ),
            "",
            wrap(
                '--json prints JSON Lines: one JSON object per line: first {"build": '
                "{...}}, which corun ran (the table's header line says the same), then "
                "one per implementation of each case (as it finishes), then one per "
                "target. The build's keys:",
                width=79,
            ),
            *_keys_text(JSON_BUILD_KEYS),
            "An implementation's keys:",
            *_keys_text(JSON_ROW_KEYS),
            "A target's keys:",
            *_keys_text(JSON_TARGET_KEYS),
            "",
            wrap(
                "--quick runs 1/50 of the counts, for a smoke test (CI): its verdicts are "
                "marked indicative. Exit status: 0 every run finished, 1 a run failed "
                "(named on stderr), 2 a bad command line (a missed target is not a "
                "failure).",
                width=79,
            ),
        ]
    )


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Benchmark corun next to greenlet, asyncio, uvloop, gevent, aiologic and plain "
            "threads, in one process, and report ops/s and the ratio corun/peer.",
            width=79,
        ),
        epilog=_epilog(),
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="CASE",
        help="cases to run, comma- or space-separated (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=_ranged(int, "N >= 1", lambda v: v >= 1),
        default=3,
        metavar="N",
        help="measured runs per implementation; the median is reported (default: 3)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--scale",
        type=_ranged(float, "F > 0", lambda v: v > 0),
        default=1.0,
        metavar="F",
        help="multiply every iteration count by this (default: 1)",
    )
    size.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny iteration counts (--scale {QUICK_SCALE:g}), for CI: the verdicts are "
        "marked indicative",
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON Lines: one JSON object per line (keys below)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="bar charts of the ratios, throughput and memory on separate axes (needs "
        "matplotlib: pip install -e '.[bench]'); the path is checked before anything runs",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each run")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a refused command line (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.memory_child:
        impl, count = args.memory_child
        print(json.dumps(memory_child(impl, int(count), args.traced)), flush=True)
        # Tearing down 100,000 suspended objects would take longer than making
        # them; this process exists only to be measured.
        os._exit(0)
    scale = QUICK_SCALE if args.quick else args.scale
    indicative = bool(args.quick)
    selected: list[str] = []
    for item in args.cases or GROUPS:
        selected += [c for c in item.split(",") if c]
    unknown = sorted(set(selected) - set(GROUPS))
    if unknown:
        print(
            f"bench.py: error: unknown case(s) {', '.join(unknown)}; "
            f"choose from {', '.join(GROUPS)}",
            file=sys.stderr,
        )
        return 2
    if args.plot:
        why = check_plot_path(args.plot)
        if why is not None:
            print(f"bench.py: error: {why}", file=sys.stderr)
            return 2

    build = build_info()
    if args.json:
        print(json.dumps({"build": build}), flush=True)
    else:
        print(build_text(build), file=sys.stderr, flush=True)
    all_rows: list[Row] = []
    for case in build_cases():
        if case.group not in selected:
            continue
        if not args.json:
            print(f"running {case.name} ...", file=sys.stderr, flush=True)
        rows = run_case(case, args.repeat, scale)
        all_rows += rows
        if args.json:
            for row in rows:
                print(json.dumps(row_json(row)), flush=True)
    results = check_targets(all_rows)
    if args.json:
        for target, value, met in results:
            verdict = {
                "target": target.describe(),
                "value": value,
                "met": met,
                "indicative": indicative,
            }
            print(json.dumps(verdict))
    else:
        print(build_text(build))
        print()
        print(table(all_rows))
        print()
        print(targets_text(results, indicative))
        notes = sorted({r.skipped for r in all_rows if r.skipped})
        for note in notes:
            print(f"note: skipped: {note}")
    if args.plot:
        why = plot(all_rows, args.plot, indicative)
        if why is None:
            print(f"plot written to {os.path.abspath(args.plot)}", file=sys.stderr)
        else:
            print(f"note: no plot: {why}", file=sys.stderr)
    failed = [r for r in all_rows if r.error is not None]
    for r in failed:
        print(f"FAILED {r.case.name} / {r.impl.label}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
