"""clusterfs fallocate: modes 0, KEEP_SIZE and PUNCH_HOLE in memory and through FUSE."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from storaged.clusterfs.fs import ClusterFS
from storaged.clusterfs.locks import LocalLocks
from storaged.clusterfs.memdev import MemoryBlockDevice
from storaged.clusterfs.mkfs import check, mkfs
from tests import test_clusterfs_fuse as fuse_tests

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
local_mount = fuse_tests.local_mount  # a -o local FUSE mount of a 128 MiB image
env = fuse_tests.env


def new_fs(size: int = 16 << 20) -> tuple[MemoryBlockDevice, ClusterFS]:
    dev = MemoryBlockDevice(size)
    dev.data[:] = b"\xa5" * size  # stale bytes: preallocated blocks must not show them
    dev.durable[:] = dev.data
    mkfs(dev, 1, rg_data=1024, journal_blocks=64, force=True)
    return dev, ClusterFS(dev, LocalLocks()).mount()


def test_mode_0_allocates_zeroed_blocks_and_extends_the_size():
    dev, fs = new_fs()
    fs.create("/f", 0o644)
    fs.write("/f", b"keep", 0)
    free = fs.statfs()["f_bfree"]
    fs.fallocate("/f", 0, 0, 5 << 20)  # more than one transaction's chunk
    assert fs.getattr("/f")["st_size"] == 5 << 20
    used = free - fs.statfs()["f_bfree"]
    assert 1279 <= used <= 1290  # 1280 blocks less the one written, plus indirect blocks
    assert fs.read("/f", 4, 0) == b"keep"
    assert fs.read("/f", 1 << 20, 3 << 20) == bytes(1 << 20)
    fs.fallocate("/f", 0, 0, 4096)  # already allocated: nothing changes
    assert fs.statfs()["f_bfree"] == free - used and fs.getattr("/f")["st_size"] == 5 << 20
    fs.write("/f", b"x" * 8192, 4 << 20)  # a write into preallocated space allocates nothing
    assert fs.statfs()["f_bfree"] == free - used
    fs.umount()
    assert check(dev).problems == []


def test_keep_size_allocates_past_eof_and_truncate_frees_it():
    dev, fs = new_fs()
    fs.create("/f", 0o644)
    free = fs.statfs()["f_bfree"]
    fs.fallocate("/f", FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
    assert fs.getattr("/f")["st_size"] == 0 and fs.statfs()["f_bfree"] <= free - 256
    assert fs.read("/f", 100, 0) == b""
    fs.truncate("/f", 8192)  # the size grows over preallocated zeros
    assert fs.read("/f", 8192, 0) == bytes(8192)
    fs.truncate("/f", 0)
    assert fs.statfs()["f_bfree"] == free
    fs.umount()
    assert check(dev).problems == []


def test_unsupported_modes_and_bad_arguments():
    dev, fs = new_fs()
    fs.create("/f", 0o644)
    fs.mkdir("/d", 0o755)
    for mode in (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
        with pytest.raises(OSError) as e:
            fs.fallocate("/f", mode, 0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP
    for args, code in ((("/f", 0, -1, 10), errno.EINVAL), (("/f", 0, 0, 0), errno.EINVAL),
                       (("/d", 0, 0, 10), errno.EISDIR), (("/none", 0, 0, 10), errno.ENOENT),
                       (("/f", 0, 0, 1 << 40), errno.EFBIG)):
        with pytest.raises(OSError) as e:
            fs.fallocate(*args)
        assert e.value.errno == code, args
    free = fs.statfs()["f_bfree"]
    with pytest.raises(OSError) as e:
        fs.fallocate("/f", 0, 0, 64 << 20)  # four times the device
    assert e.value.errno == errno.ENOSPC
    assert fs.statfs()["f_bfree"] < free  # whole chunks before the failure stay allocated
    fs.umount()
    assert check(dev).problems == []


def test_punch_hole_frees_whole_blocks_zeroes_edges_and_keeps_the_size():
    dev, fs = new_fs()
    fs.create("/f", 0o644)
    data = os.urandom(3 << 20)  # direct, single and double indirect blocks
    fs.write("/f", data, 0)
    free = fs.statfs()["f_bfree"]
    fs.fallocate("/f", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, (2 << 20) + 5000)
    assert fs.getattr("/f")["st_size"] == 3 << 20
    end = 1000 + (2 << 20) + 5000
    assert fs.read("/f", 3 << 20, 0) == data[:1000] + bytes(end - 1000) + data[end:]
    assert fs.statfs()["f_bfree"] - free == (end // 4096) - 1  # whole blocks 1..end//4096-1
    fs.fallocate("/f", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 40)  # past EOF
    assert fs.read("/f", 3 << 20, 0) == bytes(3 << 20)
    fs.write("/f", b"again", 2 << 20)  # a hole fills again
    assert fs.read("/f", 5, 2 << 20) == b"again"
    fs.umount()
    assert check(dev).problems == []


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) through libc (os has only posix_fallocate); 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


@pytest.mark.peer
@pytest.mark.slow
def test_fallocate_through_a_fuse_mount(local_mount):
    _img, mnt = local_mount
    path = os.path.join(mnt, "pre")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 2 << 20)
        st = os.fstat(fd)
        assert st.st_size == 2 << 20 and st.st_blocks * 512 >= 2 << 20
        assert _fallocate(fd, FALLOC_FL_KEEP_SIZE, 2 << 20, 1 << 20) == 0
        st = os.fstat(fd)
        assert st.st_size == 2 << 20 and st.st_blocks * 512 >= 3 << 20
        assert os.pread(fd, 4096, 1 << 20) == bytes(4096)
        os.pwrite(fd, b"\xff" * 8192, 0)
        assert _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 4096) == 0
        assert os.pread(fd, 8192, 0) == b"\xff" * 100 + bytes(4096) + b"\xff" * 3996
        assert _fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096) == errno.EOPNOTSUPP
    finally:
        os.close(fd)
