"""A BlockDevice on a regular file (thin when sparse) or a host block device."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading

from storaged.block.aio import READ as AIO_READ
from storaged.block.aio import WRITE as AIO_WRITE
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


class AlignedBuffers:
    """Page-aligned scratch buffers for O_DIRECT I/O, recycled per size.

    O_DIRECT needs the user buffer aligned to the device's DMA alignment (at
    most a page); Python ``bytes``/``bytearray`` come from malloc with 16-byte
    alignment, so every direct transfer goes through an anonymous ``mmap``
    (page aligned by construction).  Buffers are kept per size class (page
    multiples) so the hot path does not mmap/munmap and fault pages in on every
    command: enough of them for a deep queue of small transfers (a batch of
    32 4 KiB READs takes 32 at once).  ``take``/``give`` are safe from several
    threads without a lock: ``list.pop``/``append`` are atomic under the GIL,
    and a race on the length check only keeps one buffer more or less.
    """

    KEEP_BYTES = 4 << 20     # free bytes kept per size class (at least KEEP_MIN buffers)
    KEEP_MIN = 8
    MAX_POOLED = 1 << 20     # bigger transfers get a fresh mapping each time

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}

    def take(self, length: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``length`` bytes."""
        size = max(mmap.PAGESIZE, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
        free = self._free.get(size)
        if free:
            try:
                return free.pop()
            except IndexError:      # another thread took the last one
                pass
        return mmap.mmap(-1, size)

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer from ``take`` (no views of it may remain)."""
        size = len(buf)
        if size <= self.MAX_POOLED:
            free = self._free.setdefault(size, [])
            if len(free) < max(self.KEEP_MIN, self.KEEP_BYTES // size):
                free.append(buf)
                return
        buf.close()


def probe_direct(path: str, block_size: int) -> None:
    """Raise OSError unless ``path`` takes O_DIRECT I/O in ``block_size`` units.

    Some filesystems refuse O_DIRECT at open (ramfs, some FUSE and network
    filesystems: EINVAL); others accept the open but fail a transfer smaller
    than the device's logical block size (a 512-byte LBA on a 4Kn disk).  Both
    show up here, at configuration time, instead of as I/O errors later.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise OSError(e.errno, "the filesystem does not support O_DIRECT") from None
        raise
    try:
        buf = mmap.mmap(-1, max(block_size, mmap.PAGESIZE))
        try:
            os.preadv(fd, [memoryview(buf)[:block_size]], 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise OSError(e.errno, f"O_DIRECT reads of {block_size} bytes are refused "
                              "(the device's logical block size is larger; use "
                              "--block-size 4096)") from None
            raise
        finally:
            buf.close()
    finally:
        os.close(fd)


class FileBlockDevice:
    """Block I/O on a file or block device with pread/pwrite and fdatasync.

    With ``direct`` the file is opened O_DIRECT: reads and writes bypass the
    page cache and go through page-aligned scratch buffers
    (:class:`AlignedBuffers`).  Each transfer then waits for the disk, so the
    iSCSI shell submits the disk accesses of concurrent READs and WRITEs as
    asynchronous I/O (storaged.block.aio; ``aio_reads``/``use_prefetched``,
    ``defer_writes``/``take_deferred``/``aio_writes``; storaged.iscsi.direct)
    while the SCSI commands themselves still run on its event loop.  Flushes
    and FUA writes go to the executor (``LogicalUnit.may_block``).
    """

    def __init__(self, path: str, block_size: int = 512, read_only: bool = False,
                 create_size: int | None = None, direct: bool = False) -> None:
        self.path = path
        self.block_size = block_size
        self.read_only = read_only
        self.direct = direct
        """O_DIRECT: no page cache; every transfer blocks on the disk."""
        self._aligned = AlignedBuffers()
        self._prefetched: dict[tuple[int, int], bytes] = {}
        self._prefetch_thread = 0
        self._deferred: list[tuple[int, mmap.mmap, int]] | None = None
        self._defer_thread = 0
        self._defer_error: OSError | None = None
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create_size is not None and not os.path.exists(path):
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
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

    def set_direct(self, direct: bool) -> None:
        """Switch O_DIRECT on or off on the open descriptor (F_SETFL; Linux
        allows changing O_DIRECT this way), so LUNs stay up across the change."""
        if direct == self.direct:
            return
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        flags = flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
        self.direct = direct

    def _read_direct(self, offset: int, length: int, out: memoryview | None) -> bytes:
        buf = self._aligned.take(length)
        try:
            view = memoryview(buf)[:length]
            try:
                n = os.preadv(self.fd, [view], offset)
                if n < length:
                    view[n:] = bytes(length - n)
                if out is not None:
                    out[:] = view
                    return b""
                return bytes(view)
            finally:
                view.release()
        finally:
            self._aligned.give(buf)

    def _write_direct(self, offset: int, data: bytes | memoryview) -> None:
        length = len(data)
        buf = self._aligned.take(length)
        try:
            view = memoryview(buf)[:length]
            try:
                view[:] = data
                done = 0
                while done < length:
                    done += os.pwritev(self.fd, [view[done:]], offset + done)
            finally:
                view.release()
        finally:
            self._aligned.give(buf)

    def aio_read(self, offset: int, length: int) -> tuple[int, int, int, memoryview]:
        """The storaged.block.aio operation that reads ``length`` bytes at
        ``offset`` into an aligned buffer; then ``aio_read_result``."""
        return (AIO_READ, self.fd, offset, memoryview(self._aligned.take(length))[:length])

    def aio_read_result(self, op: tuple[int, int, int, memoryview], res: int) -> bytes | None:
        """The data of a finished ``aio_read`` (a short read at the end of the
        file padded with zeros), or None if it failed; gives the buffer back."""
        view = op[3]
        n = view.nbytes
        data = None
        if res >= 0:
            data = bytes(view[:res]) + bytes(n - res) if res < n else bytes(view)
        buf = view.obj
        view.release()
        self._aligned.give(buf)  # type: ignore[arg-type]
        return data

    def aio_reads(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int, memoryview]]:
        """``aio_read`` operations for ``(offset, length)`` ranges;
        ``aio_read_data`` turns their results into data for ``use_prefetched``."""
        return [self.aio_read(off, n) for off, n in ranges]

    def aio_read_data(self, ops: list[tuple[int, int, int, memoryview]],
                      results: list[int]) -> dict[tuple[int, int], bytes]:
        """``(offset, length) -> data`` of the reads that worked; the others
        are left out, so their commands read again and report the error."""
        out: dict[tuple[int, int], bytes] = {}
        for op, res in zip(ops, results, strict=True):
            key = (op[2], op[3].nbytes)
            data = self.aio_read_result(op, res)
            if data is not None:
                out[key] = data
        return out

    def aio_write(self, offset: int, data: bytes | memoryview
                  ) -> tuple[int, int, int, memoryview]:
        """The storaged.block.aio operation that writes a copy of ``data`` (it
        may be a view of a receive buffer) at ``offset``; then
        ``aio_write_done``.  One WRITE's ``defer_writes``/``write``/
        ``take_deferred``/``aio_writes`` in one step."""
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, f"{self.path} is read-only")
        if self._prefetched:
            self._prefetched.clear()
        length = len(data)
        buf = self._aligned.take(length)
        buf[:length] = data
        return (AIO_WRITE, self.fd, offset, memoryview(buf)[:length])

    def aio_write_done(self, op: tuple[int, int, int, memoryview], res: int
                       ) -> BlockDeviceError | None:
        """Finish an ``aio_write`` (or one of ``aio_writes``): a failed or short
        write is retried once, in full; the error if that fails too.  The
        buffer goes back to the pool."""
        view = op[3]
        length = view.nbytes
        buf = view.obj
        view.release()
        error = None
        if res != length:
            try:
                self.write_pending((op[2], buf, length))  # type: ignore[arg-type]
            except BlockDeviceError as e:
                error = e
        self._aligned.give(buf)  # type: ignore[arg-type]
        return error

    def aio_writes(self, pending: list[tuple[int, mmap.mmap, int]]
                   ) -> list[tuple[int, int, int, memoryview]]:
        """Operations for storaged.block.aio that write ``take_deferred``
        entries; then ``aio_writes_done``."""
        return [(AIO_WRITE, self.fd, off, memoryview(buf)[:n]) for off, buf, n in pending]

    def aio_writes_done(self, ops: list[tuple[int, int, int, memoryview]],
                        results: list[int]) -> BlockDeviceError | None:
        """Finish ``aio_writes``: each as ``aio_write_done`` (a failed or short
        write retried once, in full; its buffer back to the pool); the first
        error if any retry failed (the batch must then not be acknowledged)."""
        error = None
        for op, res in zip(ops, results, strict=True):
            e = self.aio_write_done(op, res)
            error = error or e
        return error

    def use_prefetched(self, data: dict[tuple[int, int], bytes]) -> None:
        """Hand out ``data`` (``(offset, length) -> bytes`` from
        ``aio_read_data``) to the ``read``/``readinto`` calls of this thread
        until ``drop_prefetched``: each range once, so it never outlives the
        batch of commands it was read for.  ``write``/``discard`` drop it.
        Only the installing thread sees it (pool commands such as COMPARE AND
        WRITE read the file).  A range missing from ``data`` (a failed read)
        is read again by the command, which then reports the error."""
        self._prefetched = data
        self._prefetch_thread = threading.get_ident()

    def drop_prefetched(self) -> None:
        """Forget data from ``use_prefetched`` that no command took."""
        if self._prefetched:
            self._prefetched = {}

    def _take_prefetched(self, key: tuple[int, int]) -> bytes | None:
        if threading.get_ident() != self._prefetch_thread:
            return None
        return self._prefetched.pop(key, None)

    def defer_writes(self) -> None:
        """Until ``take_deferred``, O_DIRECT writes from this thread are
        copied to aligned buffers and queued instead of written one by one.

        The caller (the iSCSI shell, for a batch of WRITEs) writes the queue
        (``write_pending``, from worker threads) before it lets any status of
        those commands go out, so nothing is acknowledged before it is
        written.  Reads, discards and flushes from this thread write the queue
        first, so the commands of the batch still see each other's data in
        order.  Other threads (pool commands such as FUA writes) are not
        affected.
        """
        if self.direct and self._deferred is None:
            self._deferred = []
            self._defer_thread = threading.get_ident()

    def take_deferred(self) -> list[tuple[int, mmap.mmap, int]]:
        """Stop deferring and return the queue: ``(offset, buffer, length)``
        entries for ``write_pending``, each to be given back with
        ``release_pending``.  Raises BlockDeviceError when a drain of the
        queue during the batch failed: the batch must then not be
        acknowledged."""
        pending = self._deferred or []
        self._deferred = None
        error, self._defer_error = self._defer_error, None
        if error is not None:
            self.release_pending(pending)
            raise BlockDeviceError(error.errno, f"write {self.path}: {error.strerror}")
        return pending

    def write_pending(self, entry: tuple[int, mmap.mmap, int]) -> None:
        """Write one ``take_deferred`` entry now, retrying once; raises
        BlockDeviceError."""
        try:
            self._write_aligned(*entry)
        except OSError:
            try:
                self._write_aligned(*entry)
            except OSError as e:
                raise BlockDeviceError(e.errno, f"write {self.path}: {e.strerror}") from e

    def release_pending(self, pending: list[tuple[int, mmap.mmap, int]]) -> None:
        """Give the buffers of ``take_deferred`` entries back to the pool."""
        for _off, buf, _n in pending:
            self._aligned.give(buf)

    def _write_aligned(self, offset: int, buf: mmap.mmap, length: int) -> None:
        with memoryview(buf) as whole:
            view = whole[:length]
            try:
                done = 0
                while done < length:
                    done += os.pwritev(self.fd, [view[done:]], offset + done)
            finally:
                view.release()

    def _drain_deferred(self) -> None:
        """Write this thread's deferred writes now (inline, in order)."""
        if self._deferred and threading.get_ident() == self._defer_thread:
            pending, self._deferred = self._deferred, []
            try:
                for p in pending:
                    self._write_aligned(*p)
            except OSError as e:
                self._defer_error = e  # write_deferred reports it: no GOOD status goes out
                raise
            finally:
                for _off, buf, _n in pending:
                    self._aligned.give(buf)

    def read(self, offset: int, length: int) -> bytes:
        try:
            if self.direct:
                if self._deferred:
                    self._drain_deferred()
                if self._prefetched:
                    data = self._take_prefetched((offset, length))
                    if data is not None:
                        return data
                return self._read_direct(offset, length, None)
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"read {self.path}: {e.strerror}") from e
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf: memoryview) -> int:
        try:
            if self.direct:
                if self._deferred:
                    self._drain_deferred()
                data = self._take_prefetched((offset, len(buf))) if self._prefetched else None
                if data is not None:
                    buf[:] = data
                else:
                    self._read_direct(offset, len(buf), buf)
                return len(buf)
            n = os.preadv(self.fd, [buf], offset)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"read {self.path}: {e.strerror}") from e
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        return len(buf)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, f"{self.path} is read-only")
        if self._prefetched:
            self._prefetched.clear()
        try:
            view = memoryview(data)
            if self.direct:
                deferred = self._deferred
                if deferred is not None and not fua and \
                        threading.get_ident() == self._defer_thread:
                    # Copy now: ``data`` may be a view of the receive buffer.
                    length = view.nbytes
                    buf = self._aligned.take(length)
                    buf[:length] = view
                    deferred.append((offset, buf, length))
                    return
                if deferred:
                    self._drain_deferred()
                self._write_direct(offset, view)
                if fua:
                    os.fdatasync(self.fd)
                return
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
            if self._deferred:
                self._drain_deferred()
            os.fdatasync(self.fd)
        except OSError as e:
            raise BlockDeviceError(e.errno, f"flush {self.path}: {e.strerror}") from e

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, f"{self.path} is read-only")
        self._prefetched.clear()
        if self._deferred:
            self._drain_deferred()
        if self.is_block:
            # BLKZEROOUT-like fallback: write zeros (BLKDISCARD does not promise zeros).
            self.write(offset, bytes(length))
            return
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            self.write(offset, bytes(length))

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if self._deferred:
            self._drain_deferred()
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
