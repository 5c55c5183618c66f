"""Pure-Python reference for the ``_fastio`` extensions.

Same names, same results, same exception types as the compiled package
(tests/test_fastio.py checks both against each other).  Import
:mod:`storaged.fastio` to get whichever implementation is available.

Conventions shared with ``_fastio``:

* buffers are anything supporting the buffer protocol and C-contiguous
  (bytes, bytearray, memoryview, array, mmap ...);
* integer arguments go through ``operator.index`` (TypeError for floats and
  other non-integers) and an out-of-range value raises ValueError;
* a buffer that is too short raises ValueError.
"""

from __future__ import annotations

import operator
import struct

__all__ = ["crc32c", "decode_bhs", "encode_bhs", "encode_bhs_into", "scsi_rw_decode"]
# RAID parity kernels live in their own module; same names as _fastio._raid.
from storaged._pureraid import (  # noqa: E402
    gf_mul,
    pq_gen,
    raid6_recov_2data,
    raid6_recov_datap,
    xor_gen,
)

__all__ += ["gf_mul", "pq_gen", "raid6_recov_2data", "raid6_recov_datap", "xor_gen"]

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_SSIZE_MAX = 2**63 - 1
BHS_LEN = 48


def _field(value, maxv: int, name: str) -> int:
    v = operator.index(value)
    if v < 0 or v > maxv:
        raise ValueError(f"{name} out of range: {v!r}")
    return v


# --------------------------------------------------------------------------- CRC32C

_POLY = 0x82F63B78  # Castagnoli 0x1EDC6F41, bit-reflected


def _make_tables() -> tuple[tuple[int, ...], ...]:
    t0 = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t0.append(c)
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([t0[c & 0xFF] ^ (c >> 8) for c in prev])
    return tuple(tuple(t) for t in tables)


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _make_tables()


