"""CoQueue as a condition variable: a consumer waits, under a CoMutex, for an item."""

import corun

mutex = corun.CoMutex()
ready = corun.CoQueue()
items: list[str] = []


def consumer() -> str:
    with mutex:
        while not items:
            ready.wait(mutex)  # releases the mutex while waiting, re-takes it after
        return items.pop()


def producer() -> None:
    with mutex:
        items.append("job")
        print("woke a waiter:", ready.next())


with corun.IOThread("a") as a, corun.IOThread("b") as b:
    taker = a.ctx.spawn(consumer)
    a.ctx.call_sync(lambda: None)  # it has started and waits
    print(len(ready), "waiting")
    b.ctx.spawn(producer).join()
    print("consumer got", taker.join(timeout=5))
    print(ready.empty(), ready.restart_all())

# Output:
# 1 waiting
# woke a waiter: True
# consumer got job
# True 0
