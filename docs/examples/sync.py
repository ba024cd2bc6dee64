"""An Event set by a plain thread, and a Semaphore that lets two coroutines in at a time."""

import threading

import corun

started = corun.Event()
sem = corun.Semaphore(2)
inside = 0
most = 0


def job() -> None:
    global inside, most
    started.wait()  # every job waits for the starting gun
    with sem:
        inside += 1
        most = max(most, inside)
        corun.sleep(0.01)
        inside -= 1


def main() -> None:
    ctx = corun.current_context()
    jobs = [ctx.spawn(job) for _ in range(6)]
    threading.Timer(0.01, started.set).start()  # from another thread
    for co in jobs:
        co.join()
    print("at most", most, "inside at once")
    print(started.is_set(), sem.value, sem.locked())


corun.run(main)

bounded = corun.BoundedSemaphore(1)
try:
    bounded.release()  # more releases than acquires
except ValueError:
    print("BoundedSemaphore: released too many times")

# Output:
# at most 2 inside at once
# True 2 False
# BoundedSemaphore: released too many times
