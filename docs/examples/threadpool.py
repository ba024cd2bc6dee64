"""run_in_thread(): blocking calls in worker threads while the loop goes on."""

import threading
import time

import corun


def blocking_read(n: int) -> int:
    time.sleep(0.2)  # stands for a blocking syscall or library call
    return n * n


def fetch(n: int) -> int:
    return corun.run_in_thread(blocking_read, n)  # this coroutine suspends, the loop runs on


def main() -> None:
    start = time.monotonic()
    ctx = corun.current_context()
    cos = [ctx.spawn(fetch, n) for n in range(4)]
    print([co.join() for co in cos])
    print("in parallel:", time.monotonic() - start < 0.6)
    print("loop thread:", threading.current_thread().name)


corun.run(main)

# Output:
# [0, 1, 4, 9]
# in parallel: True
# loop thread: MainThread
