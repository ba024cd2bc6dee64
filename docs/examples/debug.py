"""What is everyone waiting for? dump() while one coroutine holds a CoMutex that another wants,
then the stall detector catching a coroutine that blocks its loop."""

import logging
import sys
import time

import corun

mutex = corun.CoMutex()


def holder() -> None:
    with mutex:
        corun.sleep(60)  # holds the mutex for a long time


def waiter() -> None:
    with mutex:  # waits for holder, on another IOThread
        pass


with corun.IOThread("io-a") as a, corun.IOThread("io-b") as b:
    h = a.ctx.spawn(holder, name="holder")
    a.ctx.call_sync(lambda: None)  # holder has the mutex
    w = b.ctx.spawn(waiter, name="waiter")
    b.ctx.call_sync(lambda: None)  # waiter is queued on it
    print([co.name for co in b.ctx.coroutines()])
    corun.dump(sys.stdout)  # or corun.dump_on_signal(signal.SIGUSR1), then kill -USR1 <pid>
    h.cancel()  # let them go

# The stall detector: a coroutine that blocks its loop for 0.2 s is logged while it does.
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
with corun.IOThread("io-c") as c:
    c.ctx.set_slow_callback_duration(0.05)
    c.ctx.spawn(time.sleep, 0.2, name="blocker").join()  # time.sleep, not corun.sleep
