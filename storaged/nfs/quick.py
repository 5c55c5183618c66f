"""NFSv3 READ and WRITE in one step: the hot path for small page-cache I/O.

A 4 KiB READ through the general path (``RpcService.run``, the XDR result
tables, ``Nfs3.read`` and its routing, squashing and attribute helpers) is
about 35 Python calls, which on a 2-core machine caps one event-loop thread
well below a C server.  ``QuickIo`` answers the common case in a handful:
the handle's routing (export, inode, MAC check, client address and port,
squashed identity) is remembered per connection, and the reply header,
record mark included, is packed in one call (``read_reply``/``write_reply``:
``_fastio._nfsrpc`` when built, else the ``struct`` references here).  Large
READs still go out by sendfile (``FileRange``) where the transport can.

It only ever *answers* calls whose outcome is success and otherwise declines
with None before anything is done, so the general path runs the call and
reports the error: a bad or stale handle, a client the export refuses, a
read-only export, a permission error, a short or oversized argument list.  A
WRITE the filesystem refuses is declined too; NFS WRITE is idempotent (RFC
1813 §3.3.7 relies on retransmission), so the general path's second attempt
reports the same error.  Tests compare its replies byte for byte with the
general path's.
"""

from __future__ import annotations

import struct
from typing import Any

from storaged.fastio import extensions_disabled
from storaged.nas.exports import ExportTable, HandleError
from storaged.nas.fs import Attr, Creds, FsError
from storaged.nfs.rpc import LAST_FRAGMENT, MSG_ACCEPTED, REPLY, Call, FileRange

_NS = 1_000_000_000
_M32 = 0xFFFFFFFF
_U32 = struct.Struct(">I")
_OFFSET_COUNT = struct.Struct(">QI")
_OFFSET_COUNT_STABLE_LEN = struct.Struct(">QIiI")
# record mark, xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE + length 0, SUCCESS,
# NFS3_OK, post_op_attr TRUE, fattr3 (RFC 1813 §2.6), count, eof, data length.
_READ_REPLY = struct.Struct(">IIIIIIIII" + "IIIIIQQIIQQIIIIII" + "III")
# ... NFS3_OK, wcc_data: pre_op_attr TRUE + wcc_attr, post_op_attr TRUE + fattr3,
# then count, committed (RFC 1813 §3.3.7 WRITE3resok; the verifier follows).
_WRITE_REPLY = struct.Struct(">IIIIIIIII" + "QIIII" + "I" + "IIIIIQQIIQQIIIIII" + "II")
_READ_BODY = _READ_REPLY.size - 4
_WRITE_BODY = _WRITE_REPLY.size - 4 + 8
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")  # by padding length
#: Routing entries kept per connection before the cache starts over.
MAX_FILES = 1024


