"""NFS version 3 (RFC 1813): XDR tables for all 22 procedures and the program.

The tables mirror RFC 1813 §2.5-§3.3 (types and procedure arguments and
results).  ``Nfs3`` implements the procedures over the NAS filesystem
interface (``storaged.nas.fs``) and the export table: every handle is routed
to its export, the client's address and port are checked against the export,
its AUTH_SYS identity is squashed, and errors map to NFS3ERR_* codes.  Every
result carries the post-operation attributes and weak cache consistency
(wcc) data RFC 1813 asks for, also on failure (§2.6 "wcc_data").

Hot paths (READ, WRITE, GETATTR, READDIRPLUS) use the ``Custom`` fattr3 codec
(one struct.pack from an ``Attr``); golden tests check it against the
declarative ``FATTR3_TABLE``.  READDIR/READDIRPLUS on backends with
``listing_fd`` are encoded in one pass by ``storaged.nfs.dirlist`` (with a
listing cache and a prefetch of the next slice's attributes); large READs on
backends with ``read_range`` return a ``FileRange`` that the TCP shell sends
with sendfile(2).  ``storaged.nfs.quick`` binds quick procedures
(``Procedure.quick``) to READ and WRITE that answer the calls that succeed in
one step; every error still comes from the procedures here.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from storaged.nas.exports import ExportTable, HandleError, LiveExport
from storaged.nas.fs import (
    ACCESS_DELETE,
    ACCESS_EXTEND,
    ACCESS_MODIFY,
    Attr,
    CreateMode,
    Creds,
    FileType,
    FsError,
    SetAttr,
    access_bits,
    mode_allows,
)
from storaged.nfs import dirlist
from storaged.nfs.rpc import Call, Encoded, FileRange, Procedure, Program
from storaged.nfs.xdr import (
    BOOL,
    UINT32,
    UINT64,
    VOID,
    Custom,
    Enum,
    FixedOpaque,
    List,
    Opaque,
    Optional,
    String,
    Struct,
    Union,
    XdrError,
)

log = logging.getLogger("storaged.nfs")

NFS_PROGRAM = 100003
NFS_V3 = 3
NFS3_FHSIZE = 64
NFS3_WRITEVERFSIZE = 8


class Stat:
    """nfsstat3 (RFC 1813 §2.6)."""

    OK = 0
    PERM = 1
    NOENT = 2
    IO = 5
    NXIO = 6
    ACCES = 13
    EXIST = 17
    XDEV = 18
    NODEV = 19
    NOTDIR = 20
    ISDIR = 21
    INVAL = 22
    FBIG = 27
    NOSPC = 28
    ROFS = 30
    MLINK = 31
    NAMETOOLONG = 63
    NOTEMPTY = 66
    DQUOT = 69
    STALE = 70
    REMOTE = 71
    BADHANDLE = 10001
    NOT_SYNC = 10002
    BAD_COOKIE = 10003
    NOTSUPP = 10004
    TOOSMALL = 10005
    SERVERFAULT = 10006
    BADTYPE = 10007
    JUKEBOX = 10008


_ERRNO = {
    errno.EPERM: Stat.PERM, errno.ENOENT: Stat.NOENT, errno.EIO: Stat.IO,
    errno.ENXIO: Stat.NXIO, errno.EACCES: Stat.ACCES, errno.EEXIST: Stat.EXIST,
    errno.EXDEV: Stat.XDEV, errno.ENODEV: Stat.NODEV, errno.ENOTDIR: Stat.NOTDIR,
    errno.EISDIR: Stat.ISDIR, errno.EINVAL: Stat.INVAL, errno.EFBIG: Stat.FBIG,
    errno.ENOSPC: Stat.NOSPC, errno.EROFS: Stat.ROFS, errno.EMLINK: Stat.MLINK,
    errno.ENAMETOOLONG: Stat.NAMETOOLONG, errno.ENOTEMPTY: Stat.NOTEMPTY,
    errno.EDQUOT: Stat.DQUOT, errno.ESTALE: Stat.STALE, errno.ENOTSUP: Stat.NOTSUPP,
    errno.ELOOP: Stat.INVAL, errno.EBUSY: Stat.ACCES, errno.ETXTBSY: Stat.ACCES,
    errno.EOVERFLOW: Stat.FBIG,
}


def nfsstat(err: int) -> int:
    """NFS3ERR_* for an errno (unknown errors are NFS3ERR_IO)."""
    return _ERRNO.get(err, Stat.IO)


# stable_how, createmode3, time_how, ftype3
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME = 0, 1, 2
FSF3_LINK, FSF3_SYMLINK, FSF3_HOMOGENEOUS, FSF3_CANSETTIME = 0x1, 0x2, 0x8, 0x10

# ------------------------------------------------------------ basic types

NFS_FH3 = Opaque(NFS3_FHSIZE, "nfs_fh3", copy=True)
FILENAME3 = String(None, "filename3")
NFSPATH3 = String(None, "nfspath3")
COOKIEVERF3 = FixedOpaque(8, "cookieverf3")
CREATEVERF3 = FixedOpaque(8, "createverf3")
WRITEVERF3 = FixedOpaque(8, "writeverf3")
NFSSTAT3 = UINT32  # unknown status values are passed through, not rejected
FTYPE3 = Enum("ftype3", range(1, 8))
STABLE_HOW = Enum("stable_how", (UNSTABLE, DATA_SYNC, FILE_SYNC))
CREATEMODE3 = Enum("createmode3", (0, 1, 2))
TIME_HOW = Enum("time_how", (DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME))
SPECDATA3 = Struct("specdata3", ("specdata1", UINT32), ("specdata2", UINT32))
NFSTIME3 = Struct("nfstime3", ("seconds", UINT32), ("nseconds", UINT32))

#: fattr3 as RFC 1813 §2.6 writes it: the reference for the fast codec below.
FATTR3_TABLE = Struct(
    "fattr3", ("type", UINT32), ("mode", UINT32), ("nlink", UINT32), ("uid", UINT32),
    ("gid", UINT32), ("size", UINT64), ("used", UINT64), ("rdev", SPECDATA3),
    ("fsid", UINT64), ("fileid", UINT64), ("atime", NFSTIME3), ("mtime", NFSTIME3),
    ("ctime", NFSTIME3),
)
WCC_ATTR_TABLE = Struct("wcc_attr", ("size", UINT64), ("mtime", NFSTIME3),
                        ("ctime", NFSTIME3))

_FATTR = struct.Struct(">IIIIIQQIIQQIIIIII")
_WCC = struct.Struct(">QIIII")
_NS = 1_000_000_000
_M32 = 0xFFFFFFFF


def _t(ns: int) -> tuple[int, int]:
    if ns < 0:
        return 0, 0
    s, n = divmod(ns, _NS)
    return s & _M32, n


def fattr3_bytes(a: Attr) -> bytes:
    """The 84-byte fattr3 of ``a`` (RFC 1813 §2.6)."""
    at, mt, ct = divmod(max(a.atime, 0), _NS), divmod(max(a.mtime, 0), _NS), \
        divmod(max(a.ctime, 0), _NS)
    return _FATTR.pack(a.type, a.mode, a.nlink & _M32, a.uid & _M32, a.gid & _M32, a.size,
                       a.used, a.rdev[0] & _M32, a.rdev[1] & _M32, a.fsid, a.fileid,
                       at[0] & _M32, at[1], mt[0] & _M32, mt[1], ct[0] & _M32, ct[1])


def _pack_fattr3(a: Attr, out: bytearray) -> None:
    out += fattr3_bytes(a)


def _unpack_fattr3(buf: memoryview, off: int) -> tuple[Attr, int]:
    if off + 84 > len(buf):
        raise XdrError("fattr3: short input")
    v = _FATTR.unpack_from(buf, off)
    return Attr(FileType(v[0]) if 1 <= v[0] <= 7 else v[0], v[1], v[2], v[3], v[4], v[5],
                v[6], (v[7], v[8]), v[9], v[10], v[11] * _NS + v[12], v[13] * _NS + v[14],
                v[15] * _NS + v[16]), off + 84


def _pack_wcc(a: Attr, out: bytearray) -> None:
    mt, ct = _t(a.mtime), _t(a.ctime)
    out += _WCC.pack(a.size, mt[0], mt[1], ct[0], ct[1])


def _unpack_wcc(buf: memoryview, off: int) -> tuple[dict[str, Any], int]:
    return WCC_ATTR_TABLE.unpack(buf, off)


FATTR3 = Custom("fattr3", _pack_fattr3, _unpack_fattr3)
WCC_ATTR = Custom("wcc_attr", _pack_wcc, _unpack_wcc)
POST_OP_ATTR = Optional(FATTR3, "post_op_attr")
PRE_OP_ATTR = Optional(WCC_ATTR, "pre_op_attr")
WCC_DATA = Struct("wcc_data", ("before", PRE_OP_ATTR), ("after", POST_OP_ATTR))
POST_OP_FH3 = Optional(NFS_FH3, "post_op_fh3")

SET_MODE3 = Optional(UINT32, "set_mode3")
SET_UID3 = Optional(UINT32, "set_uid3")
SET_GID3 = Optional(UINT32, "set_gid3")
SET_SIZE3 = Optional(UINT64, "set_size3")
SET_TIME = Union("set_time", TIME_HOW, {SET_TO_CLIENT_TIME: NFSTIME3}, default=VOID)
SATTR3 = Struct("sattr3", ("mode", SET_MODE3), ("uid", SET_UID3), ("gid", SET_GID3),
                ("size", SET_SIZE3), ("atime", SET_TIME), ("mtime", SET_TIME))
DIROPARGS3 = Struct("diropargs3", ("dir", NFS_FH3), ("name", FILENAME3))


def _result(name: str, ok: Any, fail: Any) -> Union:
    """A ``union switch (nfsstat3 status) { case NFS3_OK: ok; default: fail; }``."""
    return Union(name, NFSSTAT3, {Stat.OK: ok}, default=fail)


def _s(name: str, *fields: tuple[str, Any]) -> Struct:
    return Struct(name, *fields)


# ------------------------------------------------------- procedure tables

FH_ARGS = _s("fh_args", ("object", NFS_FH3))
GETATTR3RES = _result("GETATTR3res", _s("GETATTR3resok", ("obj_attributes", FATTR3)), VOID)

SATTRGUARD3 = Optional(NFSTIME3, "sattrguard3")
SETATTR3ARGS = _s("SETATTR3args", ("object", NFS_FH3), ("new_attributes", SATTR3),
                  ("guard", SATTRGUARD3))
_WCC_ONLY = _s("wcc_res", ("obj_wcc", WCC_DATA))
SETATTR3RES = _result("SETATTR3res", _WCC_ONLY, _WCC_ONLY)

LOOKUP3ARGS = _s("LOOKUP3args", ("what", DIROPARGS3))
LOOKUP3RES = _result(
    "LOOKUP3res",
    _s("LOOKUP3resok", ("object", NFS_FH3), ("obj_attributes", POST_OP_ATTR),
       ("dir_attributes", POST_OP_ATTR)),
    _s("LOOKUP3resfail", ("dir_attributes", POST_OP_ATTR)))

ACCESS3ARGS = _s("ACCESS3args", ("object", NFS_FH3), ("access", UINT32))
ACCESS3RES = _result(
    "ACCESS3res", _s("ACCESS3resok", ("obj_attributes", POST_OP_ATTR), ("access", UINT32)),
    _s("ACCESS3resfail", ("obj_attributes", POST_OP_ATTR)))

_ATTR_ONLY = _s("attr_res", ("obj_attributes", POST_OP_ATTR))
READLINK3RES = _result(
    "READLINK3res", _s("READLINK3resok", ("symlink_attributes", POST_OP_ATTR),
                       ("data", NFSPATH3)), _ATTR_ONLY)

READ3ARGS = _s("READ3args", ("file", NFS_FH3), ("offset", UINT64), ("count", UINT32))
READ3RES = _result(
    "READ3res", _s("READ3resok", ("file_attributes", POST_OP_ATTR), ("count", UINT32),
                   ("eof", BOOL), ("data", Opaque())), _ATTR_ONLY)

WRITE3ARGS = _s("WRITE3args", ("file", NFS_FH3), ("offset", UINT64), ("count", UINT32),
                ("stable", STABLE_HOW), ("data", Opaque()))
_U32 = struct.Struct(">I")
_OFFSET_COUNT = struct.Struct(">QI")
_OFFSET_COUNT_STABLE_LEN = struct.Struct(">QIiI")


def _fh(buf: memoryview) -> tuple[bytes, int] | None:
    """The nfs_fh3 that starts ``buf`` and the offset just past it, or None."""
    if len(buf) < 4:
        return None
    n = _U32.unpack_from(buf)[0]
    end = 4 + ((n + 3) & ~3)
    if n > NFS3_FHSIZE or end > len(buf):
        return None
    return bytes(buf[4:4 + n]), end


def read3_args(buf: memoryview) -> dict[str, Any] | None:
    """READ3args straight from the bytes (the hot path); None: let the
    READ3ARGS table decode it (and report what is wrong with it)."""
    fh = _fh(buf)
    if fh is None or len(buf) != fh[1] + 12:
        return None
    offset, count = _OFFSET_COUNT.unpack_from(buf, fh[1])
    return {"file": fh[0], "offset": offset, "count": count}


def write3_args(buf: memoryview) -> dict[str, Any] | None:
    """WRITE3args straight from the bytes; ``data`` is a view of ``buf``.
    None: let the WRITE3ARGS table decode it."""
    fh = _fh(buf)
    if fh is None or len(buf) < fh[1] + 20:
        return None
    offset, count, stable, n = _OFFSET_COUNT_STABLE_LEN.unpack_from(buf, fh[1])
    start = fh[1] + 20
    if stable not in (UNSTABLE, DATA_SYNC, FILE_SYNC) or len(buf) != start + ((n + 3) & ~3):
        return None
    return {"file": fh[0], "offset": offset, "count": count, "stable": stable,
            "data": buf[start:start + n]}


WRITE3RES = _result(
    "WRITE3res", _s("WRITE3resok", ("file_wcc", WCC_DATA), ("count", UINT32),
                    ("committed", STABLE_HOW), ("verf", WRITEVERF3)),
    _s("WRITE3resfail", ("file_wcc", WCC_DATA)))

CREATEHOW3 = Union("createhow3", CREATEMODE3, {0: SATTR3, 1: SATTR3, 2: CREATEVERF3})
CREATE3ARGS = _s("CREATE3args", ("where", DIROPARGS3), ("how", CREATEHOW3))
_DIROP_RES = _result(
    "diropres3", _s("diropres3ok", ("obj", POST_OP_FH3), ("obj_attributes", POST_OP_ATTR),
                    ("dir_wcc", WCC_DATA)),
    _s("diropres3fail", ("dir_wcc", WCC_DATA)))
CREATE3RES = MKDIR3RES = SYMLINK3RES = MKNOD3RES = _DIROP_RES

MKDIR3ARGS = _s("MKDIR3args", ("where", DIROPARGS3), ("attributes", SATTR3))
SYMLINKDATA3 = _s("symlinkdata3", ("symlink_attributes", SATTR3),
                  ("symlink_data", NFSPATH3))
SYMLINK3ARGS = _s("SYMLINK3args", ("where", DIROPARGS3), ("symlink", SYMLINKDATA3))
DEVICEDATA3 = _s("devicedata3", ("dev_attributes", SATTR3), ("spec", SPECDATA3))
MKNODDATA3 = Union("mknoddata3", FTYPE3, {
    FileType.CHR: DEVICEDATA3, FileType.BLK: DEVICEDATA3,
    FileType.SOCK: SATTR3, FileType.FIFO: SATTR3}, default=VOID)
MKNOD3ARGS = _s("MKNOD3args", ("where", DIROPARGS3), ("what", MKNODDATA3))

REMOVE3ARGS = _s("REMOVE3args", ("object", DIROPARGS3))
_DIR_WCC = _s("dir_wcc_res", ("dir_wcc", WCC_DATA))
REMOVE3RES = RMDIR3RES = _result("REMOVE3res", _DIR_WCC, _DIR_WCC)

RENAME3ARGS = _s("RENAME3args", ("from", DIROPARGS3), ("to", DIROPARGS3))
_RENAME_WCC = _s("RENAME3wcc", ("fromdir_wcc", WCC_DATA), ("todir_wcc", WCC_DATA))
RENAME3RES = _result("RENAME3res", _RENAME_WCC, _RENAME_WCC)

LINK3ARGS = _s("LINK3args", ("file", NFS_FH3), ("link", DIROPARGS3))
_LINK_RES = _s("LINK3wcc", ("file_attributes", POST_OP_ATTR), ("linkdir_wcc", WCC_DATA))
LINK3RES = _result("LINK3res", _LINK_RES, _LINK_RES)

READDIR3ARGS = _s("READDIR3args", ("dir", NFS_FH3), ("cookie", UINT64),
                  ("cookieverf", COOKIEVERF3), ("count", UINT32))
ENTRY3 = _s("entry3", ("fileid", UINT64), ("name", FILENAME3), ("cookie", UINT64))
READDIR3RES = _result(
    "READDIR3res", _s("READDIR3resok", ("dir_attributes", POST_OP_ATTR),
                      ("cookieverf", COOKIEVERF3),
                      ("reply", _s("dirlist3", ("entries", List(ENTRY3)), ("eof", BOOL)))),
    _s("READDIR3resfail", ("dir_attributes", POST_OP_ATTR)))

READDIRPLUS3ARGS = _s("READDIRPLUS3args", ("dir", NFS_FH3), ("cookie", UINT64),
                      ("cookieverf", COOKIEVERF3), ("dircount", UINT32),
                      ("maxcount", UINT32))
ENTRYPLUS3 = _s("entryplus3", ("fileid", UINT64), ("name", FILENAME3), ("cookie", UINT64),
                ("name_attributes", POST_OP_ATTR), ("name_handle", POST_OP_FH3))
READDIRPLUS3RES = _result(
    "READDIRPLUS3res", _s("READDIRPLUS3resok", ("dir_attributes", POST_OP_ATTR),
                          ("cookieverf", COOKIEVERF3),
                          ("reply", _s("dirlistplus3", ("entries", List(ENTRYPLUS3)),
                                       ("eof", BOOL)))),
    _s("READDIRPLUS3resfail", ("dir_attributes", POST_OP_ATTR)))

FSSTAT3RES = _result(
    "FSSTAT3res", _s("FSSTAT3resok", ("obj_attributes", POST_OP_ATTR), ("tbytes", UINT64),
                     ("fbytes", UINT64), ("abytes", UINT64), ("tfiles", UINT64),
                     ("ffiles", UINT64), ("afiles", UINT64), ("invarsec", UINT32)),
    _ATTR_ONLY)
FSINFO3RES = _result(
    "FSINFO3res", _s("FSINFO3resok", ("obj_attributes", POST_OP_ATTR), ("rtmax", UINT32),
                     ("rtpref", UINT32), ("rtmult", UINT32), ("wtmax", UINT32),
                     ("wtpref", UINT32), ("wtmult", UINT32), ("dtpref", UINT32),
                     ("maxfilesize", UINT64), ("time_delta", NFSTIME3),
                     ("properties", UINT32)),
    _ATTR_ONLY)
PATHCONF3RES = _result(
    "PATHCONF3res", _s("PATHCONF3resok", ("obj_attributes", POST_OP_ATTR),
                       ("linkmax", UINT32), ("name_max", UINT32), ("no_trunc", BOOL),
                       ("chown_restricted", BOOL), ("case_insensitive", BOOL),
                       ("case_preserving", BOOL)),
    _ATTR_ONLY)

COMMIT3ARGS = _s("COMMIT3args", ("file", NFS_FH3), ("offset", UINT64), ("count", UINT32))
COMMIT3RES = _result("COMMIT3res", _s("COMMIT3resok", ("file_wcc", WCC_DATA),
                                      ("verf", WRITEVERF3)),
                     _s("COMMIT3resfail", ("file_wcc", WCC_DATA)))

#: proc number -> (name, args type, result type), RFC 1813 §3.3
PROCEDURES: dict[int, tuple[str, Any, Any]] = {
    0: ("NULL", VOID, VOID),
    1: ("GETATTR", FH_ARGS, GETATTR3RES),
    2: ("SETATTR", SETATTR3ARGS, SETATTR3RES),
    3: ("LOOKUP", LOOKUP3ARGS, LOOKUP3RES),
    4: ("ACCESS", ACCESS3ARGS, ACCESS3RES),
    5: ("READLINK", FH_ARGS, READLINK3RES),
    6: ("READ", READ3ARGS, READ3RES),
    7: ("WRITE", WRITE3ARGS, WRITE3RES),
    8: ("CREATE", CREATE3ARGS, CREATE3RES),
    9: ("MKDIR", MKDIR3ARGS, MKDIR3RES),
    10: ("SYMLINK", SYMLINK3ARGS, SYMLINK3RES),
    11: ("MKNOD", MKNOD3ARGS, MKNOD3RES),
    12: ("REMOVE", REMOVE3ARGS, REMOVE3RES),
    13: ("RMDIR", REMOVE3ARGS, RMDIR3RES),
    14: ("RENAME", RENAME3ARGS, RENAME3RES),
    15: ("LINK", LINK3ARGS, LINK3RES),
    16: ("READDIR", READDIR3ARGS, READDIR3RES),
    17: ("READDIRPLUS", READDIRPLUS3ARGS, READDIRPLUS3RES),
    18: ("FSSTAT", FH_ARGS, FSSTAT3RES),
    19: ("FSINFO", FH_ARGS, FSINFO3RES),
    20: ("PATHCONF", FH_ARGS, PATHCONF3RES),
    21: ("COMMIT", COMMIT3ARGS, COMMIT3RES),
}

#: Procedures that change the filesystem (refused with NFS3ERR_ROFS on ro exports).
MODIFYING = frozenset({2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 21})


class NfsError(Exception):
    """Ends a procedure with ``status``; ``fail`` is the failure arm's value."""

    def __init__(self, status: int, fail: Any = None) -> None:
        super().__init__(status)
        self.status = status
        self.fail = fail


