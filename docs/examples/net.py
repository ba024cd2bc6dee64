"""A line server on two IOThreads, a client, a timeout, and a close that wakes a reader."""

import errno
import socket
from typing import Any

import corun


def handle(stream: corun.Stream, addr: Any) -> None:
    """One coroutine per connection, on one of the server's IOThreads."""
    while line := stream.readline():  # b"" at end of stream
        stream.write(line.upper())  # sends it all: no drain()


def client(port: int) -> None:
    with corun.open_connection("127.0.0.1", port, timeout=5) as conn:
        for word in (b"hello\n", b"world\n"):
            conn.write(word)
            print(conn.readline())
        try:
            with corun.timeout(0.05):  # every wait on a socket is a cancellation point
                conn.readline()  # the server sends nothing unasked
        except TimeoutError:
            print("no reply within 50 ms")


with corun.serve(handle, "127.0.0.1", 0, iothreads=2) as server:  # port 0: any free one
    corun.run(client, server.address[1])
    print("connections accepted:", server.accepted)
# Leaving the block: stop accepting, let connections finish, join the IOThreads.

a, b = socket.socketpair()
sock = corun.Socket(a)
with corun.IOThread() as io:
    reader = io.ctx.spawn(sock.recv, 16)
    io.ctx.call_sync(lambda: None)  # the reader waits in recv() now
    sock.close()  # from any thread: wakes the reader, forgets the fd, closes it
    try:
        reader.join()
    except OSError as exc:
        print("reader woken:", "EBADF" if exc.errno == errno.EBADF else exc)
b.close()

# Output:
# b'HELLO\n'
# b'WORLD\n'
# no reply within 50 ms
# connections accepted: 1
# reader woken: EBADF
