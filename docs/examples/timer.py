"""A timer that re-arms itself from its callback, three times."""

import corun

with corun.AioContext() as ctx:
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(len(ticks) + 1)
        print("tick", ticks[-1])
        if len(ticks) < 3:
            timer.mod(ctx.time() + 0.01)  # a callback may re-arm its own timer

    timer = ctx.timer(tick)
    print(timer.pending)
    timer.mod(ctx.time() + 0.01)
    print(timer.pending)
    while len(ticks) < 3:
        ctx.poll()  # blocks until the next deadline
    print(timer.pending, timer.when)

    late = ctx.call_later(60, print, "never")
    late.cancel()
    print(late.pending)

# Output:
# False
# True
# tick 1
# tick 2
# tick 3
# False None
# False
