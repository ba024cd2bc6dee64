"""A bottom half runs once per schedule(), however often it was scheduled."""

import corun

with corun.AioContext() as ctx:
    bh = ctx.bh(print, "flush", name="flush")
    for _ in range(3):
        bh.schedule()  # schedules coalesce until it runs
    print(bh.scheduled)
    ctx.poll(blocking=False)  # prints "flush" once
    print(bh.scheduled)
    bh.schedule()
    bh.cancel()
    print(ctx.poll(blocking=False))  # nothing ran
    bh.delete()
    try:
        bh.schedule()
    except RuntimeError as exc:
        print("RuntimeError:", exc)

# Output:
# True
# flush
# False
# False
# RuntimeError: cannot schedule <BottomHalf 'flush' deleted ctx='ctx-1'>: it was deleted
