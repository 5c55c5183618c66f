"""Fast-path loader: the compiled ``_fastio`` package or the pure reference.

``STORAGED_NO_EXTENSIONS=1`` forces the pure-Python module
(:mod:`storaged._purefastio`); otherwise ``_fastio`` is used when it was
built (``pip install -e .``), falling back to pure Python on ImportError.
``IMPLEMENTATION`` says which one was loaded: ``"compiled"`` or ``"pure"``.

Functions (identical in both implementations):

* ``crc32c(data, value=0) -> int``
* ``decode_bhs(buf) -> tuple`` (16 fields)
* ``encode_bhs(opcode, immediate, flags, b2, b3, ahs_len, data_len, lun, itt,
  w20, w24, w28, w32, w36, w40, w44) -> bytes``
* ``encode_bhs_into(buf, offset, <the same 16 fields>) -> None``
* ``scsi_rw_decode(cdb) -> (lba, blocks, flags_byte)``
* RAID parity: ``xor_gen``, ``pq_gen``, ``gf_mul``, ``raid6_recov_2data``,
  ``raid6_recov_datap`` (see :mod:`storaged._pureraid`)
"""

from __future__ import annotations

import os

__all__ = [
    "IMPLEMENTATION",
    "crc32c",
    "decode_bhs",
    "encode_bhs",
    "encode_bhs_into",
    "scsi_rw_decode",
    "xor_gen", "pq_gen", "gf_mul", "raid6_recov_2data", "raid6_recov_datap",
]


def extensions_disabled() -> bool:
    """True when STORAGED_NO_EXTENSIONS asks for the pure-Python fast path."""
    flag = os.environ.get("STORAGED_NO_EXTENSIONS", "").strip().lower()
    return flag not in ("", "0", "false", "no")


if extensions_disabled():
    from storaged import _purefastio as _impl

    IMPLEMENTATION = "pure"
else:
    try:
        import _fastio as _impl

        IMPLEMENTATION = "compiled"
    except ImportError:
        from storaged import _purefastio as _impl

        IMPLEMENTATION = "pure"

crc32c = _impl.crc32c
decode_bhs = _impl.decode_bhs
encode_bhs = _impl.encode_bhs
encode_bhs_into = _impl.encode_bhs_into
scsi_rw_decode = _impl.scsi_rw_decode
# RAID parity (see storaged._pureraid for the semantics)
xor_gen = _impl.xor_gen
pq_gen = _impl.pq_gen
gf_mul = _impl.gf_mul
raid6_recov_2data = _impl.raid6_recov_2data
raid6_recov_datap = _impl.raid6_recov_datap
