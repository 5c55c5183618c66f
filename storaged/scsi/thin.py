"""Logical block provisioning (SBC-3 §4.7): UNMAP, WRITE SAME(10/16) with and
without UNMAP, GET LBA STATUS, and the LU's provisioning settings.

A LUN on a sparse file is *thin* (LBPME=1, provisioning type 010b in VPD
B2h): UNMAP and WRITE SAME with the UNMAP bit punch holes into the file
(``fallocate(FALLOC_FL_PUNCH_HOLE)``), which gives the space back to the
filesystem, and GET LBA STATUS reports holes as deallocated
(``SEEK_DATA``/``SEEK_HOLE``).  Holes read as zeros, so LBPRZ=1 is true.  A
LUN on a block device is fully provisioned: UNMAP and SANITIZE BLOCK
ERASE are left out of its command table, VPD B2h says LBPU=LBPWS=LBPWS10=0
and GET LBA STATUS reports everything mapped.

Limits reported in the Block Limits VPD page (B0h) and enforced here:

* MAXIMUM UNMAP LBA COUNT FFFF_FFFFh (no limit: a punch is metadata work,
  done in 256 MiB steps so a READ to the same LU never waits long for the lock);
* MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT 1024;
* OPTIMAL UNMAP GRANULARITY = the filesystem block in logical blocks (8 for
  512-byte LBAs on a 4 KiB filesystem), UGAVALID=1 with alignment 0: an UNMAP
  of a partial filesystem block zeroes that part but frees nothing;
* MAXIMUM WRITE SAME LENGTH = 32 MiB of logical blocks, at most 65535, WSNZ=0
  (NUMBER OF LOGICAL BLOCKS 0 means "to the last LBA", refused when that is
  longer).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from storaged.scsi.commands import Access, CommandSet
from storaged.scsi.types import ScsiCommand, ScsiResult

COMMANDS = CommandSet("thin")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

C = 0x04  # CONTROL byte usage (NACA)

MiB = 1024 * 1024
MAX_UNMAP_DESCRIPTORS = 1024
MAX_WRITE_SAME_BYTES = 32 * MiB
MAX_WRITE_SAME_BLOCKS = 0xFFFF
"""MAXIMUM WRITE SAME LENGTH: 32 MiB of blocks, at most 65535 (a 2-byte count;
libiscsi then checks the limit instead of WRITE(16)s longer than a transfer)."""
WRITE_CHUNK = 1 * MiB
"""WRITE SAME writes its pattern this much at a time, each piece under the
medium lock (so a READ waits at most one piece, never the whole command)."""
DISCARD_CHUNK = 256 * MiB
STATUS_WINDOW = 1024 * MiB
"""GET LBA STATUS asks the device about this much of the LBA space at a time."""

MAPPED, DEALLOCATED, ANCHORED = 0, 1, 2   # PROVISIONING STATUS (SBC-3 table 67)

_S10 = struct.Struct(">2xIxH")
_S16 = struct.Struct(">2xQI")
_UNMAP_DESC = struct.Struct(">QI4x")

UNMAP_OPCODE = 0x42
GET_LBA_STATUS = (0x9E, 0x12)
BLOCK_ERASE = (0x48, 0x02)


# ---------------------------------------------------------------- configuration
def configure(lu: LogicalUnit, thin: bool) -> None:
    """Set the provisioning attributes of a new LU (called by LogicalUnit)."""
    bs = lu.block_size
    lu.lbpme = thin       # logical block provisioning management enabled
    lu.lbprz = thin       # deallocated blocks read as zeros (holes do)
    lu.lbpu = thin        # UNMAP supported
    lu.lbpws = thin       # WRITE SAME(16) with UNMAP deallocates
    lu.lbpws10 = thin     # WRITE SAME(10) with UNMAP deallocates
    lu.anc_sup = False    # no anchored state
    gran = int(getattr(lu.device, "discard_granularity", 4096) or 4096)
    lu.optimal_unmap_granularity = max(1, gran // bs) if thin else 0
    lu.ugavalid = thin    # UNMAP GRANULARITY ALIGNMENT is valid
    lu.unmap_granularity_alignment = 0
    lu.max_unmap_lba_count = 0xFFFFFFFF if thin else 0
    lu.max_unmap_block_descriptors = MAX_UNMAP_DESCRIPTORS if thin else 0
    lu.max_write_same_blocks = max(1, min(MAX_WRITE_SAME_BLOCKS, MAX_WRITE_SAME_BYTES // bs))
    lu.wsnz = False




# ---------------------------------------------------------------- medium helpers
def deallocate(lu: LogicalUnit, lba: int, count: int) -> None:
    """Deallocate ``count`` blocks from ``lba`` (punch a hole; reads zeros after)."""
    bs = lu.block_size
    dev = lu.device
    lock = lu.medium_lock
    off = lba * bs
    end = (lba + count) * bs
    while off < end:
        n = min(end - off, DISCARD_CHUNK)
        with lock:
            dev.discard(off, n)
        off += n


def write_pattern(lu: LogicalUnit, lba: int, count: int, block: bytes | memoryview) -> None:
    """Write the one-block ``block`` to ``count`` blocks from ``lba``."""
    bs = lu.block_size
    dev = lu.device
    lock = lu.medium_lock
    per = max(1, WRITE_CHUNK // bs)
    buf = memoryview(bytes(block) * min(per, count))
    pos = lba
    left = count
    while left:
        k = min(per, left)
        with lock:
            dev.write(pos * bs, buf[:k * bs])
        pos += k
        left -= k


def lba_status(lu: LogicalUnit, lba: int, limit: int) -> list[tuple[int, int, int]]:
    """Up to ``limit`` (start LBA, block count, provisioning status) extents from
    ``lba`` on, each maximal (or cut at the 32-bit NUMBER OF LOGICAL BLOCKS).

    A logical block counts as mapped when any byte of it is allocated (a
    filesystem block larger than the logical block is mapped or not as a
    whole, so with aligned punches this never splits a block)."""
    bs = lu.block_size
    dev = lu.device
    end = lu.num_blocks
    if not lu.lbpme:                      # fully provisioned: every LBA is mapped
        return [(lba, min(end - lba, 0xFFFFFFFF), MAPPED)]
    window = max(1, STATUS_WINDOW // bs)
    segs: list[list[int]] = []      # [start, end, status]
    pos = lba
    while pos < end and len(segs) <= limit:
        wend = min(end, pos + window)
        for off, length, mapped in dev.is_mapped(pos * bs, (wend - pos) * bs):
            if mapped:
                s, e = off // bs, -(-(off + length) // bs)
            else:
                s, e = -(-off // bs), (off + length) // bs
            if segs and s < segs[-1][1]:
                s = segs[-1][1]          # a partly mapped block went to the mapped side
            if s >= e:
                continue
            status = MAPPED if mapped else DEALLOCATED
            if segs and segs[-1][2] == status and segs[-1][1] == s:
                segs[-1][1] = e
            else:
                segs.append([s, e, status])
        pos = wend
    out: list[tuple[int, int, int]] = []
    for s, e, status in segs:
        while s < e and len(out) < limit:
            n = min(e - s, 0xFFFFFFFF)
            out.append((s, n, status))
            s += n
    return out


# ---------------------------------------------------------------- UNMAP
@COMMANDS.register(UNMAP_OPCODE, "UNMAP", 10, [0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, C],
                   access=Access.WRITE, write=True, slow=True)
def unmap(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """UNMAP (SBC-3 §5.28): deallocate the ranges of the block descriptors.

    Every descriptor is checked (range, counts) before anything is
    deallocated, so a refused command changes nothing."""
    cdb = cmd.cdb
    if not lu.lbpu:
        return lu.invalid_opcode()
    if cdb[1] & 0x01 and not lu.anc_sup:             # ANCHOR
        return lu.invalid_cdb(1, 0)
    plen = (cdb[7] << 8) | cdb[8]
    if lu.write_protected:
        return lu.write_protect_error()
    if plen == 0:
        return ScsiResult(transfer_length=0)
    if plen < 8:
        return lu.param_list_length_error()
    raw = cmd.data_out
    data = bytes(raw[:plen]) if raw is not None else b""
    if len(data) < 8:
        return lu.param_list_length_error()
    bddl = (data[2] << 8) | data[3]
    # A truncated last descriptor is ignored (SBC-3 §5.28.2).
    count = min(bddl, len(data) - 8) // 16
    if count > lu.max_unmap_block_descriptors:
        return lu.invalid_param(2)
    nb = lu.num_blocks
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):
        at = 8 + 16 * i
        lba, n = _UNMAP_DESC.unpack_from(data, at)
        if lba + n > nb:
            return lu.lba_out_of_range()
        total += n
        if total > lu.max_unmap_lba_count:
            return lu.invalid_param(at + 8)
        if n:
            ranges.append((lba, n))
    for lba, n in ranges:
        deallocate(lu, lba, n)
    if ranges and not lu.wce:
        lu.device.flush()
    return ScsiResult(transfer_length=plen)


# ---------------------------------------------------------------- WRITE SAME
def _write_same(lu: LogicalUnit, cmd: ScsiCommand, lba: int, n: int, ten: bool) -> ScsiResult:
    """WRITE SAME(10/16) (SBC-3 §5.41, §5.42).

    With UNMAP=1 the range is deallocated (SBC-3 §4.7.3.4: the Data-Out
    block is not written; deallocated blocks read as zeros, LBPRZ=1); without
    it the block is written to every LBA.  NDOB (WRITE SAME(16) only, SBC-4)
    means a block of zeros without Data-Out.  Otherwise the Data-Out buffer
    must hold exactly one block."""
    b1 = cmd.cdb[1]
    len_byte = 7 if ten else 10
    if b1 & 0xE0:                                    # WRPROTECT: no protection information
        return lu.invalid_cdb(1, 7)
    if b1 & 0x04:                                    # PBDATA (obsolete)
        return lu.invalid_cdb(1, 2)
    if b1 & 0x02:                                    # LBDATA (obsolete)
        return lu.invalid_cdb(1, 1)
    ndob = False
    if b1 & 0x01:
        if ten:
            return lu.invalid_cdb(1, 0)
        ndob = True
    unmap_bit = bool(b1 & 0x08)
    if b1 & 0x10 and (not lu.anc_sup or not unmap_bit):   # ANCHOR
        return lu.invalid_cdb(1, 4)
    if unmap_bit and not (lu.lbpws10 if ten else lu.lbpws):
        return lu.invalid_cdb(1, 3)
    nb = lu.num_blocks
    if lba >= nb or lba + n > nb:
        return lu.lba_out_of_range()
    count = n or nb - lba                            # WSNZ=0: zero means "to the last LBA"
    if count > lu.max_write_same_blocks:
        return lu.invalid_cdb(len_byte)
    if lu.write_protected:
        return lu.write_protect_error()
    bs = lu.block_size
    if ndob:
        block: bytes | memoryview = bytes(bs)
        want = 0
    else:
        data = cmd.data_out
        if data is None or len(data) != bs:
            return lu.invalid_cdb(len_byte)
        block = memoryview(data)
        want = bs
    if unmap_bit:
        deallocate(lu, lba, count)
    else:
        write_pattern(lu, lba, count, block)
    if not lu.wce:
        lu.device.flush()
    return ScsiResult(transfer_length=want)


@COMMANDS.register(0x41, "WRITE SAME(10)", 10, [0x41, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF,
                   0xFF, C],
                   access=Access.WRITE, write=True, slow=True)
def write_same10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S10.unpack_from(cmd.cdb)
    return _write_same(lu, cmd, lba, n, True)


@COMMANDS.register(0x93, "WRITE SAME(16)", 16, [0x93, 0xFF] + [0xFF] * 12 + [0x1F, C],
                   access=Access.WRITE, write=True, slow=True)
def write_same16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    lba, n = _S16.unpack_from(cmd.cdb)
    return _write_same(lu, cmd, lba, n, False)


# ---------------------------------------------------------------- GET LBA STATUS
@COMMANDS.register(0x9E, "GET LBA STATUS", 16, [0x9E, 0x12] + [0xFF] * 12 + [0, C], sa=0x12,
                   access=Access.READ)
def get_lba_status(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """GET LBA STATUS (SBC-3 §5.6): mapped / deallocated extents from the
    STARTING LOGICAL BLOCK ADDRESS on, as many as fit the allocation length
    (at least one is computed, so PARAMETER DATA LENGTH is always useful)."""
    lba, alloc = _S16.unpack_from(cmd.cdb)
    if lba >= lu.num_blocks:
        return lu.lba_out_of_range()
    limit = max(1, (alloc - 8) // 16) if alloc > 8 else 1
    descs = lba_status(lu, lba, limit)
    out = bytearray(8 + 16 * len(descs))
    out[0:4] = (4 + 16 * len(descs)).to_bytes(4, "big")
    at = 8
    for start, count, status in descs:
        struct.pack_into(">QIB3x", out, at, start, count, status)
        at += 16
    return ScsiResult(data=bytes(out[:alloc]))
