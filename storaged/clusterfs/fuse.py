"""The FUSE shell: mfusepy Operations over a :class:`~storaged.clusterfs.fs.ClusterFS`.

Why mfusepy: it is the maintained fork of fusepy (the product card's
binding; fusepy has had no release since 2018) with the same path-based
API and libfuse 3 support, and it is pure Python over ctypes (no build
step).  pyfuse3/llfuse are inode-based low-level bindings that would let
the kernel cache entries per inode; that matters once locks are kept
across operations (a later step), not for this per-operation design.

Options: multithreaded, ``max_write=1 MiB``, ``default_permissions`` (the
kernel checks modes, so a non-root user gets EACCES), ``allow_other``, and
attribute/entry/negative caching 0 plus ``direct_io``: the kernel caches
nothing, so every read and stat reaches this node's filesystem, which reads
under the DLM lock: what another node committed is what is seen.
"""

from __future__ import annotations

import ctypes.util
import errno
import fcntl
import json
import logging
import os
import socket
import threading
from typing import Any

# libfuse 3 only: mfusepy picks libfuse.so.2 first when both are installed (bindfs
# pulls in libfuse2), and under libfuse 2 the 1 MiB max_write set in init is larger
# than libfuse 2's read buffer (every read of /dev/fuse fails EINVAL) and the
# no-caching config below is never applied.
if not os.environ.get("FUSE_LIBRARY_PATH") and ctypes.util.find_library("fuse3"):
    os.environ["FUSE_LIBRARY_PATH"] = ctypes.util.find_library("fuse3") or ""

import mfusepy  # noqa: E402 - after choosing the library

from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.plocks import INF, READ, WRITE, PosixLocks

log = logging.getLogger(__name__)
MAX_WRITE = 1 << 20


def _ctx() -> tuple[int, int]:
    uid, gid, _pid = mfusepy.fuse_get_context()
    return uid, gid


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _utime(ns: int) -> int | None:
    """A utimensat time as the core takes it: None = now, -1 = leave as it is."""
    if ns == UTIME_NOW:
        return None
    if ns == UTIME_OMIT:
        return -1
    return ns


