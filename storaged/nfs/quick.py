"""NFSv3 READ and WRITE in one step: the hot path for small page-cache I/O.

A 4 KiB READ through the general path (``RpcService.run``, the XDR result
tables, ``Nfs3.read`` and its routing, squashing and attribute helpers) is
about 35 Python calls, which on a 2-core machine caps one event-loop thread
well below a C server.  ``QuickIo`` answers the common case in a handful:
the handle's routing (export, inode, MAC check, client address and port,
squashed identity) is remembered per connection, and the reply header,
record mark included, is packed in one call (``read_reply``/``write_reply``:
``_fastio._nfsrpc`` when built, else the references here, built from nfs3's encoders).  Large
READs still go out by sendfile (``FileRange``) where the transport can.

It only ever *answers* calls whose outcome is success and otherwise declines
with None before anything is done, so the general path runs the call and
reports the error: a bad or stale handle, a client the export refuses, a
read-only export, a permission error, a bad count.  The arguments come
decoded by the procedures' own ``fast_args`` (``read3_args``/``write3_args``).  A
WRITE the filesystem refuses is declined too; NFS WRITE is idempotent (RFC
1813 §3.3.7 relies on retransmission), so the general path's second attempt
reports the same error.  Tests compare its replies byte for byte with the
general path's.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from storaged.fastio import extensions_disabled
from storaged.nas.exports import ExportTable, HandleError
from storaged.nas.fs import Attr, Creds, FsError, check_io
from storaged.nfs.nfs3 import POST_OP_ATTR, PRE_OP_ATTR, Nfs3, fattr3_bytes
from storaged.nfs.rpc import LAST_FRAGMENT, Call, FileRange, Procedure, Program, accepted_header

_MARK = struct.Struct(">I")
_OK_ATTRS = b"\0\0\0\0\0\0\0\1"  # NFS3_OK, post_op_attr: attributes follow
_READ_TAIL = struct.Struct(">III")  # count, eof, data length
_WRITE_TAIL = struct.Struct(">II")  # count, committed
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")  # by padding length
#: Routing entries kept per connection before the cache starts over.
MAX_FILES = 1024


def read_reply_py(xid: int, t: Attr, count: int, eof: bool) -> bytes:
    """Record mark, RPC reply header and READ3resok up to the data: ``count``
    bytes of data and their padding follow (pure-Python reference of
    ``read_reply``, which is ``_fastio._nfsrpc`` when built)."""
    body = accepted_header(xid) + _OK_ATTRS + fattr3_bytes(t) + _READ_TAIL.pack(
        count, 1 if eof else 0, count)
    return _MARK.pack(LAST_FRAGMENT | (len(body) + count + (-count & 3))) + body


def write_reply_py(xid: int, b: Attr, t: Attr, count: int, committed: int,
                   verifier: bytes) -> bytes:
    """Record mark, RPC reply header and the whole WRITE3resok: wcc_data from
    ``b`` (before) and ``t`` (after), ``count``, ``committed``, ``verifier``
    (pure-Python reference of ``write_reply``)."""
    if len(verifier) != 8:
        raise ValueError("the write verifier is 8 bytes")
    body = bytearray(accepted_header(xid))
    body += b"\0\0\0\0"  # NFS3_OK
    PRE_OP_ATTR.pack(b, body)
    POST_OP_ATTR.pack(t, body)
    body += _WRITE_TAIL.pack(count, committed)
    body += verifier
    return _MARK.pack(LAST_FRAGMENT | len(body)) + body


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
    """What the general path would work out for one handle on one connection,
    and the attributes its last quick READ or WRITE replied with."""

    __slots__ = ("version", "cred", "fs", "inode", "creds", "rtmax", "writable",
                 "read_range", "pread", "pwrite", "attr_ttl_ns", "attr", "attr_gen", "attr_ns")

    def __init__(self, version: int, cred: Any, fs: Any, inode: bytes, creds: Creds,
                 rtmax: int, writable: bool, attr_ttl_ns: int) -> None:
        self.version = version
        self.cred = cred
        self.fs = fs
        self.inode = inode
        self.creds = creds
        self.rtmax = rtmax
        self.writable = writable
        self.read_range = getattr(fs, "read_range", None)
        self.pread = getattr(fs, "pread", None)
        self.pwrite = getattr(fs, "pwrite", None)
        # Attributes are reused (export attr_timeout) only where the filesystem can
        # read and write without re-reading them.
        reuse = self.pread is not None and self.pwrite is not None
        self.attr_ttl_ns = attr_ttl_ns if reuse else 0
        self.attr: Attr | None = None
        self.attr_gen = -1
        self.attr_ns = 0


class QuickIo:
    """READ and WRITE of ``nfs`` (an ``Nfs3``) without the general machinery.

    ``read``/``write`` take a ``Call`` whose ``local`` is its connection's
    scratch dict and its arguments (decoded by the procedure's ``fast_args``)
    and return the framed reply, or None to leave the call to the general
    path.
    """

    def __init__(self, nfs: Nfs3) -> None:
        self.nfs = nfs
        self.exports: ExportTable = nfs.exports

    def bind(self, program: Program) -> None:
        """Make READ and WRITE of ``program`` (``nfs``'s) quick procedures."""
        for num, fn in ((6, self.read), (7, self.write)):
            proc: Procedure = program.procs[num]
            proc.quick = fn

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
        f = _File(self.exports.version, c, fs, inode,
                  export.creds(c.uid, c.gid, c.gids), fs.fsinfo().rtmax,
                  not export.record.read_only, export.attr_timeout_ns)
        if len(files) >= MAX_FILES:
            files.clear()
        files[fh] = f
        return f

    def read(self, call: Call, args: dict[str, Any]) -> list[Any] | None:
        fh = args["file"]
        f = call.local.get(fh)  # _file, inline: this is the hottest path
        if f is None or f.version != self.exports.version or f.cred is not call.cred:
            f = self._route(call, fh, call.local)
            if f is None:
                return None
        offset = args["offset"]
        count = min(args["count"], f.rtmax)
        data: Any
        try:
            if call.zero_copy and count >= Nfs3.ZERO_COPY_MIN and f.read_range is not None:
                fd, k, eof, t = f.read_range(f.inode, offset, count, f.creds)
                data = FileRange(fd, offset, k) if fd is not None else b""
            else:
                # Wholly inside the file as this handle's last READ/WRITE saw it:
                # one pread, answered with those attributes.  A READ that reaches
                # the end of the file, or comes back short (the file shrank), is
                # answered fresh, as its eof must come from the current size.
                t = self._attr_reusable(f, self.nfs.generation)
                data = None
                if t is not None and 0 < count and offset + count < t.size:
                    check_io(t, f.creds, write=False)
                    data = f.pread(f.inode, offset, count)
                    if len(data) != count:
                        data = None
                if data is not None:
                    eof = False
                else:
                    data, eof, t = f.fs.read(f.inode, offset, count, f.creds)
                    if f.attr_ttl_ns:
                        f.attr, f.attr_gen, f.attr_ns = t, self.nfs.generation, \
                            time.monotonic_ns()
                k = len(data)
        except FsError:
            return None
        head = read_reply(call.xid, t, k, eof)
        pad = -k & 3
        return [head, data, _ZEROS[pad]] if pad else [head, data]

    @staticmethod
    def _attr_reusable(f: _File, generation: int) -> Attr | None:
        """The attributes ``f``'s last quick READ or WRITE replied with, if they may
        stand for the file's current ones: younger than the export's
        ``attr_timeout`` and no modifying NFS procedure run since (``generation``
        unchanged), so only a change made on the host directly can have made them
        stale, by at most ``attr_timeout``."""
        t = f.attr
        if t is None or f.attr_gen != generation \
                or time.monotonic_ns() - f.attr_ns >= f.attr_ttl_ns:
            return None
        return t

    def write(self, call: Call, args: dict[str, Any]) -> list[bytes] | None:
        count = args["count"]
        data = args["data"]
        if count != len(data):
            if count > len(data):
                return None  # NFS3ERR_INVAL, from the general path
            data = data[:count]
        f = self._file(call, args["file"])
        if f is None or not f.writable:
            return None
        nfs = self.nfs
        b = self._attr_reusable(f, nfs.generation)
        nfs.generation += 1  # as Nfs3._wrap does for every modifying procedure
        stable = args["stable"]
        try:
            if b is not None:  # the attributes this handle's last READ or WRITE replied with
                check_io(b, f.creds, write=True)
                t = f.pwrite(f.inode, args["offset"], data, stable)
            else:
                b, t = f.fs.write(f.inode, args["offset"], data, stable, f.creds)
        except FsError:
            return None
        if nfs.listings.has_entries():
            nfs._changed(7, args)
        if f.attr_ttl_ns:  # after _changed, which moves the generation on again
            f.attr, f.attr_gen, f.attr_ns = t, nfs.generation, time.monotonic_ns()
        return [write_reply(call.xid, b, t, count, stable, nfs.verifier)]
