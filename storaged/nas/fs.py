"""The filesystem interface NAS protocols serve, free of host-path assumptions.

Files are named by opaque *inode handles* (bytes a backend hands out and
accepts back, stable across restarts, never reused for another file) and
directory entries by ``(directory handle, name)`` with names as bytes.
Errors are ``FsError`` carrying an errno; the protocol layer maps errnos to
its own status codes (NFS3ERR_*).  Permission checks that need the caller's
identity take ``Creds`` (already squashed by the export).

The first backend is ``storaged.nas.hostfs.HostFs`` (a host directory); the
cluster filesystem will implement the same ``FileSystem`` protocol.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class FileType(IntEnum):
    """File types, numbered as NFSv3 ``ftype3`` (RFC 1813 §2.5)."""

    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


class CreateMode(IntEnum):
    """How CREATE treats an existing file (``createmode3``, RFC 1813 §3.3.8)."""

    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class FsError(Exception):
    """A filesystem operation failed with ``errno``."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err


def fail(err: int, message: str = "") -> FsError:
    """Shorthand: ``raise fail(errno.ENOENT)``."""
    return FsError(err, message)


@dataclass(slots=True)
class Attr:
    """Attributes of one file (the fields of ``fattr3``), times in nanoseconds."""

    type: FileType
    mode: int  # permission bits incl. setuid/setgid/sticky (07777)
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: tuple[int, int]
    fsid: int
    fileid: int
    atime: int
    mtime: int
    ctime: int


@dataclass(slots=True)
class SetAttr:
    """Changes for SETATTR/CREATE (``sattr3``): None = leave alone.

    ``atime``/``mtime`` are nanoseconds since the epoch, or ``NOW`` for the
    server's clock.
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | None = None
    mtime: int | None = None

    NOW = -1

    def empty(self) -> bool:
        return (self.mode is None and self.uid is None and self.gid is None
                and self.size is None and self.atime is None and self.mtime is None)


@dataclass(frozen=True, slots=True)
class Creds:
    """The caller's identity after export squashing."""

    uid: int
    gid: int
    gids: tuple[int, ...] = ()

    @property
    def root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.gids


ROOT = Creds(0, 0)


@dataclass(slots=True)
class DirEntry:
    """A directory entry: name, file id and the cookie that resumes *after* it.

    ``handle`` and ``attr`` are filled by ``readdir(..., plus=True)`` when the
    entry could be looked up (READDIRPLUS).
    """

    name: bytes
    fileid: int
    cookie: int
    handle: bytes | None = None
    attr: Attr | None = None


@dataclass(slots=True)
class FsStat:
    """Space and inode counts (FSSTAT, RFC 1813 §3.3.18)."""

    tbytes: int
    fbytes: int
    abytes: int
    tfiles: int
    ffiles: int
    afiles: int


@dataclass(slots=True)
class FsInfo:
    """Static limits (FSINFO, RFC 1813 §3.3.19; PATHCONF §3.3.20)."""

    rtmax: int = 1 << 20
    rtpref: int = 1 << 20
    wtmax: int = 1 << 20
    wtpref: int = 1 << 20
    dtpref: int = 64 * 1024
    maxfilesize: int = (1 << 63) - 1
    time_delta_ns: int = 1
    link: bool = True
    symlink: bool = True
    homogeneous: bool = True
    cansettime: bool = True
    linkmax: int = 65000
    name_max: int = 255


# ACCESS bits (RFC 1813 §3.3.4)
ACCESS_READ = 0x01
ACCESS_LOOKUP = 0x02
ACCESS_MODIFY = 0x04
ACCESS_EXTEND = 0x08
ACCESS_DELETE = 0x10
ACCESS_EXECUTE = 0x20
ACCESS_ALL = 0x3F


def mode_allows(attr: Attr, creds: Creds, want: int) -> bool:
    """Unix permission check of ``want`` (4 r, 2 w, 1 x) against ``attr``'s mode bits.

    Root passes read/write always and execute if any x bit is set (or for a
    directory).
    """
    if creds.root:
        if want & 1 and attr.type != FileType.DIR and not attr.mode & 0o111:
            return False
        return True
    if attr.uid == creds.uid:
        bits = (attr.mode >> 6) & 7
    elif creds.in_group(attr.gid):
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    return bits & want == want


