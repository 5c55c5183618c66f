"""O_DIRECT backstores: the device, the CLI option, and QEMU against one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from storaged.block.base import BlockDeviceError
from storaged.block.file import AlignedBuffers, FileBlockDevice
from storaged.cli import cli
from storaged.state import Backstore, Store
from storaged.state.errors import ValidationError
from tests.support import direct_target, free_port, require_tool, running, storaged

IQN = "iqn.2026-11.org.storaged:direct"


def _fd_flags(pid: int, path: str) -> int:
    """open(2) flags of the descriptor ``pid`` holds on ``path`` (from fdinfo)."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == path:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("flags:"):
                            return int(line.split()[1], 8)
        except OSError:
            continue
    raise AssertionError(f"process {pid} has no descriptor on {path}")


# ---------------------------------------------------------------- device
@pytest.mark.parametrize("block_size", [512, 4096])
def test_direct_device_round_trip(tmp_path, block_size):
    path = str(tmp_path / "d.img")
    dev = FileBlockDevice(path, block_size=block_size, create_size=4 << 20, direct=True)
    try:
        assert dev.direct
        assert _fd_flags(os.getpid(), path) & os.O_DIRECT
        data = os.urandom(64 * block_size)
        # A view into the middle of a bytearray: not page aligned, copied to an aligned buffer.
        carrier = bytearray(7) + bytearray(data)
        dev.write(3 * block_size, memoryview(carrier)[7:])
        assert dev.read(3 * block_size, len(data)) == data
        out = bytearray(len(data))
        assert dev.readinto(3 * block_size, memoryview(out)) == len(data)
        assert out == data
        dev.write(0, data[:block_size], fua=True)
        assert dev.read(0, block_size) == data[:block_size]
        dev.flush()
    finally:
        dev.close()
    # The bytes really reached the file (read back through the page cache).
    with open(path, "rb") as f:
        f.seek(3 * block_size)
        assert f.read(len(data)) == data


def test_set_direct_switches_the_open_descriptor(tmp_path):
    path = str(tmp_path / "d.img")
    dev = FileBlockDevice(path, create_size=1 << 20)
    try:
        assert not _fd_flags(os.getpid(), path) & os.O_DIRECT
        dev.write(0, b"a" * 4096)
        dev.set_direct(True)
        assert dev.direct and _fd_flags(os.getpid(), path) & os.O_DIRECT
        assert dev.read(0, 4096) == b"a" * 4096
        dev.write(4096, b"b" * 512)
        dev.set_direct(False)
        assert not dev.direct and not _fd_flags(os.getpid(), path) & os.O_DIRECT
        assert dev.read(4096, 512) == b"b" * 512
    finally:
        dev.close()


def test_aligned_buffers_are_page_aligned_and_reused():
    pool = AlignedBuffers()
    import ctypes
    import mmap
    a = pool.take(5000)
    assert len(a) == 2 * mmap.PAGESIZE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(a))
    assert addr % mmap.PAGESIZE == 0
    pool.give(a)
    assert pool.take(8192) is a          # same size class comes back
    big = pool.take(2 << 20)             # above MAX_POOLED: not kept
    pool.give(big)
    assert big.closed


