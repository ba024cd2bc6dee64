"""An IOThread runs its own AioContext; any thread can hand it work."""

import threading

import corun


def where() -> str:
    return threading.current_thread().name


with corun.IOThread("io-1") as io:
    print(io, io.ctx)
    print("call_sync ran on", io.ctx.call_sync(where))
    co = io.ctx.spawn(where)
    print("coroutine ran on", co.join())
print(io.is_alive(), io.ctx)  # joined: stopped, its context closed

# Output:
# <IOThread 'io-1' running> <AioContext 'io-1' open thread='io-1'>
# call_sync ran on io-1
# coroutine ran on io-1
# False <AioContext 'io-1' closed thread='io-1'>
