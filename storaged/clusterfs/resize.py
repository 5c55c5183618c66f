"""Growing a mounted clusterfs: new resource groups (``fs grow``) and journals (``add-journal``).

Both work on a mounted :class:`~storaged.clusterfs.fs.ClusterFS` (online, on a
cluster mount; or offline through a local mount the CLI makes) and hold the
filesystem's rindex lock in EX for the whole change, so two nodes never grow
at once (GFS2 serialises gfs2_grow and gfs2_jadd the same way).

Crash safety comes from the order of writes.  New resource groups lie past
the old end of the filesystem and new journals in blocks the allocator has
already taken, so both are invisible until block 0 (superblock and journal
index) names them; block 0 is rewritten last, in one sector-sized write, after
a flush.  Resource-group headers other nodes may have cached (the old last
group, when it was short) change only in a journaled transaction under that
group's lock, whose blocking callback makes the other nodes drop their copy.
Other mounted nodes learn of the new geometry through
:meth:`ClusterFS.refresh_geometry` (on ENOSPC, statfs, a block past their
end, and their recovery poll).
"""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from storaged.clusterfs.format import (
    JINDEX_MAX,
    JOURNAL_HEADER,
    RGRP,
    Geometry,
    pack_block0,
)
from storaged.clusterfs.locks import EX

if TYPE_CHECKING:
    from storaged.clusterfs.fs import ClusterFS
    from storaged.clusterfs.txn import Txn

MAX_JOURNALS = 64


class ResizeError(Exception):
    """The filesystem cannot grow as asked (the device did not grow, no space...)."""


