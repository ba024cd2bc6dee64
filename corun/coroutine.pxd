# C declarations for the compiled build of coroutine.py (Cython, pure-Python
# mode: coroutine.py is the source; see corun/_mode.py and setup.py). Every
# field stays `public`: the rest of corun, and the tests, read and write them.

cimport cython

from corun._greenlet cimport greenlet, getcurrent
from corun._greenlet cimport switch as _switch
from corun._greenlet cimport greenlet_init as _greenlet_init


cdef class _CoroutineBase


cdef class _CoGreenlet(greenlet):
    cdef public _CoroutineBase co
    cdef public object owner


cdef class _KernelContext:
    cdef public bint _closed
    cdef public Py_ssize_t _co_entered
    cdef public list _co_pool
    cdef public set _live
    cdef public object _thread


cdef class _CoroutineBase:
    cdef public object _name
    cdef public object _number
    cdef public object ctx
    cdef public bint done
    cdef public object _fn
    cdef public object _args
    cdef public object _kwargs
    cdef public _CoGreenlet _greenlet
    cdef public object _thread
    cdef public greenlet _caller
    cdef public object _sched
    cdef public object _sched_where
    cdef public object _wakeups
    cdef public _KernelContext _live_in
    cdef public object _result
    cdef public object _exc
    cdef public object _tb
    cdef public bint _exc_owned
    cdef public object _waiters
    cdef public object _held
    cdef public object _context
    cdef public object _cancel
    cdef public object _cancels
    cdef public object _abort
    cdef public object _waiting
    cdef public object _since
    cdef public object _unretrieved

    @cython.locals(g=_CoGreenlet, current=greenlet, ctx=_KernelContext)
    cpdef enter(self)


cpdef _finished(_KernelContext ctx, _CoroutineBase co, _CoGreenlet g)

@cython.locals(g=_CoGreenlet)
cpdef _CoGreenlet _prepare(_KernelContext ctx, _CoroutineBase to, greenlet current)

@cython.locals(current=greenlet, g=_CoGreenlet)
cpdef _enter(_KernelContext ctx, _CoroutineBase co, bint explicit)

@cython.locals(g=_CoGreenlet, co=_CoroutineBase, caller=greenlet)
cpdef yield_()

@cython.locals(caller=greenlet)
cpdef _suspend(_CoroutineBase co, what=*)

cpdef checkpoint(_CoroutineBase co)

@cython.locals(caller=greenlet)
cpdef park(_CoroutineBase co, abort, what=*)

cpdef _defer(_CoroutineBase me, _CoroutineBase co)
