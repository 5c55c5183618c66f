"""The clusterfs filesystem: POSIX operations on a BlockDevice under a lock layer.

Every operation is a transaction (storaged.clusterfs.txn): it locks the
inodes it reads (PR) or changes (EX) and the resource groups it allocates
from, reads their blocks from the device, changes copies and commits them
through this node's journal before its locks go.  Nothing is cached across
operations, so what one node committed is what every other node reads next.

Operations take paths (the FUSE shell is path based) and raise OSError with
the POSIX errno.  Permission checks are the kernel's (FUSE
``default_permissions``); this layer checks only what the kernel cannot.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from typing import Any

from storaged.block.base import BlockDevice, BlockDeviceError
from storaged.clusterfs import txn as txnmod
from storaged.clusterfs.format import (
    DIR_BUCKET_HEAD,
    DIR_MAGIC,
    DIRENT_HEAD,
    INODE,
    INODE_HEAD,
    JH_CLEAN,
    NAME_MAX,
    RGRP,
    XATTR_ENTRY,
    XATTR_HEAD,
    XATTR_MAGIC,
    FormatError,
    direct_count,
    max_file_blocks,
    pointers_per_block,
    read_geometry,
)
from storaged.clusterfs.glock import BlockCache
from storaged.clusterfs.journal import Journal, JournalFull
from storaged.clusterfs.locks import EX, PR, LockLayer, LockLost, WouldBlock
from storaged.clusterfs.txn import Txn
from storaged.fastio import crc32c

log = logging.getLogger("storaged.clusterfs")

MAX_DIR_DEPTH = 24
FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOCATE_CHUNK = 1024      # blocks allocated per transaction by fallocate
XATTR_CREATE = 1
XATTR_REPLACE = 2


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), what or None)


def dtype_of(mode: int) -> int:
    """The DT_* directory-entry type of a st_mode (``mode >> 12``, as Linux does)."""
    return (mode >> 12) & 0xF


def split_path(path: str) -> list[str]:
    """Components of an absolute path; ENAMETOOLONG for a component over 255 bytes."""
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if len(p.encode()) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, p)
    return parts


class Inode:
    """A decoded inode bound to its block in a transaction."""

    __slots__ = ("ino", "f", "buf")

    def __init__(self, ino: int, f: dict[str, Any], buf: bytearray) -> None:
        self.ino = ino
        self.f = f
        self.buf = buf

    @property
    def mode(self) -> int:
        return self.f["mode"]

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.f["mode"])


class ClusterFS:
    """One node's mount of the filesystem on ``dev`` (see module docstring)."""

    def __init__(self, dev: BlockDevice, locks: LockLayer, *, read_only: bool = False,
                 slot: int | None = None) -> None:
        self.dev = dev
        self.locks = locks
        self.read_only = read_only
        self.want_slot = slot
        self.geo = read_geometry(dev)
        sb = self.geo.sb
        self.bs = self.geo.bs
        self.ppb = pointers_per_block(self.bs)
        self.ndirect = direct_count(self.bs)
        self.tag = sb["uuid"][:4].hex()
        self.slot: int | None = None
        self.journal: Journal | None = None
        self._jlock: Any = None
        self.withdrawn: str | None = None
        self.stats = {"ops": 0, "commits": 0, "restarts": 0, "replayed": 0}
        self._stats_lock = threading.Lock()
        # Journal-slot locks are never cached (another node probes them with NOQUEUE).
        self.jlocks: LockLayer = getattr(locks, "inner", locks)
        self.cache: BlockCache | None = None
        self.lazy_checkpoint = False
        if getattr(locks, "caching", False):  # a lock layer private to this mount
            self.cache = BlockCache()
            locks.on_invalidate = self.cache.drop_owner  # type: ignore[attr-defined]
            # Locks outlive transactions: checkpoint the journal only before one is
            # given up (GFS2 flushes its log before a glock goes), not every commit.
            locks.before_release = self.checkpoint  # type: ignore[attr-defined]
            locks.on_lvb_invalid = self.recover_all  # type: ignore[attr-defined]
            self.lazy_checkpoint = True

    # -------------------------------------------------------------- naming
    def iname(self, ino: int) -> str:
        return f"{self.tag}.i{ino}"

    def rname(self, k: int) -> str:
        return f"{self.tag}.r{k}"

    def jname(self, slot: int) -> str:
        return f"{self.tag}.j{slot}"

    def rindex_name(self) -> str:
        """The lock that serialises changes of the resource-group and journal index
        (``fs grow``, ``fs add-journal``), like GFS2's rindex glock."""
        return f"{self.tag}.rindex"

    def refresh_geometry(self) -> bool:
        """Re-read block 0 (superblock, journal index); True if the filesystem grew.

        Another node's ``fs grow`` or ``add-journal`` rewrites block 0 only after
        the new groups or journal are on the device, so reading it is enough
        (no lock: a torn read fails its CRC and is retried).  Called when this
        node runs out of space, meets a block past its idea of the end, on
        statfs and before recovery polls."""
        for _ in range(3):
            try:
                geo = read_geometry(self.dev)
                break
            except FormatError:
                time.sleep(0.01)
        else:
            return False
        old = self.geo
        if geo.total_blocks < old.total_blocks or geo.journals < old.journals:
            return False  # never shrink under a mounted node
        if (geo.total_blocks, geo.rg_count, geo.extra_journals) == \
                (old.total_blocks, old.rg_count, old.extra_journals):
            return False
        self.geo = geo
        if self.journal is not None:
            self.journal.geo = geo
        return True

    # ------------------------------------------------------------ mounting
    def mount(self) -> ClusterFS:
        """Claim a journal slot (its lock, held until umount), replay free journals."""
        if self.read_only:
            return self
        slots = range(self.geo.journals) if self.want_slot is None else [self.want_slot]
        for attempt in range(5):  # a free slot may be held a moment by a recovery poll
            for s in slots:
                try:
                    self._jlock = self.jlocks.lock(self.jname(s), EX, noqueue=True)
                except WouldBlock:
                    continue
                except LockLost:  # the lockspace is still recovering from a join
                    if attempt == 4:
                        raise
                    break
                self.slot = s
                break
            if self.slot is not None:
                break
            time.sleep(0.1 * (attempt + 1))
        if self.slot is None:
            raise _err(errno.EBUSY, f"all {self.geo.journals} journal slots are in use "
                       "(add one with 'storaged fs add-journal DEVICE')")
        self.journal = Journal(self.dev, self.geo, self.slot)
        self.stats["replayed"] += self.journal.replay()
        for s in range(self.geo.journals):
            if s != self.slot:
                self.recover(s, wait=False)
        self.journal.write_header(self.journal.seq, clean=False)
        return self

    def recover(self, slot: int, wait: bool = True) -> int:
        """Replay journal ``slot`` of a node that is gone (its lock is free); blocks replayed.

        Call only once the membership's fencer confirmed that node fenced: the
        DLM then has purged its journal lock, so taking it here is the proof."""
        try:
            h = self.jlocks.lock(self.jname(slot), EX, noqueue=not wait)
        except WouldBlock:
            return 0
        try:
            j = Journal(self.dev, self.geo, slot)
            n = j.replay()
            if not self.read_only and not j.header()["flags"] & JH_CLEAN:
                j.write_header(j.seq, clean=True)  # recovered: the slot is free and clean
        finally:
            self.jlocks.unlock(h)
        if n and self.cache is not None:
            self.cache.clear()  # the replayed blocks were written under no inode lock
        self.stats["replayed"] += n
        return n

    def recover_all(self) -> int:
        """Replay every other slot whose lock is free (its node is gone and fenced)."""
        if self.withdrawn is not None or self.journal is None:
            return 0
        self.refresh_geometry()  # journals added by another node are recovered too
        n = 0
        for s in range(self.geo.journals):
            if s != self.slot:
                n += self.recover(s, wait=False)
        return n

    def checkpoint(self) -> None:
        """Checkpoint this node's journal (before a lock goes to another node)."""
        j = self.journal
        if j is not None and self.withdrawn is None:
            try:
                j.checkpoint()
            except BlockDeviceError as e:
                self.withdrawn = f"I/O error: {e}"
                raise LockLost(self.withdrawn) from None

    def umount(self) -> None:
        """Clean unmount: mark the journal clean and release its slot."""
        drop = getattr(self.locks, "drop_all", None)
        if drop is not None:
            drop()  # cached glocks go back to the DLM (nothing is dirty: see glock.py)
        if self.cache is not None:
            self.cache.clear()
        if self.journal is not None and self.withdrawn is None:
            self.journal.checkpoint()
            self.journal.write_header(self.journal.seq, clean=True)
        if self._jlock is not None:
            try:
                self.jlocks.unlock(self._jlock)
            except LockLost:
                pass
            self._jlock = None
        self.journal = None

    # ---------------------------------------------------------- plumbing
    def read_block(self, block: int) -> bytes:
        if block >= self.geo.total_blocks:
            self.refresh_geometry()
        if block <= 0 or block >= self.geo.total_blocks:
            raise _err(errno.EIO, f"block {block} outside the filesystem")
        return self.dev.read(block * self.bs, self.bs)

    def commit(self, txn: Txn) -> None:
        """Ordered-mode commit: data, flush, then the metadata through the journal."""
        if not txn.dirty and not txn.data:
            return
        if self.read_only or self.journal is None:
            raise _err(errno.EROFS)
        for blk, data in sorted(txn.data.items()):
            self.dev.write(blk * self.bs, data)
        if txn.data:
            self.dev.flush()
            self.journal.note_flushed()
        for blk in txn.dirty:  # seal inode and resource-group checksums
            self._seal(txn.blocks[blk])
        try:
            self.journal.commit(txn.images(), checkpoint=not self.lazy_checkpoint)
        except JournalFull as e:
            raise _err(errno.EFBIG, str(e)) from None
        self.stats["commits"] += 1
        mark = getattr(self.locks, "mark_dirty", None)
        if mark is not None:
            for h in txn.held_ex():
                mark(h)
        cache = self.cache
        if cache is not None:
            for blk in txn.freed:
                cache.discard(blk)
            for blk in txn.dirty:
                owner = txn.owners.get(blk)
                if owner is None:
                    cache.discard(blk)
                else:
                    cache.put(blk, bytes(txn.blocks[blk]), owner)

    @staticmethod
    def _seal(buf: bytearray) -> None:
        magic = bytes(buf[:4])
        if magic == INODE.magic:
            struct.pack_into("<I", buf, 124, crc32c(bytes(buf[:124])))
        elif magic == RGRP.magic:
            struct.pack_into("<I", buf, 24, crc32c(bytes(buf[:24])))

    def run(self, body: Any, first: tuple[tuple[str, str], ...] = ()) -> Any:
        """Run ``body(txn)`` as a transaction; EIO once withdrawn."""
        if self.withdrawn is not None:
            raise _err(errno.EIO, f"withdrawn: {self.withdrawn}")
        with self._stats_lock:
            self.stats["ops"] += 1
        try:
            return txnmod.run(self, body, first)
        except (LockLost, FormatError, struct.error) as e:  # struct.error: corrupt bytes
            if isinstance(e, LockLost):
                self.withdrawn = str(e)
            raise _err(errno.EIO, str(e)) from None
        except BlockDeviceError as e:
            # The device failed us (or fenced us off): write nothing more, ever.
            if self.withdrawn is None:
                log.error("clusterfs %s: withdrawn: %s", self.tag, e)
            self.withdrawn = f"I/O error: {e}"
            raise _err(errno.EIO, self.withdrawn) from None

    # ------------------------------------------------------------- inodes
    def iget(self, t: Txn, ino: int, mode: str = PR) -> Inode:
        t.lock(self.iname(ino), mode)
        ip = t.inodes.get(ino)
        if ip is None:
            buf = t.read(ino, self.iname(ino))
            ip = t.inodes[ino] = Inode(ino, INODE.unpack(buf), buf)
        return ip

    def iput(self, t: Txn, ip: Inode) -> None:
        """Write back ``ip``'s fields into its (changed) block."""
        t.dirty.add(ip.ino)
        ip.buf[:INODE.size] = INODE.pack(ip.f)

    def _ptr(self, buf: bytearray, i: int) -> int:
        return struct.unpack_from("<Q", buf, 8 * i)[0]

    def _setptr(self, buf: bytearray, i: int, v: int) -> None:
        struct.pack_into("<Q", buf, 8 * i, v)

    def bmap(self, t: Txn, ip: Inode, idx: int, alloc: bool = False) -> int:
        """Device block of logical block ``idx`` (0 = hole); allocates with ``alloc``."""
        blk = self._bmap(t, ip, idx, alloc)
        if blk >= self.geo.total_blocks:
            self.refresh_geometry()  # another node allocated it in space grown since
        if blk and not self.geo.rg_start <= blk < self.geo.total_blocks:
            raise FormatError(f"inode {ip.ino}: block pointer {blk} outside the data area")
        return blk

    def _bmap(self, t: Txn, ip: Inode, idx: int, alloc: bool) -> int:
        if idx >= max_file_blocks(self.bs):
            raise _err(errno.EFBIG)
        nd, p = self.ndirect, self.ppb
        if idx < nd:
            slot = INODE_HEAD // 8 + idx
            blk = self._ptr(ip.buf, slot)
            if blk or not alloc:
                return blk
            blk = self.alloc(t, ip)
            t.dirty.add(ip.ino)
            self._setptr(ip.buf, slot, blk)
            return blk
        idx -= nd
        if idx < p:
            path = [(ip.buf, ip.ino, self.bs // 8 - 2), (None, 0, idx)]
        else:
            idx -= p
            path = [(ip.buf, ip.ino, self.bs // 8 - 1), (None, 0, idx // p), (None, 0, idx % p)]
        buf, owner, slot = path[0]
        for level in range(1, len(path)):
            blk = self._ptr(buf, slot)
            if not blk:
                if not alloc:
                    return 0
                blk = self.alloc(t, ip)
                t.new(blk, self.iname(ip.ino))
                t.change(owner)
                self._setptr(buf, slot, blk)
            buf, owner, slot = t.read(blk, self.iname(ip.ino)), blk, path[level][2]
        blk = self._ptr(buf, slot)
        if blk or not alloc:
            return blk
        blk = self.alloc(t, ip)
        t.change(owner)
        self._setptr(buf, slot, blk)
        return blk

    def alloc(self, t: Txn, ip: Inode | None) -> int:
        """Allocate one block, starting in this node's home resource group."""
        try:
            return self._alloc(t, ip)
        except OSError as e:
            if e.errno != errno.ENOSPC or not self.refresh_geometry():
                raise
        return self._alloc(t, ip)  # another node grew the filesystem

    def _alloc(self, t: Txn, ip: Inode | None) -> int:
        g = self.geo
        home = (self.slot or 0) % g.rg_count
        for step in range(g.rg_count):
            k = (home + step) % g.rg_count
            t.lock(self.rname(k), EX)
            hb = g.rg_block(k)
            rn = self.rname(k)
            hdr = RGRP.unpack(t.read(hb, rn))
            if hdr["free"] == 0:
                continue
            bm = t.change(hb + 1, rn)
            n = hdr["data_blocks"]
            for byte in range((n + 7) // 8):
                if bm[byte] != 0xFF:
                    bit = (~bm[byte] & (bm[byte] + 1)).bit_length() - 1
                    i = byte * 8 + bit
                    if i >= n:
                        break
                    bm[byte] |= 1 << bit
                    hdr["free"] -= 1
                    t.change(hb)[:RGRP.size] = RGRP.pack(hdr)
                    if ip is not None:
                        ip.f["blocks"] += 1
                        t.dirty.add(ip.ino)
                    return hdr["data_start"] + i
        raise _err(errno.ENOSPC)

    def free(self, t: Txn, block: int, ip: Inode | None) -> None:
        """Return ``block`` to its resource group."""
        g = self.geo
        k = g.rg_of(block)
        t.lock(self.rname(k), EX)
        hb = g.rg_block(k)
        rn = self.rname(k)
        hdr = RGRP.unpack(t.read(hb, rn))
        i = block - hdr["data_start"]
        if not 0 <= i < hdr["data_blocks"]:
            raise _err(errno.EIO, f"freeing block {block} outside its group")
        bm = t.change(hb + 1, rn)
        if bm[i // 8] & (1 << (i % 8)):
            bm[i // 8] &= ~(1 << (i % 8)) & 0xFF
            hdr["free"] += 1
            t.change(hb)[:RGRP.size] = RGRP.pack(hdr)
        if ip is not None:
            ip.f["blocks"] = max(0, ip.f["blocks"] - 1)
        t.data.pop(block, None)
        t.freed.append(block)

    def new_inode(self, t: Txn, mode: int, uid: int, gid: int, parent: int = 0) -> Inode:
        blk = self.alloc(t, None)
        t.lock(self.iname(blk), EX)
        buf = t.new(blk, self.iname(blk))
        now = time.time_ns()
        f = {"mode": mode, "uid": uid, "gid": gid, "nlink": 1, "dir_depth": 0, "size": 0,
             "blocks": 0, "atime_ns": now, "mtime_ns": now, "ctime_ns": now,
             "generation": now, "xattr_block": 0, "parent": parent, "rdev": 0,
             "reserved": b""}
        if stat.S_ISDIR(mode):
            f["nlink"] = 2
        ip = t.inodes[blk] = Inode(blk, f, buf)
        self.iput(t, ip)
        return ip

    def truncate_blocks(self, t: Txn, ip: Inode, keep: int) -> None:
        """Free every data and mapping block at logical index >= ``keep``."""
        nd, p = self.ndirect, self.ppb
        base = INODE_HEAD // 8
        for i in range(keep, nd):
            blk = self._ptr(ip.buf, base + i)
            if blk:
                self.free(t, blk, ip)
                self._setptr(ip.buf, base + i, 0)

        def cut(owner: int, obuf: bytearray, slot: int, start: int, depth: int) -> None:
            blk = self._ptr(obuf, slot)
            if not blk:
                return
            span = p ** (depth - 1)
            buf = t.read(blk, self.iname(ip.ino))
            for j in range(p):
                s = start - j * span
                if s >= span:
                    continue
                child = self._ptr(buf, j)
                if not child:
                    continue
                if depth == 1:
                    t.change(blk)
                    self.free(t, child, ip)
                    self._setptr(buf, j, 0)
                else:
                    cut(blk, buf, j, max(0, s), depth - 1)
            if start <= 0:
                self.free(t, blk, ip)
                t.change(owner)
                self._setptr(obuf, slot, 0)

        cut(ip.ino, ip.buf, self.bs // 8 - 2, keep - nd, 1)
        cut(ip.ino, ip.buf, self.bs // 8 - 1, keep - nd - p, 2)
        t.dirty.add(ip.ino)

    def destroy(self, t: Txn, ip: Inode) -> None:
        """Free an inode with no links left: its blocks, xattr block and itself."""
        self.truncate_blocks(t, ip, 0)
        if ip.f["xattr_block"]:
            self.free(t, ip.f["xattr_block"], None)
        self.free(t, ip.ino, None)
        t.dirty.discard(ip.ino)
        ip.buf[:4] = b"\0\0\0\0"  # no longer an inode
        t.dirty.add(ip.ino)

    # -------------------------------------------------------- directories
    def _bucket_entries(self, buf: bytes) -> list[tuple[bytes, int, int]]:
        magic, used = DIR_BUCKET_HEAD.unpack_from(buf, 0)
        if magic != DIR_MAGIC or used > self.bs - DIR_BUCKET_HEAD.size:
            raise FormatError("bad directory bucket")
        out = []
        off, end = DIR_BUCKET_HEAD.size, DIR_BUCKET_HEAD.size + used
        while off < end:
            ino, typ, nl = DIRENT_HEAD.unpack_from(buf, off)
            off += DIRENT_HEAD.size
            out.append((bytes(buf[off:off + nl]), ino, typ))
            off += nl
        return out

    def _bucket_map(self, buf: bytes) -> dict[bytes, tuple[int, int]]:
        return {n: (ino, typ) for n, ino, typ in self._bucket_entries(buf)}

    def _write_bucket(self, buf: bytearray, entries: list[tuple[bytes, int, int]]) -> bool:
        parts = [DIRENT_HEAD.pack(ino, typ, len(n)) + n for n, ino, typ in entries]
        body = b"".join(parts)
        if len(body) > self.bs - DIR_BUCKET_HEAD.size:
            return False
        buf[:] = bytes(self.bs)
        buf[:DIR_BUCKET_HEAD.size] = DIR_BUCKET_HEAD.pack(DIR_MAGIC, len(body))
        buf[DIR_BUCKET_HEAD.size:DIR_BUCKET_HEAD.size + len(body)] = body
        return True

    def _bucket_of(self, dp: Inode, name: bytes) -> int:
        return crc32c(name) & ((1 << dp.f["dir_depth"]) - 1)

    def dir_entries(self, t: Txn, dp: Inode) -> list[tuple[bytes, int, int]]:
        out = []
        for b in range(1 << dp.f["dir_depth"]):
            blk = self.bmap(t, dp, b)
            if blk:
                out.extend(self._bucket_entries(t.read(blk, self.iname(dp.ino))))
        return out

    def lookup(self, t: Txn, dp: Inode, name: bytes) -> tuple[int, int] | None:
        blk = self.bmap(t, dp, self._bucket_of(dp, name))
        if not blk:
            return None
        own = self.iname(dp.ino)
        buf = t.read(blk, own)
        if self.cache is not None and blk not in t.dirty:
            # Not changed by this transaction, so the cached image is what it read
            # (only an EX holder changes it, and that is this transaction or none).
            names = self.cache.decoded(blk, own, self._bucket_map)
            if names is not None:
                return names.get(name)
        for n, ino, typ in self._bucket_entries(buf):
            if n == name:
                return ino, typ
        return None

    def dir_add(self, t: Txn, dp: Inode, name: bytes, ino: int, typ: int) -> None:
        b = self._bucket_of(dp, name)
        own = self.iname(dp.ino)
        blk = self.bmap(t, dp, b)
        if blk:
            buf = t.read(blk, own)
        else:  # a fresh bucket: never trust what a freed block still holds
            blk = self.bmap(t, dp, b, alloc=True)
            buf = t.new(blk, own)
        entries = self._bucket_entries(buf) if buf[:4] == DIR_MAGIC else []
        if self._write_bucket(t.change(blk, own), entries + [(name, ino, typ)]):
            return
        self._write_bucket(t.change(blk, own), entries)
        self._grow_dir(t, dp)
        self.dir_add(t, dp, name, ino, typ)

    def _grow_dir(self, t: Txn, dp: Inode) -> None:
        """Double the bucket count and rehash every entry (an overflowing bucket)."""
        depth = dp.f["dir_depth"]
        if depth >= MAX_DIR_DEPTH:
            raise _err(errno.ENOSPC, "directory hash is full")
        entries = self.dir_entries(t, dp)
        dp.f["dir_depth"] = depth + 1
        nb = 1 << (depth + 1)
        groups: dict[int, list] = {}
        for e in entries:
            groups.setdefault(crc32c(e[0]) & (nb - 1), []).append(e)
        for b in range(nb):
            g = groups.get(b, [])
            blk = self.bmap(t, dp, b, alloc=bool(g))
            if blk:
                if not self._write_bucket(t.change(blk, self.iname(dp.ino)), g):
                    dp.f["dir_depth"] = depth + 1
                    self.iput(t, dp)
                    self._grow_dir(t, dp)
                    return
        dp.f["size"] = nb * self.bs
        self.iput(t, dp)

    def dir_remove(self, t: Txn, dp: Inode, name: bytes) -> None:
        blk = self.bmap(t, dp, self._bucket_of(dp, name))
        if not blk:
            raise _err(errno.ENOENT)
        entries = self._bucket_entries(t.read(blk, self.iname(dp.ino)))
        kept = [e for e in entries if e[0] != name]
        if len(kept) == len(entries):
            raise _err(errno.ENOENT)
        self._write_bucket(t.change(blk, self.iname(dp.ino)), kept)

    # --------------------------------------------------------------- paths
    def walk(self, t: Txn, parts: list[str], mode: str = PR) -> Inode:
        """The inode at ``parts``; intermediate directories PR, the last in ``mode``."""
        ip = self.iget(t, self.geo.root_ino, mode if not parts else PR)
        for i, p in enumerate(parts):
            if not ip.is_dir():
                raise _err(errno.ENOTDIR)
            found = self.lookup(t, ip, p.encode())
            if found is None:
                raise _err(errno.ENOENT)
            ip = self.iget(t, found[0], mode if i == len(parts) - 1 else PR)
        return ip

    def parent_of(self, t: Txn, path: str) -> tuple[Inode, bytes]:
        parts = split_path(path)
        if not parts:
            raise _err(errno.EBUSY, "/")
        dp = self.walk(t, parts[:-1], EX)
        if not dp.is_dir():
            raise _err(errno.ENOTDIR)
        return dp, parts[-1].encode()

    # ---------------------------------------------------------- attributes
    def _attrs(self, ip: Inode) -> dict[str, Any]:
        f = ip.f
        return {"st_ino": ip.ino, "st_mode": f["mode"], "st_nlink": f["nlink"],
                "st_uid": f["uid"], "st_gid": f["gid"], "st_size": f["size"],
                "st_blocks": f["blocks"] * (self.bs // 512), "st_blksize": self.bs,
                "st_atime": f["atime_ns"] / 1e9, "st_mtime": f["mtime_ns"] / 1e9,
                "st_ctime": f["ctime_ns"] / 1e9, "st_rdev": f["rdev"],
                "st_atime_ns": f["atime_ns"], "st_mtime_ns": f["mtime_ns"],
                "st_ctime_ns": f["ctime_ns"]}

    def getattr(self, path: str) -> dict[str, Any]:
        parts = split_path(path)
        return self.run(lambda t: self._attrs(self.walk(t, parts)))

    def _change(self, path: str, fn: Any) -> None:
        parts = split_path(path)

        def body(t: Txn) -> None:
            ip = self.walk(t, parts, EX)
            fn(ip)
            ip.f["ctime_ns"] = time.time_ns()
            self.iput(t, ip)
        self.run(body)

    def chmod(self, path: str, mode: int) -> None:
        def fn(ip: Inode) -> None:
            ip.f["mode"] = (ip.f["mode"] & ~0o7777) | (mode & 0o7777)
        self._change(path, fn)

    def chown(self, path: str, uid: int, gid: int) -> None:
        def fn(ip: Inode) -> None:
            if uid != -1 and uid != 0xFFFFFFFF:
                ip.f["uid"] = uid
            if gid != -1 and gid != 0xFFFFFFFF:
                ip.f["gid"] = gid
        self._change(path, fn)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        now = time.time_ns()

        def fn(ip: Inode) -> None:  # None: now; -1: leave as it is (UTIME_OMIT)
            if atime_ns != -1:
                ip.f["atime_ns"] = now if atime_ns is None else atime_ns
            if mtime_ns != -1:
                ip.f["mtime_ns"] = now if mtime_ns is None else mtime_ns
        self._change(path, fn)

    # ------------------------------------------------------------- creating
    def _make(self, path: str, mode: int, uid: int, gid: int, *, target: bytes = b"",
              rdev: int = 0, exclusive: bool = True) -> int:
        def body(t: Txn) -> int:
            dp, name = self.parent_of(t, path)
            found = self.lookup(t, dp, name)
            if found is not None:
                if exclusive:
                    raise _err(errno.EEXIST)
                return found[0]
            isdir = stat.S_ISDIR(mode)
            if dp.f["nlink"] == 0:
                raise _err(errno.ENOENT)
            ip = self.new_inode(t, mode, uid, gid, parent=dp.ino if isdir else 0)
            ip.f["rdev"] = rdev
            if target:
                self._write(t, ip, 0, target)
            self.dir_add(t, dp, name, ip.ino, dtype_of(mode))
            now = time.time_ns()
            dp.f["mtime_ns"] = dp.f["ctime_ns"] = now
            if isdir:
                dp.f["nlink"] += 1
            self.iput(t, dp)
            self.iput(t, ip)
            return ip.ino
        return self.run(body)

    def create(self, path: str, mode: int, uid: int = 0, gid: int = 0,
               exclusive: bool = True) -> int:
        return self._make(path, stat.S_IFREG | (mode & 0o7777), uid, gid, exclusive=exclusive)

    def mknod(self, path: str, mode: int, rdev: int = 0, uid: int = 0, gid: int = 0) -> int:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        return self._make(path, mode, uid, gid, rdev=rdev)

    def mkdir(self, path: str, mode: int, uid: int = 0, gid: int = 0) -> int:
        return self._make(path, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> int:
        raw = target.encode()
        if not raw or len(raw) >= 4096:
            raise _err(errno.ENAMETOOLONG if raw else errno.ENOENT)
        return self._make(path, stat.S_IFLNK | 0o777, uid, gid, target=raw)

    def readlink(self, path: str) -> str:
        parts = split_path(path)

        def body(t: Txn) -> str:
            ip = self.walk(t, parts)
            if not stat.S_ISLNK(ip.mode):
                raise _err(errno.EINVAL)
            return self._read(t, ip, 0, ip.f["size"]).decode(errors="surrogateescape")
        return self.run(body)

    def link(self, target: str, path: str) -> None:
        tparts = split_path(target)

        def body(t: Txn) -> None:
            ip = self.walk(t, tparts, EX)
            if ip.is_dir():
                raise _err(errno.EPERM)
            dp, name = self.parent_of(t, path)
            if self.lookup(t, dp, name) is not None:
                raise _err(errno.EEXIST)
            self.dir_add(t, dp, name, ip.ino, dtype_of(ip.mode))
            now = time.time_ns()
            ip.f["nlink"] += 1
            ip.f["ctime_ns"] = dp.f["mtime_ns"] = dp.f["ctime_ns"] = now
            self.iput(t, ip)
            self.iput(t, dp)
        self.run(body)

    # ------------------------------------------------------------- removing
    def _drop_link(self, t: Txn, dp: Inode, name: bytes, ip: Inode) -> None:
        self.dir_remove(t, dp, name)
        now = time.time_ns()
        dp.f["mtime_ns"] = dp.f["ctime_ns"] = now
        if ip.is_dir():
            dp.f["nlink"] -= 1
            ip.f["nlink"] = 0
        else:
            ip.f["nlink"] -= 1
        ip.f["ctime_ns"] = now
        self.iput(t, dp)
        if ip.f["nlink"] <= 0:
            self.destroy(t, ip)
        else:
            self.iput(t, ip)

    def unlink(self, path: str) -> None:
        def body(t: Txn) -> None:
            dp, name = self.parent_of(t, path)
            found = self.lookup(t, dp, name)
            if found is None:
                raise _err(errno.ENOENT)
            ip = self.iget(t, found[0], EX)
            if ip.is_dir():
                raise _err(errno.EISDIR)
            self._drop_link(t, dp, name, ip)
        self.run(body)

    def _is_empty(self, t: Txn, ip: Inode) -> bool:
        return not self.dir_entries(t, ip)

    def rmdir(self, path: str) -> None:
        def body(t: Txn) -> None:
            dp, name = self.parent_of(t, path)
            if name in (b".", b".."):
                raise _err(errno.EINVAL)
            found = self.lookup(t, dp, name)
            if found is None:
                raise _err(errno.ENOENT)
            ip = self.iget(t, found[0], EX)
            if not ip.is_dir():
                raise _err(errno.ENOTDIR)
            if not self._is_empty(t, ip):
                raise _err(errno.ENOTEMPTY)
            self._drop_link(t, dp, name, ip)
        self.run(body)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        oparts, nparts = split_path(old), split_path(new)
        if not oparts or not nparts:
            raise _err(errno.EBUSY)
        if nparts[:len(oparts)] == oparts and len(nparts) > len(oparts):
            raise _err(errno.EINVAL, "cannot move a directory into itself")
        cross_dir = oparts[:-1] != nparts[:-1]
        first = ((f"{self.tag}.rename", EX),) if cross_dir else ()

        def body(t: Txn) -> None:
            if cross_dir:
                t.lock(f"{self.tag}.rename", EX)
            odp, oname = self.parent_of(t, old)
            ndp, nname = self.parent_of(t, new)
            same = odp.ino == ndp.ino
            if same:
                ndp = odp
            found = self.lookup(t, odp, oname)
            if found is None:
                raise _err(errno.ENOENT)
            ip = self.iget(t, found[0], EX)
            target = self.lookup(t, ndp, nname)
            if target is not None and target[0] == ip.ino:
                return
            if ip.is_dir() and not same:
                a = ndp  # the new parent must not be inside the directory moved
                while a.ino != self.geo.root_ino:
                    if a.ino == ip.ino:
                        raise _err(errno.EINVAL)
                    a = self.iget(t, a.f["parent"])
                    if a.ino == ip.ino:
                        raise _err(errno.EINVAL)
            if target is not None:
                if flags & 1:  # RENAME_NOREPLACE
                    raise _err(errno.EEXIST)
                tp = self.iget(t, target[0], EX)
                if ip.is_dir() and not tp.is_dir():
                    raise _err(errno.ENOTDIR)
                if tp.is_dir() and not ip.is_dir():
                    raise _err(errno.EISDIR)
                if tp.is_dir() and not self._is_empty(t, tp):
                    raise _err(errno.ENOTEMPTY)
                self._drop_link(t, ndp, nname, tp)
            self.dir_remove(t, odp, oname)
            self.dir_add(t, ndp, nname, ip.ino, dtype_of(ip.mode))
            now = time.time_ns()
            if ip.is_dir() and not same:
                odp.f["nlink"] -= 1
                ndp.f["nlink"] += 1
                ip.f["parent"] = ndp.ino
            for d in (odp, ndp):
                d.f["mtime_ns"] = d.f["ctime_ns"] = now
                self.iput(t, d)
            ip.f["ctime_ns"] = now
            self.iput(t, ip)
        self.run(body, first)

    # --------------------------------------------------------------- data
    def _read(self, t: Txn, ip: Inode, offset: int, size: int) -> bytes:
        end = min(ip.f["size"], offset + size)
        if offset >= end:
            return b""
        bs = self.bs
        out = bytearray()
        idx = offset // bs
        while idx * bs < end:
            blk = self.bmap(t, ip, idx)
            chunk = self.dev.read(blk * bs, bs) if blk else bytes(bs)
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            out += chunk[lo:hi]
            idx += 1
        return bytes(out)

    def _write(self, t: Txn, ip: Inode, offset: int, data: bytes) -> int:
        bs = self.bs
        end = offset + len(data)
        idx = offset // bs
        pos = 0
        while idx * bs < end:
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            existing = self.bmap(t, ip, idx)
            blk = existing or self.bmap(t, ip, idx, alloc=True)
            if hi - lo == bs:
                block = data[pos:pos + bs]
            else:
                old = t.data.get(blk)
                if old is None:
                    old = self.dev.read(blk * bs, bs) if existing else bytes(bs)
                block = old[:lo] + data[pos:pos + hi - lo] + old[hi:]
            t.write_data(blk, bytes(block))
            pos += hi - lo
            idx += 1
        if end > ip.f["size"]:
            ip.f["size"] = end
        ip.f["mtime_ns"] = ip.f["ctime_ns"] = time.time_ns()
        self.iput(t, ip)
        return len(data)

    def read(self, path: str, size: int, offset: int) -> bytes:
        parts = split_path(path)

        def body(t: Txn) -> bytes:
            ip = self.walk(t, parts)
            if ip.is_dir():
                raise _err(errno.EISDIR)
            return self._read(t, ip, offset, size)
        return self.run(body)

    def write(self, path: str, data: bytes, offset: int) -> int:
        parts = split_path(path)

        def body(t: Txn) -> int:
            ip = self.walk(t, parts, EX)
            if ip.is_dir():
                raise _err(errno.EISDIR)
            return self._write(t, ip, offset, data)
        return self.run(body)

    def truncate(self, path: str, length: int) -> None:
        parts = split_path(path)
        if length < 0:
            raise _err(errno.EINVAL)
        if length > max_file_blocks(self.bs) * self.bs:
            raise _err(errno.EFBIG)

        def body(t: Txn) -> None:
            ip = self.walk(t, parts, EX)
            if ip.is_dir():
                raise _err(errno.EISDIR)
            bs = self.bs
            if length < ip.f["size"]:
                keep = (length + bs - 1) // bs
                self.truncate_blocks(t, ip, keep)
                if length % bs:
                    blk = self.bmap(t, ip, length // bs)
                    if blk:
                        old = self.dev.read(blk * bs, bs)
                        t.write_data(blk, old[:length % bs] + bytes(bs - length % bs))
            ip.f["size"] = length
            ip.f["mtime_ns"] = ip.f["ctime_ns"] = time.time_ns()
            self.iput(t, ip)
        self.run(body)

    def fallocate(self, path: str, mode: int, offset: int, length: int) -> None:
        """fallocate(2) modes 0 and FALLOC_FL_KEEP_SIZE: allocate every block of
        ``[offset, offset + length)`` that is a hole, so later writes there cannot
        fail with ENOSPC; the size grows to the end of the range unless KEEP_SIZE.

        The format has no "unwritten extent" flag, so new blocks are written
        with zeros (ordered data, before the metadata that maps them).  Large
        ranges commit FALLOCATE_CHUNK blocks per transaction (one journal record
        each): an ENOSPC part way keeps what was allocated, as ext4 does.
        PUNCH_HOLE|KEEP_SIZE frees the blocks the range covers whole and zeroes
        the partial ones at its edges.  Other modes (zero, collapse, insert
        range, punch without KEEP_SIZE as Linux) give EOPNOTSUPP."""
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if mode & ~punch or mode == FALLOC_FL_PUNCH_HOLE:
            raise _err(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        if offset < 0 or length <= 0:
            raise _err(errno.EINVAL)
        bs = self.bs
        end = offset + length
        parts = split_path(path)
        if mode == punch:
            self._punch(parts, offset, min(end, max_file_blocks(bs) * bs))
            return
        if end > max_file_blocks(bs) * bs:
            raise _err(errno.EFBIG)
        first, last = offset // bs, (end - 1) // bs
        zero = bytes(bs)
        lo = first
        while lo <= last:
            hi = min(last + 1, lo + FALLOCATE_CHUNK)

            def body(t: Txn, lo: int = lo, hi: int = hi) -> None:
                ip = self.walk(t, parts, EX)
                if ip.is_dir():
                    raise _err(errno.EISDIR)
                if not stat.S_ISREG(ip.mode):
                    raise _err(errno.ENODEV)
                for i in range(lo, hi):
                    if not self.bmap(t, ip, i):
                        t.write_data(self.bmap(t, ip, i, alloc=True), zero)
                now = time.time_ns()
                if hi > last and not mode & FALLOC_FL_KEEP_SIZE and end > ip.f["size"]:
                    ip.f["size"] = end
                    ip.f["mtime_ns"] = now
                ip.f["ctime_ns"] = now
                self.iput(t, ip)
            self.run(body)
            lo = hi

    def _unmap(self, t: Txn, ip: Inode, idx: int) -> None:
        """Free the block at logical index ``idx`` (mapping blocks stay)."""
        nd, p = self.ndirect, self.ppb
        if idx < nd:
            slot = INODE_HEAD // 8 + idx
            blk = self._ptr(ip.buf, slot)
            if blk:
                self.free(t, blk, ip)
                self._setptr(ip.buf, slot, 0)
                t.dirty.add(ip.ino)
            return
        idx -= nd
        if idx < p:
            path = [self.bs // 8 - 2, idx]
        else:
            idx -= p
            path = [self.bs // 8 - 1, idx // p, idx % p]
        buf, owner = ip.buf, ip.ino
        for slot in path[:-1]:
            blk = self._ptr(buf, slot)
            if not blk:
                return
            buf, owner = t.read(blk, self.iname(ip.ino)), blk
        blk = self._ptr(buf, path[-1])
        if blk:
            self.free(t, blk, ip)
            t.change(owner)
            self._setptr(buf, path[-1], 0)

    def _punch(self, parts: list[str], offset: int, end: int) -> None:
        """FALLOC_FL_PUNCH_HOLE: holes where the range covers whole blocks, zeros
        in the partial blocks at its edges; the size stays."""
        bs = self.bs
        lo = offset // bs
        last = (end - 1) // bs
        while lo <= last:
            hi = min(last + 1, lo + FALLOCATE_CHUNK)

            def body(t: Txn, lo: int = lo, hi: int = hi) -> None:
                ip = self.walk(t, parts, EX)
                if ip.is_dir():
                    raise _err(errno.EISDIR)
                if not stat.S_ISREG(ip.mode):
                    raise _err(errno.ENODEV)
                for i in range(lo, hi):
                    a, b = max(offset, i * bs) - i * bs, min(end, (i + 1) * bs) - i * bs
                    if b - a == bs:
                        self._unmap(t, ip, i)
                        continue
                    blk = self.bmap(t, ip, i)
                    if blk:
                        old = t.data.get(blk) or self.dev.read(blk * bs, bs)
                        t.write_data(blk, old[:a] + bytes(b - a) + old[b:])
                now = time.time_ns()
                ip.f["mtime_ns"] = ip.f["ctime_ns"] = now
                self.iput(t, ip)
            self.run(body)
            lo = hi

    # ------------------------------------------------------------- listing
    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """(name, ino, DT type) of every entry, '.' and '..' first."""
        parts = split_path(path)

        def body(t: Txn) -> list[tuple[str, int, int]]:
            dp = self.walk(t, parts)
            if not dp.is_dir():
                raise _err(errno.ENOTDIR)
            out = [(".", dp.ino, 4), ("..", dp.f["parent"] or dp.ino, 4)]
            out += [(n.decode(errors="surrogateescape"), ino, typ)
                    for n, ino, typ in self.dir_entries(t, dp)]
            return out
        return self.run(body)

    def statfs(self) -> dict[str, int]:
        """Totals from the resource-group headers (read without locks: a snapshot)."""
        self.refresh_geometry()
        g = self.geo
        free = 0
        for k in range(g.rg_count):
            try:
                free += RGRP.unpack(self.read_block(g.rg_block(k)))["free"]
            except FormatError:
                raise _err(errno.EIO, f"resource group {k} is corrupt") from None
        blocks = g.total_blocks
        return {"f_bsize": self.bs, "f_frsize": self.bs, "f_blocks": blocks, "f_bfree": free,
                "f_bavail": free, "f_files": blocks, "f_ffree": free, "f_favail": free,
                "f_namemax": NAME_MAX}

    # -------------------------------------------------------------- xattrs
    def _xattrs(self, t: Txn, ip: Inode) -> dict[bytes, bytes]:
        blk = ip.f["xattr_block"]
        if not blk:
            return {}
        buf = t.read(blk, self.iname(ip.ino))
        magic, count = XATTR_HEAD.unpack_from(buf, 0)
        if magic != XATTR_MAGIC:
            raise FormatError("bad xattr block")
        out, off = {}, XATTR_HEAD.size
        for _ in range(count):
            nl, vl = XATTR_ENTRY.unpack_from(buf, off)
            off += XATTR_ENTRY.size
            out[bytes(buf[off:off + nl])] = bytes(buf[off + nl:off + nl + vl])
            off += nl + vl
        return out

    def _store_xattrs(self, t: Txn, ip: Inode, xa: dict[bytes, bytes]) -> None:
        body = b"".join(XATTR_ENTRY.pack(len(k), len(v)) + k + v for k, v in xa.items())
        if XATTR_HEAD.size + len(body) > self.bs:
            raise _err(errno.ENOSPC, "extended attributes exceed one block")
        if not xa:
            if ip.f["xattr_block"]:
                self.free(t, ip.f["xattr_block"], None)
                ip.f["xattr_block"] = 0
        else:
            blk = ip.f["xattr_block"]
            if not blk:
                blk = ip.f["xattr_block"] = self.alloc(t, None)
            buf = t.new(blk, self.iname(ip.ino))
            raw = XATTR_HEAD.pack(XATTR_MAGIC, len(xa)) + body
            buf[:len(raw)] = raw
        ip.f["ctime_ns"] = time.time_ns()
        self.iput(t, ip)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        key = name.encode()
        if not key or len(key) > 255:
            raise _err(errno.ERANGE)
        if len(value) > 0xFFFF:
            raise _err(errno.E2BIG)
        parts = split_path(path)

        def body(t: Txn) -> None:
            ip = self.walk(t, parts, EX)
            xa = self._xattrs(t, ip)
            if flags & XATTR_CREATE and key in xa:
                raise _err(errno.EEXIST)
            if flags & XATTR_REPLACE and key not in xa:
                raise _err(errno.ENODATA)
            xa[key] = bytes(value)
            self._store_xattrs(t, ip, xa)
        self.run(body)

    def getxattr(self, path: str, name: str) -> bytes:
        parts = split_path(path)

        def body(t: Txn) -> bytes:
            xa = self._xattrs(t, self.walk(t, parts))
            if name.encode(errors="surrogateescape") not in xa:
                raise _err(errno.ENODATA)
            return xa[name.encode(errors="surrogateescape")]
        return self.run(body)

    def listxattr(self, path: str) -> list[str]:
        parts = split_path(path)
        return self.run(lambda t: [k.decode(errors="surrogateescape")
                                  for k in self._xattrs(t, self.walk(t, parts))])

    def removexattr(self, path: str, name: str) -> None:
        parts = split_path(path)

        def body(t: Txn) -> None:
            ip = self.walk(t, parts, EX)
            xa = self._xattrs(t, ip)
            if xa.pop(name.encode(), None) is None:
                raise _err(errno.ENODATA)
            self._store_xattrs(t, ip, xa)
        self.run(body)