@dataclass
class GrowResult:
    """What ``fs grow`` did, in filesystem blocks."""

    old_blocks: int
    new_blocks: int
    old_groups: int
    new_groups: int
    added_free: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _group_count(geo: Geometry, total: int) -> int:
    """Resource groups that ``total`` blocks hold (mkfs's rule: none without data)."""
    stride = geo.rg_data + 2
    count = -(-(total - geo.rg_start) // stride)
    if total - (geo.rg_start + (count - 1) * stride) - 2 < 1:
        count -= 1
    return count


def _writable(fs: ClusterFS) -> None:
    if fs.read_only or fs.journal is None:
        raise ResizeError("the filesystem is mounted read-only here")
    if fs.withdrawn is not None:
        raise ResizeError(f"the mount is withdrawn ({fs.withdrawn})")


def grow(fs: ClusterFS) -> GrowResult:
    """Add resource groups for the space the device gained since mkfs or the last grow."""
    _writable(fs)
    h = fs.jlocks.lock(fs.rindex_name(), EX)
    try:
        refresh = getattr(fs.dev, "refresh_size", None)
        if refresh is not None:
            refresh()
        fs.refresh_geometry()
        g = fs.geo
        bs = g.bs
        total = fs.dev.size // bs
        last = g.rg_count - 1
        last_hdr = RGRP.unpack(fs.read_block(g.rg_block(last)))
        last_want = min(g.rg_data, total - last_hdr["data_start"])
        if total <= g.total_blocks and last_want <= last_hdr["data_blocks"]:
            raise ResizeError(
                f"the device holds {total} blocks of {bs} bytes and the filesystem already "
                f"uses {g.total_blocks}: nothing to grow (grow the LUN or image first)")
        count = max(_group_count(g, total), g.rg_count)
        added = 0
        for k in range(g.rg_count, count):
            hb = g.rg_block(k)
            n = min(g.rg_data, total - hb - 2)
            fs.dev.write(hb * bs, RGRP.pack({"index": k, "data_start": hb + 2,
                                             "data_blocks": n, "free": n}, bs) + bytes(bs))
            added += n
        fs.dev.flush()
        if total > g.total_blocks:
            sb = dict(g.sb, total_blocks=total, rg_count=count)
            fs.dev.write(0, pack_block0(g, sb, g.extra_journals))
            fs.dev.flush()
            fs.refresh_geometry()
        grown = [0]

        def extend_last(t: Txn) -> None:
            rn = fs.rname(last)
            t.lock(rn, EX)
            hb = fs.geo.rg_block(last)
            hdr = RGRP.unpack(t.read(hb, rn))
            more = last_want - hdr["data_blocks"]
            grown[0] = max(0, more)
            if more > 0:
                hdr["data_blocks"] += more
                hdr["free"] += more
                t.change(hb, rn)[:RGRP.size] = RGRP.pack(hdr)

        if last_want > last_hdr["data_blocks"]:
            fs.run(extend_last)
            fs.checkpoint()  # in place now: statfs on other nodes reads headers directly
        return GrowResult(g.total_blocks, total, g.rg_count, count, added + grown[0])
    finally:
        fs.jlocks.unlock(h)


def _take_run(fs: ClusterFS, t: Txn, n: int, taken: list[int]) -> int:
    """Allocate ``n`` contiguous blocks in one resource group; their first block."""
    g = fs.geo
    for k in range(g.rg_count):
        rn = fs.rname(k)
        t.lock(rn, EX)
        hb = g.rg_block(k)
        hdr = RGRP.unpack(t.read(hb, rn))
        if hdr["free"] < n:
            continue
        bm = t.read(hb + 1, rn)
        bits = int.from_bytes(bm, "little")
        run = 0
        for i in range(hdr["data_blocks"]):
            run = 0 if bits >> i & 1 else run + 1
            if run == n:
                first = i - n + 1
                bm = t.change(hb + 1, rn)
                for j in range(first, i + 1):
                    bm[j // 8] |= 1 << (j % 8)
                hdr["free"] -= n
                t.change(hb, rn)[:RGRP.size] = RGRP.pack(hdr)
                taken.append(hdr["data_start"] + first)
                return hdr["data_start"] + first
    raise OSError(errno.ENOSPC, f"no resource group has {n} contiguous free blocks")


def add_journals(fs: ClusterFS, count: int = 1) -> list[int]:
    """Add ``count`` journal slots (so more nodes can mount); the new slot numbers."""
    _writable(fs)
    if count < 1:
        raise ResizeError(f"--count must be at least 1, not {count}")
    h = fs.jlocks.lock(fs.rindex_name(), EX)
    try:
        fs.refresh_geometry()
        g = fs.geo
        bs = g.bs
        if g.journals + count > MAX_JOURNALS or len(g.extra_journals) + count > JINDEX_MAX:
            raise ResizeError(
                f"the filesystem has {g.journals} journals ({len(g.extra_journals)} added); "
                f"at most {MAX_JOURNALS} in all and {JINDEX_MAX} added ones")

        def body(t: Txn) -> list[int]:
            taken: list[int] = []
            for _ in range(count):
                _take_run(fs, t, g.journal_blocks, taken)
            return taken

        try:
            starts = fs.run(body)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise ResizeError(f"no space for {count} journal(s) of {g.journal_blocks} "
                              f"contiguous blocks ({e.strerror}): grow the filesystem "
                              "first (storaged fs grow)") from None
        fs.checkpoint()
        slots = list(range(g.journals, g.journals + count))
        zero = bytes(bs * 64)
        for slot, start in zip(slots, starts, strict=True):
            for off in range(0, g.journal_blocks, 64):  # no stale bytes look like records
                n = min(64, g.journal_blocks - off)
                fs.dev.write((start + off) * bs, zero[:n * bs])
            fs.dev.write(start * bs, JOURNAL_HEADER.pack({"slot": slot, "seq": 1, "flags": 1},
                                                         bs))
        fs.dev.flush()
        fs.dev.write(0, pack_block0(g, g.sb, g.extra_journals + tuple(starts)))
        fs.dev.flush()
        fs.refresh_geometry()
        return slots
    finally:
        fs.jlocks.unlock(h)


def summary(fs: ClusterFS) -> dict[str, Any]:
    """Geometry as the CLI reports it after a change."""
    g = fs.geo
    return {"blocks": g.total_blocks, "block_size": g.bs, "resource_groups": g.rg_count,
            "journals": g.journals}
