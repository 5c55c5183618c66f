"""READDIR / READDIRPLUS entries of a host directory, encoded in one pass.

The general listing path goes through the NAS filesystem interface
(``fs.readdir`` yields ``DirEntry`` objects, ``Nfs3._readdir`` encodes them)
and costs ~15 us per entry in Python.  For backends that list a real kernel
directory (``HostFs``: ``listing_fd``) this module fuses the loop: getdents64
from the cookie on, then per entry ``name_to_handle_at`` + ``fstatat``
(READDIRPLUS), the NFS file handle (``storaged.nas.exports`` layout: prefix,
inode handle, keyed BLAKE2b MAC) and the XDR of ``entry3``/``entryplus3``
(RFC 1813 §3.3.16-17), stopping before ``budget`` bytes are exceeded.

``encode_entries`` is the compiled ``_fastio._nfsdir`` when built (and not
disabled with ``STORAGED_NO_EXTENSIONS=1``), else ``encode_entries_py``, the
pure-Python reference below; tests check they return identical bytes, and
that both match the general path.
"""

from __future__ import annotations

import array
import bisect
import errno
import hashlib
import os
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Hashable

from storaged.fastio import extensions_disabled
from storaged.nas import linux

__all__ = ["IMPLEMENTATION", "ListingCache", "blake2b_mac", "encode_entries",
           "encode_entries_py", "encode_indexed", "encode_indexed_py", "refresh_attrs",
           "refresh_attrs_py"]

_FATTR = struct.Struct(">IIIIIQQIIQQIIIIII")
_ENTRY_HEAD = struct.Struct(">IQI")  # value_follows, fileid, name length
_Q = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_TRUE = b"\0\0\0\1"
_FALSE = b"\0\0\0\0"
_M32 = 0xFFFFFFFF
_FH_MAX = 64
_MAC_LEN = 8
_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFBLK: 3, stat.S_IFCHR: 4,
          stat.S_IFLNK: 5, stat.S_IFSOCK: 6, stat.S_IFIFO: 7}


def blake2b_mac_py(key: bytes, data: bytes, digest_size: int = 8) -> bytes:
    """Keyed BLAKE2b (RFC 7693), the handle MAC of ``storaged.nas.exports``."""
    return hashlib.blake2b(data, key=key, digest_size=digest_size).digest()


def _time(sec: int, nsec: int) -> tuple[int, int]:
    return (0, 0) if sec < 0 else (sec & _M32, nsec)


def fattr3_stat(st: os.stat_result, fsid: int) -> bytes:
    """fattr3 (RFC 1813 §2.6) of a stat result, as ``HostFs._attr`` + ``fattr3_bytes``."""
    a = _time(*divmod(st.st_atime_ns, 1_000_000_000))
    m = _time(*divmod(st.st_mtime_ns, 1_000_000_000))
    c = _time(*divmod(st.st_ctime_ns, 1_000_000_000))
    return _FATTR.pack(_TYPES.get(stat.S_IFMT(st.st_mode), 1), st.st_mode & 0o7777,
                       st.st_nlink & _M32, st.st_uid & _M32, st.st_gid & _M32, st.st_size,
                       st.st_blocks * 512, os.major(st.st_rdev) & _M32,
                       os.minor(st.st_rdev) & _M32, fsid, st.st_ino, a[0], a[1], m[0], m[1],
                       c[0], c[1])


def encode_entries_py(dfd: int, cookie: int, budget: int, first_read: int, plus: bool,
                      is_root: bool, mount_id: int, dir_fh: bytes, prefix: bytes, key: bytes,
                      fsid: int) -> tuple[bytes, int, bool]:
    """``(entries XDR, count, eof)`` of the directory open as ``dfd`` from ``cookie`` on.

    ``dir_fh`` is the NFS handle of the directory itself (for ``.``, and for
    ``..`` when ``is_root``); ``prefix`` the 5-byte handle prefix (version,
    export id) and ``key`` the export's MAC key; entries whose handle is on
    another mount (``mount_id``) or cannot be made get no attributes or handle.
    OSError(EINVAL) for a cookie the directory cannot seek to.
    """
    return encode_indexed_py(dfd, cookie, budget, first_read, plus, is_root, mount_id,
                             dir_fh, prefix, key, fsid)[:3]


