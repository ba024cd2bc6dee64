"""An EventNotifier set by another thread wakes a blocked poll()."""

import threading

import corun

with corun.EventNotifier() as notifier, corun.AioContext() as ctx:
    ctx.add_reader(notifier, lambda: print("was set:", notifier.test_and_clear()))
    setter = threading.Thread(target=notifier.set)
    setter.start()
    ctx.poll()  # blocks until the fd is readable, then runs the reader
    setter.join()
    print("set again?", notifier.test_and_clear())
    print(ctx.remove_reader(notifier))

# Output:
# was set: True
# set again? False
# True
