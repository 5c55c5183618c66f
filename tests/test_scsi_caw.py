"""COMPARE AND WRITE (atomic, miscompare offset), ORWRITE(16) and WRITE
ATOMIC(16) with its crash journal."""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib

import pytest

from storaged.scsi import atomic
from storaged.scsi.atomic import AtomicJournal, attach_journal
from storaged.scsi.types import ScsiCommand, Status
from tests.scsi_util import (
    BS,
    N2,
    MiB,
    assert_check,
    cdb16,
    clear_ua,
    good,
    inquiry_vpd,
    make_lu,
    parse_sense,
    read16,
    rsoc_all,
    run,
    write16,
)

SIZE = 8 * MiB


@pytest.fixture
def lu(tmp_path):
    unit = make_lu(str(tmp_path / "caw.img"), SIZE)
    yield unit
    unit.device.close()


def caw(lu, lba: int, verify: bytes, new: bytes, b1: int = 0, n: int | None = None,
        nexus=None):
    n = len(verify) // lu.block_size if n is None else n
    cdb = [0x89, b1] + list(struct.pack(">Q", lba)) + [0, 0, 0, n, 0, 0]
    kw = {} if nexus is None else {"nexus": nexus}
    return run(lu, cdb, verify + new, **kw)


# ---------------------------------------------------------------- COMPARE AND WRITE
def test_caw_writes_when_equal(lu):
    good(write16(lu, 10, b"A" * (4 * BS)))
    r = good(caw(lu, 10, b"A" * (4 * BS), b"B" * (4 * BS)))
    assert r.transfer_length == 8 * BS
    assert read16(lu, 10, 4) == b"B" * (4 * BS)


@pytest.mark.parametrize("d_sense", [False, True])
def test_caw_miscompare_reports_first_differing_byte(tmp_path, d_sense):
    lu = make_lu(str(tmp_path / "m.img"), SIZE, d_sense=d_sense)
    old = bytearray(b"A" * (3 * BS))
    good(write16(lu, 0, bytes(old)))
    for at in (0, 1, BS - 1, BS, 2 * BS + 17, 3 * BS - 1):
        verify = bytearray(old)
        verify[at] ^= 0xFF
        verify[-1] ^= 0x01                        # later differences do not matter
        s = assert_check(caw(lu, 0, bytes(verify), b"X" * (3 * BS)), 0x0E, 0x1D, 0x00)
        assert s["valid"] and s["info"] == at
        assert read16(lu, 0, 3) == bytes(old)     # nothing written
    lu.device.close()


def test_caw_zero_blocks_and_limits(lu):
    cdb0 = [0x89, 0] + [0] * 8 + [0, 0, 0, 0, 0, 0]
    assert good(run(lu, cdb0)).transfer_length == 0                     # NLB 0: no-op
    assert_check(run(lu, cdb0, bytes(2 * BS)), 5, 0x24)                 # ... but not with data
    lu.max_compare_and_write = 4
    assert_check(caw(lu, 0, bytes(5 * BS), bytes(5 * BS)), 5, 0x24)
    assert inquiry_vpd(lu, 0xB0)[5] == 4
    nb = lu.num_blocks
    assert_check(caw(lu, nb - 1, bytes(2 * BS), bytes(2 * BS)), 5, 0x21)
    # Data-Out must be exactly verify + write data
    cdb = [0x89, 0] + [0] * 8 + [0, 0, 0, 1, 0, 0]
    assert_check(run(lu, cdb, bytes(BS)), 5, 0x24)
    assert_check(run(lu, cdb, bytes(4 * BS)), 5, 0x24)
    assert_check(caw(lu, 0, bytes(BS), bytes(BS), b1=0x20), 5, 0x24)    # WRPROTECT
    lu.read_only = True
    assert_check(caw(lu, 0, bytes(BS), bytes(BS)), 7, 0x27)


def test_caw_fua_flushes(lu, monkeypatch):
    flushes = []
    monkeypatch.setattr(lu.device, "flush", lambda: flushes.append(1))
    good(caw(lu, 0, bytes(BS), b"F" * BS))
    assert not flushes
    good(caw(lu, 0, b"F" * BS, b"G" * BS, b1=0x08))
    assert flushes == [1]
    assert lu.may_block(ScsiCommand(bytes([0x89, 0x08] + [0] * 14), 0, N2))


