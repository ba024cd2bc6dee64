# greenlet's C API for the compiled kernel (see _mode.py). A .pxd only:
# inline functions, no module of their own. Each compiled module that
# cimports them calls greenlet_init() once at import (PyGreenlet_Import
# fills a table that is static to each C file).

cdef extern from "greenlet/greenlet.h":
    ctypedef class greenlet.greenlet [object PyGreenlet]:
        pass

    greenlet PyGreenlet_GetCurrent()
    object PyGreenlet_Switch(greenlet self, void* args, void* kwargs)
    void PyGreenlet_Import()


cdef inline greenlet getcurrent():
    return PyGreenlet_GetCurrent()


cdef inline object switch(greenlet g):
    return PyGreenlet_Switch(g, NULL, NULL)


cdef inline void greenlet_init():
    PyGreenlet_Import()
