"""corun: QEMU's coroutines and AioContext event loops for Python, on greenlets.

The modules, in layers; each imports only from layers below it:

1. Pieces with no corun imports: `_thread` (the per-thread state),
   `notifier` (eventfd), `fdhandler` (epoll), `watchdog`, `_mode`
   (compiled or pure Python).
2. The kernel (compiled with Cython when built: see `_mode`):
   `coroutine` (coroutines, entering and yielding, the wake-up queue, the
   wait verbs `park`/`_suspend`, the chain of held locks) and `context`
   (AioContext: the loop, the one door in from other threads, `wake`),
   with `bh` and `timer`, which the loop runs. The kernel knows nothing
   of what is built on it: locks link themselves into a coroutine's held
   locks, and `waiter` registers the class `join()` waits with.
3. Primitives on the kernel: `waiter`, `comutex` (compiled too),
   `coqueue`, `corwlock`, `sleep`, `fdwait`, `threadpool`, `scope`.
4. Built on those: `sync`, `channel`, `taskgroup`, `net`, `iothread`,
   `run`, `debug`.
"""

# First: importing _mode chooses between the compiled and the pure-Python
# kernel, before any kernel module loads.
from . import _mode
from .bh import BottomHalf
from .channel import Queue, QueueEmpty, QueueFull, QueueShutDown
from .comutex import CoMutex
from .context import AioContext, current_context, wake
from .coqueue import CoQueue
from .coroutine import Cancelled, Coroutine, current_coroutine, in_coroutine, yield_
from .corwlock import CoRwLock
from .debug import dump, dump_on_signal
from .fdwait import notify_closing, wait_readable, wait_writable
from .iothread import IOThread
from .net import Server, Socket, Stream, open_connection, serve
from .notifier import EventNotifier
from .run import run
from .scope import CancelScope, move_on_after, timeout
from .sleep import CoSleep, sleep
from .sync import BoundedSemaphore, Event, Semaphore
from .taskgroup import TaskGroup
from .threadpool import run_in_thread
from .timer import Timer

#: True when the compiled (Cython) kernel runs, False for pure Python (see
#: corun/_mode.py: CORUN_PURE_PYTHON=1 forces pure Python).
compiled: bool = _mode.is_compiled()

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0.dev0"

__all__ = [
    "AioContext",
    "BottomHalf",
    "BoundedSemaphore",
    "CancelScope",
    "Cancelled",
    "CoMutex",
    "CoQueue",
    "CoRwLock",
    "CoSleep",
    "Coroutine",
    "Event",
    "EventNotifier",
    "IOThread",
    "Queue",
    "QueueEmpty",
    "QueueFull",
    "QueueShutDown",
    "Semaphore",
    "Server",
    "Socket",
    "Stream",
    "TaskGroup",
    "Timer",
    "current_context",
    "current_coroutine",
    "dump",
    "dump_on_signal",
    "in_coroutine",
    "move_on_after",
    "notify_closing",
    "open_connection",
    "run",
    "run_in_thread",
    "serve",
    "sleep",
    "timeout",
    "wait_readable",
    "wait_writable",
    "wake",
    "yield_",
]
