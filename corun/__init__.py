"""corun: QEMU's coroutines and AioContext event loops for Python, on greenlets."""

from .bh import BottomHalf
from .context import AioContext, current_context, wake
from .coroutine import Coroutine, current_coroutine, in_coroutine, yield_
from .iothread import IOThread
from .notifier import EventNotifier
from .run import run
from .timer import Timer

__all__ = [
    "AioContext",
    "BottomHalf",
    "Coroutine",
    "EventNotifier",
    "IOThread",
    "Timer",
    "current_context",
    "current_coroutine",
    "in_coroutine",
    "run",
    "wake",
    "yield_",
]
