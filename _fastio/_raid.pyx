# cython: language_level=3, boundscheck=False, wraparound=False
"""RAID-5/6 parity kernels (XOR, P+Q, GF(2^8) multiply, 1/2-block recovery).

The C code (src/raid_impl.c) picks AVX-512BW (+GFNI for multiplications by
a constant), AVX2 or portable C at import time.  Semantics, argument checks
and exceptions match :mod:`storaged._pureraid` exactly.
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc

from operator import index as _index


cdef extern from "src/raid_impl.h":
    int RAID_MAX_SRCS
    void raid_init()
    void raid_xor_gen(int n, size_t len, const uint8_t *const *srcs, uint8_t *dest) nogil
    void raid_pq_gen(int n, size_t len, const uint8_t *const *srcs, uint8_t *p,
                     uint8_t *q) nogil
    void raid_gf_mul(uint8_t c, size_t len, const uint8_t *src, uint8_t *dest,
                     int accumulate) nogil
    int raid_recov_2data(int nd, size_t len, uint8_t **blocks, int x, int y) nogil
    int raid_recov_datap(int nd, size_t len, uint8_t **blocks, int x) nogil
    const char *raid_backend()
    int raid_set_backend(const char *name)


raid_init()

# Work on buffers at least this long runs with the GIL released.
cdef Py_ssize_t NOGIL_MIN = 64 * 1024


cdef class _Views:
    """Holds Py_buffers for a call and releases them all."""
    cdef Py_buffer *bufs
    cdef uint8_t **ptrs
    cdef int n
    cdef int got

    def __cinit__(self, int n):
        self.bufs = <Py_buffer *>malloc(sizeof(Py_buffer) * (n if n > 0 else 1))
        self.ptrs = <uint8_t **>malloc(sizeof(uint8_t *) * (n if n > 0 else 1))
        if self.bufs == NULL or self.ptrs == NULL:
            raise MemoryError()
        self.n = n
        self.got = 0

    cdef Py_ssize_t add(self, object obj, bint writable, str name) except -1:
        if not PyObject_CheckBuffer(obj):
            raise TypeError(f"{name} must support the buffer protocol")
        try:
            PyObject_GetBuffer(obj, &self.bufs[self.got],
                               PyBUF_SIMPLE | (PyBUF_WRITABLE if writable else 0))
        except BufferError:
            if writable:
                raise TypeError(f"{name} must be writable") from None
            raise ValueError(f"{name} must be C-contiguous") from None
        self.ptrs[self.got] = <uint8_t *>self.bufs[self.got].buf
        self.got += 1
        return self.bufs[self.got - 1].len

    def __dealloc__(self):
        cdef int i
        if self.bufs != NULL:
            for i in range(self.got):
                PyBuffer_Release(&self.bufs[i])
            free(self.bufs)
        if self.ptrs != NULL:
            free(self.ptrs)


cdef list _seq(object srcs, str what):
    if isinstance(srcs, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a sequence of buffers")
    return list(srcs)


def xor_gen(dest, srcs):
    """dest = srcs[0] ^ srcs[1] ^ ... (all buffers the same length)."""
    cdef list items = _seq(srcs, "srcs")
    cdef int n = len(items)
    if n == 0:
        raise ValueError("srcs must not be empty")
    if n > RAID_MAX_SRCS:
        raise ValueError(f"at most {RAID_MAX_SRCS} sources")
    cdef _Views v = _Views(n + 1)
    cdef Py_ssize_t length = v.add(dest, True, "dest")
    cdef int i
    for i in range(n):
        if v.add(items[i], False, "srcs item") != length:
            raise ValueError("all buffers must have the same length")
    cdef uint8_t *d = v.ptrs[0]
    cdef const uint8_t *const *s = <const uint8_t *const *>(v.ptrs + 1)
    if length >= NOGIL_MIN:
        with nogil:
            raid_xor_gen(n, <size_t>length, s, d)
    else:
        raid_xor_gen(n, <size_t>length, s, d)


def pq_gen(p, q, srcs):
    """P = XOR of srcs, Q = sum of g**i * srcs[i] in GF(2^8)/0x11d."""
    cdef list items = _seq(srcs, "srcs")
    cdef int n = len(items)
    if n == 0:
        raise ValueError("srcs must not be empty")
    if n > RAID_MAX_SRCS:
        raise ValueError(f"at most {RAID_MAX_SRCS} sources")
    cdef _Views v = _Views(n + 2)
    cdef Py_ssize_t length = v.add(p, True, "p")
    if v.add(q, True, "q") != length:
        raise ValueError("all buffers must have the same length")
    cdef int i
    for i in range(n):
        if v.add(items[i], False, "srcs item") != length:
            raise ValueError("all buffers must have the same length")
    cdef const uint8_t *const *s = <const uint8_t *const *>(v.ptrs + 2)
    if length >= NOGIL_MIN:
        with nogil:
            raid_pq_gen(n, <size_t>length, s, v.ptrs[0], v.ptrs[1])
    else:
        raid_pq_gen(n, <size_t>length, s, v.ptrs[0], v.ptrs[1])


def gf_mul(dest, src, c, accumulate=False):
    """dest = c*src in GF(2^8) byte by byte (``accumulate``: dest ^= c*src)."""
    cdef object ci = _index(c)
    if not 0 <= ci <= 255:
        raise ValueError(f"c out of range: {ci!r}")
    cdef int acc = 1 if accumulate else 0
    cdef _Views v = _Views(2)
    cdef Py_ssize_t length = v.add(dest, True, "dest")
    if v.add(src, False, "src") != length:
        raise ValueError("all buffers must have the same length")
    cdef uint8_t cc = <uint8_t>ci
    if length >= NOGIL_MIN:
        with nogil:
            raid_gf_mul(cc, <size_t>length, v.ptrs[1], v.ptrs[0], acc)
    else:
        raid_gf_mul(cc, <size_t>length, v.ptrs[1], v.ptrs[0], acc)


cdef _Views _blocks(object blocks, set writable, Py_ssize_t *length):
    if isinstance(blocks, (bytes, bytearray, memoryview)):
        raise ValueError("blocks must be a sequence of at least 2 data blocks, P and Q")
    cdef list items = list(blocks)
    cdef int n = len(items)
    if n < 4:
        raise ValueError("blocks must be a sequence of at least 2 data blocks, P and Q")
    if n - 2 > RAID_MAX_SRCS:
        raise ValueError(f"at most {RAID_MAX_SRCS} data blocks")
    cdef _Views v = _Views(n)
    cdef int i
    cdef Py_ssize_t ln
    for i in range(n):
        try:
            ln = v.add(items[i], i in writable, "blocks item")
        except TypeError:
            if i in writable and PyObject_CheckBuffer(items[i]):
                raise TypeError("lost blocks must be writable") from None
            raise
        if i == 0:
            length[0] = ln
        elif ln != length[0]:
            raise ValueError("all buffers must have the same length")
    return v


def raid6_recov_2data(blocks, x, y):
    """Rebuild data blocks x and y (blocks = D_0..D_{n-1}, P, Q) in place."""
    cdef object xi = _index(x)
    cdef object yi = _index(y)
    cdef Py_ssize_t nb = len(blocks) if not isinstance(
        blocks, (bytes, bytearray, memoryview)) else 0
    if nb < 4:
        raise ValueError("blocks must be a sequence of at least 2 data blocks, P and Q")
    cdef int nd = nb - 2
    if not (0 <= xi < nd and 0 <= yi < nd) or xi == yi:
        raise ValueError("x and y must be two different data block indices")
    cdef Py_ssize_t length = 0
    cdef _Views v = _blocks(blocks, {xi, yi}, &length)
    cdef int rc
    cdef int xx = xi, yy = yi
    with nogil:
        rc = raid_recov_2data(nd, <size_t>length, v.ptrs, xx, yy)
    if rc:
        raise MemoryError()


def raid6_recov_datap(blocks, x):
    """Rebuild data block x and P from Q and the other data blocks."""
    cdef object xi = _index(x)
    cdef Py_ssize_t nb = len(blocks) if not isinstance(
        blocks, (bytes, bytearray, memoryview)) else 0
    if nb < 4:
        raise ValueError("blocks must be a sequence of at least 2 data blocks, P and Q")
    cdef int nd = nb - 2
    if not 0 <= xi < nd:
        raise ValueError("x must be a data block index")
    cdef Py_ssize_t length = 0
    cdef _Views v = _blocks(blocks, {xi, nd}, &length)
    cdef int rc
    cdef int xx = xi
    with nogil:
        rc = raid_recov_datap(nd, <size_t>length, v.ptrs, xx)
    if rc:
        raise MemoryError()


def backend():
    """The kernels in use on this CPU, e.g. "avx512bw+gfni", "avx2" or "generic"."""
    return raid_backend().decode("ascii")


def _set_backend(name):
    """Force "avx512", "avx2", "generic" or "" (best) for tests; ValueError if unsupported."""
    if raid_set_backend(name.encode("ascii")) != 0:
        raise ValueError(f"backend {name!r} is not supported on this CPU")