def encode_indexed_py(dfd: int, cookie: int, budget: int, first_read: int, plus: bool,
                      is_root: bool, mount_id: int, dir_fh: bytes, prefix: bytes, key: bytes,
                      fsid: int) -> tuple[bytes, int, bool, bytes]:
    """``encode_entries_py`` plus an index: native uint64 pairs (cookie, end offset)."""
    if len(prefix) != 5 or len(key) > 64 or len(dir_fh) > 64:
        raise ValueError("bad handle prefix, key or directory handle")
    try:
        os.lseek(dfd, cookie, os.SEEK_SET)
    except OSError:
        raise OSError(errno.EINVAL, "bad cookie") from None
    out = bytearray()
    index: list[int] = []
    n = 0
    self_st: os.stat_result | None = None
    n2h = linux.name_to_handle_at
    dents = linux.Getdents()
    for name, ino, off, _dtype in dents.read(dfd, min(max(first_read, 1024), dents.size)):
        ln = len(name)
        tail = b""
        if name == b"." or (is_root and name == b".."):
            if self_st is None:
                self_st = os.fstat(dfd)
            ino = self_st.st_ino
            if plus:
                tail = _TRUE + fattr3_stat(self_st, fsid) + _TRUE + _U32.pack(len(dir_fh)) + \
                    dir_fh + _PAD[len(dir_fh) & 3]
        elif plus:
            try:
                inode, mid = n2h(dfd, name, 0)
                if mid == mount_id and 5 + len(inode) + _MAC_LEN <= _FH_MAX:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    fh = prefix + inode + blake2b_mac_py(key, prefix[1:] + inode)
                    tail = _TRUE + fattr3_stat(st, fsid) + _TRUE + _U32.pack(len(fh)) + \
                        fh + _PAD[len(fh) & 3]
            except OSError:
                tail = b""
        if plus and not tail:
            tail = _FALSE + _FALSE
        piece = _ENTRY_HEAD.pack(1, ino, ln) + name + _PAD[ln & 3] + _Q.pack(off) + tail
        if len(out) + len(piece) > budget:
            return bytes(out), n, False, array.array("Q", index).tobytes()
        out += piece
        index += (off, len(out))
        n += 1
    return bytes(out), n, True, array.array("Q", index).tobytes()


def refresh_attrs_py(dfd: int, buf: bytearray | memoryview, is_root: bool, fsid: int) -> bool:
    """Rewrite every entryplus3 fattr3 in ``buf`` from a fresh stat of its name (the
    directory itself for ``.`` and root ``..``); False if one cannot be stat'ed or ``buf``
    is not an entry list."""
    pos, n = 0, len(buf)
    while pos < n:
        if pos + 16 > n or _U32.unpack_from(buf, pos)[0] != 1:
            return False
        ln = _U32.unpack_from(buf, pos + 12)[0]
        if ln > 255 or pos + 16 + ((ln + 3) & ~3) + 12 > n:
            return False
        name = bytes(buf[pos + 16:pos + 16 + ln])
        pos += 16 + ((ln + 3) & ~3) + 8
        if not _U32.unpack_from(buf, pos)[0]:
            pos += 8
            continue
        if pos + 96 > n:
            return False
        try:
            if name == b"." or (is_root and name == b".."):
                st = os.fstat(dfd)
            else:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        buf[pos + 4:pos + 88] = fattr3_stat(st, fsid)
        pos += 92
        fl = _U32.unpack_from(buf, pos)[0]
        if fl > _FH_MAX or pos + 4 + ((fl + 3) & ~3) > n:
            return False
        pos += 4 + ((fl + 3) & ~3)
    return True


IMPLEMENTATION = "pure"
encode_entries = encode_entries_py
encode_indexed = encode_indexed_py
refresh_attrs = refresh_attrs_py
blake2b_mac = blake2b_mac_py
if not extensions_disabled():
    try:
        from _fastio._nfsdir import (  # type: ignore[no-redef]
            blake2b_mac,
            encode_entries,
            encode_indexed,
            refresh_attrs,
        )

        IMPLEMENTATION = "compiled"
    except ImportError:
        pass


