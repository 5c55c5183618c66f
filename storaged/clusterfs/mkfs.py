"""mkfs and check for clusterfs (offline tools on a BlockDevice)."""

from __future__ import annotations

import os
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from storaged.block.base import BlockDevice
from storaged.clusterfs.format import (
    DIR_MAGIC,
    INODE,
    JOURNAL_HEADER,
    RGRP,
    SUPERBLOCK,
    FormatError,
    Geometry,
    direct_count,
    pointers_per_block,
    read_geometry,
)
from storaged.clusterfs.journal import Journal
from storaged.clusterfs.locks import LocalLocks

DEFAULT_JOURNAL_BLOCKS = 512


class MkfsError(Exception):
    """The device cannot take this filesystem (too small, already formatted...)."""


def existing_filesystem(dev: BlockDevice) -> str | None:
    """What the device already holds, if recognisable (clusterfs or another filesystem)."""
    head = dev.read(0, min(dev.size, 65536 + 4096))
    if head[:8] == SUPERBLOCK.magic:
        return "a clusterfs filesystem"
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "an ext2/3/4 filesystem"
    if head[65536:65536 + 8] == b"_BHRfS_M" or head[65600:65608] == b"_BHRfS_M":
        return "a btrfs filesystem"
    if head[:4] == b"XFSB":
        return "an XFS filesystem"
    if len(head) >= 65536 + 4 and head[65536:65540] == b"\x01\x16\x19\x70":
        return "a GFS2 filesystem"
    return None


