"""An AioContext in the main thread: a callback, a coroutine and a timer, run by poll()."""

import corun

with corun.AioContext("main") as ctx:
    ctx.call_soon(print, "call_soon: runs at the next poll")
    co = ctx.spawn(lambda: "hello from a coroutine", name="hello")
    print(ctx.poll(blocking=False))  # one pass: the callback, then the coroutine
    print(repr(co), "->", co.result())
    print(ctx.poll(blocking=False))  # nothing left to do
    timer = ctx.call_later(0.05, print, "call_later: fires 50 ms later")
    while timer.pending:
        ctx.poll()  # blocks until there is something to do: here, the timer
    print(ctx.stats()["timers_fired"], "timer fired")
    print(corun.current_context() is ctx)
print(ctx)

# Output:
# call_soon: runs at the next poll
# True
# <Coroutine 'hello' done ctx='main'> -> hello from a coroutine
# False
# call_later: fires 50 ms later
# 1 timer fired
# True
# <AioContext 'main' closed thread='MainThread'>
