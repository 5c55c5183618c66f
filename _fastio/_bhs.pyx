# cython: language_level=3, boundscheck=False, wraparound=False
"""iSCSI Basic Header Segment (RFC 7143 section 11.2) generic codec.

Field tuple (16 items), identical to storaged._purefastio:
(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
 w20, w24, w28, w32, w36, w40, w44)
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.string cimport memcpy

from _fastio._util cimport as_field, be32, be64, put32, put64

cdef extern from "Python.h":
    Py_ssize_t PY_SSIZE_T_MAX

cdef enum:
    BHS_LEN = 48


cdef inline tuple _decode(const unsigned char *p):
    return (
        p[0] & 0x3F,
        (p[0] & 0x40) != 0,
        p[1],
        p[2],
        p[3],
        p[4],
        ((<unsigned int>p[5]) << 16) | ((<unsigned int>p[6]) << 8) | p[7],
        be64(p + 8),
        be32(p + 16),
        be32(p + 20),
        be32(p + 24),
        be32(p + 28),
        be32(p + 32),
        be32(p + 36),
        be32(p + 40),
        be32(p + 44),
    )


def decode_bhs(buf):
    """Decode the first 48 bytes of ``buf`` into the 16-field tuple."""
    cdef Py_buffer view
    if PyBytes_CheckExact(buf):
        if PyBytes_GET_SIZE(buf) < BHS_LEN:
            raise ValueError(f"BHS needs 48 bytes, got {PyBytes_GET_SIZE(buf)}")
        return _decode(<const unsigned char *>PyBytes_AS_STRING(buf))
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if view.len < BHS_LEN:
            raise ValueError(f"BHS needs 48 bytes, got {view.len}")
        return _decode(<const unsigned char *>view.buf)
    finally:
        PyBuffer_Release(&view)


cdef int _pack(unsigned char *p, object opcode, object immediate, object flags, object b2,
               object b3, object ahs_len, object data_len, object lun, object itt,
               object w20, object w24, object w28, object w32, object w36, object w40,
               object w44) except -1:
    cdef unsigned int op = <unsigned int>as_field(opcode, 0x3F, "opcode")
    if immediate:
        op |= 0x40
    cdef unsigned char f = <unsigned char>as_field(flags, 0xFF, "flags")
    cdef unsigned char c2 = <unsigned char>as_field(b2, 0xFF, "b2")
    cdef unsigned char c3 = <unsigned char>as_field(b3, 0xFF, "b3")
    cdef unsigned char ahs = <unsigned char>as_field(ahs_len, 0xFF, "ahs_len")
    cdef unsigned int dlen = <unsigned int>as_field(data_len, 0xFFFFFF, "data_len")
    cdef unsigned long long l = as_field(lun, 0xFFFFFFFFFFFFFFFFULL, "lun")
    cdef unsigned int v16 = <unsigned int>as_field(itt, 0xFFFFFFFFULL, "itt")
    cdef unsigned int v20 = <unsigned int>as_field(w20, 0xFFFFFFFFULL, "w20")
    cdef unsigned int v24 = <unsigned int>as_field(w24, 0xFFFFFFFFULL, "w24")
    cdef unsigned int v28 = <unsigned int>as_field(w28, 0xFFFFFFFFULL, "w28")
    cdef unsigned int v32 = <unsigned int>as_field(w32, 0xFFFFFFFFULL, "w32")
    cdef unsigned int v36 = <unsigned int>as_field(w36, 0xFFFFFFFFULL, "w36")
    cdef unsigned int v40 = <unsigned int>as_field(w40, 0xFFFFFFFFULL, "w40")
    cdef unsigned int v44 = <unsigned int>as_field(w44, 0xFFFFFFFFULL, "w44")
    p[0] = <unsigned char>op
    p[1] = f
    p[2] = c2
    p[3] = c3
    p[4] = ahs
    p[5] = <unsigned char>(dlen >> 16)
    p[6] = <unsigned char>(dlen >> 8)
    p[7] = <unsigned char>dlen
    put64(p + 8, l)
    put32(p + 16, v16)
    put32(p + 20, v20)
    put32(p + 24, v24)
    put32(p + 28, v28)
    put32(p + 32, v32)
    put32(p + 36, v36)
    put32(p + 40, v40)
    put32(p + 44, v44)
    return 0


def encode_bhs(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
               w20, w24, w28, w32, w36, w40, w44):
    """Encode the 16 fields into a new 48-byte ``bytes`` (inverse of decode_bhs)."""
    cdef unsigned char tmp[BHS_LEN]
    _pack(tmp, opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
          w20, w24, w28, w32, w36, w40, w44)
    return PyBytes_FromStringAndSize(<char *>tmp, BHS_LEN)


def encode_bhs_into(buf, offset, opcode, immediate, flags, b2, b3, ahs_len, data_len,
                    lun, itt, w20, w24, w28, w32, w36, w40, w44):
    """Encode the 16 fields into writable ``buf`` at ``offset``; returns None."""
    cdef unsigned char tmp[BHS_LEN]
    cdef Py_buffer view
    cdef Py_ssize_t off
    _pack(tmp, opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
          w20, w24, w28, w32, w36, w40, w44)
    off = <Py_ssize_t>as_field(offset, <unsigned long long>PY_SSIZE_T_MAX, "offset")
    try:
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    except BufferError as exc:
        raise TypeError(f"buffer must be writable and C-contiguous: {exc}") from None
    try:
        if off > view.len - BHS_LEN:
            raise ValueError(
                f"buffer too small: need {off + BHS_LEN} bytes, have {view.len}")
        memcpy(<unsigned char *>view.buf + off, tmp, BHS_LEN)
    finally:
        PyBuffer_Release(&view)

