"""A coroutine waits for a socket to become readable, with a timeout."""

import socket
import threading

import corun


def main() -> None:
    a, b = socket.socketpair()
    with a, b:
        print("readable:", corun.wait_readable(a, timeout=0.05))  # nothing sent yet
        threading.Timer(0.01, b.send, [b"ping"]).start()
        print("readable:", corun.wait_readable(a, timeout=5))
        print(a.recv(16))
        print("writable:", corun.wait_writable(a))


corun.run(main)

# Output:
# readable: False
# readable: True
# b'ping'
# writable: True
