# C declarations for the compiled build of comutex.py (see coroutine.pxd).

cimport cython

from corun._greenlet cimport greenlet, getcurrent
from corun._greenlet cimport greenlet_init as _greenlet_init
from corun.coroutine cimport _CoGreenlet, _CoroutineBase


cdef class CoMutex:
    cdef object __weakref__
    cdef public object _next_held
    cdef public object _taken
    cdef public object _waiters
    cdef public object holder

    @cython.locals(g=_CoGreenlet, co=_CoroutineBase)
    cpdef bint acquire(self, timeout=*) except -1

    @cython.locals(g=_CoGreenlet, co=_CoroutineBase)
    cpdef release(self, exc_type=*, exc=*, tb=*)

    cpdef _hand_on(self)
    cpdef bint _hand_off(self, _CoroutineBase head) except -1
