"""The host-directory backend of the NAS filesystem interface.

Inode handles are the kernel's own file handles (``name_to_handle_at``): they
survive restarts of the daemon and of the host, and a file deleted and
recreated gets a new one (the inode generation differs), so an old handle
answers ESTALE from ``open_by_handle_at``.  Handles are opened relative to
the export's root directory, so a handle from another filesystem never
resolves.  Opening by handle needs CAP_DAC_READ_SEARCH: the daemon runs as
root.

Open descriptors are cached per handle (LRU).  Namespace operations run with
the caller's fsuid/fsgid/groups (per-thread ``setfsuid``), so the kernel
checks permissions and sets ownership exactly as for a local process; they
are made durable by fsync of the directory before returning (RFC 1813 §3.3
requires namespace changes to be on stable storage before the reply).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from storaged.nas import linux
from storaged.nas.fs import (
    Attr,
    CreateMode,
    Creds,
    DirEntry,
    FileType,
    FsError,
    FsInfo,
    FsStat,
    SetAttr,
    check_io,
    fail,
)

_REG = FileType.REG
_TYPES = {stat.S_IFREG: FileType.REG, stat.S_IFDIR: FileType.DIR, stat.S_IFBLK: FileType.BLK,
          stat.S_IFCHR: FileType.CHR, stat.S_IFLNK: FileType.LNK, stat.S_IFSOCK: FileType.SOCK,
          stat.S_IFIFO: FileType.FIFO}
_S_IFMT = 0o170000  # stat.S_IFMT() as a mask: one call less per attribute read
_NO_RDEV = (0, 0)
_IFMT = {FileType.BLK: stat.S_IFBLK, FileType.CHR: stat.S_IFCHR,
         FileType.SOCK: stat.S_IFSOCK, FileType.FIFO: stat.S_IFIFO}

_libc = ctypes.CDLL(None, use_errno=True)
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]

NAME_MAX = 255


def check_name(name: bytes, creating: bool = False) -> None:
    """Refuse names no directory entry can have (as the kernel NFS server does)."""
    if not name:
        raise fail(errno.EINVAL, "empty name")
    if len(name) > NAME_MAX:
        raise fail(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name:
        raise fail(errno.EACCES, "name contains '/' or NUL")
    if creating and name in (b".", b".."):
        raise fail(errno.EEXIST)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class HostFs:
    """A host directory served through the inode-handle interface."""

    def __init__(self, directory: str, fsid: int, cache_size: int = 1024,
                 sync_metadata: bool = True) -> None:
        self.directory = directory
        self.fsid = fsid
        self.root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.root, self.mount_id = linux.name_to_handle_at(self.root_fd, b"",
                                                               linux.AT_EMPTY_PATH)
        except OSError:
            os.close(self.root_fd)
            raise
        self.sync_metadata = sync_metadata
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.RLock()
        self._switch = os.geteuid() == 0
        self._groups = tuple(os.getgroups())
        self._umask = _umask()
        self._dents = linux.Getdents()

    def close(self) -> None:
        with self._lock:
            for fd in self._cache.values():
                os.close(fd)
            self._cache.clear()
        os.close(self.root_fd)

    # ------------------------------------------------------------ handles

    def _fd(self, fh: bytes) -> int:
        """A cached descriptor for ``fh``: O_RDWR/O_RDONLY file, O_RDONLY dir, else O_PATH."""
        cache = self._cache
        fd = cache.get(fh)
        if fd is not None:  # the hot case, without the lock (each step holds the GIL)
            try:
                cache.move_to_end(fh)
                return fd
            except KeyError:  # evicted by another thread just now
                pass
        with self._lock:
            fd = cache.get(fh)
            if fd is not None:
                return fd
            fd = self._open(fh)
            self._cache[fh] = fd
            while len(self._cache) > self.cache_size:
                os.close(self._cache.popitem(last=False)[1])
            return fd

    def _open(self, fh: bytes) -> int:
        if fh == self.root:
            return os.dup(self.root_fd)
        try:
            fd = linux.open_by_handle_at(self.root_fd, fh, os.O_PATH)
        except OSError as e:
            raise fail(errno.ESTALE, f"open by handle: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                flags = (os.O_RDWR, os.O_RDONLY)
            elif stat.S_ISDIR(mode):
                flags = (os.O_RDONLY | os.O_DIRECTORY,)
            else:
                return fd
            for i, f in enumerate(flags):
                try:
                    real = linux.open_by_handle_at(self.root_fd, fh, f)
                    break
                except OSError:
                    if i == len(flags) - 1:
                        return fd
            os.close(fd)
            return real
        except BaseException:
            os.close(fd)
            raise

    def _evict(self, fh: bytes) -> None:
        with self._lock:
            fd = self._cache.pop(fh, None)
            if fd is not None:
                os.close(fd)

    def _handle(self, dfd: int, name: bytes) -> bytes:
        """The handle of ``name`` in the directory ``dfd`` (no symlink following)."""
        try:
            fh, mount_id = linux.name_to_handle_at(dfd, name, 0)
        except OSError as e:
            raise FsError(e.errno) from None
        if mount_id != self.mount_id:
            raise fail(errno.EXDEV, "entry is on another filesystem")
        return fh

    def _stat(self, fh: bytes) -> tuple[int, os.stat_result]:
        fd = self._fd(fh)
        st = os.fstat(fd)
        if st.st_nlink == 0:  # deleted while we held it open: the handle is stale
            self._evict(fh)
            raise fail(errno.ESTALE)
        return fd, st

    def _attr(self, st: os.stat_result) -> Attr:
        mode, rdev = st.st_mode, st.st_rdev
        return Attr(_TYPES.get(mode & _S_IFMT, _REG), mode & 0o7777,
                    st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blocks * 512,
                    (os.major(rdev), os.minor(rdev)) if rdev else _NO_RDEV, self.fsid,
                    st.st_ino, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def _dir(self, fh: bytes) -> int:
        fd, st = self._stat(fh)
        if not stat.S_ISDIR(st.st_mode):
            raise fail(errno.ENOTDIR)
        return fd

    # -------------------------------------------------------- credentials

    def _become(self, creds: Creds) -> bool:
        if not self._switch or (creds.uid == 0 and creds.gid == 0):
            return False
        linux.setgroups_thread(creds.gids)
        linux.setfsgid(creds.gid)
        linux.setfsuid(creds.uid)
        return True

    def _restore(self) -> None:
        linux.setfsuid(0)
        linux.setfsgid(0)
        linux.setgroups_thread(self._groups)

    def _sync_dir(self, dfd: int) -> None:
        if self.sync_metadata:
            os.fsync(dfd)

    # --------------------------------------------------------- attributes

    def getattr(self, fh: bytes) -> Attr:
        return self._attr(self._stat(fh)[1])

    def setattr(self, fh: bytes, changes: SetAttr, creds: Creds) -> Attr:
        fd, st = self._stat(fh)
        attr = self._attr(st)
        if changes.size is not None:
            check_io(attr, creds, write=True)
            try:
                os.truncate(fd, changes.size)
            except OSError as e:
                raise FsError(e.errno) from None
        path = f"/proc/self/fd/{fd}"
        switched = self._become(creds)
        try:
            if changes.mode is not None and attr.type != FileType.LNK:
                if attr.type in (FileType.REG, FileType.DIR):
                    os.chmod(fd, changes.mode & 0o7777)
                else:
                    os.chmod(path, changes.mode & 0o7777)
            if changes.uid is not None or changes.gid is not None:
                uid = -1 if changes.uid is None else changes.uid
                gid = -1 if changes.gid is None else changes.gid
                if _fchownat(fd, b"", uid, gid, linux.AT_EMPTY_PATH) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            if (changes.atime is not None or changes.mtime is not None) \
                    and attr.type != FileType.LNK:
                now = time.time_ns()
                if changes.atime == changes.mtime == SetAttr.NOW:
                    times = None
                else:
                    a = attr.atime if changes.atime is None else changes.atime
                    m = attr.mtime if changes.mtime is None else changes.mtime
                    times = (now if a == SetAttr.NOW else a, now if m == SetAttr.NOW else m)
                target = fd if attr.type in (FileType.REG, FileType.DIR) else path
                os.utime(target, ns=times) if times else os.utime(target)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        return self.getattr(fh)

    # ------------------------------------------------------------- lookup

    def lookup(self, dirfh: bytes, name: bytes, creds: Creds) -> tuple[bytes, Attr]:
        dfd = self._dir(dirfh)
        check_name(name)
        if name == b"." or (name == b".." and dirfh == self.root):
            return dirfh, self.getattr(dirfh)
        switched = self._become(creds)
        try:
            fh = self._handle(dfd, name)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        return fh, self._attr(st)

    # --------------------------------------------------------------- data

    def read(self, fh: bytes, offset: int, count: int, creds: Creds
             ) -> tuple[bytes, bool, Attr]:
        fd, st = self._stat(fh)
        attr = self._attr(st)
        check_io(attr, creds, write=False)
        if offset >= st.st_size or count == 0:
            return b"", offset >= st.st_size, attr
        try:
            data = os.pread(fd, count, offset)
        except OSError as e:  # EIO from the disk: NFS3ERR_IO, not a server error
            raise FsError(e.errno) from None
        return data, offset + len(data) >= st.st_size, attr

    def pread(self, fh: bytes, offset: int, count: int) -> bytes:
        """The bytes only, without attributes or an access check: for a caller that
        checked access on attributes it read moments ago (the NFS quick READ)."""
        try:
            return os.pread(self._fd(fh), count, offset)
        except OSError as e:
            raise FsError(e.errno) from None

    def read_range(self, fh: bytes, offset: int, count: int, creds: Creds
                   ) -> tuple[int | None, int, bool, Attr]:
        """READ without copying: ``(fd, n, eof, attr)`` where ``fd`` is a new descriptor
        (the caller closes it) whose bytes ``offset .. offset+n`` are the data, or None
        when ``n`` is 0.  Lets the transport sendfile(2) from the page cache."""
        fd, st = self._stat(fh)
        attr = self._attr(st)
        check_io(attr, creds, write=False)
        n = max(0, min(count, st.st_size - offset))
        eof = offset + n >= st.st_size
        return (os.dup(fd) if n else None), n, eof, attr

    def write(self, fh: bytes, offset: int, data: bytes | memoryview, sync: int,
              creds: Creds) -> tuple[Attr, Attr]:
        """Write ``data``; ``sync`` 0 = unstable, 1 = data, 2 = data + metadata.

        Returns (attributes before, attributes after).
        """
        fd, st = self._stat(fh)
        before = self._attr(st)
        check_io(before, creds, write=True)
        return before, self._pwrite(fd, offset, data, sync)

    def pwrite(self, fh: bytes, offset: int, data: bytes | memoryview, sync: int) -> Attr:
        """``write`` without the attributes before or an access check: for a caller
        that checked access on attributes it read moments ago (the NFS quick
        WRITE).  Returns the attributes after."""
        return self._pwrite(self._fd(fh), offset, data, sync)

    def _pwrite(self, fd: int, offset: int, data: bytes | memoryview, sync: int) -> Attr:
        n = len(data)
        try:
            done = os.pwrite(fd, data, offset) if n else 0
            while done < n:  # a short write (rare): the rest
                done += os.pwrite(fd, memoryview(data)[done:], offset + done)
            if sync == 1:
                os.fdatasync(fd)
            elif sync == 2:
                os.fsync(fd)
        except OSError as e:
            raise FsError(e.errno) from None
        return self._attr(os.fstat(fd))

    def commit(self, fh: bytes, offset: int, count: int) -> Attr:
        """fsync the file.  Safe from a worker thread: it works on a descriptor of
        its own and never adds to or evicts from the descriptor cache, whose
        descriptors the event-loop thread uses without the lock (an eviction here
        could close one under a READ, whose number the next open then reuses)."""
        with self._lock:
            cached = self._cache.get(fh)
            fd = os.dup(cached) if cached is not None else None
        if fd is None:
            fd = self._open(fh)
        try:
            if os.fstat(fd).st_nlink == 0:
                raise fail(errno.ESTALE)
            os.fsync(fd)
            return self._attr(os.fstat(fd))
        finally:
            os.close(fd)

    # ---------------------------------------------------------- namespace

    def _fix_mode(self, dfd: int, name: bytes, mode: int | None) -> None:
        if mode is not None and mode & self._umask:
            os.chmod(name, mode & 0o7777, dir_fd=dfd, follow_symlinks=False)

    def _finish(self, dirfh: bytes, dfd: int, name: bytes, attrs: SetAttr | None,
                creds: Creds) -> tuple[bytes, Attr]:
        fh = self._handle(dfd, name)
        if attrs is not None and not attrs.empty():
            rest = SetAttr(uid=attrs.uid, gid=attrs.gid, size=attrs.size, atime=attrs.atime,
                           mtime=attrs.mtime)
            if not rest.empty():
                self.setattr(fh, rest, creds)
        self._sync_dir(dfd)
        return fh, self.getattr(fh)

    def create(self, dirfh: bytes, name: bytes, how: CreateMode, attrs: SetAttr,
               verifier: bytes | None, creds: Creds) -> tuple[bytes, Attr]:
        dfd = self._dir(dirfh)
        check_name(name, creating=True)
        mode = 0o644 if attrs.mode is None else attrs.mode & 0o7777
        if how == CreateMode.EXCLUSIVE:
            mode = 0o600
        switched = self._become(creds)
        try:
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_CLOEXEC, mode,
                             dir_fd=dfd)
                os.close(fd)
                created = True
            except FileExistsError:
                created = False
                if how == CreateMode.GUARDED:
                    raise
            if created:
                self._fix_mode(dfd, name, mode)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        if how == CreateMode.EXCLUSIVE:
            assert verifier is not None
            # RFC 1813 §3.3.8: keep the verifier in the file (atime/mtime seconds,
            # as the kernel server does) so a retransmitted CREATE succeeds.
            hi, lo = int.from_bytes(verifier[:4], "big"), int.from_bytes(verifier[4:8], "big")
            if created:
                os.utime(name, ns=(hi * 10**9, lo * 10**9), dir_fd=dfd, follow_symlinks=False)
            else:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError as e:
                    raise FsError(e.errno) from None
                if not (stat.S_ISREG(st.st_mode) and int(st.st_atime) == hi
                        and int(st.st_mtime) == lo):
                    raise fail(errno.EEXIST)
            return self._finish(dirfh, dfd, name, None, creds)
        if not created:
            fh, attr = self.lookup(dirfh, name, creds)
            if attr.type != FileType.REG:
                raise fail(errno.EEXIST)
        return self._finish(dirfh, dfd, name, attrs, creds)

    def mkdir(self, dirfh: bytes, name: bytes, attrs: SetAttr,
              creds: Creds) -> tuple[bytes, Attr]:
        dfd = self._dir(dirfh)
        check_name(name, creating=True)
        mode = 0o755 if attrs.mode is None else attrs.mode & 0o7777
        switched = self._become(creds)
        try:
            os.mkdir(name, mode, dir_fd=dfd)
            self._fix_mode(dfd, name, mode)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        return self._finish(dirfh, dfd, name, attrs, creds)

    def mknod(self, dirfh: bytes, name: bytes, ftype: FileType, attrs: SetAttr,
              rdev: tuple[int, int], creds: Creds) -> tuple[bytes, Attr]:
        dfd = self._dir(dirfh)
        check_name(name, creating=True)
        if ftype not in _IFMT:
            raise fail(errno.EBADF, "bad file type")  # NFS3ERR_BADTYPE
        mode = 0o644 if attrs.mode is None else attrs.mode & 0o7777
        dev = os.makedev(*rdev) if ftype in (FileType.BLK, FileType.CHR) else 0
        switched = self._become(creds)
        try:
            os.mknod(name, mode | _IFMT[ftype], dev, dir_fd=dfd)
            self._fix_mode(dfd, name, mode)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        return self._finish(dirfh, dfd, name, attrs, creds)

    def symlink(self, dirfh: bytes, name: bytes, target: bytes, attrs: SetAttr,
                creds: Creds) -> tuple[bytes, Attr]:
        dfd = self._dir(dirfh)
        check_name(name, creating=True)
        if not target or b"\0" in target or len(target) > 4095:
            raise fail(errno.EINVAL if target else errno.ENOENT)
        switched = self._become(creds)
        try:
            os.symlink(target, name, dir_fd=dfd)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        return self._finish(dirfh, dfd, name, None, creds)

    def readlink(self, fh: bytes) -> bytes:
        fd, st = self._stat(fh)
        if not stat.S_ISLNK(st.st_mode):
            raise fail(errno.EINVAL)
        return os.readlink(b"", dir_fd=fd)

    def _victim(self, dfd: int, name: bytes) -> bytes | None:
        try:
            return linux.name_to_handle_at(dfd, name, 0)[0]
        except OSError:
            return None

    def remove(self, dirfh: bytes, name: bytes, creds: Creds) -> None:
        dfd = self._dir(dirfh)
        check_name(name)
        victim = self._victim(dfd, name)
        switched = self._become(creds)
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        if victim is not None:
            self._evict(victim)
        self._sync_dir(dfd)

    def rmdir(self, dirfh: bytes, name: bytes, creds: Creds) -> None:
        dfd = self._dir(dirfh)
        check_name(name)
        if name == b".":
            raise fail(errno.EINVAL)
        if name == b"..":
            raise fail(errno.ENOTEMPTY)
        victim = self._victim(dfd, name)
        switched = self._become(creds)
        try:
            os.rmdir(name, dir_fd=dfd)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        if victim is not None:
            self._evict(victim)
        self._sync_dir(dfd)

    def rename(self, fromdir: bytes, fromname: bytes, todir: bytes, toname: bytes,
               creds: Creds) -> None:
        sfd = self._dir(fromdir)
        dfd = self._dir(todir)
        check_name(fromname)
        check_name(toname)
        if fromname in (b".", b"..") or toname in (b".", b".."):
            raise fail(errno.EINVAL)
        victim = self._victim(dfd, toname)
        switched = self._become(creds)
        try:
            os.rename(fromname, toname, src_dir_fd=sfd, dst_dir_fd=dfd)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        if victim is not None and victim != self._victim(dfd, toname):
            self._evict(victim)
        self._sync_dir(dfd)
        if sfd != dfd:
            self._sync_dir(sfd)

    def link(self, fh: bytes, dirfh: bytes, name: bytes, creds: Creds) -> None:
        fd, st = self._stat(fh)
        if stat.S_ISDIR(st.st_mode):
            raise fail(errno.EISDIR)
        dfd = self._dir(dirfh)
        check_name(name, creating=True)
        switched = self._become(creds)
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
        except OSError as e:
            raise FsError(e.errno) from None
        finally:
            if switched:
                self._restore()
        self._sync_dir(dfd)

    # ------------------------------------------------------------ readdir

    def readdir(self, dirfh: bytes, cookie: int, plus: bool = False,
                size_hint: int = 0) -> Iterator[DirEntry]:
        """Entries from ``cookie`` on (0 = start); each cookie is the kernel's d_off.

        The kernel's directory offsets are stable across inserts and deletes
        (ext4 uses name hashes), which is what makes them good NFS cookies.
        With ``plus`` each entry also gets its handle and attributes (entries
        on another filesystem, or gone meanwhile, get neither).  ``size_hint``
        is roughly how many bytes of entries the caller can use.
        """
        dfd = self._dir(dirfh)
        try:
            os.lseek(dfd, cookie, os.SEEK_SET)
        except OSError:
            raise fail(errno.EINVAL, "bad cookie") from None
        root = dirfh == self.root
        n2h = linux.name_to_handle_at
        lstat = os.stat
        attr = self._attr
        mount_id = self.mount_id
        dents = self._dents.read(dfd, max(1024, size_hint // 3) if size_hint else None)
        for name, ino, off, _dtype in dents:
            if name == b"." or (root and name == b".."):
                ent = DirEntry(name, os.fstat(dfd).st_ino, off)
                if plus:
                    ent.handle, ent.attr = dirfh, self.getattr(dirfh)
                yield ent
                continue
            ent = DirEntry(name, ino, off)
            if plus:
                try:
                    fh, mid = n2h(dfd, name, 0)
                    if mid == mount_id:
                        ent.handle = fh
                        ent.attr = attr(lstat(name, dir_fd=dfd, follow_symlinks=False))
                except OSError:
                    ent.handle = None
            yield ent

    def listing_fd(self, dirfh: bytes) -> int:
        """A descriptor of directory ``dirfh`` for one-pass listing encoders
        (storaged.nfs.dirlist), which read it as ``readdir`` does: seek to the
        cookie, getdents64, handles on ``self.mount_id`` only."""
        return self._dir(dirfh)

    # ---------------------------------------------------------- fs-wide

    def fsstat(self) -> FsStat:
        v = os.fstatvfs(self.root_fd)
        return FsStat(v.f_blocks * v.f_frsize, v.f_bfree * v.f_frsize, v.f_bavail * v.f_frsize,
                      v.f_files, v.f_ffree, v.f_favail)

    def fsinfo(self) -> FsInfo:
        return FsInfo()