def crc32c(data, value=0) -> int:
    """CRC32C of ``data`` continuing from ``value`` (zlib.crc32 style).

    ``crc32c(b, crc32c(a)) == crc32c(a + b)``; ``crc32c(b"123456789") == 0xE3069283``.
    iSCSI puts the result on the wire least-significant byte first.

    Slicing-by-8 over a zip of one byte iterator: about 1.7x faster than the
    byte-at-a-time table loop in CPython (and faster than struct.iter_unpack).
    """
    crc = _field(value, _U32, "value") ^ _U32
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError("crc32c: buffer is not C-contiguous")
    raw = data if type(data) is bytes else mv.tobytes()
    t0, t1, t2, t3, t4, t5, t6, t7 = _T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7
    it = iter(raw)
    # zip() stops at the last full group of 8; the tail is redone below.
    for a, b, c, d, e, f, g, h in zip(it, it, it, it, it, it, it, it, strict=False):
        crc = (
            t7[(crc ^ a) & 0xFF] ^ t6[((crc >> 8) ^ b) & 0xFF]
            ^ t5[((crc >> 16) ^ c) & 0xFF] ^ t4[(crc >> 24) ^ d]
            ^ t3[e] ^ t2[f] ^ t1[g] ^ t0[h]
        )
    for b in raw[len(raw) & ~7:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


# --------------------------------------------------------------------------- BHS

# byte0 byte1 byte2 byte3 ahs_len dlen_hi dlen_lo16 lun itt w20..w44
_BHS = struct.Struct(">BBBBBBHQI7I")
assert _BHS.size == BHS_LEN


def decode_bhs(buf) -> tuple:
    """Decode the first 48 bytes of ``buf`` (RFC 7143 section 11.2) into 16 fields.

    ``(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
    w20, w24, w28, w32, w36, w40, w44)``: opcode is byte 0 & 0x3F, immediate
    is bit 0x40 of byte 0, ahs_len is TotalAHSLength in 4-byte words,
    data_len the 24-bit DataSegmentLength, lun bytes 8..15 as an unsigned
    big-endian integer, itt and wNN big-endian u32 at those byte offsets.
    """
    try:
        b0, b1, b2, b3, ahs, dhi, dlo, lun, itt, *words = _BHS.unpack_from(buf)
    except struct.error:
        raise ValueError(f"BHS needs 48 bytes, got {memoryview(buf).nbytes}") from None
    return (b0 & 0x3F, bool(b0 & 0x40), b1, b2, b3, ahs, (dhi << 16) | dlo, lun, itt, *words)


def _pack(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
          w20, w24, w28, w32, w36, w40, w44) -> bytes:
    byte0 = _field(opcode, 0x3F, "opcode")
    if immediate:
        byte0 |= 0x40
    flags = _field(flags, 0xFF, "flags")
    b2 = _field(b2, 0xFF, "b2")
    b3 = _field(b3, 0xFF, "b3")
    ahs_len = _field(ahs_len, 0xFF, "ahs_len")
    data_len = _field(data_len, 0xFFFFFF, "data_len")
    lun = _field(lun, _U64, "lun")
    itt = _field(itt, _U32, "itt")
    words = [
        _field(w20, _U32, "w20"),
        _field(w24, _U32, "w24"),
        _field(w28, _U32, "w28"),
        _field(w32, _U32, "w32"),
        _field(w36, _U32, "w36"),
        _field(w40, _U32, "w40"),
        _field(w44, _U32, "w44"),
    ]
    return _BHS.pack(byte0, flags, b2, b3, ahs_len, data_len >> 16, data_len & 0xFFFF,
                     lun, itt, *words)


def encode_bhs(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
               w20, w24, w28, w32, w36, w40, w44) -> bytes:
    """Encode the 16 fields into a new 48-byte ``bytes`` (inverse of decode_bhs)."""
    return _pack(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
                 w20, w24, w28, w32, w36, w40, w44)


def encode_bhs_into(buf, offset, opcode, immediate, flags, b2, b3, ahs_len, data_len,
                    lun, itt, w20, w24, w28, w32, w36, w40, w44) -> None:
    """Encode the 16 fields into writable ``buf`` at byte ``offset``; returns None."""
    data = _pack(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
                 w20, w24, w28, w32, w36, w40, w44)
    off = _field(offset, _SSIZE_MAX, "offset")
    mv = memoryview(buf)
    if mv.readonly or not mv.c_contiguous:
        raise TypeError("buffer must be writable and C-contiguous")
    if off > mv.nbytes - BHS_LEN:
        raise ValueError(f"buffer too small: need {off + BHS_LEN} bytes, have {mv.nbytes}")
    _RAW48.pack_into(buf, off, data)


_RAW48 = struct.Struct("48s")


# --------------------------------------------------------------------------- CDB

_CDB_OP = struct.Struct(">B")
_CDB6 = struct.Struct(">BBHBB")  # op, lba[20:16], lba[15:0], length, control
_CDB10 = struct.Struct(">BBIBHB")  # op, flags, lba, group, length, control
_CDB12 = struct.Struct(">BBIIBB")  # op, flags, lba, length, group, control
_CDB16 = struct.Struct(">BBQIBB")  # op, flags, lba, length, group, control

_RW6 = frozenset((0x08, 0x0A))  # READ(6), WRITE(6)
_RW10 = frozenset((0x28, 0x2A, 0x2F, 0x2E))  # READ, WRITE, VERIFY, WRITE AND VERIFY (10)
_RW12 = frozenset((0xA8, 0xAA, 0xAF, 0xAE))
_RW16 = frozenset((0x88, 0x8A, 0x8F, 0x8E))


def scsi_rw_decode(cdb) -> tuple[int, int, int]:
    """``(lba, blocks, flags_byte)`` of a READ/WRITE/VERIFY/WRITE AND VERIFY CDB.

    6-byte CDBs: 21-bit LBA, a length of 0 means 256 blocks, flags_byte is 0.
    10/12/16-byte CDBs: flags_byte is byte 1 (DPO, FUA, protection bits ...).
    Unknown opcode or a CDB shorter than its opcode needs: ValueError.
    """
    try:
        (op,) = _CDB_OP.unpack_from(cdb)
    except struct.error:
        raise ValueError("empty CDB") from None
    try:
        if op in _RW6:
            _, hi, lo, length, _ = _CDB6.unpack_from(cdb)
            return ((hi & 0x1F) << 16) | lo, length or 256, 0
        if op in _RW10:
            _, flags, lba, _, length, _ = _CDB10.unpack_from(cdb)
            return lba, length, flags
        if op in _RW12:
            _, flags, lba, length, _, _ = _CDB12.unpack_from(cdb)
            return lba, length, flags
        if op in _RW16:
            _, flags, lba, length, _, _ = _CDB16.unpack_from(cdb)
            return lba, length, flags
    except struct.error:
        n = memoryview(cdb).nbytes
        raise ValueError(f"CDB too short for opcode 0x{op:02x}: {n} bytes") from None
    raise ValueError(f"not a READ/WRITE/VERIFY CDB: opcode 0x{op:02x}")