def mkfs(dev: BlockDevice, journals: int, *, block_size: int = 4096,
         journal_blocks: int = DEFAULT_JOURNAL_BLOCKS, rg_data: int | None = None,
         label: str = "", force: bool = False) -> Geometry:
    """Write a new filesystem on ``dev``; MkfsError names what is wrong."""
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise MkfsError(f"block size {block_size} is not a power of two in 512..65536")
    if journals < 1 or journals > 64:
        raise MkfsError(f"--journals must be 1..64, not {journals}")
    if not force:
        what = existing_filesystem(dev)
        if what:
            raise MkfsError(f"the device already holds {what} (use --force to overwrite it)")
    bs = block_size
    total = dev.size // bs
    rg_data = min(rg_data or 8 * bs, 8 * bs)
    jstart = 1
    rg_start = jstart + journals * journal_blocks
    if total < rg_start + 2 + 16:
        raise MkfsError(f"the device has {total} blocks of {bs} bytes; {journals} journals "
                        f"of {journal_blocks} blocks need at least {rg_start + 18}")
    rg_count = -(-(total - rg_start) // (rg_data + 2))
    last_data = total - (rg_start + (rg_count - 1) * (rg_data + 2)) - 2
    if last_data < 1:
        rg_count -= 1
    uuid = os.urandom(16)
    root = rg_start + 2  # first data block of group 0
    sb = {"version": 1, "block_size": bs, "total_blocks": total, "journals": journals,
          "journal_blocks": journal_blocks, "journal_start": jstart, "rg_start": rg_start,
          "rg_count": rg_count, "rg_data": rg_data, "root_ino": root, "uuid": uuid,
          "label": label.encode()[:32]}
    geo = Geometry(sb)
    for s in range(journals):
        jb = geo.journal_block(s)
        dev.write(jb * bs, JOURNAL_HEADER.pack({"slot": s, "seq": 1, "flags": 1}, bs)
                  + bytes(bs))
    for k in range(rg_count):
        n = geo.rg_data_blocks(k)
        hb = geo.rg_block(k)
        bm = bytearray(bs)
        free = n
        if k == 0:
            bm[0] = 1
            free -= 1
        dev.write(hb * bs, RGRP.pack({"index": k, "data_start": hb + 2, "data_blocks": n,
                                      "free": free}, bs) + bytes(bm))
    now = time.time_ns()
    dev.write(root * bs, INODE.pack({
        "mode": stat.S_IFDIR | 0o755, "nlink": 2, "atime_ns": now, "mtime_ns": now,
        "ctime_ns": now, "generation": now, "parent": root}, bs))
    dev.flush()
    dev.write(0, SUPERBLOCK.pack(sb, bs))  # last: a half-made filesystem has no superblock
    dev.flush()
    return geo


@dataclass
class CheckReport:
    """What `fs check` found (and, with repair, fixed)."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    replayed: int = 0
    inodes: int = 0
    used_blocks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"problems": self.problems, "repaired": self.repaired,
                "replayed": self.replayed, "inodes": self.inodes,
                "used_blocks": self.used_blocks}


def check(dev: BlockDevice, repair: bool = False) -> CheckReport:
    """Walk the filesystem from the root and compare with the bitmaps and link counts.

    Reports journals not cleanly unmounted (``repair`` replays them), blocks in
    use but free in the bitmap or the reverse, wrong free counts, wrong link
    counts, and directory entries pointing at non-inodes (repair drops them).
    Offline: nothing may have the filesystem mounted."""
    rep = CheckReport()
    try:
        geo = read_geometry(dev)
    except FormatError as e:
        rep.problems.append(f"superblock: {e}")
        return rep
    bs = geo.bs
    for s in range(geo.journals):
        j = Journal(dev, geo, s)
        try:
            hdr = j.header()
            pending = j.pending()
        except FormatError as e:
            rep.problems.append(f"journal {s}: {e}")
            continue
        if pending is not None:
            rep.problems.append(f"journal {s}: a committed record is not checkpointed")
            if repair:
                rep.replayed += j.replay()
                rep.repaired.append(f"journal {s}: replayed")
        elif not hdr["flags"] & 1:
            rep.problems.append(f"journal {s}: not cleanly unmounted (nothing to replay)")
            if repair:
                j.write_header(hdr["seq"], clean=True)
                rep.repaired.append(f"journal {s}: marked clean")
    if rep.problems and not repair:
        return rep  # journals first: checking a filesystem that needs replay misleads

    used: set[int] = set()
    for start in geo.extra_journals:  # added journals are extents of the data area
        used.update(range(start, start + geo.journal_blocks))
    links: dict[int, int] = {}
    nlink: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    nd, p = direct_count(bs), pointers_per_block(bs)

    def rd(b: int) -> bytes:
        return dev.read(b * bs, bs)

    def ptrs(buf: bytes, lo: int, hi: int) -> list[int]:
        return list(struct.unpack_from(f"<{hi - lo}Q", buf, 8 * lo))

    first_data = geo.rg_start

    def valid(ino: int, b: int) -> bool:
        if first_data <= b < geo.total_blocks:
            return True
        rep.problems.append(f"inode {ino}: block pointer {b} outside the data area")
        return False

    def data_blocks(ino: int, buf: bytes) -> list[tuple[int, int]]:
        out = [(i, b) for i, b in enumerate(ptrs(buf, 16, 16 + nd)) if b and valid(ino, b)]
        ind, dind = ptrs(buf, bs // 8 - 2, bs // 8)
        if ind and valid(ino, ind):
            used.add(ind)
            out += [(nd + i, b) for i, b in enumerate(ptrs(rd(ind), 0, p))
                    if b and valid(ino, b)]
        if dind and valid(ino, dind):
            used.add(dind)
            for j, sub in enumerate(ptrs(rd(dind), 0, p)):
                if sub and valid(ino, sub):
                    used.add(sub)
                    out += [(nd + p + j * p + i, b) for i, b in enumerate(ptrs(rd(sub), 0, p))
                            if b and valid(ino, b)]
        return out

    stack = [(geo.root_ino, geo.root_ino)]
    seen: set[int] = set()
    bad_entries: list[tuple[int, int, bytes, int]] = []
    while stack:
        ino, parent = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        buf = rd(ino)
        try:
            f = INODE.unpack(buf)
        except FormatError as e:
            rep.problems.append(f"inode {ino}: {e}")
            continue
        rep.inodes += 1
        used.add(ino)
        nlink[ino] = f["nlink"]
        if f["xattr_block"] and valid(ino, f["xattr_block"]):
            used.add(f["xattr_block"])
        blocks = data_blocks(ino, buf)
        used.update(b for _, b in blocks)
        if stat.S_ISDIR(f["mode"]):
            subdirs.setdefault(ino, 0)
            for idx, b in blocks:
                bb = rd(b)
                if bb[:4] != DIR_MAGIC:
                    rep.problems.append(f"directory {ino}: bucket {idx} is corrupt")
                    continue
                used_bytes = struct.unpack_from("<I", bb, 4)[0]
                off = 8
                while off < 8 + used_bytes:
                    child, _typ, nl = struct.unpack_from("<QBB", bb, off)
                    name = bytes(bb[off + 10:off + 10 + nl])
                    off += 10 + nl
                    try:
                        cf = INODE.unpack(rd(child)) if first_data <= child < geo.total_blocks \
                            else None
                    except FormatError:
                        cf = None
                    if cf is None:
                        rep.problems.append(f"directory {ino}: entry {name!r} points at "
                                            f"block {child}, not an inode")
                        bad_entries.append((ino, b, name, child))
                        continue
                    links[child] = links.get(child, 0) + 1
                    if stat.S_ISDIR(cf["mode"]):
                        subdirs[ino] += 1
                    stack.append((child, ino))
    for ino, n in nlink.items():
        want = 2 + subdirs[ino] if ino in subdirs else links.get(ino, 0)
        if n != want:
            rep.problems.append(f"inode {ino}: link count {n}, expected {want}")
            if repair:
                raw = bytearray(rd(ino))
                f = INODE.unpack(raw)
                f["nlink"] = want
                raw[:INODE.size] = INODE.pack(f)
                dev.write(ino * bs, bytes(raw))
                rep.repaired.append(f"inode {ino}: link count set to {want}")
    if repair:
        for _dino, b, name, _child in bad_entries:
            raw = bytearray(rd(b))
            used_bytes = struct.unpack_from("<I", raw, 4)[0]
            off, kept = 8, b""
            while off < 8 + used_bytes:
                child, typ, nl = struct.unpack_from("<QBB", raw, off)
                ent = bytes(raw[off:off + 10 + nl])
                if bytes(raw[off + 10:off + 10 + nl]) != name:
                    kept += ent
                off += 10 + nl
            raw[8:] = kept + bytes(bs - 8 - len(kept))
            struct.pack_into("<I", raw, 4, len(kept))
            dev.write(b * bs, bytes(raw))
            rep.repaired.append(f"directory bucket {b}: dropped entry {name!r}")
    rep.used_blocks = len(used)
    for k in range(geo.rg_count):
        hb = geo.rg_block(k)
        try:
            hdr = RGRP.unpack(rd(hb))
        except FormatError as e:
            rep.problems.append(f"resource group {k}: {e}")
            continue
        bm = bytearray(rd(hb + 1))
        start, n = hdr["data_start"], hdr["data_blocks"]
        want = bytearray(bs)
        for b in used:
            if start <= b < start + n:
                i = b - start
                want[i // 8] |= 1 << (i % 8)
        if want != bm:
            diff = sum(bin(a ^ c).count("1") for a, c in zip(want, bm, strict=True))
            rep.problems.append(f"resource group {k}: bitmap differs from the tree in "
                                f"{diff} block(s)")
        free = n - sum(bin(c).count("1") for c in want)
        if want != bm or free != hdr["free"]:
            if hdr["free"] != free:
                rep.problems.append(f"resource group {k}: free count {hdr['free']}, "
                                    f"expected {free}")
            if repair:
                hdr["free"] = free
                dev.write(hb * bs, RGRP.pack(hdr, bs) + bytes(want))
                rep.repaired.append(f"resource group {k}: bitmap and free count rebuilt")
    dev.flush()
    return rep


def local_locks() -> LocalLocks:
    """A lock layer for single-node (local) mounts."""
    return LocalLocks()
