"""The README's tour: a coroutine on an IOThread woken from another thread, a CoMutex
across IOThreads, a TaskGroup over two IOThreads joined by a Queue."""

import threading

import corun


def worker(box: list[str]) -> str:
    me = corun.current_coroutine()
    print(f"{me.name} starts on {threading.current_thread().name}")
    while not box:
        corun.yield_()  # suspend; the IOThread's loop goes on
    print(f"{me.name} woken with {box[0]!r} on {threading.current_thread().name}")
    return box[0].upper()


with corun.IOThread("io-1") as io:
    box: list[str] = []
    co = io.ctx.spawn(worker, box, name="worker")
    io.ctx.call_sync(lambda: None)  # let it start and suspend
    print(f"main sees {co!r}")
    box.append("hello")
    corun.wake(co)  # from the main thread: scheduled on io-1, lock-free
    print(f"join -> {co.join(timeout=5)!r}")
    print(io.ctx.stats())

# Locks work across threads: 4 IOThreads, one CoMutex, no lost update.
counter = 0
mutex = corun.CoMutex()


def add(n: int) -> None:
    global counter
    for _ in range(n):
        with mutex:
            value = counter
            corun.sleep(0)  # yield while holding the lock
            counter = value + 1


threads = [corun.IOThread() for _ in range(4)]
cos = [t.ctx.spawn(add, 250) for t in threads]
for co in cos:
    co.join()
for t in threads:
    t.join()
print(f"counter = {counter}")

# A TaskGroup over two IOThreads: a producer and a consumer joined by a Queue.
q: corun.Queue[int] = corun.Queue(maxsize=8)


def produce(n: int) -> None:
    for i in range(n):
        q.put(i)  # suspends while the queue is full
    q.close()  # end of stream


def consume() -> int:
    total = 0
    while True:
        try:
            total += q.get()
        except corun.QueueShutDown:
            return total


with corun.IOThread("io-a") as a, corun.IOThread("io-b") as b:
    with corun.TaskGroup() as tg:  # owned by the main thread
        tg.spawn(produce, 100, ctx=a.ctx)
        consumer = tg.spawn(consume, ctx=b.ctx)
    # Leaving the block waited for both; a failure would have cancelled the other.
    print(f"sum = {consumer.result()}")
