"""Linux syscalls the host-directory backend needs and Python's os module lacks.

* ``name_to_handle_at`` / ``open_by_handle_at`` (open_by_handle_at(2)): file
  handles that name an inode, survive reboots and go stale when the inode is
  freed (ext4/xfs/btrfs/tmpfs embed a generation number).  Opening by handle
  needs CAP_DAC_READ_SEARCH, i.e. root.
* ``getdents64``: directory entries *with* their ``d_off`` positions, which are
  the stable READDIR cookies (what the kernel NFS server uses too).
* per-thread ``setfsuid``/``setfsgid``/``setgroups`` (raw syscalls: glibc
  would broadcast setgroups to every thread) so the kernel checks permissions
  and sets ownership as the NFS caller.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
import threading
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)

MAX_HANDLE_SZ = 128
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000

_SYSCALLS = {
    "x86_64": {"getdents64": 217, "setfsuid": 122, "setfsgid": 123, "setgroups": 116},
    "aarch64": {"getdents64": 61, "setfsuid": 151, "setfsgid": 152, "setgroups": 159},
}
_NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_n2h = _libc.name_to_handle_at
_n2h.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                 ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_obh = _libc.open_by_handle_at
_obh.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]

_HEAD = struct.Struct("=Ii")
_LITTLE = sys.byteorder == "little"


def _raise(path: bytes | str | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), path)


_tls = threading.local()


def name_to_handle_at(dirfd: int, name: bytes, flags: int = 0) -> tuple[bytes, int]:
    """``(handle, mount_id)``: handle = 4-byte handle_type (big endian) + f_handle bytes."""
    bufs = getattr(_tls, "n2h", None)
    if bufs is None:
        fh = _FileHandle()
        mount_id = ctypes.c_int()
        bufs = _tls.n2h = (fh, mount_id, ctypes.byref(fh), ctypes.byref(mount_id))
    fh, mount_id, pfh, pmid = bufs
    fh.handle_bytes = MAX_HANDLE_SZ
    if _n2h(dirfd, name, pfh, pmid, flags) != 0:
        _raise(name)
    raw = ctypes.string_at(pfh, 8 + fh.handle_bytes)
    return raw[4:8][::-1] + raw[8:] if _LITTLE else raw[4:], mount_id.value


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the inode named by ``handle`` (from ``name_to_handle_at``); OSError ESTALE if gone."""
    if len(handle) < 4 or len(handle) - 4 > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "bad handle length")
    htype = struct.unpack(">i", handle[:4])[0]
    raw = _HEAD.pack(len(handle) - 4, htype) + handle[4:]
    buf = ctypes.create_string_buffer(raw, len(raw))
    fd = _obh(mount_fd, buf, flags | os.O_CLOEXEC)
    if fd < 0:
        _raise()
    return fd


_DIRENT = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type


class Getdents:
    """A reusable getdents64(2) buffer."""

    def __init__(self, size: int = 64 * 1024) -> None:
        self.size = size
        self.buf = ctypes.create_string_buffer(size)

    def read(self, fd: int, size: int | None = None) -> Iterator[tuple[bytes, int, int, int]]:
        """Entries ``(name, d_ino, d_off, d_type)`` from ``fd``'s current position on.

        ``size`` limits each getdents call (a caller that wants few entries
        should not make the kernel produce thousands).
        """
        nr = _NR["getdents64"]
        unpack = _DIRENT.unpack_from
        want = min(size or self.size, self.size)
        while True:
            n = _syscall(nr, fd, self.buf, want)
            if n < 0:
                _raise()
            if n == 0:
                return
            raw = ctypes.string_at(self.buf, n)
            pos = 0
            while pos < n:
                ino, off, reclen, dtype = unpack(raw, pos)
                end = raw.index(b"\0", pos + 19)
                yield raw[pos + 19:end], ino, off, dtype
                pos += reclen
            want = self.size


def setfsuid(uid: int) -> None:
    """Set this thread's filesystem uid (the previous one is not reported reliably)."""
    _syscall(_NR["setfsuid"], ctypes.c_uint(uid))


def setfsgid(gid: int) -> None:
    """Set this thread's filesystem gid."""
    _syscall(_NR["setfsgid"], ctypes.c_uint(gid))


def setgroups_thread(groups: tuple[int, ...] | list[int]) -> None:
    """Set this thread's supplementary groups only (raw syscall, no glibc broadcast)."""
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _syscall(_NR["setgroups"], len(groups), arr) != 0:
        _raise()
