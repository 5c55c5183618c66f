"""RAID benchmark: parity kernels next to ISA-L and memcpy, and array I/O next to a raw member.

``python -m storaged.bench raid [--mib N] [--io-mib N] [--quick]``

1. Parity on a working set of ``--mib`` MiB (default 256) split into 8 data
   blocks: storaged's ``xor_gen`` and ``pq_gen`` (the ``storaged.fastio``
   implementation in use) next to ISA-L's ``xor_gen``/``pq_gen`` from
   Debian's libisal2 (loaded with ctypes) and a plain memcpy of the same
   bytes.  GB/s counts data bytes in per second; best of several runs.
2. Sequential (1 MiB, then whole stripes: a rewrite in stripe-aligned
   full-stripe writes, which skip the journal) and random (4 KiB) reads
   and writes through RAID-5
   (4 members) and RAID-6 (6 members) arrays of files (512 KiB chunks), next
   to the same I/O on one raw member file (page cache: this measures the
   software path).  Each level runs with the default write-intent bitmap and
   stripe journal (async), with the journal in sync (FUA) mode, without the
   journal, and without either, so the cost of closing the write hole shows
   in the same run.

The last line is ``min ratio storaged/isal: X.XX`` (the lower of the XOR
and P+Q ratios), or ``min ratio storaged/isal: n/a`` without libisal2.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable

from storaged import fastio

NDATA = 8


def _best(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm up (page faults, CPU frequency)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _isal() -> ctypes.CDLL | None:
    for name in ("libisal.so.2", ctypes.util.find_library("isal") or ""):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        for fn in (lib.pq_gen, lib.xor_gen):
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
        return lib
    return None


def parity(total_mib: int, runs: int) -> tuple[list[tuple[str, float]], float | None]:
    """Rows of (label, GB/s) and the min storaged/isal ratio (None without ISA-L)."""
    blk = (total_mib << 20) // NDATA
    blk -= blk % 4096
    maps = [mmap.mmap(-1, blk) for _ in range(NDATA + 2)]   # page aligned
    for m in maps[:NDATA]:
        for off in range(0, blk, 1 << 20):
            n = min(1 << 20, blk - off)
            m[off:off + n] = os.urandom(n)
    data = [memoryview(m) for m in maps[:NDATA]]
    p, q = memoryview(maps[NDATA]), memoryview(maps[NDATA + 1])
    nbytes = NDATA * blk
    rows: list[tuple[str, float]] = []

    def rate(t: float) -> float:
        return nbytes / t / 1e9

    dst = mmap.mmap(-1, nbytes)
    src = mmap.mmap(-1, nbytes)
    src[:blk] = maps[0][:]
    a_dst = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    a_src = ctypes.addressof(ctypes.c_char.from_buffer(src))
    t_memcpy = _best(lambda: ctypes.memmove(a_dst, a_src, nbytes), runs)
    rows.append(("memcpy (same bytes)", rate(t_memcpy)))
    t_xor = _best(lambda: fastio.xor_gen(p, data), runs)
    t_pq = _best(lambda: fastio.pq_gen(p, q, data), runs)
    rows.append((f"storaged xor_gen ({fastio.IMPLEMENTATION})", rate(t_xor)))
    rows.append((f"storaged pq_gen ({fastio.IMPLEMENTATION})", rate(t_pq)))
    lib = _isal()
    ratio = None
    if lib is not None:
        holders = [ctypes.c_char.from_buffer(m) for m in maps]
        ptrs = (ctypes.c_void_p * (NDATA + 2))(*[ctypes.addressof(h) for h in holders])
        t_ixor = _best(lambda: lib.xor_gen(NDATA + 1, blk, ptrs), runs)
        t_ipq = _best(lambda: lib.pq_gen(NDATA + 2, blk, ptrs), runs)
        rows.append(("ISA-L xor_gen", rate(t_ixor)))
        rows.append(("ISA-L pq_gen", rate(t_ipq)))
        ratio = min(t_ixor / t_xor, t_ipq / t_pq)
        del holders, ptrs
    for v in (data, [p, q]):
        for x in v:
            x.release()
    for m in maps:
        m.close()
    return rows, ratio


def _io(dev, size: int, seconds: float) -> dict[str, float]:  # noqa: ANN001
    """MB/s for sequential 1 MiB and full-stripe writes, 1 MiB reads; IOPS for random 4 KiB."""
    out: dict[str, float] = {}
    big = os.urandom(1 << 20)
    span = size - size % (1 << 20)
    t = time.perf_counter()
    for off in range(0, span, 1 << 20):
        dev.write(off, big)
    out["seq write MB/s"] = span / (time.perf_counter() - t) / 1e6
    # Whole stripes, stripe-aligned (data chunks x chunk size; 1 MiB on a raw
    # member): the full-stripe path, which needs no reads and no journal.
    geo = getattr(dev, "geo", None)
    stripe = geo.data_disks * geo.chunk if geo is not None and geo.level in (4, 5, 6) \
        else 1 << 20
    whole = os.urandom(stripe)
    sspan = size - size % stripe
    t = time.perf_counter()
    for off in range(0, sspan, stripe):
        dev.write(off, whole)
    out["stripe write MB/s"] = sspan / (time.perf_counter() - t) / 1e6
    t = time.perf_counter()
    for off in range(0, span, 1 << 20):
        dev.read(off, 1 << 20)
    out["seq read MB/s"] = span / (time.perf_counter() - t) / 1e6
    rnd = random.Random(1)
    small = os.urandom(4096)
    for name, op in (("rand write IOPS", lambda o: dev.write(o, small)),
                     ("rand read IOPS", lambda o: dev.read(o, 4096))):
        n = 0
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            for _ in range(64):
                op(rnd.randrange(size // 4096) * 4096)
            n += 64
        out[name] = n / (time.perf_counter() - t)
    return out


def block_layer(io_mib: int, seconds: float) -> list[tuple[str, dict[str, float]]]:
    from storaged.block.file import FileBlockDevice
    from storaged.raid.manage import create, size_for_capacity

    tmp = tempfile.mkdtemp(prefix="storaged-bench-raid-")
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        raw = FileBlockDevice(os.path.join(tmp, "raw"), create_size=io_mib << 20)
        rows.append(("one raw member", _io(raw, io_mib << 20, seconds)))
        raw.close()
        variants = (("", {}), (", journal sync", {"journal": "sync"}),
                    (", no journal", {"journal": False}),
                    (", no journal/bitmap", {"journal": False, "bitmap": False}))
        for level, n in ((5, 4), (6, 6)):
            per = size_for_capacity(io_mib << 20, level, n)
            for tag, opts in variants:
                paths = [os.path.join(tmp, f"r{level}{len(tag)}-{i}") for i in range(n)]
                arr = create(f"bench{level}", paths, level, size=per, **opts)
                rows.append((f"raid{level} ({n} members{tag})",
                             _io(arr, io_mib << 20, seconds)))
                arr.close()
                for p in paths:
                    os.unlink(p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m storaged.bench raid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="parity working set (MiB)")
    ap.add_argument("--io-mib", type=int, default=128, help="array size for the I/O part")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.io_mib, args.runs = 16, 8, 2
    seconds = 0.3 if args.quick else 2.0
    backend = ""
    try:
        import _fastio._raid as craid
        backend = craid.backend()
    except ImportError:
        pass
    print(f"RAID parity: {NDATA} data blocks, {args.mib} MiB working set, fast path "
          f"{fastio.IMPLEMENTATION}{' (' + backend + ')' if backend else ''}")
    rows, ratio = parity(args.mib, args.runs)
    for label, gbs in rows:
        print(f"  {label:<32} {gbs:8.2f} GB/s")
    print()
    print(f"Block layer: {args.io_mib} MiB, sequential 1 MiB and random 4 KiB I/O "
          "(page cache)")
    io_rows = block_layer(args.io_mib, seconds)
    keys = list(io_rows[0][1])
    print("  " + f"{'device':<36}" + "".join(f"{k:>19}" for k in keys))
    for label, vals in io_rows:
        print("  " + f"{label:<36}" + "".join(f"{vals[k]:19.0f}" for k in keys))
    print()
    if ratio is None:
        print("ISA-L (Debian package libisal2) not found: no comparison")
        print("min ratio storaged/isal: n/a")
    else:
        print(f"min ratio storaged/isal: {ratio:.2f}")
    return 0
