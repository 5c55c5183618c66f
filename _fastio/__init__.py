"""Compiled fast paths for storaged (Cython).

Exports exactly the names of :mod:`storaged._purefastio`, with the same
semantics; import :mod:`storaged.fastio` rather than this package so that
the pure-Python fallback is picked when the extensions are not built.
"""

from _fastio._bhs import decode_bhs, encode_bhs, encode_bhs_into
from _fastio._cdb import scsi_rw_decode
from _fastio._crc import crc32c
from _fastio._raid import gf_mul, pq_gen, raid6_recov_2data, raid6_recov_datap, xor_gen

__all__ = ["crc32c", "decode_bhs", "encode_bhs", "encode_bhs_into", "scsi_rw_decode"]
__all__ += ["gf_mul", "pq_gen", "raid6_recov_2data", "raid6_recov_datap", "xor_gen"]