def access_bits(attr: Attr, creds: Creds, wanted: int) -> int:
    """ACCESS3 bits granted from mode bits (no ACLs)."""
    granted = 0
    if wanted & ACCESS_READ and mode_allows(attr, creds, 4):
        granted |= ACCESS_READ
    writable = mode_allows(attr, creds, 2)
    if attr.type == FileType.DIR:
        if wanted & ACCESS_LOOKUP and mode_allows(attr, creds, 1):
            granted |= ACCESS_LOOKUP
        if writable and mode_allows(attr, creds, 1):
            granted |= wanted & (ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)
    else:
        if writable:
            granted |= wanted & (ACCESS_MODIFY | ACCESS_EXTEND)
        if wanted & ACCESS_EXECUTE and mode_allows(attr, creds, 1):
            granted |= ACCESS_EXECUTE
    return granted & wanted


_REG = FileType.REG


def check_io(attr: Attr, creds: Creds, write: bool) -> None:
    """READ/WRITE permission as the kernel NFS server checks it.

    The owner may always read and write (the client checked at open time,
    and a file created mode 0444 must stay writable through the descriptor
    that created it); reading is also allowed with execute permission.
    """
    if attr.type != _REG:  # a module constant: FileType.REG is a slow lookup on 3.11
        raise fail(errno.EISDIR if attr.type == FileType.DIR else errno.EINVAL)
    if attr.uid == creds.uid or creds.uid == 0:  # the owner, or root (Creds.root)
        return
    if write:
        if not mode_allows(attr, creds, 2):
            raise fail(errno.EACCES)
    elif not (mode_allows(attr, creds, 4) or mode_allows(attr, creds, 1)):
        raise fail(errno.EACCES)


class FileSystem(Protocol):
    """What a NAS protocol needs from a filesystem.  ``fh`` are inode handles.

    Namespace operations (create, mkdir, mknod, symlink, remove, rmdir,
    rename, link, setattr, lookup) check permissions as ``creds``.  READ and
    WRITE permission is checked by the caller with ``check_io`` on the
    attributes it already fetched.
    """

    root: bytes
    fsid: int

    def getattr(self, fh: bytes) -> Attr: ...

    def setattr(self, fh: bytes, changes: SetAttr, creds: Creds) -> Attr: ...

    def lookup(self, dirfh: bytes, name: bytes, creds: Creds) -> tuple[bytes, Attr]: ...

    def read(self, fh: bytes, offset: int, count: int) -> tuple[bytes, bool, Attr]: ...

    def write(self, fh: bytes, offset: int, data: bytes | memoryview,
              sync: bool) -> Attr: ...

    def commit(self, fh: bytes, offset: int, count: int) -> Attr: ...

    def create(self, dirfh: bytes, name: bytes, how: CreateMode, attrs: SetAttr,
               verifier: bytes | None, creds: Creds) -> tuple[bytes, Attr]: ...

    def mkdir(self, dirfh: bytes, name: bytes, attrs: SetAttr,
              creds: Creds) -> tuple[bytes, Attr]: ...

    def mknod(self, dirfh: bytes, name: bytes, ftype: FileType, attrs: SetAttr,
              rdev: tuple[int, int], creds: Creds) -> tuple[bytes, Attr]: ...

    def symlink(self, dirfh: bytes, name: bytes, target: bytes, attrs: SetAttr,
                creds: Creds) -> tuple[bytes, Attr]: ...

    def readlink(self, fh: bytes) -> bytes: ...

    def remove(self, dirfh: bytes, name: bytes, creds: Creds) -> None: ...

    def rmdir(self, dirfh: bytes, name: bytes, creds: Creds) -> None: ...

    def rename(self, fromdir: bytes, fromname: bytes, todir: bytes, toname: bytes,
               creds: Creds) -> None: ...

    def link(self, fh: bytes, dirfh: bytes, name: bytes, creds: Creds) -> None: ...

    def readdir(self, dirfh: bytes, cookie: int, plus: bool = False,
                size_hint: int = 0) -> Iterator[DirEntry]: ...

    def fsstat(self) -> FsStat: ...

    def fsinfo(self) -> FsInfo: ...