def sattr(v: dict[str, Any]) -> SetAttr:
    """A SetAttr from a decoded sattr3."""
    def t(x: tuple[int, Any]) -> int | None:
        if x[0] == SET_TO_SERVER_TIME:
            return SetAttr.NOW
        if x[0] == SET_TO_CLIENT_TIME:
            return x[1]["seconds"] * _NS + x[1]["nseconds"]
        return None
    return SetAttr(mode=v["mode"], uid=v["uid"], gid=v["gid"], size=v["size"],
                   atime=t(v["atime"]), mtime=t(v["mtime"]))


_TRUE = b"\0\0\0\1"
_FALSE = b"\0\0\0\0"
_OK = b"\0\0\0\0"
_U32 = struct.Struct(">I")
_READ_HDR = struct.Struct(">IIII")  # count, eof, data length ... (after attrs)
_ENTRY_HEAD = struct.Struct(">IQI")  # value_follows, fileid, name length
_Q = struct.Struct(">Q")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length & 3


_FAST_ARGS = {6: read3_args, 7: write3_args}
"""Hand-written argument decoders of the hot procedures (tests compare them
with the tables)."""


class Nfs3:
    """The NFSv3 program over an ``ExportTable``."""

    #: Use storaged.nfs.dirlist (and its listing cache for READDIRPLUS) for backends with
    #: ``listing_fd``; tests turn it off to compare with the general path.
    fast_listing = True

    def __init__(self, exports: ExportTable, write_verifier: bytes) -> None:
        self.exports = exports
        self.verifier = write_verifier
        self.listings = dirlist.ListingCache()
        self.generation = 0  # count of modifying procedures run
        self._next: tuple[Any, ...] | None = None   # listing slice to prefetch
        self._ready: tuple[Any, ...] | None = None  # (match key, time, prefetched slice)
        #: file handle -> generation of the NFS procedure that last changed it (recent
        #: ones only; see ``_changed``), and the generation before which every cached
        #: listing attribute is void
        self.changed: dict[bytes, int] = {}
        self.attrs_void = 0
        self._changed_lock = threading.Lock()

    def program(self) -> Program:
        """The RPC program (100003 v3) with every procedure bound."""
        prog = Program(NFS_PROGRAM, NFS_V3)
        for num, (name, args, res) in PROCEDURES.items():
            fn = getattr(self, name.lower())
            prog.procs[num] = Procedure(name, args, res, self._wrap(num, fn),
                                        blocking=(name == "COMMIT"),
                                        fast_args=_FAST_ARGS.get(num))
        return prog

    def _wrap(self, num: int, fn: Callable[[Call, Any], Any]) -> Callable[[Call, Any], Any]:
        modifying = num in MODIFYING

        def handler(call: Call, args: Any) -> Any:
            if modifying:
                self.generation += 1  # retires prefetched listing attributes
            try:
                return fn(call, args)
            except NfsError as e:
                return (e.status, e.fail)
            finally:
                if modifying and self.listings.has_entries():
                    self._changed(num, args)
        handler.__name__ = fn.__name__
        return handler

    #: Past this many recently changed handles, all cached listing attributes are voided
    #: instead (keeps ``_changed`` and the freshness check cheap under write load).
    MAX_CHANGED = 4096

    def _changed(self, num: int, args: Any) -> None:
        """Void cached listing attributes (export ``attr_timeout``) that procedure
        ``num`` may have changed: the file handles it names (the object, and the
        directory whose mtime/ctime it moves) are marked with a new generation;
        REMOVE, RMDIR and RENAME also change objects named only by name (nlink and
        ctime of the removed, moved or replaced file, which may be listed elsewhere
        through hard links), so they void everything."""
        if num == 2:
            handles = (args["object"],)
        elif num in (7, 21):
            handles = (args["file"],)
        elif num == 15:
            handles = (args["file"], args["link"]["dir"])
        elif num in (8, 9, 10, 11):  # CREATE, MKDIR, SYMLINK, MKNOD
            handles = (args["where"]["dir"],)
        else:  # REMOVE, RMDIR, RENAME
            handles = None
        with self._changed_lock:  # COMMIT runs in a worker thread
            self.generation += 1  # after the change: attributes read from now on have it
            gen = self.generation
            changed = self.changed
            if handles is None or len(changed) >= self.MAX_CHANGED:
                self.attrs_void = gen
                changed.clear()
                return
            for fh in handles:
                fh = bytes(fh)
                changed.pop(fh, None)
                changed[fh] = gen  # insertion order = generation order

    def _attrs_fresh(self, export: LiveExport, snap: dirlist.Snapshot, cookie: int,
                     budget: int, entries: bytearray) -> bool:
        """True if the attributes ``entries`` (``snap.slice(cookie, budget)``) hold are
        recent enough to send without re-reading: read less than the export's
        attr_timeout ago, and no NFS procedure since then changed one of the entries
        (``_changed``).  Changes made other than through storaged show within
        attr_timeout, as with any server-side attribute cache."""
        rec = snap.fresh.get((cookie, budget))
        if rec is None or time.monotonic_ns() - rec[0] >= export.attr_timeout_ns \
                or rec[1] < self.attrs_void:
            return False
        gen = rec[1]
        with self._changed_lock:
            for fh, g in reversed(self.changed.items()):
                if g <= gen:
                    break
                if fh in entries:
                    return False
        return True

    # ------------------------------------------------------------ helpers

    def _export(self, call: Call, fh: bytes, fail: Any, write: bool = False
                ) -> tuple[LiveExport, bytes, Creds]:
        """Route ``fh``: its export, inode handle and the caller's squashed creds."""
        try:
            export, inode = self.exports.resolve(fh)
        except HandleError as e:
            raise NfsError(Stat.STALE if e.stale else Stat.BADHANDLE, fail) from None
        host, port = call.peer
        if not export.allows(host) or not export.port_ok(port):
            raise NfsError(Stat.ACCES, fail)
        if write and export.record.read_only:
            raise NfsError(Stat.ROFS, fail)
        c = call.cred
        return export, inode, export.creds(c.uid, c.gid, c.gids)

    @staticmethod
    def _attr(export: LiveExport, inode: bytes) -> Attr | None:
        try:
            return export.fs.getattr(inode)
        except FsError:
            return None

    @staticmethod
    def _fail_wcc(pre: Attr | None, post: Attr | None = None) -> dict[str, Any]:
        return {"before": pre, "after": post}

    # ------------------------------------------------------------- procs

    def null(self, call: Call, args: Any) -> None:
        return None

    def getattr(self, call: Call, args: Any) -> Any:
        export, inode, _ = self._export(call, args["object"], None)
        try:
            attr = export.fs.getattr(inode)
        except FsError as e:
            raise NfsError(nfsstat(e.errno)) from None
        return Encoded([_OK, fattr3_bytes(attr)])

    def setattr(self, call: Call, args: Any) -> Any:
        nofail = {"obj_wcc": self._fail_wcc(None)}
        export, inode, creds = self._export(call, args["object"], nofail, write=True)
        pre = self._attr(export, inode)
        if pre is None:
            raise NfsError(Stat.STALE, nofail)
        guard = args["guard"]
        if guard is not None and (guard["seconds"], guard["nseconds"]) != _t(pre.ctime):
            raise NfsError(Stat.NOT_SYNC, {"obj_wcc": self._fail_wcc(pre, pre)})
        changes = sattr(args["new_attributes"])
        try:
            post = export.fs.setattr(inode, changes, creds)
        except FsError as e:
            raise NfsError(nfsstat(e.errno),
                           {"obj_wcc": self._fail_wcc(pre, self._attr(export, inode))}) from None
        return (Stat.OK, {"obj_wcc": {"before": pre, "after": post}})

    def lookup(self, call: Call, args: Any) -> Any:
        what = args["what"]
        export, dinode, creds = self._export(call, what["dir"], {"dir_attributes": None})
        try:
            inode, attr = export.fs.lookup(dinode, what["name"], creds)
        except FsError as e:
            raise NfsError(nfsstat(e.errno),
                           {"dir_attributes": self._attr(export, dinode)}) from None
        return (Stat.OK, {"object": export.handle(inode), "obj_attributes": attr,
                          "dir_attributes": self._attr(export, dinode)})

    def access(self, call: Call, args: Any) -> Any:
        export, inode, creds = self._export(call, args["object"], {"obj_attributes": None})
        attr = self._attr(export, inode)
        if attr is None:
            raise NfsError(Stat.STALE, {"obj_attributes": None})
        granted = access_bits(attr, creds, args["access"])
        if export.record.read_only:
            granted &= ~(ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)
        return (Stat.OK, {"obj_attributes": attr, "access": granted})

    def readlink(self, call: Call, args: Any) -> Any:
        fail = {"obj_attributes": None}
        export, inode, _ = self._export(call, args["object"], fail)
        try:
            data = export.fs.readlink(inode)
        except FsError as e:
            raise NfsError(nfsstat(e.errno),
                           {"obj_attributes": self._attr(export, inode)}) from None
        return (Stat.OK, {"symlink_attributes": self._attr(export, inode), "data": data})

    #: READs of at least this many bytes go out by sendfile when the transport can
    #: (``Call.zero_copy``) and the backend has ``read_range``.  64 KiB: measured
    #: side by side with ganesha, 128 KiB READs at QD16 went from 0.81-0.84x to
    #: 1.00-1.08x with sendfile, the server's CPU from 409-431 to 259-281 ms a
    #: run (docs/benchmarks.md); 4 KiB READs stay on pread (one syscall less).
    ZERO_COPY_MIN = 64 << 10

    def read(self, call: Call, args: Any) -> Any:
        export, inode, creds = self._export(call, args["file"], {"obj_attributes": None})
        count = min(args["count"], export.fs.fsinfo().rtmax)
        if call.zero_copy and count >= self.ZERO_COPY_MIN:
            read_range = getattr(export.fs, "read_range", None)
            if read_range is not None:
                try:
                    fd, n, eof, attr = read_range(inode, args["offset"], count, creds)
                except FsError as e:
                    raise NfsError(nfsstat(e.errno),
                                   {"obj_attributes": self._attr(export, inode)}) from None
                head = _OK + _TRUE + fattr3_bytes(attr) + struct.pack(
                    ">III", n, 1 if eof else 0, n)
                if fd is None:
                    return Encoded([head])
                return Encoded([head, FileRange(fd, args["offset"], n), _PAD[n & 3]])
        try:
            data, eof, attr = export.fs.read(inode, args["offset"], count, creds)
        except FsError as e:
            raise NfsError(nfsstat(e.errno),
                           {"obj_attributes": self._attr(export, inode)}) from None
        n = len(data)
        # READ3resok: status, post_op_attr, count, eof, opaque data<>, padding.
        head = _OK + _TRUE + fattr3_bytes(attr) + struct.pack(">III", n, 1 if eof else 0, n)
        return Encoded([head, data, b"\0" * (-n & 3)])

    def write(self, call: Call, args: Any) -> Any:
        nofail = {"file_wcc": self._fail_wcc(None)}
        export, inode, creds = self._export(call, args["file"], nofail, write=True)
        data = args["data"]
        count = args["count"]
        if count > len(data):
            raise NfsError(Stat.INVAL, nofail)
        data = data[:count]
        stable = args["stable"]
        try:
            pre, post = export.fs.write(inode, args["offset"], data, stable, creds)
        except FsError as e:
            after = self._attr(export, inode)
            raise NfsError(nfsstat(e.errno), {"file_wcc": self._fail_wcc(None, after)}) from None
        out = bytearray(_OK)
        _pack_wcc_data(pre, post, out)
        out += struct.pack(">II", count, stable)
        out += self.verifier
        return out

    def _dirop(self, call: Call, where: dict[str, Any],
               make: Callable[[LiveExport, bytes, Creds], tuple[bytes, Attr]]) -> Any:
        nofail = {"dir_wcc": self._fail_wcc(None)}
        export, dinode, creds = self._export(call, where["dir"], nofail, write=True)
        pre = self._attr(export, dinode)
        if pre is None:
            raise NfsError(Stat.STALE, nofail)
        try:
            inode, attr = make(export, dinode, creds)
        except FsError as e:
            raise NfsError(nfsstat(e.errno), {"dir_wcc": self._fail_wcc(
                pre, self._attr(export, dinode))}) from None
        return (Stat.OK, {"obj": export.handle(inode), "obj_attributes": attr,
                          "dir_wcc": {"before": pre, "after": self._attr(export, dinode)}})

    def create(self, call: Call, args: Any) -> Any:
        where = args["where"]
        mode, value = args["how"]
        how = CreateMode(mode)
        attrs = SetAttr() if how == CreateMode.EXCLUSIVE else sattr(value)
        verifier = value if how == CreateMode.EXCLUSIVE else None
        return self._dirop(call, where, lambda e, d, c: e.fs.create(
            d, where["name"], how, attrs, verifier, c))

    def mkdir(self, call: Call, args: Any) -> Any:
        where = args["where"]
        attrs = sattr(args["attributes"])
        return self._dirop(call, where, lambda e, d, c: e.fs.mkdir(d, where["name"], attrs, c))

    def symlink(self, call: Call, args: Any) -> Any:
        where = args["where"]
        link = args["symlink"]
        attrs = sattr(link["symlink_attributes"])
        return self._dirop(call, where, lambda e, d, c: e.fs.symlink(
            d, where["name"], link["symlink_data"], attrs, c))

    def mknod(self, call: Call, args: Any) -> Any:
        where = args["where"]
        ftype, data = args["what"]
        if ftype in (FileType.CHR, FileType.BLK):
            attrs = sattr(data["dev_attributes"])
            rdev = (data["spec"]["specdata1"], data["spec"]["specdata2"])
        elif ftype in (FileType.SOCK, FileType.FIFO):
            attrs, rdev = sattr(data), (0, 0)
        else:
            raise NfsError(Stat.BADTYPE, {"dir_wcc": self._fail_wcc(None)})
        return self._dirop(call, where, lambda e, d, c: e.fs.mknod(
            d, where["name"], FileType(ftype), attrs, rdev, c))

    def _unlink(self, call: Call, args: Any, rmdir: bool) -> Any:
        obj = args["object"]
        nofail = {"dir_wcc": self._fail_wcc(None)}
        export, dinode, creds = self._export(call, obj["dir"], nofail, write=True)
        pre = self._attr(export, dinode)
        if pre is None:
            raise NfsError(Stat.STALE, nofail)
        try:
            if rmdir:
                export.fs.rmdir(dinode, obj["name"], creds)
            else:
                export.fs.remove(dinode, obj["name"], creds)
        except FsError as e:
            raise NfsError(nfsstat(e.errno), {"dir_wcc": self._fail_wcc(
                pre, self._attr(export, dinode))}) from None
        return (Stat.OK, {"dir_wcc": {"before": pre, "after": self._attr(export, dinode)}})

    def remove(self, call: Call, args: Any) -> Any:
        return self._unlink(call, args, rmdir=False)

    def rmdir(self, call: Call, args: Any) -> Any:
        return self._unlink(call, args, rmdir=True)

    def rename(self, call: Call, args: Any) -> Any:
        src, dst = args["from"], args["to"]
        nofail = {"fromdir_wcc": self._fail_wcc(None), "todir_wcc": self._fail_wcc(None)}
        export, sinode, creds = self._export(call, src["dir"], nofail, write=True)
        export2, dinode, _ = self._export(call, dst["dir"], nofail, write=True)
        if export2 is not export:
            raise NfsError(Stat.XDEV, nofail)
        spre, dpre = self._attr(export, sinode), self._attr(export, dinode)
        try:
            export.fs.rename(sinode, src["name"], dinode, dst["name"], creds)
            status = Stat.OK
        except FsError as e:
            status = nfsstat(e.errno)
        res = {"fromdir_wcc": {"before": spre, "after": self._attr(export, sinode)},
               "todir_wcc": {"before": dpre, "after": self._attr(export, dinode)}}
        return (status, res)

    def link(self, call: Call, args: Any) -> Any:
        link = args["link"]
        nofail = {"file_attributes": None, "linkdir_wcc": self._fail_wcc(None)}
        export, inode, creds = self._export(call, args["file"], nofail, write=True)
        export2, dinode, _ = self._export(call, link["dir"], nofail, write=True)
        if export2 is not export:
            raise NfsError(Stat.XDEV, nofail)
        pre = self._attr(export, dinode)
        try:
            export.fs.link(inode, dinode, link["name"], creds)
            status = Stat.OK
        except FsError as e:
            status = nfsstat(e.errno)
        return (status, {"file_attributes": self._attr(export, inode),
                         "linkdir_wcc": {"before": pre, "after": self._attr(export, dinode)}})

    def _dir_for_listing(self, call: Call, fh: bytes) -> tuple[LiveExport, bytes, Attr]:
        fail = {"dir_attributes": None}
        export, dinode, creds = self._export(call, fh, fail)
        attr = self._attr(export, dinode)
        if attr is None:
            raise NfsError(Stat.STALE, fail)
        if attr.type != FileType.DIR:
            raise NfsError(Stat.NOTDIR, {"dir_attributes": attr})
        if not mode_allows(attr, creds, 4):
            raise NfsError(Stat.ACCES, {"dir_attributes": attr})
        return export, dinode, attr

    def _cached_listing(self, export: LiveExport, dinode: bytes, dfd: int, dattr: Attr,
                        cookie: int, budget: int, is_root: bool
                        ) -> tuple[bytearray, int, bool] | None:
        """READDIRPLUS entries from the directory's snapshot (``dirlist.ListingCache``),
        taken at cookie 0 of a settled directory; None: list it the uncached way."""
        cache = self.listings
        prefix, mac_key = export.handle_layout()
        key = (prefix, mac_key, dinode)
        stamp = (dattr.mtime, dattr.ctime, dattr.fileid)
        snap = cache.get(key, stamp)
        fs = export.fs
        if snap is None:
            if cookie != 0 or not cache.settled(dattr.mtime, dattr.ctime):
                return None
            data, _n, eof, index = dirlist.encode_indexed(
                dfd, 0, cache.max_dir_bytes, 1 << 16, True, is_root, fs.mount_id,
                export.handle(dinode), prefix, mac_key, fs.fsid)
            snap = dirlist.Snapshot(stamp, data, index, complete=eof)
            cache.put(key, snap)
        ready, self._ready = self._ready, None
        got = None
        if export.attr_timeout_ns:
            got = snap.slice(cookie, budget)
            if got is None:
                return None
            if not self._attrs_fresh(export, snap, cookie, budget, got[0]):
                got = None
        if got is not None:
            pass  # attributes from an earlier listing, within attr_timeout
        elif ready is not None and ready[0] == (key, stamp, cookie, budget, self.generation) \
                and time.monotonic_ns() - ready[1] < self.PREFETCH_MAX_AGE_NS:
            got = ready[2]
            if export.attr_timeout_ns:
                snap.store_attrs(cookie, budget, got[0], ready[1], ready[0][4])
        else:
            got = snap.slice(cookie, budget)
            when = time.monotonic_ns()
            if got is None or not dirlist.refresh_attrs(dfd, got[0], is_root, fs.fsid):
                return None
            if export.attr_timeout_ns:
                snap.store_attrs(cookie, budget, got[0], when, self.generation)
        if got[1] and not got[2]:
            self._next = (key, stamp, snap.last_cookie(cookie, got[1]), budget, export,
                          dinode, is_root, snap)
        return got

    #: How old prefetched READDIRPLUS attributes may be when the client asks for them.
    PREFETCH_MAX_AGE_NS = 50_000_000

    def prefetch_listing(self) -> None:
        """Idle work for the transport once replies are sent: read the attributes of the
        next slice of the listing a client is walking (it asks for ~50 entries a call),
        so they are ready when its next READDIRPLUS arrives, while it is still busy with
        this reply.  Used only for exactly that call, within PREFETCH_MAX_AGE_NS, with
        the directory unchanged and no modifying procedure run in between (RFC 1813
        gives READDIRPLUS attributes no stronger ordering than that)."""
        nxt, self._next = self._next, None
        if nxt is None:
            return
        key, stamp, cookie, budget, export, dinode, is_root, snap = nxt
        generation = self.generation
        got = snap.slice(cookie, budget)
        if got is None or (export.attr_timeout_ns
                           and self._attrs_fresh(export, snap, cookie, budget, got[0])):
            return
        try:
            dfd = export.fs.listing_fd(dinode)
        except (FsError, OSError):
            return
        when = time.monotonic_ns()
        if dirlist.refresh_attrs(dfd, got[0], is_root, export.fs.fsid):
            self._ready = ((key, stamp, cookie, budget, generation), when, got)

    def readdir(self, call: Call, args: Any) -> Any:
        return self._readdir(call, args["dir"], args["cookie"], args["count"], plus=False)

    def readdirplus(self, call: Call, args: Any) -> Any:
        return self._readdir(call, args["dir"], args["cookie"], args["maxcount"], plus=True)

    def _readdir(self, call: Call, fh: bytes, cookie: int, count: int, plus: bool) -> Any:
        """READDIR / READDIRPLUS (RFC 1813 §3.3.16-17) with kernel d_off cookies.

        The reply is built directly: entries are added while the encoded size
        stays within ``count`` (maxcount for READDIRPLUS; dircount is only a
        hint, as in the Linux server).  Cookie verifiers are always zero: the
        cookies stay valid while the directory changes.
        """
        export, dinode, dattr = self._dir_for_listing(call, fh)
        fs = export.fs
        head = bytearray(_OK)
        head += _TRUE + fattr3_bytes(dattr) + bytes(8)
        budget = count - len(head) - 8  # list terminator and eof
        listing_fd = getattr(fs, "listing_fd", None) if self.fast_listing else None
        if listing_fd is not None:
            # One pass in C (or its pure reference): storaged.nfs.dirlist.
            prefix, key = export.handle_layout()
            try:
                dfd = listing_fd(dinode)
                is_root = dinode == fs.root
                got = self._cached_listing(export, dinode, dfd, dattr, cookie, budget,
                                           is_root) if plus else None
                if got is not None:
                    out, n, eof = got
                else:
                    out, n, eof = dirlist.encode_entries(
                        dfd, cookie, budget, count // 3, plus, is_root, fs.mount_id,
                        export.handle(dinode), prefix, key, fs.fsid)
            except FsError as e:
                raise NfsError(nfsstat(e.errno), {"dir_attributes": dattr}) from None
            except OSError as e:
                raise NfsError(nfsstat(e.errno or errno.EIO),
                               {"dir_attributes": dattr}) from None
            if n == 0 and not eof:
                raise NfsError(Stat.TOOSMALL, {"dir_attributes": dattr})
            head += out
            head += _FALSE + (_TRUE if eof else _FALSE)
            return head
        out = bytearray()
        eof = True
        n = 0
        handle = export.handle
        try:
            for ent in fs.readdir(dinode, cookie, plus, count):
                name = ent.name
                ln = len(name)
                piece = _ENTRY_HEAD.pack(1, ent.fileid, ln) + name + _PAD[ln & 3] + \
                    _Q.pack(ent.cookie)
                if plus:
                    if ent.handle is not None and ent.attr is not None:
                        fhb = handle(ent.handle)
                        piece += _TRUE + fattr3_bytes(ent.attr) + _TRUE + \
                            _U32.pack(len(fhb)) + fhb + _PAD[len(fhb) & 3]
                    else:
                        piece += _FALSE + _FALSE
                if len(out) + len(piece) > budget:
                    eof = False
                    break
                out += piece
                n += 1
        except FsError as e:
            raise NfsError(nfsstat(e.errno), {"dir_attributes": dattr}) from None
        if n == 0 and not eof:
            raise NfsError(Stat.TOOSMALL, {"dir_attributes": dattr})
        head += out
        head += _FALSE + (_TRUE if eof else _FALSE)
        return head

    def fsstat(self, call: Call, args: Any) -> Any:
        export, inode, _ = self._export(call, args["object"], {"obj_attributes": None})
        attr = self._attr(export, inode)
        if attr is None:
            raise NfsError(Stat.STALE, {"obj_attributes": None})
        try:
            s = export.fs.fsstat()
        except OSError as e:
            raise NfsError(nfsstat(e.errno), {"obj_attributes": attr}) from None
        return (Stat.OK, {"obj_attributes": attr, "tbytes": s.tbytes, "fbytes": s.fbytes,
                          "abytes": s.abytes, "tfiles": s.tfiles, "ffiles": s.ffiles,
                          "afiles": s.afiles, "invarsec": 0})

    def fsinfo(self, call: Call, args: Any) -> Any:
        export, inode, _ = self._export(call, args["object"], {"obj_attributes": None})
        attr = self._attr(export, inode)
        if attr is None:
            raise NfsError(Stat.STALE, {"obj_attributes": None})
        i = export.fs.fsinfo()
        props = ((FSF3_LINK if i.link else 0) | (FSF3_SYMLINK if i.symlink else 0)
                 | (FSF3_HOMOGENEOUS if i.homogeneous else 0)
                 | (FSF3_CANSETTIME if i.cansettime else 0))
        return (Stat.OK, {"obj_attributes": attr, "rtmax": i.rtmax, "rtpref": i.rtpref,
                          "rtmult": 4096, "wtmax": i.wtmax, "wtpref": i.wtpref,
                          "wtmult": 4096, "dtpref": i.dtpref, "maxfilesize": i.maxfilesize,
                          "time_delta": {"seconds": 0, "nseconds": i.time_delta_ns},
                          "properties": props})

    def pathconf(self, call: Call, args: Any) -> Any:
        export, inode, _ = self._export(call, args["object"], {"obj_attributes": None})
        attr = self._attr(export, inode)
        if attr is None:
            raise NfsError(Stat.STALE, {"obj_attributes": None})
        i = export.fs.fsinfo()
        return (Stat.OK, {"obj_attributes": attr, "linkmax": i.linkmax,
                          "name_max": i.name_max, "no_trunc": True, "chown_restricted": True,
                          "case_insensitive": False, "case_preserving": True})

    def commit(self, call: Call, args: Any) -> Any:
        """COMMIT (§3.3.21): fsync the file; runs in a worker thread."""
        nofail = {"file_wcc": self._fail_wcc(None)}
        export, inode, _ = self._export(call, args["file"], nofail, write=True)
        try:
            post = export.fs.commit(inode, args["offset"], args["count"])
        except FsError as e:
            raise NfsError(nfsstat(e.errno), nofail) from None
        except OSError as e:
            raise NfsError(nfsstat(e.errno), nofail) from None
        return (Stat.OK, {"file_wcc": {"before": None, "after": post}, "verf": self.verifier})


def _pack_wcc_data(pre: Attr | None, post: Attr | None, out: bytearray) -> None:
    WCC_DATA.pack({"before": pre, "after": post}, out)


def new_write_verifier() -> bytes:
    """A write verifier that differs on every start (RFC 1813 §3.3.7)."""
    return os.urandom(8)
