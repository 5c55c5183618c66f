"""Pure-Python reference for the RAID parity kernels of ``_fastio._raid``.

Re-exported by :mod:`storaged._purefastio`; the compiled versions have the
same names, arguments, results and exceptions (tests/test_raid_parity.py
checks them against each other).

Arithmetic is md's RAID-6 (H. Peter Anvin, "The mathematics of RAID-6"):
GF(2^8) with polynomial x^8+x^4+x^3+x^2+1 (0x11d) and generator g = 2.
P is the XOR of the data blocks; Q = sum over i of g**i * D_i.

No numpy: bulk XOR goes through Python's big integers and multiplication
by a constant through ``bytes.translate`` with a 256-entry table, both of
which run at C speed inside CPython.

Functions (every buffer must have the same length; outputs must be writable):

* ``xor_gen(dest, srcs)``: dest = XOR of srcs
* ``pq_gen(p, q, srcs)``: P and Q of srcs (srcs[i] gets coefficient g**i)
* ``gf_mul(dest, src, c, accumulate=False)``: dest = c*src (or dest ^= c*src)
* ``raid6_recov_2data(blocks, x, y)``: blocks = D_0..D_{n-1}, P, Q; rebuild
  data blocks x and y (x != y) in place from the others
* ``raid6_recov_datap(blocks, x)``: rebuild data block x and P from Q and the rest
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

__all__ = ["gf_mul", "pq_gen", "raid6_recov_2data", "raid6_recov_datap", "xor_gen"]

POLY = 0x11D


def _build_tables() -> tuple[list[int], list[int], list[int], list[bytes]]:
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    inv = [0] * 256
    for a in range(1, 256):
        inv[a] = exp[(255 - log[a]) % 255]

    def mul(a: int, b: int) -> int:
        if a == 0 or b == 0:
            return 0
        return exp[log[a] + log[b]]

    tables = [bytes(mul(c, v) for v in range(256)) for c in range(256)]
    return exp, log, inv, tables


GF_EXP, GF_LOG, GF_INV, MUL_TABLES = _build_tables()


def gf_mul_scalar(a: int, b: int) -> int:
    """a*b in GF(2^8)/0x11d."""
    return MUL_TABLES[a][b]


def _view(buf, name: str, writable: bool = False) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{name} must support the buffer protocol") from None
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    if writable and mv.readonly:
        raise TypeError(f"{name} must be writable")
    return mv


def _srcs(srcs: Sequence, length: int | None) -> tuple[list[memoryview], int]:
    if isinstance(srcs, (bytes, bytearray, memoryview)):
        raise TypeError("srcs must be a sequence of buffers")
    views = [_view(s, "srcs item") for s in srcs]
    if not views:
        raise ValueError("srcs must not be empty")
    n = len(views[0]) if length is None else length
    for v in views:
        if len(v) != n:
            raise ValueError("all buffers must have the same length")
    return views, n


def _to_int(b) -> int:  # noqa: ANN001
    return int.from_bytes(b, "little")


def xor_gen(dest, srcs) -> None:
    """dest = srcs[0] ^ srcs[1] ^ ... (all the same length)."""
    d = _view(dest, "dest", True)
    views, n = _srcs(srcs, len(d))
    acc = 0
    for v in views:
        acc ^= _to_int(v)
    d[:] = acc.to_bytes(n, "little")


def _mul2(b: bytes) -> bytes:
    return b.translate(MUL_TABLES[2])


def pq_gen(p, q, srcs) -> None:
    """P = XOR of srcs, Q = sum of g**i * srcs[i] (Horner's rule from the last block)."""
    pv = _view(p, "p", True)
    qv = _view(q, "q", True)
    views, n = _srcs(srcs, len(pv))
    if len(qv) != n:
        raise ValueError("all buffers must have the same length")
    pacc = 0
    qbytes = bytes(views[-1])
    pacc = _to_int(qbytes)
    for v in reversed(views[:-1]):
        vi = _to_int(v)
        pacc ^= vi
        qbytes = (_to_int(_mul2(qbytes)) ^ vi).to_bytes(n, "little")
    pv[:] = pacc.to_bytes(n, "little")
    qv[:] = qbytes


def gf_mul(dest, src, c, accumulate=False) -> None:
    """dest = c*src in GF(2^8), byte by byte (``accumulate``: dest ^= c*src)."""
    c = operator.index(c)
    if not 0 <= c <= 255:
        raise ValueError(f"c out of range: {c!r}")
    d = _view(dest, "dest", True)
    s = _view(src, "src")
    if len(s) != len(d):
        raise ValueError("all buffers must have the same length")
    prod = bytes(s).translate(MUL_TABLES[c])
    if accumulate:
        prod = (_to_int(prod) ^ _to_int(d)).to_bytes(len(d), "little")
    d[:] = prod


def _blocks(blocks: Sequence) -> tuple[list[memoryview], int]:
    if isinstance(blocks, (bytes, bytearray, memoryview)) or len(blocks) < 4:
        raise ValueError("blocks must be a sequence of at least 2 data blocks, P and Q")
    views = [_view(b, "blocks item") for b in blocks]
    n = len(views[0])
    if any(len(v) != n for v in views):
        raise ValueError("all buffers must have the same length")
    return views, n


def raid6_recov_2data(blocks, x, y) -> None:
    """Rebuild data blocks ``x`` and ``y`` from the other data blocks, P and Q.

    With Pxy/Qxy the P/Q of the surviving data (lost blocks as zeros) XORed
    with the stored P/Q: Dy = Pxy/(g**(y-x)+1) ... solved as in md's
    raid6_2data_recov: Dy = Pxy*g^x/(g^x+g^y) + Qxy/(g^x+g^y), Dx = Dy ^ Pxy.
    """
    views, n = _blocks(blocks)
    nd = len(views) - 2
    x, y = operator.index(x), operator.index(y)
    if not (0 <= x < nd and 0 <= y < nd) or x == y:
        raise ValueError("x and y must be two different data block indices")
    for i in (x, y):
        if views[i].readonly:
            raise TypeError("lost blocks must be writable")
    if x > y:
        x, y = y, x
    pacc = _to_int(views[nd])
    qacc = _to_int(views[nd + 1])
    zero = bytes(n)
    data = [zero if i in (x, y) else bytes(views[i]) for i in range(nd)]
    qz = data[-1]
    pz = _to_int(qz)
    for v in reversed(data[:-1]):
        vi = _to_int(v)
        pz ^= vi
        qz = (_to_int(_mul2(qz)) ^ vi).to_bytes(n, "little")
    pxy = (pacc ^ pz).to_bytes(n, "little")
    qxy = (qacc ^ _to_int(qz)).to_bytes(n, "little")
    denom_inv = GF_INV[GF_EXP[x] ^ GF_EXP[y]]
    a = gf_mul_scalar(GF_EXP[x], denom_inv)
    dy = _to_int(pxy.translate(MUL_TABLES[a])) ^ _to_int(qxy.translate(MUL_TABLES[denom_inv]))
    dx = dy ^ _to_int(pxy)
    views[x][:] = dx.to_bytes(n, "little")
    views[y][:] = dy.to_bytes(n, "little")


def raid6_recov_datap(blocks, x) -> None:
    """Rebuild data block ``x`` from Q and the other data blocks, then P."""
    views, n = _blocks(blocks)
    nd = len(views) - 2
    x = operator.index(x)
    if not 0 <= x < nd:
        raise ValueError("x must be a data block index")
    if views[x].readonly or views[nd].readonly:
        raise TypeError("lost blocks must be writable")
    zero = bytes(n)
    data = [zero if i == x else bytes(views[i]) for i in range(nd)]
    qz = data[-1]
    for v in reversed(data[:-1]):
        qz = (_to_int(_mul2(qz)) ^ _to_int(v)).to_bytes(n, "little")
    qx = (_to_int(views[nd + 1]) ^ _to_int(qz)).to_bytes(n, "little")
    dx = qx.translate(MUL_TABLES[GF_INV[GF_EXP[x]]])
    views[x][:] = dx
    data[x] = dx
    acc = 0
    for v in data:
        acc ^= _to_int(v)
    views[nd][:] = acc.to_bytes(n, "little")
