"""``python -m storaged.bench clusterfs``: storaged's cluster filesystem vs bindfs.

    python -m storaged.bench clusterfs [--runs 3] [--files 400] [--mib 8]
                                       [--hold-ms 10] [--keep]

Three sides, each a FUSE mount on this machine:

* ``local``: ``storaged fs mount -o local`` (one node, no DLM),
* ``cluster``: node 1 of a two-node cluster (``storaged fs mount --cluster``
  on 127.0.0.1 and 127.0.0.2, both mounted, one image file); node 2's mount
  is the "other mount" of the cross-node row,
* ``bindfs``: bindfs (a C FUSE passthrough of a directory on the same disk:
  the ceiling of FUSE here), twice for the "other mount" row.

Rows (median of ``--runs`` runs; the sides alternate within each run, the
order rotating from run to run; every run works in a fresh directory):

* create+write: ``open(O_CREAT)``, one 4 KiB write, close (files/s),
* stat: ``os.stat`` of each of those files, same mount (stats/s),
* stat, other mount: the same from the second mount (for cluster: the other
  node, so every file's lock moves once),
* 4 KiB write / 4 KiB read: ``pwrite``/``pread`` of 4 KiB at a time over a
  file of ``--mib`` MiB (MiB/s).

storaged's writes are synchronous (each returns after its journal commit:
docs/clusterfs.md), bindfs's go to the page cache; the table says what
each costs, it does not make them equal.  The last line is ``min ratio
storaged/bindfs: X.XX`` over every row of both storaged sides.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

BS = 4096
SIDES = ("local", "cluster", "bindfs")
ROWS = ("create+write 4 KiB (files/s)", "stat (stats/s)", "stat, other mount (stats/s)",
        "4 KiB write (MiB/s)", "4 KiB read (MiB/s)")


def _ports() -> list[int]:
    """Two ports free on 127.0.0.1 / 127.0.0.2 in 43000-43999."""
    for _ in range(200):
        base = random.randrange(43000, 43998)
        ok = True
        for i, p in enumerate((base, base + 1)):
            with socket.socket() as s:
                try:
                    s.bind((f"127.0.0.{i + 1}", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return [base, base + 1]
    raise RuntimeError("no free port pair in 43000-43999")


def _storaged(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-m", "storaged", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"storaged {' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout


class Mounts:
    """The mounts of every side, made in ``tmp`` and torn down by :meth:`close`."""

    def __init__(self, tmp: str, hold_ms: float) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, STORAGED_FS_RUNDIR=os.path.join(tmp, "run"))
        self.storaged_mounts: list[str] = []
        self.bindfs_mounts: list[str] = []
        self.pairs: dict[str, tuple[str, str]] = {}
        self.hold_ms = hold_ms

    def _mnt(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.mkdir(path)
        return path

    def _image(self, name: str, mib: int = 512) -> str:
        img = os.path.join(self.tmp, name)
        with open(img, "wb") as f:
            f.truncate(mib << 20)
        _storaged("fs", "mkfs", img, "--journals", "2", env=self.env)
        return img

    def start(self) -> None:
        img = self._image("local.img")
        m = self._mnt("local")
        _storaged("fs", "mount", img, m, "-o", "local", env=self.env)
        self.storaged_mounts.append(m)
        self.pairs["local"] = (m, m)

        img = self._image("cluster.img")
        ports = _ports()
        mnts, procs = [], []
        for i in (1, 2):
            d = os.path.join(self.tmp, f"node{i}")
            _storaged("--dir", d, "cluster", "init", "bench", "--node",
                      f"1=127.0.0.1:{ports[0]}", "--node", f"2=127.0.0.2:{ports[1]}",
                      "--id", str(i), "--two-node", "--fencer", "test", env=self.env)
            mnts.append(self._mnt(f"cluster{i}"))
        for i, m in enumerate(mnts, 1):  # both at once: the first waits for quorum
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "storaged", "fs", "mount", img, m, "--cluster",
                 os.path.join(self.tmp, f"node{i}"), "-o", f"hold_ms={self.hold_ms:g}"],
                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            out, err = p.communicate(timeout=90)
            if p.returncode != 0:
                raise RuntimeError(f"cluster mount: {out}{err}")
        self.storaged_mounts += mnts
        self.pairs["cluster"] = (mnts[0], mnts[1])

        if shutil.which("bindfs") is None:
            raise RuntimeError("bindfs is missing: install the Debian package bindfs")
        src = self._mnt("bindfs-src")
        b1, b2 = self._mnt("bindfs1"), self._mnt("bindfs2")
        for b in (b1, b2):
            subprocess.run(["bindfs", "--no-allow-other", src, b], check=True,
                           capture_output=True)
            self.bindfs_mounts.append(b)
        self.pairs["bindfs"] = (b1, b2)

    def close(self) -> None:
        for m in reversed(self.storaged_mounts):
            if os.path.ismount(m):
                subprocess.run([sys.executable, "-m", "storaged", "fs", "umount", m],
                               env=self.env, capture_output=True, timeout=60)
        for m in self.bindfs_mounts:
            subprocess.run(["fusermount3", "-u", m], capture_output=True)


def _rate(n: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def measure(a: str, b: str, tag: str, files: int, mib: int) -> list[float]:
    """One run of every row on mounts ``a`` (and ``b``, the other mount)."""
    da, db = os.path.join(a, tag), os.path.join(b, tag)
    os.mkdir(da)
    block = os.urandom(BS)
    names = [os.path.join(da, f"f{i:05d}") for i in range(files)]
    other = [os.path.join(db, f"f{i:05d}") for i in range(files)]

    def create() -> None:
        for p in names:
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, block)
            os.close(fd)

    def stat(paths: list[str]) -> Callable[[], None]:
        def go() -> None:
            for p in paths:
                os.stat(p)
        return go

    count = (mib << 20) // BS
    big = os.path.join(da, "big")

    def write() -> None:
        fd = os.open(big, os.O_CREAT | os.O_WRONLY, 0o644)
        for i in range(count):
            os.pwrite(fd, block, i * BS)
        os.close(fd)

    def read() -> None:
        fd = os.open(big, os.O_RDONLY)
        for i in range(count):
            os.pread(fd, BS, i * BS)
        os.close(fd)

    out = [_rate(files, create), _rate(files, stat(names)), _rate(files, stat(other))]
    out.append(_rate(mib, write))
    out.append(_rate(mib, read))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m storaged.bench clusterfs")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=400, help="files per create/stat row")
    ap.add_argument("--mib", type=int, default=8, help="MiB per 4 KiB write/read row")
    ap.add_argument("--hold-ms", type=float, default=10.0,
                    help="cluster mount's minimum lock hold time (-o hold_ms)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="storaged-bench-clusterfs-")
    mounts = Mounts(tmp, args.hold_ms)
    results: dict[str, list[list[float]]] = {s: [] for s in SIDES}
    try:
        mounts.start()
        for run in range(args.runs):
            order = SIDES[run % len(SIDES):] + SIDES[:run % len(SIDES)]
            for side in order:
                a, b = mounts.pairs[side]
                subprocess.run(["sync"], check=False)
                results[side].append(measure(a, b, f"run{run}", args.files, args.mib))
    except (RuntimeError, OSError) as e:
        print(f"storaged: error: {e}", file=sys.stderr)
        return 1
    finally:
        mounts.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    med = {s: [statistics.median(r[i] for r in results[s]) for i in range(len(ROWS))]
           for s in SIDES}
    print(f"clusterfs vs bindfs, medians of {args.runs} runs ({args.files} files, "
          f"{args.mib} MiB, cluster hold_ms={args.hold_ms:g})")
    print("\n".join(report(med)))
    return 0


def report(med: dict[str, list[float]]) -> list[str]:
    """The table of medians per side, ratios to bindfs, and the min-ratio line."""
    lines = [f"{'row':<30}{'local':>10}{'cluster':>10}{'bindfs':>10}{'loc/bfs':>9}"
             f"{'clu/bfs':>9}"]
    ratios = []
    for i, row in enumerate(ROWS):
        lo, cl, bf = med["local"][i], med["cluster"][i], med["bindfs"][i]
        rl, rc = lo / bf, cl / bf
        ratios += [rl, rc]
        lines.append(f"{row:<30}{lo:>10.1f}{cl:>10.1f}{bf:>10.1f}{rl:>9.2f}{rc:>9.2f}")
    lines.append(f"min ratio storaged/bindfs: {min(ratios):.2f}")
    return lines
