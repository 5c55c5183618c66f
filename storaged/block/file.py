"""A BlockDevice on a regular file (thin when sparse) or a host block device."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from storaged.block.base import BlockDeviceError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272


_libc_fallocate = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc_fallocate
    import ctypes

    fn = _libc_fallocate
    if fn is None:
        # Resolved once: ctypes.util.find_library runs ldconfig in a subprocess.
        fn = ctypes.CDLL(None, use_errno=True).fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        _libc_fallocate = fn
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBlockDevice:
    """Block I/O on a file or block device with pread/pwrite and fdatasync."""

    def __init__(self, path: str, block_size: int = 512, read_only: bool = False,
                 create_size: int | None = None) -> None:
        self.path = path
        self.block_size = block_size
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create_size is not None and not os.path.exists(path):
            flags |= os.O_CREAT
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if create_size is not None and not self.is_block and st.st_size < create_size:
            os.ftruncate(self.fd, create_size)
        self._size = self._probe_size()
        self.discard_granularity = max(block_size, st.st_blksize or 4096)
        """Bytes a discard frees at a time (the filesystem block size)."""
        self.thin = not self.is_block and self._can_punch()
        """A regular file on a filesystem that punches holes: discarded ranges
        give their space back and read as zeros (thin provisioning)."""

    def _can_punch(self) -> bool:
        if self.read_only:
            return True  # cannot probe without write access; the data stays sparse anyway
        try:
            # Past EOF with KEEP_SIZE: changes nothing, fails where unsupported.
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       max(self._size, 0), self.block_size)
        except OSError:
            return False
        return True

    def _probe_size(self) -> int:
        if self.is_block:
            import array
            buf = array.array("Q", [0])
            fcntl.ioctl(self.fd, _BLKGETSIZE64, buf)
            size = buf[0]
        else:
            size = os.fstat(self.fd).st_size
        return size - size % self.block_size

    @property
    def size(self) -> int:
        return self._size

    def refresh_size(self) -> int:
        """Re-read the capacity after the backing file or device was resized."""
        self._size = self._probe_size()
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"read {self.path}: {e.strerror}") from e
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf: memoryview) -> int:
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"read {self.path}: {e.strerror}") from e
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        return len(buf)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, f"{self.path} is read-only")
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
            if fua:
                os.fdatasync(self.fd)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"write {self.path}: {e.strerror}") from e

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"flush {self.path}: {e.strerror}") from e

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, f"{self.path} is read-only")
        if self.is_block:
            # BLKZEROOUT-like fallback: write zeros (BLKDISCARD does not promise zeros).
            self.write(offset, bytes(length))
            return
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            self.write(offset, bytes(length))

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        end = offset + length
        if self.is_block:
            return [(offset, length, True)]
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    data = end
                else:
                    return [(offset, length, True)]
            if data > pos:
                hole_end = min(data, end)
                out.append((pos, hole_end - pos, False))
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            seg_end = min(hole, end)
            out.append((pos, seg_end - pos, True))
            pos = seg_end
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
