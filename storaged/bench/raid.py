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

3. ``--iscsi``: the same small writes through iSCSI, on one storaged daemon
   (127.0.0.1, ``--port``) exporting a plain 1 GiB file LUN and a RAID-5 LUN
   like ``storaged demo``'s (4 sparse members, 512 KiB chunk, bitmap + async
   journal).  ``qemu-img bench`` 4 KiB writes at QD32, sequential (its
   default, the issue's "4k write QD32" row) and scattered (a 1 MiB + 4 KiB
   step: every write in another stripe row), alternating plain file, RAID-5
   with the stripe cache and RAID-5 with ``raid cache --size 0`` in one
   run; it prints each side's median and the RAID-5/plain-file ratios.

The last line is ``min ratio storaged/isal: X.XX`` (the lower of the XOR
and P+Q ratios), or ``min ratio storaged/isal: n/a`` without libisal2
(with ``--iscsi`` only: ``min ratio raid5/plain: X.XX`` over the cached rows).
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


ISCSI_PORT = 3297
LUN_IQN = "iqn.2026-11.org.storaged:raidbench"
SCATTER_STEP = (1 << 20) + 4096


def _lun_daemon(workdir: str, port: int):  # noqa: ANN202 - a context manager
    """``storaged serve`` with LUN 0 on a plain 1 GiB file and LUN 1 on a RAID-5 array."""
    import contextlib
    import subprocess
    import sys

    from storaged.bench.iscsi import (
        STORAGED,
        BenchError,
        Endpoint,
        _stop,
        make_backing,
        port_free,
        wait_listening,
    )
    from storaged.raid.manage import size_for_capacity

    @contextlib.contextmanager
    def run():  # noqa: ANN202
        if not port_free(port):
            raise BenchError(f"port {port} is in use (--port)")
        state = os.path.join(workdir, "state")
        env = dict(os.environ, STORAGED_LOG="WARNING")
        base = [sys.executable, "-m", "storaged", "--dir", state]

        def cli(*args: str) -> None:
            p = subprocess.run(base + list(args), capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise BenchError(f"storaged {' '.join(args)}: {p.stderr.strip()}")

        image = os.path.join(workdir, "plain.img")
        make_backing([image], 1 << 30)
        members = [os.path.join(workdir, f"disk{i}.img") for i in range(4)]
        per = size_for_capacity(1 << 30, 5, 4)
        cli("raid", "create", "--level", "5", "--size", str(per), "--name", "r5", *members)
        cli("raid", "backstore", "r5lun", "r5")
        cli("backstore", "create", "plain", image)
        cli("target", "create", LUN_IQN, "--portal", f"127.0.0.1:{port}")
        cli("lun", "add", LUN_IQN, "plain", "--lun", "0")
        cli("lun", "add", LUN_IQN, "r5lun", "--lun", "1")
        cli("target", "open", LUN_IQN)
        log = open(os.path.join(workdir, "storaged.log"), "wb")
        proc = subprocess.Popen(base + ["serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_listening(port, proc, "storaged")
            yield (Endpoint(STORAGED, port, LUN_IQN, 0, None, proc.pid),
                   Endpoint(STORAGED, port, LUN_IQN, 1, None, proc.pid), cli)
        finally:
            _stop(proc)
            log.close()

    return run()


def lun_rows(port: int, runs: int, seconds: float) -> list[tuple[str, dict[str, float]]]:
    """IOPS of the plain-file LUN, the RAID-5 LUN and the RAID-5 LUN without cache."""
    import statistics

    from storaged.bench.iscsi import Case, parse_qemu_bench, qemu_command
    from storaged.bench.iscsi import _run_tool as run_tool

    def once(ep, case: Case, count: int, step: int | None) -> float:  # noqa: ANN001
        cmd = qemu_command(ep, case, count)
        if step:
            i = cmd.index("--image-opts")
            cmd[i:i] = ["-S", str(step)]
        secs = parse_qemu_bench(run_tool(cmd, timeout=120 + 20 * seconds))
        return count / secs if secs > 0 else 0.0

    tmp = tempfile.mkdtemp(prefix="storaged-bench-raidlun-", dir="/var/tmp")
    out: list[tuple[str, dict[str, float]]] = []
    try:
        with _lun_daemon(tmp, port) as (plain, raid, cli):
            def cache(on: bool) -> None:
                cli("raid", "cache", "r5", "--size", "1024" if on else "0")

            case = Case("4k write QD32", "qemu", 4096, 32, write=True)
            for label, step in (("4k write QD32 (sequential)", None),
                                ("4k write QD32 (scattered)", SCATTER_STEP)):
                sides = {"plain": (plain, True), "raid5": (raid, True),
                         "raid5 no cache": (raid, False)}
                rates: dict[str, float] = {}
                for name, (ep, on) in sides.items():      # calibrate and warm up
                    cache(on)
                    rates[name] = once(ep, case, 8000, step)
                count = max(128, round(statistics.geometric_mean(rates.values()) * seconds))
                got: dict[str, list[float]] = {k: [] for k in sides}
                order = list(sides)
                for r in range(runs):
                    for name in (order if r % 2 == 0 else order[::-1]):
                        ep, on = sides[name]
                        cache(on)
                        got[name].append(once(ep, case, count, step))
                cache(True)
                out.append((label, {k: statistics.median(v) for k, v in got.items()}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m storaged.bench raid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="parity working set (MiB)")
    ap.add_argument("--io-mib", type=int, default=128, help="array size for the I/O part")
    ap.add_argument("--runs", type=int, default=None,
                    help="best of N for the kernels (5), median of N for --iscsi (3)")
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    ap.add_argument("--iscsi", action="store_true",
                    help="only the iSCSI rows: RAID-5 LUN vs plain-file LUN, one daemon")
    ap.add_argument("--port", type=int, default=ISCSI_PORT, help="iSCSI port for --iscsi")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per --iscsi run")
    args = ap.parse_args(argv)
    if args.iscsi:
        from storaged.bench.iscsi import BenchError
        try:
            rows = lun_rows(args.port, args.runs or 3, args.seconds)
        except BenchError as e:
            print(f"bench raid: error: {e}")
            return 1
        print("iSCSI, one storaged daemon: plain 1 GiB file LUN vs RAID-5 LUN "
              "(4 members, 512K chunk, bitmap + async journal), qemu-img bench, IOPS")
        print(f"  {'row':<30}{'plain':>10}{'raid5':>10}{'no cache':>10}"
              f"{'raid5/plain':>13}{'no cache/plain':>16}")
        ratios = []
        for label, v in rows:
            r1, r0 = v["raid5"] / v["plain"], v["raid5 no cache"] / v["plain"]
            ratios.append(r1)
            print(f"  {label:<30}{v['plain']:10.0f}{v['raid5']:10.0f}"
                  f"{v['raid5 no cache']:10.0f}{r1:13.2f}{r0:16.2f}")
        print(f"min ratio raid5/plain: {min(ratios):.2f}")
        return 0
    if args.quick:
        args.mib, args.io_mib, args.runs = 16, 8, 2
    args.runs = args.runs or 5
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