def test_caw_is_atomic_against_concurrent_writers_and_readers(lu, monkeypatch):
    """Threads increment a counter held in 64 blocks with CAW (retrying on
    MISCOMPARE) while others overwrite a neighbouring range and read the
    counter: no increment is lost and no read ever sees a half-written value.

    The device is slowed down (reads and writes yield the GIL and are done in
    two halves) so that, without the LU's medium lock, lost updates and torn
    reads are certain."""
    clear_ua(lu, N2)
    dev = lu.device
    real_read, real_write = dev.read, dev.write

    def slow_read(off: int, length: int) -> bytes:
        half = length // 2
        first = real_read(off, half)
        time.sleep(0.0002)
        return first + real_read(off + half, length - half)

    def slow_write(off: int, data, fua: bool = False) -> None:
        view = memoryview(data)
        half = len(view) // 2
        real_write(off, view[:half])
        time.sleep(0.0002)
        real_write(off + half, view[half:], fua)

    monkeypatch.setattr(dev, "read", slow_read)
    monkeypatch.setattr(dev, "write", slow_write)
    nblk = 64
    size = nblk * BS

    def encode(v: int) -> bytes:
        return struct.pack(">Q", v) * (size // 8)

    good(write16(lu, 0, encode(0)))
    per_thread, threads = 25, 6
    errors: list[str] = []
    stop = threading.Event()

    def incrementer() -> None:
        for _ in range(per_thread):
            while True:
                cur = read16(lu, 0, nblk)
                v = struct.unpack_from(">Q", cur)[0]
                r = caw(lu, 0, cur, encode(v + 1), nexus=N2)
                if r.status == Status.GOOD:
                    break
                s = parse_sense(r.sense)
                if (s["key"], s["asc"]) != (0x0E, 0x1D):
                    errors.append(f"unexpected {s}")
                    return

    def reader() -> None:
        while not stop.is_set():
            data = read16(lu, 0, nblk)
            if data != data[:8] * (size // 8):
                errors.append("torn read")
                return

    def writer() -> None:
        i = 0
        while not stop.is_set():
            good(write16(lu, nblk, bytes([i & 0xFF]) * size, b1=0x08 if i % 3 == 0 else 0))
            i += 1

    side = [threading.Thread(target=f) for f in (reader, reader, writer)]
    incs = [threading.Thread(target=incrementer) for _ in range(threads)]
    for t in side + incs:
        t.start()
    for t in incs:
        t.join()
    stop.set()
    for t in side:
        t.join()
    assert not errors, errors[:3]
    assert struct.unpack_from(">Q", read16(lu, 0, nblk))[0] == per_thread * threads


def test_caw_holds_the_medium_lock(lu):
    """A CAW cannot run while another command holds the lock (and vice versa)."""
    good(write16(lu, 0, bytes(BS)))
    done = threading.Event()
    with lu.medium_lock:
        t = threading.Thread(target=lambda: (caw(lu, 0, bytes(BS), b"Z" * BS), done.set()))
        t.start()
        assert not done.wait(0.2)
        assert lu.device.read(0, BS) == bytes(BS)
    t.join()
    assert read16(lu, 0, 1) == b"Z" * BS


# ---------------------------------------------------------------- ORWRITE
def test_orwrite_ors_into_the_medium(lu):
    good(write16(lu, 5, bytes([0x0F, 0xF0]) * BS))
    r = good(run(lu, cdb16(0x8B, 5, 2), bytes([0x30, 0x03]) * BS))
    assert r.transfer_length == 2 * BS
    assert read16(lu, 5, 2) == bytes([0x3F, 0xF3]) * BS


def test_orwrite_errors(lu):
    nb = lu.num_blocks
    assert_check(run(lu, cdb16(0x8B, nb - 1, 2), bytes(2 * BS)), 5, 0x21)
    assert_check(run(lu, cdb16(0x8B, 0, 1, b1=0x20), bytes(BS)), 5, 0x24)   # ORPROTECT
    assert good(run(lu, cdb16(0x8B, 0, 0))).transfer_length == 0
    # short Data-Out: only whole blocks that arrived are changed
    good(run(lu, cdb16(0x8B, 0, 2), b"\x01" * (BS + 10)))
    assert read16(lu, 0, 2) == b"\x01" * BS + bytes(BS)
    lu.read_only = True
    assert_check(run(lu, cdb16(0x8B, 0, 1), bytes(BS)), 7, 0x27)


# ---------------------------------------------------------------- WRITE ATOMIC
def wa16(lba: int, n: int, boundary: int = 0, b1: int = 0) -> list[int]:
    return [0x9C, b1] + list(struct.pack(">QHH", lba, boundary, n)) + [0, 0]


def test_write_atomic_needs_a_journal(lu):
    assert_check(run(lu, wa16(0, 1), bytes(BS)), 5, 0x20)
    assert int.from_bytes(inquiry_vpd(lu, 0xB0)[44:48], "big") == 0


def test_write_atomic_with_journal(lu, tmp_path):
    journal = attach_journal(lu, str(tmp_path / "j" / "lun0.journal"))
    b0 = inquiry_vpd(lu, 0xB0)
    maxa = int.from_bytes(b0[44:48], "big")
    assert maxa == AtomicJournal.DEFAULT_CAPACITY // BS
    assert maxa <= int.from_bytes(b0[8:12], "big")             # <= MAXIMUM TRANSFER LENGTH
    assert b0[48:64] == bytes(16)                              # no alignment/granularity/boundary
    data = os.urandom(256 * BS)
    r = good(run(lu, wa16(7, 256), data))
    assert r.transfer_length == 256 * BS
    assert read16(lu, 7, 256) == data
    # the record is cleared once the data is in place
    assert os.pread(journal.fd, 8, 0) == bytes(8)
    assert good(run(lu, wa16(0, 0))).transfer_length == 0
    assert_check(run(lu, wa16(0, maxa + 1), bytes((maxa + 1) * BS)), 5, 0x24)
    assert_check(run(lu, wa16(0, 1, boundary=1), bytes(BS)), 5, 0x24)
    assert_check(run(lu, wa16(lu.num_blocks - 1, 2), bytes(2 * BS)), 5, 0x21)
    assert_check(run(lu, wa16(0, 2), bytes(BS)), 5, 0x24)      # short: nothing written
    assert_check(run(lu, wa16(0, 1, b1=0x20), bytes(BS)), 5, 0x24)
    good(run(lu, wa16(0, 1, b1=0x18), b"\x42" * BS))           # DPO, FUA
    assert (0x9C, 0) in rsoc_all(lu)
    lu.read_only = True
    assert_check(run(lu, wa16(0, 1), bytes(BS)), 7, 0x27)
    journal.close()


def _record(journal: AtomicJournal, offset: int, data: bytes) -> bytes:
    head = AtomicJournal.HEADER.pack(AtomicJournal.MAGIC, journal.wwn, offset, len(data))
    crc = zlib.crc32(data, zlib.crc32(head)) & 0xFFFFFFFF
    return (head + struct.pack(">I", crc)).ljust(AtomicJournal.HEADER_SIZE, b"\0") + data


def test_journal_replays_a_complete_record(lu, tmp_path):
    path = str(tmp_path / "lun0.journal")
    j = AtomicJournal.open(path, lu.device, lu.wwn)
    new = b"N" * (8 * BS)
    # crash after the record was durable, before the data went in place
    os.pwrite(j.fd, _record(j, 3 * BS, new), 0)
    j.close()
    j2 = attach_journal(lu, path)
    assert read16(lu, 3, 8) == new
    assert os.pread(j2.fd, 8, 0) == bytes(8)                 # cleared after replay
    assert not j2.replay(lu.device)
    j2.close()


@pytest.mark.parametrize("damage", ["crc", "wwn", "torn"])
def test_journal_ignores_incomplete_or_foreign_records(lu, tmp_path, damage):
    path = str(tmp_path / "lun0.journal")
    j = AtomicJournal.open(path, lu.device, lu.wwn)
    rec = bytearray(_record(j, 0, b"N" * (8 * BS)))
    if damage == "crc":
        rec[-1] ^= 1
    elif damage == "wwn":
        rec[8] ^= 1
    else:
        rec = rec[:AtomicJournal.HEADER_SIZE + 100]          # data never fully written
    os.pwrite(j.fd, bytes(rec), 0)
    j.close()
    j2 = AtomicJournal.open(path, lu.device, lu.wwn)
    assert read16(lu, 0, 8) == bytes(8 * BS)                 # old data stays
    j2.close()


def test_journal_write_order(lu, tmp_path, monkeypatch):
    """Record durable, then data in place, then device flushed, then cleared."""
    journal = attach_journal(lu, str(tmp_path / "lun0.journal"))
    events: list[str] = []
    real_fdatasync = os.fdatasync
    real_write = lu.device.write
    real_flush = lu.device.flush

    def fdatasync(fd: int) -> None:
        if fd == journal.fd:
            head = os.pread(fd, 8, 0)
            events.append("journal-sync:" + ("record" if head == journal.MAGIC else "clear"))
        real_fdatasync(fd)

    monkeypatch.setattr(atomic.os, "fdatasync", fdatasync)
    monkeypatch.setattr(lu.device, "write",
                        lambda off, data, fua=False: (events.append("write"),
                                                      real_write(off, data, fua)))
    monkeypatch.setattr(lu.device, "flush", lambda: (events.append("flush"), real_flush()))
    good(run(lu, wa16(0, 4), b"Q" * (4 * BS)))
    assert events == ["journal-sync:record", "write", "flush", "journal-sync:clear"]
    journal.close()
