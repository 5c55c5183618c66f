# cython: language_level=3, boundscheck=False, wraparound=False
"""LBA / transfer length extraction for SBC READ, WRITE, VERIFY CDBs."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

from _fastio._util cimport be32, be64


cdef tuple _rw(const unsigned char *p, Py_ssize_t n):
    cdef unsigned char op
    cdef unsigned int blocks
    if n < 1:
        raise ValueError("empty CDB")
    op = p[0]
    if op == 0x08 or op == 0x0A:  # READ(6), WRITE(6)
        if n < 6:
            raise ValueError(f"CDB too short for opcode 0x{op:02x}: {n} bytes")
        blocks = p[4]
        if blocks == 0:
            blocks = 256
        return (((<unsigned int>p[1] & 0x1F) << 16) | (<unsigned int>p[2] << 8) | p[3],
                blocks, 0)
    if op == 0x28 or op == 0x2A or op == 0x2F or op == 0x2E:  # (10)
        if n < 10:
            raise ValueError(f"CDB too short for opcode 0x{op:02x}: {n} bytes")
        return (be32(p + 2), (<unsigned int>p[7] << 8) | p[8], p[1])
    if op == 0xA8 or op == 0xAA or op == 0xAF or op == 0xAE:  # (12)
        if n < 12:
            raise ValueError(f"CDB too short for opcode 0x{op:02x}: {n} bytes")
        return (be32(p + 2), be32(p + 6), p[1])
    if op == 0x88 or op == 0x8A or op == 0x8F or op == 0x8E:  # (16)
        if n < 16:
            raise ValueError(f"CDB too short for opcode 0x{op:02x}: {n} bytes")
        return (be64(p + 2), be32(p + 10), p[1])
    raise ValueError(f"not a READ/WRITE/VERIFY CDB: opcode 0x{op:02x}")


def scsi_rw_decode(cdb):
    """Return ``(lba, blocks, flags_byte)`` for a READ/WRITE/VERIFY 6/10/12/16 CDB."""
    cdef Py_buffer view
    PyObject_GetBuffer(cdb, &view, PyBUF_SIMPLE)
    try:
        return _rw(<const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
