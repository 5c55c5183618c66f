"""Atomic commands: COMPARE AND WRITE, ORWRITE(16) and WRITE ATOMIC(16).

**Atomic against other commands.**  Every command that reads or writes the
medium holds the LU's ``medium_lock`` while it touches the device (READ,
WRITE, VERIFY, WRITE SAME, UNMAP, EXTENDED COPY, SANITIZE, ...).  COMPARE AND
WRITE (SBC-3 §5.3) and ORWRITE (SBC-3 §5.10) hold it across their whole
read-compare/modify-write, so no command from any session - on the
transport's event loop or in its thread pool - sees or slips in between
their read and their write.  That is what VMware's ATS heartbeats and
locks rely on.  Flushes (FUA, write-through) happen after the lock is let
go, before the command completes.

**Atomic across a crash.**  WRITE ATOMIC(16) (SBC-4 §5.48) must leave either
all or none of its blocks written even when the process or the host dies
half-way.  A plain pwrite of 1 MiB to a file gives no such promise, so an
:class:`AtomicJournal` (one record slot in a file beside the daemon's state)
is written and made durable first, then the data goes in place, then the
record is cleared; on the next start :func:`AtomicJournal.open` replays a
complete record.  An LU without a journal does not offer WRITE ATOMIC (the
command is unsupported and MAXIMUM ATOMIC TRANSFER LENGTH is 0).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from typing import TYPE_CHECKING

from storaged.block.base import BlockDevice
from storaged.scsi.commands import Access, CommandSet
from storaged.scsi.sbc import _first_difference
from storaged.scsi.sense import Key
from storaged.scsi.types import ScsiCommand, ScsiResult

COMMANDS = CommandSet("atomic")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

log = logging.getLogger("storaged.scsi")

C = 0x04  # CONTROL byte usage (NACA)

MAX_COMPARE_AND_WRITE = 255
"""MAXIMUM COMPARE AND WRITE LENGTH in logical blocks (the CDB's one-byte field)."""

_LBA16 = struct.Struct(">2xQ")


# ---------------------------------------------------------------- COMPARE AND WRITE
@COMMANDS.register(0x89, "COMPARE AND WRITE", 16,
                   [0x89, 0xFA] + [0xFF] * 8 + [0, 0, 0, 0xFF, 0x1F, C],
                   access=Access.WRITE, write=True)
def compare_and_write(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """COMPARE AND WRITE (SBC-3 §5.3).

    The Data-Out buffer holds the verify data (NUMBER OF LOGICAL BLOCKS
    blocks) followed by the write data; it must be exactly that long.  On a
    mismatch nothing is written and the command ends with MISCOMPARE,
    MISCOMPARE DURING VERIFY OPERATION, the INFORMATION field holding the
    offset in the Data-Out buffer of the first byte that differs."""
    cdb = cmd.cdb
    b1 = cdb[1]
    if b1 & 0xE0:                                    # WRPROTECT: no protection information
        return lu.invalid_cdb(1, 7)
    (lba,) = _LBA16.unpack_from(cdb)
    n = cdb[13]
    nb = lu.num_blocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    if n > lu.max_compare_and_write:
        return lu.invalid_cdb(13)
    bs = lu.block_size
    half = n * bs
    data = cmd.data_out
    if (0 if data is None else len(data)) != 2 * half:
        # Data-Out must hold exactly the verify and the write data: anything
        # else (including data with NUMBER OF LOGICAL BLOCKS 0) is refused.
        return lu.invalid_cdb(13)
    if lu.write_protected:
        return lu.write_protect_error()
    if not n:                                        # no compare, no write: not an error
        return ScsiResult(transfer_length=0)
    view = memoryview(data)
    verify, new = view[:half], view[half:]
    dev = lu.device
    off = lba * bs
    with lu.medium_lock:
        current = dev.read(off, half)
        if current != verify:
            at = _first_difference(memoryview(current), verify)
            return lu.check(Key.MISCOMPARE, 0x1D, 0x00, info=at)
        dev.write(off, new)
    if b1 & 0x08 or not lu.wce:                      # FUA / write-through
        dev.flush()
    return ScsiResult(transfer_length=2 * half)


# ---------------------------------------------------------------- ORWRITE(16)
def _or(a: bytes, b: bytes | memoryview) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")


@COMMANDS.register(0x8B, "ORWRITE(16)", 16, [0x8B, 0xFA] + [0xFF] * 12 + [0x1F, C],
                   access=Access.WRITE, write=True)
def orwrite16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """ORWRITE(16) (SBC-3 §5.10): medium := medium OR Data-Out, as one
    uninterrupted read-modify-write.  Short Data-Out is handled as WRITE does:
    only the whole blocks that arrived are changed."""
    cdb = cmd.cdb
    b1 = cdb[1]
    if b1 & 0xE0:                                    # ORPROTECT
        return lu.invalid_cdb(1, 7)
    lba, n = struct.unpack_from(">2xQI", cdb)
    nb = lu.num_blocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    if lu.write_protected:
        return lu.write_protect_error()
    if not n:
        return ScsiResult(transfer_length=0)
    if n > lu.max_transfer_blocks:
        return lu.invalid_cdb(10)
    bs = lu.block_size
    want = n * bs
    data = cmd.data_out
    have = min(0 if data is None else len(data), want)
    have -= have % bs
    if have:
        mask = memoryview(data)[:have]  # type: ignore[arg-type]
        dev = lu.device
        off = lba * bs
        with lu.medium_lock:
            dev.write(off, _or(dev.read(off, have), mask))
        if b1 & 0x08 or not lu.wce:
            dev.flush()
    return ScsiResult(transfer_length=want)


# ---------------------------------------------------------------- WRITE ATOMIC(16)
class AtomicJournal:
    """One-slot write-ahead record that makes WRITE ATOMIC crash-atomic.

    Layout: a 4096-byte header (magic, LU WWN, byte offset, length, CRC-32
    of header fields and data) followed by the data.  ``write`` makes the
    record durable, writes the data in place under the LU's medium lock,
    flushes the device and clears the record durably; ``open`` replays a
    record whose CRC checks (the crash came after the record was durable, so
    the whole new data goes in) and ignores anything else (the crash came
    before: nothing was written in place)."""

    MAGIC = b"SDATOMW1"
    HEADER = struct.Struct(">8s16sQI")
    HEADER_SIZE = 4096
    DEFAULT_CAPACITY = 1024 * 1024

    def __init__(self, path: str, fd: int, wwn: str, capacity: int) -> None:
        self.path = path
        self.fd = fd
        self.wwn = bytes.fromhex(wwn)
        self.capacity = capacity
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, device: BlockDevice, wwn: str,
             capacity: int = DEFAULT_CAPACITY) -> AtomicJournal:
        """Open (or create) the journal for the LU with ``wwn`` on ``device``,
        replaying a complete record left by a crash."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        journal = cls(path, fd, wwn, capacity)
        try:
            journal.replay(device)
        except Exception:
            os.close(fd)
            raise
        return journal

    def _crc(self, offset: int, data: bytes | memoryview) -> int:
        head = self.HEADER.pack(self.MAGIC, self.wwn, offset, len(data))
        return zlib.crc32(data, zlib.crc32(head)) & 0xFFFFFFFF

    def replay(self, device: BlockDevice) -> bool:
        """Finish an interrupted atomic write; True when one was replayed."""
        head = os.pread(self.fd, self.HEADER_SIZE, 0)
        if len(head) < self.HEADER.size + 4:
            return False
        magic, wwn, offset, length = self.HEADER.unpack_from(head)
        if magic != self.MAGIC or wwn != self.wwn or length > self.capacity:
            return False
        (crc,) = struct.unpack_from(">I", head, self.HEADER.size)
        data = os.pread(self.fd, length, self.HEADER_SIZE)
        if len(data) != length or self._crc(offset, data) != crc \
                or offset + length > device.size:
            return False
        log.warning("%s: replaying an interrupted WRITE ATOMIC (%d bytes at %d)",
                    self.path, length, offset)
        device.write(offset, data)
        device.flush()
        self._clear()
        return True

    def _clear(self) -> None:
        os.pwrite(self.fd, bytes(self.HEADER.size + 4), 0)
        os.fdatasync(self.fd)

    def write(self, lu: LogicalUnit, offset: int, data: bytes | memoryview) -> None:
        """All-or-nothing write of ``data`` at byte ``offset`` of ``lu``'s device.
        Returns once the data is durable."""
        if len(data) > self.capacity:
            raise ValueError("atomic write larger than the journal")
        head = self.HEADER.pack(self.MAGIC, self.wwn, offset, len(data)) \
            + struct.pack(">I", self._crc(offset, data))
        with self._lock:
            os.pwritev(self.fd, [head.ljust(self.HEADER_SIZE, b"\0"), data], 0)
            os.fdatasync(self.fd)
            with lu.medium_lock:
                lu.device.write(offset, data)
            lu.device.flush()
            self._clear()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def attach_journal(lu: LogicalUnit, path: str,
                   capacity: int = AtomicJournal.DEFAULT_CAPACITY) -> AtomicJournal:
    """Give ``lu`` a journal at ``path`` (replaying it) and offer WRITE ATOMIC
    up to ``capacity`` bytes (MAXIMUM ATOMIC TRANSFER LENGTH in VPD B0h)."""
    journal = AtomicJournal.open(path, lu.device, lu.wwn, capacity)
    lu.atomic_journal = journal
    lu.max_atomic_transfer_blocks = min(capacity // lu.block_size, lu.max_transfer_blocks)
    return journal


@COMMANDS.register(0x9C, "WRITE ATOMIC(16)", 16,
                   [0x9C, 0xF8] + [0xFF] * 8 + [0xFF, 0xFF, 0xFF, 0xFF, 0x1F, C],
                   access=Access.WRITE, write=True, slow=True)
def write_atomic16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """WRITE ATOMIC(16) (SBC-4 §5.48).  No alignment or granularity limits
    (ATOMIC ALIGNMENT and ATOMIC TRANSFER LENGTH GRANULARITY are 0) and no
    atomic boundaries (MAXIMUM ATOMIC BOUNDARY SIZE 0: a non-zero ATOMIC
    BOUNDARY is refused).  Data-Out shorter than the CDB's length writes
    nothing: an atomic write is all or nothing."""
    journal = lu.atomic_journal
    if journal is None:
        return lu.invalid_opcode()
    cdb = cmd.cdb
    b1 = cdb[1]
    if b1 & 0xE0:                                    # WRPROTECT
        return lu.invalid_cdb(1, 7)
    lba, boundary, n = struct.unpack_from(">2xQHH", cdb)
    if boundary:
        return lu.invalid_cdb(10)
    nb = lu.num_blocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    if n > lu.max_atomic_transfer_blocks:
        return lu.invalid_cdb(12)
    if lu.write_protected:
        return lu.write_protect_error()
    if not n:
        return ScsiResult(transfer_length=0)
    bs = lu.block_size
    want = n * bs
    data = cmd.data_out
    if data is None or len(data) < want:
        return lu.invalid_cdb(12)
    journal.write(lu, lba * bs, memoryview(data)[:want])
    return ScsiResult(transfer_length=want)
