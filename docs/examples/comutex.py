"""Four IOThreads increment one counter under a CoMutex, yielding while they hold it."""

import corun

counter = 0
mutex = corun.CoMutex()


def add(n: int) -> None:
    global counter
    for _ in range(n):
        with mutex:
            value = counter
            corun.sleep(0)  # yield while holding the lock: nobody else gets in
            counter = value + 1


threads = [corun.IOThread() for _ in range(4)]
for co in [t.ctx.spawn(add, 250) for t in threads]:
    co.join()
for t in threads:
    t.join()
print(f"counter = {counter}")
print(mutex.locked(), mutex.holder)


def try_lock() -> bool:
    return mutex.acquire(timeout=0.05)  # False on timeout, like threading.Lock


def hold() -> None:
    with mutex:
        corun.sleep(0.2)


def main() -> None:
    ctx = corun.current_context()
    holder = ctx.spawn(hold, name="holder")
    corun.sleep(0)  # let it take the mutex
    print("held by", mutex.holder.name)
    print("acquired:", ctx.spawn(try_lock).join())
    holder.join()


corun.run(main)

# Output:
# counter = 1000
# False None
# held by holder
# acquired: False
