# C declarations for the compiled build of context.py (see coroutine.pxd).
# Every field stays `public`: the rest of corun, and the tests, use them.

cimport cython

from corun._greenlet cimport greenlet, getcurrent
from corun._greenlet cimport switch as _switch
from corun._greenlet cimport greenlet_init as _greenlet_init
from corun.coroutine cimport _CoGreenlet, _CoroutineBase, _KernelContext
from corun.coroutine cimport _defer, _enter, _finished, _prepare


cdef class AioContext(_KernelContext):
    # No __dict__: with one, every call of a cpdef method from C would first
    # look the name up on the instance, in case a Python override hid it.
    cdef object __weakref__
    cdef public object name
    cdef public object _thread_name
    cdef public bint _draining
    cdef public bint _released
    cdef public object _close_done
    cdef public bint _inherited
    cdef public bint _interrupted
    cdef public Py_ssize_t _depth
    cdef public object _ready
    cdef public object _bh_q
    cdef public object _idle_q
    cdef public object _timers
    cdef public object _notifier
    cdef public object _notify_fd
    cdef public bint _notify_me
    cdef public bint _notified
    cdef public object _event_armed
    cdef public object _write_lock
    cdef public object _close_lock
    cdef public object _poller
    cdef public bint _notify_edge
    cdef public dict _fds
    cdef public dict _edge_fds
    cdef public object _signal_socks
    cdef public object _signal_fd
    cdef public object _exc_handler
    cdef public object _thread_pool
    cdef public object _thread_pool_size
    cdef public Py_ssize_t _polls
    cdef public Py_ssize_t _pass_ended
    cdef public object _slow
    cdef public Py_ssize_t _notify_writes
    cdef public Py_ssize_t _bh_calls
    cdef public Py_ssize_t _co_scheduled
    cdef public Py_ssize_t _timers_fired
    cdef public Py_ssize_t _fd_events

    cpdef notify(self)
    cpdef _submit(self, queue, item)
    cpdef schedule(self, _CoroutineBase co)
    cpdef enter(self, _CoroutineBase co)
    cpdef bint _has_work(self)
    @cython.locals(timers=object)
    cpdef bint _pass(self, timeout)

    @cython.locals(co=_CoroutineBase, g=_CoGreenlet, current=greenlet)
    cpdef _run_ready(self, Py_ssize_t n)


@cython.locals(ctx=AioContext)
cpdef wake(_CoroutineBase co)