@pytest.mark.peer
def test_probe_direct_refuses_ramfs(tmp_path):
    """ramfs has no O_DIRECT; the probe says so (private mount namespace)."""
    unshare = require_tool("unshare", "util-linux")
    mnt = tmp_path / "ram"
    mnt.mkdir()
    code = ("import sys; from storaged.block.file import probe_direct\n"
            f"open('{mnt}/x', 'wb').write(bytes(4096))\n"
            "try:\n"
            f"    probe_direct('{mnt}/x', 512)\n"
            "except OSError as e:\n"
            "    print('refused:', e.strerror); sys.exit(0)\n"
            "sys.exit(3)\n")
    r = subprocess.run([unshare, "-m", "sh", "-c",
                        f"mount -t ramfs none {mnt} && exec {sys.executable} -c \"$0\"", code],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused: the filesystem does not support O_DIRECT" in r.stdout
    assert not os.listdir(mnt)


# ---------------------------------------------------------------- state + CLI
def test_record_field_validated_and_defaults_off():
    b = Backstore(name="b", kind="file", path="/x.img", size=1 << 20)
    b.validate()
    assert b.direct is False
    assert Backstore.from_dict({k: v for k, v in b.to_dict().items() if k != "direct"}).direct \
        is False
    with pytest.raises(ValidationError, match="direct"):
        Backstore(name="b", kind="file", path="/x.img", size=1 << 20, direct="yes").validate()
    with pytest.raises(ValidationError, match="not raid"):
        Backstore(name="b", kind="raid", path="md0", size=1 << 20, direct=True).validate()


def test_cli_create_and_set_direct(tmp_path):
    state = str(tmp_path / "state")
    runner = CliRunner()

    def run(*args, code=0):
        r = runner.invoke(cli, ["--dir", state, *args])
        assert r.exit_code == code, (r.output, r.exception)
        return r.output

    run("backstore", "create", "d1", str(tmp_path / "d1.img"), "--size", "8M", "--direct")
    run("backstore", "create", "p1", str(tmp_path / "p1.img"), "--size", "8M")
    assert "O_DIRECT" in run("backstore", "ls")
    with Store(state) as store, store.read() as txn:
        assert txn.get(Backstore, "d1").direct is True
        assert txn.get(Backstore, "p1").direct is False
    out = run("backstore", "set", "d1", "--direct", "off")
    assert "O_DIRECT" not in out
    assert "O_DIRECT" in run("backstore", "set", "p1", "--direct", "on")
    with Store(state) as store, store.read() as txn:
        assert txn.get(Backstore, "d1").direct is False
        assert txn.get(Backstore, "p1").direct is True
    run("backstore", "set", "p1", "--direct", "maybe", code=2)


@pytest.mark.peer
def test_cli_error_when_filesystem_refuses_direct(tmp_path):
    """ramfs refuses O_DIRECT: a clear error, exit 1, no record, no file left behind.

    (tmpfs, the usual example, accepts O_DIRECT since Linux 6.6; the test for
    it is below.)"""
    unshare = require_tool("unshare", "util-linux")
    mnt = tmp_path / "ram"
    mnt.mkdir()
    state = str(tmp_path / "state")
    script = (f"mount -t ramfs none {mnt} && "
              f"{sys.executable} -m storaged --dir {state} backstore create r1 {mnt}/r.img "
              f"--size 8M --direct; echo rc=$?; ls -A {mnt}; echo end")
    r = subprocess.run([unshare, "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "cannot use O_DIRECT (--direct) on" in r.stderr
    assert "does not support O_DIRECT" in r.stderr
    assert "r.img" not in r.stdout          # the file it had created is removed again
    assert "Traceback" not in r.stderr
    r = storaged("backstore", "ls", directory=state)
    assert "r1" not in r.stdout


def test_cli_direct_on_tmpfs(tmp_path):
    """tmpfs: either it takes O_DIRECT (Linux >= 6.6) and the backstore works,
    or the CLI refuses with the clear error; never a half-made backstore."""
    if not os.path.isdir("/dev/shm"):
        pytest.fail("/dev/shm (tmpfs) missing")
    img = f"/dev/shm/storaged-test-{os.getpid()}.img"
    state = str(tmp_path / "state")
    try:
        r = storaged("backstore", "create", "t1", img, "--size", "8M", "--direct",
                     directory=state, check=False)
        ls = storaged("backstore", "ls", directory=state).stdout
        if r.returncode == 0:
            assert "O_DIRECT" in ls
            dev = FileBlockDevice(img, direct=True)
            try:
                dev.write(512, b"x" * 512)
                assert dev.read(512, 512) == b"x" * 512
            finally:
                dev.close()
        else:
            assert r.returncode == 1 and "cannot use O_DIRECT" in r.stderr, r.stderr
            assert "t1" not in ls and not os.path.exists(img)
    finally:
        if os.path.exists(img):
            os.unlink(img)


# ---------------------------------------------------------------- QEMU
@pytest.mark.peer
def test_qemu_convert_compare_on_direct_backstore(tmp_path):
    qemu_img = require_tool("qemu-img", "qemu-utils (and qemu-block-extra for iscsi://)")
    src = str(tmp_path / "src.img")
    with open(src, "wb") as f:
        f.write(os.urandom(32 << 20))
    backing = str(tmp_path / "direct.img")
    state = str(tmp_path / "state")
    port = free_port()
    direct_target(state, IQN, backing, "32M", port)
    with running(state, port, demo=False) as d:
        proc = d.proc
        assert proc is not None
        assert _fd_flags(proc.pid, backing) & os.O_DIRECT
        opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target={IQN},lun=0")
        image = f"driver=raw,file.filename={src}"

        def qemu(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([qemu_img, *args], capture_output=True, text=True,
                                  timeout=300)

        r = qemu("convert", "-n", "--image-opts", image, "--target-image-opts", opts)
        assert r.returncode == 0, r.stderr
        r = qemu("compare", "--image-opts", image, opts)
        assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
        # The data is in the file, not only in some cache of the daemon.
        with open(src, "rb") as a, open(backing, "rb") as b:
            assert a.read() == b.read()
        # Switched off live (routed to the daemon): same descriptor, no O_DIRECT.
        storaged("backstore", "set", "d0", "--direct", "off", directory=state)
        assert not _fd_flags(proc.pid, backing) & os.O_DIRECT
        r = qemu("compare", "--image-opts", image, opts)
        assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
        storaged("backstore", "set", "d0", "--direct", "on", directory=state)
        assert _fd_flags(proc.pid, backing) & os.O_DIRECT
        # A changed byte is noticed over the O_DIRECT path.
        with open(src, "r+b") as f:
            f.seek(777777)
            old = f.read(1)
            f.seek(777777)
            f.write(bytes([old[0] ^ 0x5A]))
        r = qemu("compare", "--image-opts", image, opts)
        assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in d.output()


def test_prefetched_data_is_served_once_to_its_thread_and_writes_drop_it(tmp_path):
    import threading
    path = str(tmp_path / "p.img")
    dev = FileBlockDevice(path, create_size=1 << 20, direct=True)
    try:
        dev.write(0, b"A" * 8192)
        dev.write(65536, b"B" * 4096)
        ranges = [(0, 4096), (65536, 4096), (4096, 4096)]
        dev.use_prefetched({r: dev.read(*r) for r in ranges})
        # Overwrite the file behind the device's back: a hit must come from the prefetch...
        with open(path, "r+b") as f:
            f.write(b"Z" * 4096)
        # ...for the installing thread only (a pool command reads the file)...
        seen = []
        t = threading.Thread(target=lambda: seen.append(dev.read(0, 4096)))
        t.start()
        t.join()
        assert seen == [b"Z" * 4096]
        assert dev.read(0, 4096) == b"A" * 4096
        # ...once: the next read goes to the file again.
        assert dev.read(0, 4096) == b"Z" * 4096
        out = bytearray(4096)
        dev.readinto(65536, memoryview(out))
        assert out == b"B" * 4096
        # A write through the device drops what is left (no stale data).
        dev.write(4096, b"C" * 4096)
        assert dev.read(4096, 4096) == b"C" * 4096
        dev.use_prefetched({(0, 512): b"q" * 512})
        dev.drop_prefetched()
        assert dev.read(0, 512) == b"Z" * 512
    finally:
        dev.close()


def _on_disk(path: str, off: int, n: int) -> bytes:
    """What the file holds, read around the device (and its O_DIRECT fd)."""
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_deferred_writes_are_written_together_and_seen_in_order(tmp_path):
    import threading
    path = str(tmp_path / "w.img")
    dev = FileBlockDevice(path, create_size=1 << 20, direct=True)

    def write_all() -> None:
        pending = dev.take_deferred()
        try:
            for p in pending:
                dev.write_pending(p)
        finally:
            dev.release_pending(pending)

    try:
        dev.defer_writes()
        src = bytearray(b"1" * 4096)
        dev.write(0, memoryview(src))
        src[:] = b"x" * 4096                 # the caller's buffer is reused: a copy was queued
        dev.write(8192, b"2" * 4096)
        assert _on_disk(path, 0, 4096) == bytes(4096)   # queued, not written yet
        # Another thread (a pool command) writes through at once.
        t = threading.Thread(target=dev.write, args=(16384, b"3" * 512))
        t.start()
        t.join()
        assert _on_disk(path, 16384, 512) == b"3" * 512
        dev.write(20480, b"4" * 4096)
        write_all()
        assert _on_disk(path, 0, 4096) == b"1" * 4096
        assert _on_disk(path, 8192, 4096) == b"2" * 4096
        assert _on_disk(path, 20480, 4096) == b"4" * 4096
        # A read in the batch sees the batch's earlier writes (queue written first).
        dev.defer_writes()
        dev.write(4096, b"5" * 4096)
        assert dev.read(4096, 4096) == b"5" * 4096
        assert _on_disk(path, 4096, 4096) == b"5" * 4096
        dev.write(4096, b"6" * 4096, fua=True)   # FUA writes are never queued
        assert _on_disk(path, 4096, 4096) == b"6" * 4096
        assert dev.take_deferred() == []
        # Deferring is a no-op without O_DIRECT.
        dev.set_direct(False)
        dev.defer_writes()
        dev.write(0, b"7" * 512)
        assert _on_disk(path, 0, 512) == b"7" * 512
        assert dev.take_deferred() == []
    finally:
        dev.close()


def test_lone_aio_write_copies_retries_and_reports(tmp_path):
    import errno
    path = str(tmp_path / "w.img")
    dev = FileBlockDevice(path, create_size=1 << 20, direct=True)
    try:
        src = bytearray(b"a" * 4096)
        op = dev.aio_write(8192, memoryview(src))
        src[:] = b"z" * 4096                    # a copy: the receive buffer may be reused
        assert bytes(op[3]) == b"a" * 4096 and op[2] == 8192
        os.pwrite(dev.fd, op[3], 8192)          # what the AIO context does
        assert dev.aio_write_done(op, 4096) is None
        with pytest.raises(ValueError):         # the view is released, the buffer pooled
            op[3].nbytes  # noqa: B018
        assert _on_disk(path, 8192, 4096) == b"a" * 4096
        # A short or failed write is written again in full...
        op = dev.aio_write(0, b"b" * 4096)
        assert dev.aio_write_done(op, 512) is None
        op = dev.aio_write(4096, b"c" * 4096)
        assert dev.aio_write_done(op, -errno.EIO) is None
        assert _on_disk(path, 0, 8192) == b"b" * 4096 + b"c" * 4096
        # ...and an error is returned (not raised) when that fails too.
        op = dev.aio_write(0, b"d" * 4096)
        os.close(dev.fd)
        dev.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        err = dev.aio_write_done(op, -errno.EIO)
        assert err is not None and err.errno == errno.EBADF
    finally:
        dev.close()
    ro = FileBlockDevice(path, read_only=True, direct=True)
    try:
        with pytest.raises(BlockDeviceError) as e:
            ro.aio_write(0, b"e" * 4096)
        assert e.value.errno == errno.EROFS
    finally:
        ro.close()


def test_aio_helpers_pad_short_reads_and_retry_failed_writes(tmp_path):
    import errno
    path = str(tmp_path / "a.img")
    dev = FileBlockDevice(path, create_size=1 << 20, direct=True)

    try:
        # Results as the AIO context reports them: done, short, failed.
        ops = dev.aio_reads([(0, 4096), (8192, 4096), (16384, 4096)])
        for i, op in enumerate(ops):
            op[3][:] = bytes([0x41 + i]) * 4096
        data = dev.aio_read_data(ops, [4096, 1024, -errno.EIO])
        assert data == {(0, 4096): b"A" * 4096,
                        (8192, 4096): b"B" * 1024 + bytes(3072)}   # the failed one left out
        for op in ops:                      # the views are released, the buffers pooled
            with pytest.raises(ValueError):
                op[3].nbytes  # noqa: B018
        # A failed or short write is written again in full by the device...
        dev.defer_writes()
        dev.write(0, b"1" * 4096)
        dev.write(4096, b"2" * 4096)
        pending = dev.take_deferred()
        ops = dev.aio_writes(pending)
        assert dev.aio_writes_done(ops, [-errno.EIO, 512]) is None
        assert _on_disk(path, 0, 8192) == b"1" * 4096 + b"2" * 4096
        # ...and an error is returned (not raised) when that fails too.
        dev.defer_writes()
        dev.write(0, b"3" * 4096)
        pending = dev.take_deferred()
        ops = dev.aio_writes(pending)
        os.close(dev.fd)
        dev.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        err = dev.aio_writes_done(ops, [-errno.EIO])
        assert err is not None and err.errno == errno.EBADF
    finally:
        dev.close()
