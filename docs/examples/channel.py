"""A Queue carries items from a producer on one IOThread to a consumer on another."""

import corun

q: corun.Queue[int] = corun.Queue(maxsize=8)


def produce(n: int) -> None:
    for i in range(n):
        q.put(i)  # suspends while the queue is full
    q.close()  # end of stream


def consume() -> int:
    total = 0
    while True:
        try:
            total += q.get()
        except corun.QueueShutDown:  # closed and drained
            return total


with corun.IOThread("io-a") as a, corun.IOThread("io-b") as b:
    with corun.TaskGroup() as tg:
        tg.spawn(produce, 100, ctx=a.ctx)
        consumer = tg.spawn(consume, ctx=b.ctx)
    print(f"sum = {consumer.result()}")

# Plain threads use it too: get() blocks, with a timeout.
q2: corun.Queue[str] = corun.Queue()
try:
    q2.get(timeout=0.01)
except corun.QueueEmpty:
    print("empty")
q2.put_nowait("x")
print(q2.qsize(), q2.get_nowait(), q2.empty())

# Output:
# sum = 4950
# empty
# 1 x True
