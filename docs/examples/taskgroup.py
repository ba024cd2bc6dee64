"""A TaskGroup over two IOThreads: the first failure cancels the other children."""

import sys

import corun

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

cancelled: list[str] = []


def slow(name: str) -> None:
    try:
        corun.sleep(60)
    except corun.Cancelled:
        cancelled.append(name)  # cleaning up; then let Cancelled go on
        raise


def fail() -> None:
    corun.sleep(0.01)
    raise ValueError("disk on fire")


with corun.IOThread("io-a") as a, corun.IOThread("io-b") as b:
    try:
        with corun.TaskGroup() as tg:  # owned by the main thread
            tg.spawn(slow, "slow-a", ctx=a.ctx)
            tg.spawn(slow, "slow-b", ctx=b.ctx)
            tg.spawn(fail, ctx=b.ctx)
        # Leaving the block waits for every child.
    except ExceptionGroup as group:
        print(group.exceptions)
    print("cancelled:", sorted(cancelled))

    with corun.TaskGroup() as tg:
        squares = [tg.spawn(pow, n, 2, ctx=a.ctx) for n in range(5)]
    print([co.result() for co in squares])

# Output:
# (ValueError('disk on fire'),)
# cancelled: ['slow-a', 'slow-b']
# [0, 1, 4, 9, 16]
