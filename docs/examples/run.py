"""corun.run(): asyncio.run for corun, in the calling thread."""

import corun


def child(n: int) -> int:
    corun.sleep(0.01)
    return n * 2


def main(n: int) -> int:
    ctx = corun.current_context()
    print("running on", ctx.name)
    return sum(co.join() for co in [ctx.spawn(child, i) for i in range(n)])


print(corun.run(main, 4))
print(corun.current_context())  # the context is closed and gone

# Output:
# running on run:main
# 12
# None
