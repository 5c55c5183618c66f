# cython: language_level=3
"""Shared inline helpers for the _fastio extensions (argument conversion).

Integer fields are converted the way storaged._purefastio does it:
``operator.index()`` (TypeError for non-integers), then a range check that
raises ValueError, never OverflowError, so both implementations agree.
"""

from cpython.long cimport PyLong_Check
from cpython.number cimport PyNumber_Index


cdef extern from "Python.h":
    # Declared without an exception spec on purpose: errors are handled below.
    unsigned long long _as_ull "PyLong_AsUnsignedLongLong"(object v)
    void *PyErr_Occurred()
    void PyErr_Clear()


cdef inline unsigned long long as_field(object v, unsigned long long maxv, str name) \
        except? 0xFFFFFFFFFFFFFFFFULL:
    cdef unsigned long long r
    if not PyLong_Check(v):
        v = PyNumber_Index(v)
    r = _as_ull(v)
    if r == 0xFFFFFFFFFFFFFFFFULL and PyErr_Occurred() != NULL:
        PyErr_Clear()  # OverflowError: negative or wider than 64 bits
        raise ValueError(f"{name} out of range: {v!r}")
    if r > maxv:
        raise ValueError(f"{name} out of range: {v!r}")
    return r


cdef inline unsigned int be32(const unsigned char *p) noexcept nogil:
    return ((<unsigned int>p[0]) << 24) | ((<unsigned int>p[1]) << 16) \
        | ((<unsigned int>p[2]) << 8) | (<unsigned int>p[3])


cdef inline unsigned long long be64(const unsigned char *p) noexcept nogil:
    return ((<unsigned long long>be32(p)) << 32) | (<unsigned long long>be32(p + 4))


cdef inline void put32(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void put64(unsigned char *p, unsigned long long v) noexcept nogil:
    put32(p, <unsigned int>(v >> 32))
    put32(p + 4, <unsigned int>v)