class Snapshot:
    """A whole directory's READDIRPLUS entries as of ``stamp`` (mtime, ctime, fileid)."""

    __slots__ = ("stamp", "data", "ends", "after", "cookies", "complete", "fresh")

    def __init__(self, stamp: tuple[int, int, int], data: bytes, index: bytes,
                 complete: bool = True) -> None:
        pairs = array.array("Q")
        pairs.frombytes(index)
        self.stamp = stamp
        #: False: the directory was too big to cache (remembered so that it is not
        #: walked again at every cookie 0 while unchanged)
        self.complete = complete
        #: the entries, attributes included: ``store_attrs`` writes re-read ones back
        self.data = data if type(data) is bytearray else bytearray(data)
        #: (cookie, budget) of a slice whose attributes in ``data`` are recent ->
        #: (time.monotonic_ns() before they were read, Nfs3.generation after)
        self.fresh: dict[tuple[int, int], tuple[int, int]] = {}
        #: end offset of entry i in ``data``, and its cookie
        self.ends = pairs[1::2]
        self.cookies = pairs[0::2]
        #: cookie -> index of the entry that follows it
        self.after = {c: i + 1 for i, c in enumerate(pairs[0::2])}

    def last_cookie(self, cookie: int, n: int) -> int:
        """The cookie of the last of the ``n`` entries that ``slice(cookie, ...)`` gave."""
        return self.cookies[(0 if cookie == 0 else self.after[cookie]) + n - 1]

    def slice(self, cookie: int, budget: int) -> tuple[bytearray, int, bool] | None:
        """Entries after ``cookie`` that fit in ``budget`` bytes, as the uncached path
        would choose them; None for a cookie this snapshot does not know."""
        first = 0 if cookie == 0 else self.after.get(cookie)
        if first is None or not self.complete:
            return None
        ends = self.ends
        start = ends[first - 1] if first else 0
        stop = bisect.bisect_right(ends, start + budget, lo=first)
        end = ends[stop - 1] if stop > first else start
        return bytearray(self.data[start:end]), stop - first, stop == len(ends)

    def store_attrs(self, cookie: int, budget: int, entries: bytes | bytearray, when: int,
                    generation: int) -> None:
        """Write the entries of ``slice(cookie, budget)``, with attributes read at
        ``when`` (monotonic ns), back into ``data`` and remember them as fresh then.
        Entry sizes never change (handles and names are fixed), so this is in place."""
        first = 0 if cookie == 0 else self.after.get(cookie)
        if first is None:
            return
        start = self.ends[first - 1] if first else 0
        self.data[start:start + len(entries)] = entries
        self.fresh[(cookie, budget)] = (when, generation)


class ListingCache:
    """READDIRPLUS listings of settled directories, reused across the round trips of
    one client listing (libnfs asks for ~50 entries a call) and across listings.

    A snapshot holds everything but the attributes: names, cookies (d_off),
    fileids and file handles, which are fixed while the directory's mtime and
    ctime are unchanged (every create, remove, rename or link changes them).  It
    is only taken and used while the directory has been unmodified for
    ``settle_ns`` (2 s), longer than the kernel's coarse timestamp tick, so a
    change made within the same tick as the snapshot cannot go unnoticed.
    Attributes are re-read (``refresh_attrs``, one fstatat per entry) unless the
    export's ``attr_timeout`` lets a reply reuse those of an earlier one
    (``Snapshot.fresh``; ``storaged.nfs.nfs3`` decides, and voids them on changes).
    Bounded by directory count and bytes (LRU); a directory over ``max_dir_bytes``
    (~50,000 entries) is remembered as too big until it changes, so it is not
    walked again at every listing.
    """

    def __init__(self, max_dirs: int = 16, max_bytes: int = 64 << 20,
                 max_dir_bytes: int = 8 << 20, settle_ns: int = 2_000_000_000) -> None:
        self.max_dirs = max_dirs
        self.max_bytes = max_bytes
        self.max_dir_bytes = max_dir_bytes
        self.settle_ns = settle_ns
        self.bytes = 0
        self._snaps: OrderedDict[Hashable, Snapshot] = OrderedDict()

    def settled(self, mtime: int, ctime: int, now: int | None = None) -> bool:
        """True if a directory with these times may be cached now."""
        return (time.time_ns() if now is None else now) - max(mtime, ctime) > self.settle_ns

    def get(self, key: Hashable, stamp: tuple[int, int, int]) -> Snapshot | None:
        snap = self._snaps.get(key)
        if snap is None:
            return None
        if snap.stamp != stamp:
            self._drop(key)
            return None
        self._snaps.move_to_end(key)
        return snap

    def put(self, key: Hashable, snap: Snapshot) -> None:
        if len(snap.data) > self.max_dir_bytes:
            snap = Snapshot(snap.stamp, b"", b"", complete=False)
        self._drop(key)
        self._snaps[key] = snap
        self.bytes += len(snap.data)
        while len(self._snaps) > self.max_dirs or self.bytes > self.max_bytes:
            self._drop(next(iter(self._snaps)))

    def has_entries(self) -> bool:
        """True if any snapshot is held (so cached attributes may need voiding)."""
        return bool(self._snaps)

    def _drop(self, key: Hashable) -> None:
        snap = self._snaps.pop(key, None)
        if snap is not None:
            self.bytes -= len(snap.data)

    def clear(self) -> None:
        self._snaps.clear()
        self.bytes = 0