def read_reply_py(xid: int, t: Attr, count: int, eof: bool) -> bytes:
    """Record mark, RPC reply header and READ3resok up to the data: ``count``
    bytes of data and their padding follow (pure-Python reference of
    ``read_reply``, which is ``_fastio._nfsrpc`` when built)."""
    at, mt, ct = max(t.atime, 0), max(t.mtime, 0), max(t.ctime, 0)  # as fattr3_bytes
    return _READ_REPLY.pack(
        LAST_FRAGMENT | (_READ_BODY + count + (-count & 3)), xid, REPLY, MSG_ACCEPTED, 0, 0,
        0, 0, 1, t.type, t.mode, t.nlink & _M32, t.uid & _M32, t.gid & _M32, t.size, t.used,
        t.rdev[0] & _M32, t.rdev[1] & _M32, t.fsid, t.fileid,
        (at // _NS) & _M32, at % _NS, (mt // _NS) & _M32, mt % _NS,
        (ct // _NS) & _M32, ct % _NS, count, 1 if eof else 0, count)


def write_reply_py(xid: int, b: Attr, t: Attr, count: int, committed: int,
                   verifier: bytes) -> bytes:
    """Record mark, RPC reply header and the whole WRITE3resok: wcc_data from
    ``b`` (before) and ``t`` (after), ``count``, ``committed``, ``verifier``
    (pure-Python reference of ``write_reply``)."""
    if len(verifier) != 8:
        raise ValueError("the write verifier is 8 bytes")
    bm, bc = max(b.mtime, 0), max(b.ctime, 0)
    at, mt, ct = max(t.atime, 0), max(t.mtime, 0), max(t.ctime, 0)
    return _WRITE_REPLY.pack(
        LAST_FRAGMENT | _WRITE_BODY, xid, REPLY, MSG_ACCEPTED, 0, 0, 0, 0, 1,
        b.size, (bm // _NS) & _M32, bm % _NS, (bc // _NS) & _M32, bc % _NS,
        1, t.type, t.mode, t.nlink & _M32, t.uid & _M32, t.gid & _M32, t.size, t.used,
        t.rdev[0] & _M32, t.rdev[1] & _M32, t.fsid, t.fileid,
        (at // _NS) & _M32, at % _NS, (mt // _NS) & _M32, mt % _NS,
        (ct // _NS) & _M32, ct % _NS, count, committed) + verifier


IMPLEMENTATION = "pure"
read_reply = read_reply_py
write_reply = write_reply_py
if not extensions_disabled():
    try:
        from _fastio._nfsrpc import read_reply, write_reply  # type: ignore[no-redef]

        IMPLEMENTATION = "compiled"
    except ImportError:
        pass


class _File:
    """What the general path would work out for one handle on one connection."""

    __slots__ = ("fh", "version", "cred", "fs", "inode", "creds", "rtmax", "writable",
                 "read_range")

    def __init__(self, fh: bytes, version: int, cred: Any, fs: Any, inode: bytes,
                 creds: Creds, rtmax: int, writable: bool) -> None:
        self.fh = fh
        self.version = version
        self.cred = cred
        self.fs = fs
        self.inode = inode
        self.creds = creds
        self.rtmax = rtmax
        self.writable = writable
        self.read_range = getattr(fs, "read_range", None)


class QuickIo:
    """READ and WRITE of ``nfs`` (an ``Nfs3``) without the general machinery.

    ``read``/``write`` take a ``Call`` whose ``local`` is its connection's
    scratch dict and return the framed reply, or None to leave the call to
    the general path.
    """

    def __init__(self, nfs: Any, zero_copy_min: int) -> None:
        self.nfs = nfs
        self.exports: ExportTable = nfs.exports
        self.zero_copy_min = zero_copy_min

    def _file(self, call: Call, fh: bytes) -> _File | None:
        """The route of ``fh`` for this call: remembered on its connection, or
        worked out (``_route``); None where ``Nfs3._export`` would fail."""
        files = call.local
        f = files.get(fh)
        if f is None or f.version != self.exports.version or f.cred is not call.cred:
            return self._route(call, fh, files)
        return f

    def _route(self, call: Call, fh: bytes, files: dict[bytes, _File]) -> _File | None:
        """Route ``fh`` as ``Nfs3._export`` does; None where that would fail."""
        try:
            export, inode = self.exports.resolve(fh)
        except HandleError:
            return None
        host, port = call.peer
        if not export.allows(host) or not export.port_ok(port):
            return None
        c = call.cred
        fs = export.fs
        f = _File(fh, self.exports.version, c, fs, inode,
                  export.creds(c.uid, c.gid, c.gids), fs.fsinfo().rtmax,
                  not export.record.read_only)
        if len(files) >= MAX_FILES:
            files.clear()
        files[fh] = f
        return f

    def read(self, call: Call) -> list[Any] | None:
        a = call.args
        n = len(a)
        if n < 16:
            return None
        flen = _U32.unpack_from(a)[0]
        end = 4 + ((flen + 3) & ~3)
        if flen > 64 or n != end + 12:
            return None
        f = self._file(call, a[4:4 + flen].tobytes())
        if f is None:
            return None
        offset, count = _OFFSET_COUNT.unpack_from(a, end)
        if count > f.rtmax:
            count = f.rtmax
        data: Any
        try:
            if call.zero_copy and count >= self.zero_copy_min and f.read_range is not None:
                fd, k, eof, t = f.read_range(f.inode, offset, count, f.creds)
                data = FileRange(fd, offset, k) if fd is not None else b""
            else:
                data, eof, t = f.fs.read(f.inode, offset, count, f.creds)
                k = len(data)
        except FsError:
            return None
        head = read_reply(call.xid, t, k, eof)
        pad = -k & 3
        return [head, data, _ZEROS[pad]] if pad else [head, data]

    def write(self, call: Call) -> list[bytes | memoryview] | None:
        a = call.args
        n = len(a)
        if n < 24:
            return None
        flen = _U32.unpack_from(a)[0]
        end = 4 + ((flen + 3) & ~3)
        if flen > 64 or n < end + 20:
            return None
        offset, count, stable, k = _OFFSET_COUNT_STABLE_LEN.unpack_from(a, end)
        start = end + 20
        if not 0 <= stable <= 2 or n != start + ((k + 3) & ~3) or count > k:
            return None
        f = self._file(call, a[4:4 + flen].tobytes())
        if f is None or not f.writable:
            return None
        nfs = self.nfs
        nfs.generation += 1  # as Nfs3._wrap does for every modifying procedure
        try:
            b, t = f.fs.write(f.inode, offset, a[start:start + count], stable, f.creds)
        except FsError:
            return None
        if nfs.listings.has_entries():
            nfs._changed(7, {"file": f.fh})
        return [write_reply(call.xid, b, t, count, stable, nfs.verifier)]
