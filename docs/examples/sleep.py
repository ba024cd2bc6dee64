"""sleep(), and a CoSleep that another thread cuts short."""

import threading
import time

import corun


def nap(s: corun.CoSleep) -> float:
    start = time.monotonic()
    s.sleep(10)  # returns early when someone calls s.wake()
    return time.monotonic() - start


def main() -> None:
    start = time.monotonic()
    corun.sleep(0.05)
    print("slept at least 50 ms:", time.monotonic() - start >= 0.05)
    s = corun.CoSleep()
    co = corun.current_context().spawn(nap, s, name="nap")
    corun.sleep(0)  # reschedules us: nap starts and falls asleep
    print(co)
    threading.Thread(target=s.wake).start()  # from any thread
    print("woken early:", co.join() < 1)


corun.run(main)

# Output:
# slept at least 50 ms: True
# <Coroutine 'nap' scheduled ctx='run:main'>
# woken early: True
