"""SBC-3 block commands: READ/WRITE 6/10/12/16, VERIFY, WRITE AND VERIFY,
SYNCHRONIZE CACHE, PRE-FETCH, READ CAPACITY, START STOP UNIT, PREVENT ALLOW
MEDIUM REMOVAL, READ DEFECT DATA.

The READ/WRITE handlers are the hot path: fixed struct layouts decode the
CDB in one call and the only allocation besides the data buffer is the
result record.

Data-Out shorter than the CDB asks for (the initiator's expected data
transfer length was smaller) writes only the whole blocks that arrived;
longer Data-Out is cut to the CDB's length.  Either way the result's
``transfer_length`` is what the CDB called for, so the transport reports
the residual overflow/underflow (libiscsi iSCSIResiduals.Write*Residuals
checks exactly this, including that blocks past the received data are
left untouched).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from storaged.block.base import BlockDeviceError
from storaged.scsi.commands import Access, CommandSet
from storaged.scsi.sense import Key
from storaged.scsi.types import ScsiCommand, ScsiResult

COMMANDS = CommandSet("sbc")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

C = 0x04  # CONTROL byte usage (NACA)

_S10 = struct.Struct(">2xIxH")      # LBA bytes 2-5, length bytes 7-8
_S12 = struct.Struct(">2xII")       # LBA bytes 2-5, length bytes 6-9
_S16 = struct.Struct(">2xQI")       # LBA bytes 2-9, length bytes 10-13
_RC10 = struct.Struct(">II")

RW10_USAGE = [0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, C]
RW12_USAGE = [0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, C]
RW16_USAGE = [0xFA] + [0xFF] * 12 + [0x1F, C]
V10_USAGE = [0xF6] + RW10_USAGE[1:]
V12_USAGE = [0xF6] + RW12_USAGE[1:]
V16_USAGE = [0xF6] + RW16_USAGE[1:]


def _lba6(cdb: bytes) -> tuple[int, int]:
    return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256


def _first_difference(a: bytes | memoryview, b: bytes | memoryview) -> int:
    """Offset of the first byte where a and b differ (they are known to differ)."""
    n = min(len(a), len(b))
    step = 4096
    for start in range(0, n, step):
        end = min(start + step, n)
        if a[start:end] != b[start:end]:
            for i in range(start, end):
                if a[i] != b[i]:
                    return i
    return n


# ---------------------------------------------------------------- READ
def _read(lu: LogicalUnit, lba: int, n: int, len_byte: int) -> ScsiResult:
    nb = lu._nblocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    if not n:
        return ScsiResult(transfer_length=0)
    if n > lu.max_transfer_blocks:
        return lu.invalid_cdb(len_byte)
    bs = lu.block_size
    with lu.medium_lock:   # never sees half of a COMPARE AND WRITE / ORWRITE
        data = lu.device.read(lba * bs, n * bs)
    return ScsiResult(data=data)


@COMMANDS.register(0x08, "READ(6)", 6, [0x08, 0x1F, 0xFF, 0xFF, 0xFF, C], access=Access.READ)
def read6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _lba6(cmd.cdb)
    return _read(lu, lba, n, 4)


@COMMANDS.register(0x28, "READ(10)", 10, [0x28] + RW10_USAGE, access=Access.READ)
def read10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    if cdb[1] & 0xE0:                              # RDPROTECT: no protection information
        return lu.invalid_cdb(1, 7)
    lba, n = _S10.unpack_from(cdb)
    return _read(lu, lba, n, 7)


@COMMANDS.register(0xA8, "READ(12)", 12, [0xA8] + RW12_USAGE, access=Access.READ)
def read12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    if cdb[1] & 0xE0:
        return lu.invalid_cdb(1, 7)
    lba, n = _S12.unpack_from(cdb)
    return _read(lu, lba, n, 6)


@COMMANDS.register(0x88, "READ(16)", 16, [0x88] + RW16_USAGE, access=Access.READ)
def read16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    if cdb[1] & 0xE0:
        return lu.invalid_cdb(1, 7)
    lba, n = _S16.unpack_from(cdb)
    return _read(lu, lba, n, 10)


# ---------------------------------------------------------------- WRITE
def _write(lu: LogicalUnit, cmd: ScsiCommand, lba: int, n: int, fua: int,
           len_byte: int) -> ScsiResult:
    nb = lu._nblocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    if lu._wp:
        return lu.write_protect_error()
    if not n:
        return ScsiResult(transfer_length=0)
    if n > lu.max_transfer_blocks:
        return lu.invalid_cdb(len_byte)
    bs = lu.block_size
    want = n * bs
    data = cmd.data_out
    have = 0 if data is None else len(data)
    if have != want:
        if have > want:
            data = memoryview(data)[:want]  # type: ignore[arg-type]
        else:
            have -= have % bs
            if not have:
                return ScsiResult(transfer_length=want)
            data = memoryview(data)[:have]  # type: ignore[arg-type]
    with lu.medium_lock:
        lu.device.write(lba * bs, data)  # type: ignore[arg-type]
    if fua or not lu._wce:
        # FUA / write-through: flushed outside the lock, so a READ of this LU
        # running on the transport's event loop never waits for the disk.
        lu.device.flush()
    return ScsiResult(transfer_length=want)


@COMMANDS.register(0x0A, "WRITE(6)", 6, [0x0A, 0x1F, 0xFF, 0xFF, 0xFF, C],
                   access=Access.WRITE, write=True)
def write6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _lba6(cmd.cdb)
    return _write(lu, cmd, lba, n, 0, 4)


@COMMANDS.register(0x2A, "WRITE(10)", 10, [0x2A] + RW10_USAGE, access=Access.WRITE, write=True)
def write10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    b1 = cdb[1]
    if b1 & 0xE0:                                  # WRPROTECT: no protection information
        return lu.invalid_cdb(1, 7)
    lba, n = _S10.unpack_from(cdb)
    return _write(lu, cmd, lba, n, b1 & 0x08, 7)


@COMMANDS.register(0xAA, "WRITE(12)", 12, [0xAA] + RW12_USAGE, access=Access.WRITE, write=True)
def write12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    b1 = cdb[1]
    if b1 & 0xE0:
        return lu.invalid_cdb(1, 7)
    lba, n = _S12.unpack_from(cdb)
    return _write(lu, cmd, lba, n, b1 & 0x08, 6)


@COMMANDS.register(0x8A, "WRITE(16)", 16, [0x8A] + RW16_USAGE, access=Access.WRITE, write=True)
def write16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    b1 = cdb[1]
    if b1 & 0xE0:
        return lu.invalid_cdb(1, 7)
    lba, n = _S16.unpack_from(cdb)
    return _write(lu, cmd, lba, n, b1 & 0x08, 10)


# ---------------------------------------------------------------- VERIFY
def _compare(lu: LogicalUnit, medium: bytes, expected: bytes | memoryview) -> ScsiResult | None:
    m = memoryview(medium)[:len(expected)]
    if m == expected:
        return None
    off = _first_difference(m, expected)
    return lu.check(Key.MISCOMPARE, 0x1D, 0x00, info=off)  # MISCOMPARE DURING VERIFY


def _verify(lu: LogicalUnit, cmd: ScsiCommand, lba: int, n: int, len_byte: int) -> ScsiResult:
    b1 = cmd.cdb[1]
    if b1 & 0xE0:                                  # VRPROTECT
        return lu.invalid_cdb(1, 7)
    bytchk = (b1 >> 1) & 3
    if bytchk == 2:
        return lu.invalid_cdb(1, 2)
    nb = lu._nblocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    bs = lu.block_size
    want = 0 if bytchk == 0 else (n * bs if bytchk == 1 else bs)
    if not n:
        return ScsiResult(transfer_length=0)
    if n > lu.max_transfer_blocks:
        return lu.invalid_cdb(len_byte)
    with lu.medium_lock:
        medium = lu.device.read(lba * bs, n * bs)
    if bytchk:
        data = cmd.data_out
        got = memoryview(data if data is not None else b"")[:want]
        if bytchk == 3:
            got = memoryview(bytes(got[:bs]) * n) if len(got) == bs else got
        bad = _compare(lu, medium, got)
        if bad is not None:
            return bad
    return ScsiResult(transfer_length=want)


@COMMANDS.register(0x2F, "VERIFY(10)", 10, [0x2F] + V10_USAGE, access=Access.READ)
def verify10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S10.unpack_from(cmd.cdb)
    return _verify(lu, cmd, lba, n, 7)


@COMMANDS.register(0xAF, "VERIFY(12)", 12, [0xAF] + V12_USAGE, access=Access.READ)
def verify12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S12.unpack_from(cmd.cdb)
    return _verify(lu, cmd, lba, n, 6)


@COMMANDS.register(0x8F, "VERIFY(16)", 16, [0x8F] + V16_USAGE, access=Access.READ)
def verify16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S16.unpack_from(cmd.cdb)
    return _verify(lu, cmd, lba, n, 10)


# ---------------------------------------------------------------- WRITE AND VERIFY
def _write_verify(lu: LogicalUnit, cmd: ScsiCommand, lba: int, n: int,
                  len_byte: int) -> ScsiResult:
    b1 = cmd.cdb[1]
    if b1 & 0xE0:                                  # WRPROTECT
        return lu.invalid_cdb(1, 7)
    bytchk = (b1 >> 1) & 3
    if bytchk > 1:
        return lu.invalid_cdb(1, 2)
    result = _write(lu, cmd, lba, n, 0, len_byte)
    if result.status or not n or not bytchk:
        return result
    bs = lu.block_size
    data = cmd.data_out
    have = min(0 if data is None else len(data), n * bs)
    have -= have % bs
    if have:
        with lu.medium_lock:
            medium = lu.device.read(lba * bs, have)
        bad = _compare(lu, medium, memoryview(data)[:have])  # type: ignore
        if bad is not None:
            return bad
    return result


@COMMANDS.register(0x2E, "WRITE AND VERIFY(10)", 10, [0x2E] + V10_USAGE, access=Access.WRITE,
                   write=True)
def write_verify10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S10.unpack_from(cmd.cdb)
    return _write_verify(lu, cmd, lba, n, 7)


@COMMANDS.register(0xAE, "WRITE AND VERIFY(12)", 12, [0xAE] + V12_USAGE, access=Access.WRITE,
                   write=True)
def write_verify12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S12.unpack_from(cmd.cdb)
    return _write_verify(lu, cmd, lba, n, 6)


@COMMANDS.register(0x8E, "WRITE AND VERIFY(16)", 16, [0x8E] + V16_USAGE, access=Access.WRITE,
                   write=True)
def write_verify16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S16.unpack_from(cmd.cdb)
    return _write_verify(lu, cmd, lba, n, 10)


# ---------------------------------------------------------------- SYNCHRONIZE CACHE, PRE-FETCH
def _range_ok(lu: LogicalUnit, lba: int, n: int) -> bool:
    nb = lu._nblocks
    return lba < nb and lba + n <= nb


def _sync(lu: LogicalUnit, lba: int, n: int) -> ScsiResult:
    # NUMBER OF BLOCKS 0 means "to the last LBA".  IMMED is honoured by
    # finishing the flush before answering, which is always allowed.
    if not _range_ok(lu, lba, n):
        return lu.lba_out_of_range()
    lu.device.flush()
    return ScsiResult()


@COMMANDS.register(0x35, "SYNCHRONIZE CACHE(10)", 10,
                   [0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, C],
                   access=Access.WRITE, slow=True)
def sync_cache10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S10.unpack_from(cmd.cdb)
    return _sync(lu, lba, n)


@COMMANDS.register(0x91, "SYNCHRONIZE CACHE(16)", 16, [0x91, 0x02] + [0xFF] * 12 + [0x1F, C],
                   access=Access.WRITE, slow=True)
def sync_cache16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S16.unpack_from(cmd.cdb)
    return _sync(lu, lba, n)


def _prefetch(lu: LogicalUnit, lba: int, n: int) -> ScsiResult:
    # GOOD rather than CONDITION MET: we do not promise the blocks fit in a
    # cache (SBC-3 §5.8), and libiscsi's Prefetch tests expect GOOD.
    if not _range_ok(lu, lba, n):
        return lu.lba_out_of_range()
    return ScsiResult()


@COMMANDS.register(0x34, "PRE-FETCH(10)", 10, [0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF,
                   0xFF, C],
                   access=Access.READ)
def prefetch10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S10.unpack_from(cmd.cdb)
    return _prefetch(lu, lba, n)


@COMMANDS.register(0x90, "PRE-FETCH(16)", 16, [0x90, 0x02] + [0xFF] * 12 + [0x1F, C],
                   access=Access.READ)
def prefetch16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S16.unpack_from(cmd.cdb)
    return _prefetch(lu, lba, n)


# ---------------------------------------------------------------- READ CAPACITY
@COMMANDS.register(0x25, "READ CAPACITY(10)", 10, [0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, C])
def read_capacity10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    if not cdb[8] & 0x01 and (cdb[2] | cdb[3] | cdb[4] | cdb[5]):
        return lu.invalid_cdb(2)                   # LBA set without PMI
    last = max(lu._nblocks - 1, 0)
    return ScsiResult(data=_RC10.pack(min(last, 0xFFFFFFFF), lu.block_size))


@COMMANDS.register(0x9E, "READ CAPACITY(16)", 16, [0x9E, 0x10] + [0xFF] * 12 + [0x01, C], sa=0x10)
def read_capacity16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    lba, alloc = _S16.unpack_from(cdb)
    if lba and not cdb[14] & 0x01:
        return lu.invalid_cdb(2)
    d = bytearray(32)
    d[0:8] = max(lu._nblocks - 1, 0).to_bytes(8, "big")
    d[8:12] = lu.block_size.to_bytes(4, "big")
    d[12] = 0x00                                   # P_TYPE 0, PROT_EN 0
    d[13] = lu.lbppbe & 0x0F                       # P_I_EXPONENT 0, LBPPBE
    d[14] = (0x80 if lu.lbpme else 0) | (0x40 if lu.lbprz else 0)   # LALBA 0
    return ScsiResult(data=bytes(d[:alloc]))


# ---------------------------------------------------------------- START STOP, PREVENT ALLOW
POWER_CONDITIONS = (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB)


@COMMANDS.register(0x1B, "START STOP UNIT", 6, [0x1B, 0x01, 0, 0x0F, 0xF7, C],
                   access=Access.CONFLICT, medium=False, slow=True)
def start_stop_unit(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    b4 = cmd.cdb[4]
    pc = b4 >> 4
    if pc not in POWER_CONDITIONS:
        return lu.invalid_cdb(4, 7)
    if pc == 0:
        if b4 & 0x02 and not lu.removable:         # LOEJ on a non-removable medium
            return lu.invalid_cdb(4, 1)
        if not b4 & 0x01 and not b4 & 0x04 and lu.online:   # STOP without NO_FLUSH
            lu.device.flush()
    return ScsiResult()


@COMMANDS.register(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", 6, [0x1E, 0, 0, 0, 0x03, C],
                   access=Access.CONFLICT, medium=False)
def prevent_allow(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    prevent = cmd.cdb[4] & 0x03
    if prevent > 1:                                # obsolete values for SBC
        return lu.invalid_cdb(4, 1)
    lu.nexus_state(cmd.nexus).prevent = bool(prevent)
    return ScsiResult()


# ---------------------------------------------------------------- READ DEFECT DATA
@COMMANDS.register(0x37, "READ DEFECT DATA(10)", 10, [0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, C],
                   access=Access.READ)
def read_defect_data10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    alloc = (cdb[7] << 8) | cdb[8]
    # Empty lists in the requested format: PLISTV/GLISTV echo what was asked for.
    return ScsiResult(data=bytes((0, cdb[2] & 0x1F, 0, 0))[:alloc])


@COMMANDS.register(0xB7, "READ DEFECT DATA(12)", 12,
                   [0xB7, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
                   access=Access.READ)
def read_defect_data12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    alloc = int.from_bytes(bytes(cdb[6:10]), "big")
    return ScsiResult(data=bytes((0, cdb[1] & 0x1F, 0, 0, 0, 0, 0, 0))[:alloc])


# ---------------------------------------------------------------- quick path
_QUICK_READ = {0x28: (_S10, 9), 0x88: (_S16, 15)}    # opcode -> (layout, CONTROL byte)
_QUICK_WRITE = {0x2A: (_S10, 9), 0x8A: (_S16, 15)}


def quick_check(lu: LogicalUnit, nexus_key: tuple[str, str], cdb: bytes | memoryview,
                expected: int, write: bool) -> int | None:
    """The byte offset of a READ/WRITE(10/16) that needs no decision beyond
    its CDB, or None when ``LogicalUnit.execute`` must run it.

    None whenever the general path could answer anything but GOOD with
    exactly ``expected`` bytes moved: a pending unit attention for the
    nexus, a sanitize gate, a restrictive ALUA state, any reservation, the
    LU offline, protection or NACA bits, FUA or write cache off (the
    transport runs those off its loop: ``may_block``), write protect, a
    zero, too long or out-of-range transfer, or a length that differs from
    the transport's expected length (residuals).  For transports that skip
    building a ScsiCommand and a ScsiResult for the commands that carry
    nearly all the data (SBC-3 §5.15, §5.40)."""
    if lu.gate is not None or lu.alua_check is not None or lu.access_check is not None \
            or not lu._online:
        return None
    st = lu._nexus.get(nexus_key)
    if st is None or st.ua:
        return None
    spec = (_QUICK_WRITE if write else _QUICK_READ).get(cdb[0])
    if spec is None or cdb[1] & 0xE0 or cdb[spec[1]] & 0x04:
        return None
    if write and (cdb[1] & 0x08 or not lu._wce or lu._wp):
        return None
    lba, n = spec[0].unpack_from(cdb)
    bs = lu.block_size
    if not n or n > lu.max_transfer_blocks or lba + n > lu._nblocks or n * bs != expected:
        return None
    return lba * bs


def quick_rw(lu: LogicalUnit, nexus_key: tuple[str, str], cdb: bytes | memoryview,
             expected: int, data: bytes | memoryview | None) -> bytes | None:
    """Run a READ/WRITE(10/16) that ``quick_check`` admits, with exactly the
    effect ``execute`` would have: the read data (b"" for a write, whose
    ``data`` is then in the device), or None with nothing done (also for a
    device error: the general path retries it and reports the MEDIUM ERROR)."""
    offset = quick_check(lu, nexus_key, cdb, expected, data is not None)
    if offset is None:
        return None
    try:
        if data is None:
            with lu.medium_lock:
                return lu.device.read(offset, expected)
        if len(data) != expected:
            return None
        with lu.medium_lock:
            lu.device.write(offset, data)
        return b""
    except BlockDeviceError:
        return None