class FuseOps(mfusepy.Operations):
    """Path-based FUSE operations; OSError errnos pass through to the kernel."""

    use_ns = True

    def __init__(self, fs: ClusterFS, on_destroy: Any = None, plocks: PosixLocks | None = None
                 ) -> None:
        self.fs = fs
        self.on_destroy = on_destroy
        self.plocks = plocks
        if plocks is None:
            # localflocks / local mode: no lock callbacks, so the kernel keeps fcntl
            # and flock locks itself, local to this node (GFS2's localflocks).
            self.lock = None  # type: ignore[assignment]
            self.flock = None  # type: ignore[assignment]

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info:  # libfuse 3: max_write is set here, not by -o
            getattr(conn_info, "contents", conn_info).max_write = MAX_WRITE
        if config_3:
            c = getattr(config_3, "contents", config_3)
            c.attr_timeout = 0.0
            c.entry_timeout = 0.0
            c.negative_timeout = 0.0
            c.use_ino = 1
            c.direct_io = 1

    def destroy(self, path: str) -> None:
        if self.plocks is not None:
            self.plocks.drop_all()
        self.fs.umount()
        if self.on_destroy is not None:
            self.on_destroy()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = self.fs.getattr(path)
        st["st_atime"], st["st_mtime"], st["st_ctime"] = (
            st.pop("st_atime_ns"), st.pop("st_mtime_ns"), st.pop("st_ctime_ns"))
        return st

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # with use_ino the inode number must be given: glibc skips d_ino 0 entries
        return [(name, {"st_ino": ino, "st_mode": typ << 12}, 0)
                for name, ino, typ in self.fs.readdir(path)]

    def mkdir(self, path: str, mode: int) -> int:
        self.fs.mkdir(path, mode, *_ctx())
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.fs.mknod(path, mode, dev, *_ctx())
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self.fs.create(path, mode, *_ctx(), exclusive=False)
        return 0

    def open(self, path: str, flags: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.fs.read(path, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.fs.write(path, bytes(data), offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self.fs.truncate(path, length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        self.fs.fallocate(path, mode, offset, size)
        return 0

    def unlink(self, path: str) -> int:
        self.fs.unlink(path)
        return 0

    def rmdir(self, path: str) -> int:
        self.fs.rmdir(path)
        return 0

    def rename(self, old: str, new: str) -> int:
        self.fs.rename(old, new)
        return 0

    def link(self, target: str, source: str) -> int:
        self.fs.link(source, target)  # mfusepy: creates `target` -> existing `source`
        return 0

    def symlink(self, target: str, source: str) -> int:
        uid, gid = _ctx()
        self.fs.symlink(target, source, uid, gid)  # `target` is the new link, `source` its text
        return 0

    def readlink(self, path: str) -> str:
        return self.fs.readlink(path)

    def chmod(self, path: str, mode: int) -> int:
        self.fs.chmod(path, mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self.fs.chown(path, uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            self.fs.utimens(path, None, None)
        else:
            self.fs.utimens(path, *(_utime(int(t)) for t in times))
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    def setxattr(self, path: str, name: str, value: bytes, options: int,
                 position: int = 0) -> int:
        self.fs.setxattr(path, name, bytes(value), options)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.fs.getxattr(path, name)

    def listxattr(self, path: str) -> list[str]:
        return self.fs.listxattr(path)

    def removexattr(self, path: str, name: str) -> int:
        self.fs.removexattr(path, name)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        # Every operation returned only after its data and journal record were
        # flushed (ordered commit), so there is nothing left to make durable.
        if self.fs.withdrawn:
            raise OSError(errno.EIO, "withdrawn")
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    # --------------------------------------------------- fcntl and flock
    def lock(self, path: str | None, owner: int, cmd: int, lockp: Any) -> int:
        """POSIX byte-range locks (``owner`` is FUSE's lock_owner, see _FUSE.lock)."""
        if path is None or self.plocks is None:
            raise OSError(errno.ENOLCK, "no path for the lock")
        fl = lockp.contents
        start = int(fl.l_start)
        end = INF if fl.l_len == 0 else start + int(fl.l_len)
        if fl.l_len < 0:
            start, end = start + int(fl.l_len), start
        ino = self.fs.getattr(path)["st_ino"]
        if cmd == fcntl.F_GETLK:
            kind = READ if fl.l_type == fcntl.F_RDLCK else WRITE
            found = self.plocks.getlk(ino, owner, kind, start, end)
            if found is None:
                fl.l_type = fcntl.F_UNLCK
            else:
                k, s, e = found
                fl.l_type = fcntl.F_RDLCK if k == READ else fcntl.F_WRLCK
                fl.l_whence = os.SEEK_SET
                fl.l_start, fl.l_len, fl.l_pid = s, 0 if e >= INF else e - s, 0
            return 0
        if cmd not in (fcntl.F_SETLK, fcntl.F_SETLKW):
            raise OSError(errno.EINVAL, f"lock command {cmd}")
        kind = {fcntl.F_RDLCK: READ, fcntl.F_WRLCK: WRITE}.get(fl.l_type)
        if kind is None and fl.l_type != fcntl.F_UNLCK:
            raise OSError(errno.EINVAL, f"lock type {fl.l_type}")
        self.plocks.setlk(ino, owner, kind, start, end, wait=cmd == fcntl.F_SETLKW)
        return 0

    def flock(self, path: str | None, owner: int, op: int) -> int:
        """flock(2): one whole-file lock per open file (``owner``)."""
        if path is None or self.plocks is None:
            raise OSError(errno.ENOLCK, "no path for the lock")
        self.plocks.flock(self.fs.getattr(path)["st_ino"], owner, op)
        return 0

    def release(self, path: str, fh: int) -> int:
        return 0


def serve_status(path: str, status: Any) -> threading.Thread:
    """Answer ``status()`` as one JSON line to every connection on Unix socket ``path``."""
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(json.dumps(status()).encode() + b"\n")
                except OSError:
                    pass
    t = threading.Thread(target=loop, name="clusterfs-status", daemon=True)
    t.start()
    return t


class _FUSE(mfusepy.FUSE):
    """mfusepy's FUSE, passing ``fuse_file_info.lock_owner`` to lock and flock: the
    owner POSIX locks belong to (mfusepy passes only the file handle)."""

    def lock(self, path: bytes | None, fip: Any, cmd: int, lock: Any) -> int:
        return self.operations.lock(None if path is None else path.decode(self.encoding,
                                                                          self.errors),
                                    int(fip.contents.lock_owner), cmd, lock)

    def flock(self, path: bytes | None, fip: Any, op: int) -> int:
        return self.operations.flock(None if path is None else path.decode(self.encoding,
                                                                           self.errors),
                                     int(fip.contents.lock_owner), op)

    def open(self, path: bytes, fip: Any) -> int:
        res = super().open(path, fip)
        fip.contents.direct_io = 1  # per open and create as well as in the config: with
        return res

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        res = super().create(path, mode, fip)
        fip.contents.direct_io = 1  # libfuse 2 the config is never applied, and a file
        return res                  # kept open read stale page-cache data across nodes

    def release(self, path: bytes | None, fip: Any) -> int:
        fi = fip.contents
        if fi.flock_release and getattr(self.operations, "plocks", None) is not None:
            # the last close of a file that holds a flock: drop it (idempotent)
            self.operations.flock(None if path is None else path.decode(self.encoding,
                                                                        self.errors),
                                  int(fi.lock_owner), fcntl.LOCK_UN)
        return super().release(path, fip)


def run_fuse(fs: ClusterFS, mountpoint: str, *, read_only: bool = False,
             fsname: str = "clusterfs", on_destroy: Any = None,
             plocks: PosixLocks | None = None) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve until it is unmounted (blocks)."""
    opts: dict[str, Any] = {"foreground": True, "default_permissions": True,
                            "allow_other": os.geteuid() == 0,
                            "fsname": fsname, "subtype": "storaged",
                            # also as options: the init config is libfuse-3-only
                            "attr_timeout": 0, "entry_timeout": 0, "negative_timeout": 0,
                            "use_ino": True, "direct_io": True}
    if read_only:
        opts["ro"] = True
    try:
        _FUSE(FuseOps(fs, on_destroy, plocks), mountpoint, **opts)
    except RuntimeError as e:  # libfuse's fuse_main status
        raise OSError(errno.EIO, f"FUSE mount of {mountpoint} failed (libfuse status {e})"
                      ) from None
