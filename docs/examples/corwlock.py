"""Readers share a CoRwLock; a queued writer goes before readers that come after it."""

import corun

lock = corun.CoRwLock()
log: list[str] = []


def reader(name: str) -> None:
    with lock.reader():
        log.append(f"{name} in")
        corun.sleep(0.02)
        log.append(f"{name} out")


def writer() -> None:
    with lock.writer():
        log.append("writer in")
        corun.sleep(0.02)
        log.append("writer out")


def main() -> None:
    ctx = corun.current_context()
    r1 = ctx.spawn(reader, "r1")
    r2 = ctx.spawn(reader, "r2")
    corun.sleep(0.005)  # r1 and r2 hold the lock together
    w = ctx.spawn(writer)
    corun.sleep(0.005)  # the writer queues behind them
    r3 = ctx.spawn(reader, "r3")  # queues behind the writer
    for co in (r1, r2, w, r3):
        co.join()


corun.run(main)
print("\n".join(log))

# Output:
# r1 in
# r2 in
# r1 out
# r2 out
# writer in
# writer out
# r3 in
# r3 out
