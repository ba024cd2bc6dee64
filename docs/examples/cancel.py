"""Cancelling a coroutine from another thread, and time limits on blocks."""

import corun


def worker() -> None:
    try:
        corun.sleep(60)  # every corun wait is a cancellation point
    finally:
        print("worker cleans up")


with corun.IOThread() as io:
    co = io.ctx.spawn(worker)
    io.ctx.call_sync(lambda: None)  # it sleeps now
    asked = co.cancel("shutting down")  # from the main thread
    try:
        co.join()
    except corun.Cancelled as exc:
        print("Cancelled:", exc, co.cancelled())
    print("cancel() returned", asked)  # False only for a coroutine that had finished


def main() -> None:
    with corun.move_on_after(0.05) as scope:  # trio: leave the block quietly
        corun.sleep(60)
    print("moved on:", scope.cancelled_caught)
    try:
        with corun.timeout(0.05):  # asyncio: TimeoutError at the block's exit
            corun.sleep(60)
    except TimeoutError:
        print("timed out")


corun.run(main)

# Output:
# worker cleans up
# Cancelled: shutting down True
# cancel() returned True
# moved on: True
# timed out
