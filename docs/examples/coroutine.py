"""Coroutines QEMU-style: create, enter, yield_(), enter again."""

import corun


def count(n: int) -> str:
    for i in range(n):
        print("step", i)
        corun.yield_()  # back to whoever entered us
    return "counted"


co = corun.Coroutine(count, 3, name="count")
print(co)  # created, not started
while not co.done:
    co.enter()  # runs it until its next yield_()
print(co, co.result())


# On a context, a coroutine is entered by the loop and woken from anywhere.
def wait_for_wake() -> str:
    corun.yield_()  # suspended until someone wakes us
    return "woken"


with corun.IOThread("io") as io:
    co = io.ctx.spawn(wait_for_wake, name="sleeper")
    io.ctx.call_sync(lambda: None)  # one loop pass: it has started and yielded
    print(co)
    corun.wake(co)  # from the main thread: it resumes on io
    print(co.join(timeout=5))

# Output:
# <Coroutine 'count' new>
# step 0
# step 1
# step 2
# <Coroutine 'count' done> counted
# <Coroutine 'sleeper' suspended ctx='io'>
# woken
