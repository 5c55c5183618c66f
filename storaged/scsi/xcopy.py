"""Third-party copy (SPC-4 §5.16, §6.4, §6.18): EXTENDED COPY (LID1), RECEIVE
COPY RESULTS and the Third-party Copy VPD page (8Fh).

The copy manager is the LU that receives EXTENDED COPY.  It copies between
any two LUs of the target the command came through (VMware's XCOPY clone
and Storage vMotion within one array), found by the identification CSCD
descriptor (E4h) carrying a logical-unit designator from VPD page 83h: the
NAA designator (what VMware and libiscsi send) or the T10 vendor ID one.
LUs of other targets are not reachable: a copy never crosses an ACL.

What is implemented, and what the limits below say (they are enforced):

* CSCD descriptor E4h (identification, block devices), at most
  ``MAX_CSCD_DESCRIPTORS``; segment descriptor 02h (block to block), at most
  ``MAX_SEGMENT_DESCRIPTORS``; together at most ``MAX_DESCRIPTOR_LIST_LENGTH``
  bytes; no inline or held data, no stream devices, no ROD tokens (LID4).
* LIST ID USAGE 00b (status held for RECEIVE COPY RESULTS), 10b and 11b
  (no list identifier, SNLID=1).
* The copy runs in the transport's thread pool (``slow``) in 1 MiB steps;
  each step holds the source LU's medium lock while reading and the
  destination's while writing, so READs of either LU wait at most one step.
  Ranges the source has deallocated are deallocated on a thin destination
  instead of being written as zeros, so clones of thin disks stay thin.
* Errors while processing a segment end the command with COPY ABORTED: the
  COMMAND-SPECIFIC INFORMATION field holds the segment number, the
  sense-key specific field points into the segment descriptor, and when a
  copy target refused (LBA out of range, write protected, not ready) its
  own sense data follows at the SOURCE / DESTINATION SENSE DATA OFFSET
  (fixed format, SPC-4 §4.5.3).  A CSCD that names no LU of this target is
  COPY TARGET DEVICE NOT REACHABLE (0Dh/02h).
"""

from __future__ import annotations

import logging
import struct
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storaged.block.base import BlockDeviceError
from storaged.scsi import sense, spc
from storaged.scsi.commands import Access, CommandSet
from storaged.scsi.sense import Key
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, Status

COMMANDS = CommandSet("xcopy")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from collections.abc import Mapping

    from storaged.scsi.lu import LogicalUnit

log = logging.getLogger("storaged.scsi")

C = 0x04  # CONTROL byte usage (NACA)

MAX_CSCD_DESCRIPTORS = 16
MAX_SEGMENT_DESCRIPTORS = 64
MAX_DESCRIPTOR_LIST_LENGTH = MAX_CSCD_DESCRIPTORS * 32 + MAX_SEGMENT_DESCRIPTORS * 28
MAX_INLINE_DATA = 0
MAX_CONCURRENT_COPIES = 16
"""EXTENDED COPY commands one copy manager (LU) runs at once; more get BUSY."""
MAX_HELD_RESULTS = 64
"""Copy results held per I_T nexus for RECEIVE COPY RESULTS (oldest dropped)."""
COPY_CHUNK = 1024 * 1024

SEGMENT_BLOCK_TO_BLOCK = 0x02
CSCD_IDENTIFICATION = 0xE4
IMPLEMENTED_DESCRIPTORS = bytes((SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION))
_LONG_CSCD = (0xEA, 0xEB)              # IPv6 and IP copy service CSCD descriptors: 64 bytes

# RECEIVE COPY RESULTS service actions
COPY_STATUS, OPERATING_PARAMETERS, FAILED_SEGMENT_DETAILS = 0x00, 0x03, 0x04
# COPY MANAGER STATUS values
COMPLETED_OK, COMPLETED_WITH_ERRORS = 0x01, 0x02

_SEG = struct.Struct(">B B H H H 2x H Q Q")   # block-to-block segment descriptor


@dataclass(slots=True)
class CopyResult:
    """What RECEIVE COPY RESULTS reports about one finished EXTENDED COPY."""

    status: int
    segments: int
    transferred: int
    sense: bytes | None = None


class _CopyManager:
    """Per-LU copy manager state: held results and copies in progress."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lock = threading.Lock()
        self.held: dict[tuple[str, str], dict[int, CopyResult]] = {}
        self.running: set[tuple[str, str, int]] = set()
        self.active = 0
        lu.nexus_lost_hooks.append(self._nexus_lost)

    def _nexus_lost(self, lu: LogicalUnit, nexus: Nexus) -> None:
        with self.lock:
            self.held.pop((nexus.initiator_port, nexus.target_port), None)

    def hold(self, nexus: Nexus, list_id: int, result: CopyResult) -> None:
        with self.lock:
            per = self.held.setdefault((nexus.initiator_port, nexus.target_port), {})
            per.pop(list_id, None)
            per[list_id] = result
            while len(per) > MAX_HELD_RESULTS:
                del per[next(iter(per))]

    def result(self, nexus: Nexus, list_id: int) -> CopyResult | None:
        with self.lock:
            return self.held.get((nexus.initiator_port, nexus.target_port), {}).get(list_id)


_managers: weakref.WeakKeyDictionary[LogicalUnit, _CopyManager] = weakref.WeakKeyDictionary()
_managers_lock = threading.Lock()


def _manager(lu: LogicalUnit) -> _CopyManager:
    mgr = _managers.get(lu)
    if mgr is None:
        with _managers_lock:
            mgr = _managers.get(lu)
            if mgr is None:
                mgr = _managers[lu] = _CopyManager(lu)
    return mgr


def _be16(b: bytes, at: int) -> int:
    return (b[at] << 8) | b[at + 1]


def _be32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 4], "big")


def _illegal(lu: LogicalUnit, asc: int, ascq: int, byte: int | None = None) -> ScsiResult:
    sks = sense.field_pointer(byte, cdb=False) if byte is not None else None
    return lu.check(Key.ILLEGAL_REQUEST, asc, ascq, sks=sks)


# ---------------------------------------------------------------- copy targets
def designators(lu: LogicalUnit) -> set[tuple[int, int, bytes]]:
    """(code set, designator type, value) of the LU's logical-unit designators
    in VPD page 83h: what an E4h CSCD descriptor may name it by."""
    return {(1, 3, bytes.fromhex(lu.wwn)),
            (2, 1, lu.vendor.ljust(8).encode() + lu.serial.encode()[:64])}


def _reachable(lu: LogicalUnit, cmd: ScsiCommand) -> Mapping[int, LogicalUnit]:
    luns = lu.scsi_targets.get(cmd.nexus.target_name)
    return luns if luns is not None else {cmd.lun: lu}


def resolve(lu: LogicalUnit, cmd: ScsiCommand, desc: bytes) -> tuple[int, LogicalUnit] | None:
    """The (LUN, LU) an E4h CSCD descriptor identifies, among the LUs of the
    target the command came through (the copy manager itself included)."""
    code_set = desc[4] & 0x0F
    assoc = (desc[5] >> 4) & 0x03
    dtype = desc[5] & 0x0F
    length = desc[7]
    if assoc != 0 or length > 16:        # 20-byte designation descriptor field
        return None
    key = (code_set, dtype, bytes(desc[8:8 + length]))
    if key in designators(lu):
        return cmd.lun, lu
    for lun, unit in _reachable(lu, cmd).items():
        if key in designators(unit):
            return lun, unit
    return None


class _Abort(Exception):
    """A segment failed: COPY ABORTED with this ASC/ASCQ, pointing at byte
    ``field`` of the segment descriptor; ``reason`` is logged."""

    def __init__(self, asc: int, ascq: int, field: int, reason: str) -> None:
        super().__init__(reason)
        self.asc = asc
        self.ascq = ascq
        self.field = field
        self.reason = reason


def _check_target(lu: LogicalUnit, cmd: ScsiCommand, lun: int, unit: LogicalUnit,
                  lba: int, nblocks: int, write: bool) -> str | None:
    """Would ``unit`` accept a READ (or WRITE) of the range from this nexus?
    None if so, else why not."""
    if unit.gate is not None:
        return "sanitize in progress"
    if not unit.online:
        return "offline"
    if lba >= unit.num_blocks or lba + nblocks > unit.num_blocks:
        return f"LBA {lba}+{nblocks} out of range"
    if write and unit.write_protected:
        return "write protected"
    if unit is not lu and unit.access_check is not None:
        # Reservations of the other LU apply to this nexus as for a READ/WRITE(16).
        op = 0x8A if write else 0x88
        probe = ScsiCommand(cdb=bytes((op, 0)) + lba.to_bytes(8, "big")
                            + nblocks.to_bytes(4, "big") + bytes(2),
                            lun=lun, nexus=cmd.nexus)
        spec = unit.lookup(probe.cdb)
        if not isinstance(spec, ScsiResult) and unit.access_check(unit, probe, spec) is not None:
            return "reservation conflict"
    return None


def _copy_blocks(src: LogicalUnit, src_off: int, dst: LogicalUnit, dst_off: int,
                 nbytes: int) -> None:
    """Copy ``nbytes`` between two LUs (or within one), chunk by chunk.

    Overlapping ranges in one LU are copied in the safe direction.  A chunk
    is read completely before it is written."""
    thin_dst = dst.lbpme and dst.lbprz
    starts = list(range(0, nbytes, COPY_CHUNK))
    if src is dst and src_off < dst_off < src_off + nbytes:
        starts.reverse()
    sdev, ddev = src.device, dst.device
    for rel in starts:
        n = min(COPY_CHUNK, nbytes - rel)
        so, do = src_off + rel, dst_off + rel
        with src.medium_lock:
            extents = sdev.is_mapped(so, n) if thin_dst else [(so, n, True)]
            parts = [(off - so, length, sdev.read(off, length) if mapped else None)
                     for off, length, mapped in extents]
        with dst.medium_lock:
            for rel2, length, data in parts:
                if data is not None:
                    ddev.write(do + rel2, data)
                else:
                    ddev.discard(do + rel2, length)   # reads zeros: LBPRZ=1
    if not dst.wce:
        ddev.flush()


def _segment(lu: LogicalUnit, cmd: ScsiCommand, data: bytes, at: int,
             cscds: list[bytes]) -> int:
    """Process one block-to-block segment descriptor; return bytes copied."""
    _t, flags, _len, src_i, dst_i, nblk, src_lba, dst_lba = _SEG.unpack_from(data, at)
    if src_i >= len(cscds):
        raise _Abort(0x0D, 0x02, 4, "no such source CSCD descriptor")   # NOT REACHABLE
    if dst_i >= len(cscds):
        raise _Abort(0x0D, 0x02, 6, "no such destination CSCD descriptor")
    src_t = resolve(lu, cmd, cscds[src_i])
    if src_t is None:
        raise _Abort(0x0D, 0x02, 4, "source designator names no LU of this target")
    dst_t = resolve(lu, cmd, cscds[dst_i])
    if dst_t is None:
        raise _Abort(0x0D, 0x02, 6, "destination designator names no LU of this target")
    (src_lun, src), (dst_lun, dst) = src_t, dst_t
    for desc, unit, field in ((cscds[src_i], src, 4), (cscds[dst_i], dst, 6)):
        if desc[1] & 0x1F != 0:                        # only block devices
            raise _Abort(0x0D, 0x03, field, "not a block device CSCD")   # INCORRECT ... TYPE
        disk_bs = int.from_bytes(desc[29:32], "big")
        if disk_bs and disk_bs != unit.block_size:
            raise _Abort(0x0D, 0x03, field, f"DISK BLOCK LENGTH {disk_bs} != {unit.block_size}")
    if not nblk:
        return 0
    nbytes = nblk * (dst.block_size if flags & 0x02 else src.block_size)   # DC bit
    if nbytes % src.block_size or nbytes % dst.block_size:
        raise _Abort(0x26, 0x0A, 10, "inexact segment")   # UNEXPECTED INEXACT SEGMENT
    # A copy target that refuses (range, write protect, reservation, not ready)
    # aborts the copy: COPY ABORTED, NO ADDITIONAL SENSE INFORMATION, with the
    # segment pointer at the refused LBA field.
    why = _check_target(lu, cmd, src_lun, src, src_lba, nbytes // src.block_size, False)
    if why is not None:
        raise _Abort(0x00, 0x00, 12, f"source LUN {src_lun}: {why}")
    why = _check_target(lu, cmd, dst_lun, dst, dst_lba, nbytes // dst.block_size, True)
    if why is not None:
        raise _Abort(0x00, 0x00, 20, f"destination LUN {dst_lun}: {why}")
    try:
        _copy_blocks(src, src_lba * src.block_size, dst, dst_lba * dst.block_size, nbytes)
    except BlockDeviceError as e:
        raise _Abort(0x0D, 0x01, 0, f"I/O error: {e}") from None   # THIRD PARTY DEVICE FAILURE
    return nbytes


def _copy_aborted(lu: LogicalUnit, segment: int, err: _Abort) -> bytes:
    """COPY ABORTED sense data (SPC-4 §6.4.3.x): the number of the failed
    segment in COMMAND-SPECIFIC INFORMATION (fixed format; INFORMATION in
    descriptor format) and a segment pointer (SD=1: byte ``err.field`` of
    the segment descriptor) in the sense-key specific field."""
    sks = bytes((0xA0,)) + err.field.to_bytes(2, "big")        # SKSV, SD
    if lu.d_sense:
        return sense.build(Key.COPY_ABORTED, err.asc, err.ascq, info=segment,
                           descriptor=True, sks=sks)
    out = bytearray(sense.build(Key.COPY_ABORTED, err.asc, err.ascq, sks=sks))
    out[8:12] = segment.to_bytes(4, "big")             # COMMAND-SPECIFIC INFORMATION
    return bytes(out)


@COMMANDS.register(0x83, "EXTENDED COPY(LID1)", 16, [0x83, 0x00] + [0] * 8 + [0xFF] * 4 + [0, C],
                   sa=0x00, access=Access.WRITE, slow=True, recommended_timeout=120)
def extended_copy(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """EXTENDED COPY (LID1) (SPC-4 §6.4).  See the module docstring."""
    plen = _be32(cmd.cdb, 10)
    if plen == 0:
        return ScsiResult(transfer_length=0)
    raw = cmd.data_out
    data = bytes(raw[:plen]) if raw is not None else b""
    if len(data) < 16:
        return lu.param_list_length_error()
    list_id = data[0]
    usage = (data[1] >> 3) & 0x03
    if usage == 0x01:
        return lu.invalid_param(1, 4)
    if usage == 0x03 and list_id:
        return lu.invalid_param(0)
    cscd_len = _be16(data, 2)
    seg_len = _be32(data, 8)
    inline_len = _be32(data, 12)
    if cscd_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH \
            or 16 + cscd_len + seg_len + inline_len > len(data):
        return lu.param_list_length_error()
    if inline_len > MAX_INLINE_DATA:
        return _illegal(lu, 0x26, 0x0B, 12)            # INLINE DATA LENGTH EXCEEDED
    # CSCD descriptors
    cscds: list[bytes] = []
    pos, end = 16, 16 + cscd_len
    while pos < end:
        dlen = 64 if data[pos] in _LONG_CSCD else 32
        if len(cscds) == MAX_CSCD_DESCRIPTORS:
            return _illegal(lu, 0x26, 0x06, pos)       # TOO MANY TARGET DESCRIPTORS
        if data[pos] != CSCD_IDENTIFICATION:
            return _illegal(lu, 0x26, 0x07, pos)       # UNSUPPORTED TARGET DESCRIPTOR TYPE CODE
        if pos + dlen > end:
            return lu.invalid_param(2)
        cscds.append(data[pos:pos + dlen])
        pos += dlen
    # Segment descriptors
    segs: list[int] = []
    send = end + seg_len
    while pos < send:
        if len(segs) == MAX_SEGMENT_DESCRIPTORS:
            return _illegal(lu, 0x26, 0x08, pos)       # TOO MANY SEGMENT DESCRIPTORS
        if pos + 4 > send:
            return lu.invalid_param(8)
        if data[pos] != SEGMENT_BLOCK_TO_BLOCK:
            return _illegal(lu, 0x26, 0x09, pos)       # UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE
        dlen = _be16(data, pos + 2) + 4
        if dlen != _SEG.size or pos + dlen > send:
            return lu.invalid_param(pos + 2)
        segs.append(pos)
        pos += dlen

    mgr = _manager(lu)
    nexus = cmd.nexus
    key = (nexus.initiator_port, nexus.target_port, list_id)
    with mgr.lock:
        if usage != 0x03 and key in mgr.running:
            return lu.check(Key.ILLEGAL_REQUEST, 0x00, 0x16)   # OPERATION IN PROGRESS
        if mgr.active >= MAX_CONCURRENT_COPIES:
            return ScsiResult(status=Status.BUSY)
        mgr.active += 1
        if usage != 0x03:
            mgr.running.add(key)
    done = 0
    transferred = 0
    try:
        for at in segs:
            transferred += _segment(lu, cmd, data, at, cscds)
            done += 1
    except _Abort as err:
        log.debug("%s: EXTENDED COPY segment %d: %s", lu.name, done, err.reason)
        sdata = _copy_aborted(lu, done, err)
        if usage == 0x00:
            mgr.hold(nexus, list_id, CopyResult(COMPLETED_WITH_ERRORS, done, transferred, sdata))
        return ScsiResult(status=Status.CHECK_CONDITION, sense=sdata)
    finally:
        with mgr.lock:
            mgr.active -= 1
            mgr.running.discard(key)
    if usage == 0x00:
        mgr.hold(nexus, list_id, CopyResult(COMPLETED_OK, done, transferred))
    return ScsiResult(transfer_length=plen)


# ---------------------------------------------------------------- RECEIVE COPY RESULTS
def _rcr_alloc(cmd: ScsiCommand) -> int:
    return _be32(bytes(cmd.cdb), 10)


def _rcr_usage(sa: int) -> list[int]:
    return [0x84, sa, 0xFF] + [0] * 7 + [0xFF] * 4 + [0, C]


def _held(lu: LogicalUnit, cmd: ScsiCommand) -> CopyResult | ScsiResult:
    result = _manager(lu).result(cmd.nexus, cmd.cdb[2])
    if result is None:
        return lu.invalid_cdb(2)                       # no such list identifier
    return result


@COMMANDS.register(0x84, "RECEIVE COPY STATUS(LID1)", 16, _rcr_usage(COPY_STATUS), sa=COPY_STATUS,
                   medium=False)
def receive_copy_status(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """COPY STATUS (SPC-4 §6.18.3): status of the EXTENDED COPY with this list
    identifier from this I_T nexus (LIST ID USAGE 00b)."""
    result = _held(lu, cmd)
    if isinstance(result, ScsiResult):
        return result
    count, units = result.transferred, 0
    while count > 0xFFFFFFFF:                          # TRANSFER COUNT UNITS: 2^(10*units) bytes
        count >>= 10
        units += 1
    data = bytes((0, 0, 0, 8, result.status)) + result.segments.to_bytes(2, "big") \
        + bytes((units,)) + count.to_bytes(4, "big")
    return ScsiResult(data=data[:_rcr_alloc(cmd)])


@COMMANDS.register(0x84, "RECEIVE COPY FAILURE DETAILS(LID1)", 16,
                   _rcr_usage(FAILED_SEGMENT_DETAILS),
                   sa=FAILED_SEGMENT_DETAILS, medium=False)
def receive_copy_failure_details(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """FAILED SEGMENT DETAILS (SPC-4 §6.18.5): the sense data a held copy
    ended with (nothing after a copy that succeeded)."""
    result = _held(lu, cmd)
    if isinstance(result, ScsiResult):
        return result
    if result.sense is None:
        data = bytes(4)
    else:
        body = bytearray(56)
        body[52] = Status.CHECK_CONDITION              # COPY COMMAND STATUS (byte 56)
        body[54:56] = len(result.sense).to_bytes(2, "big")
        body += result.sense
        data = len(body).to_bytes(4, "big") + bytes(body)
    return ScsiResult(data=data[:_rcr_alloc(cmd)])


def operating_parameters(lu: LogicalUnit) -> bytes:
    """RECEIVE COPY RESULTS OPERATING PARAMETERS data (SPC-4 §6.18.4)."""
    d = bytearray(44)
    d[4] = 0x01                                        # SNLID: LIST ID USAGE 11b supported
    d[8:10] = MAX_CSCD_DESCRIPTORS.to_bytes(2, "big")
    d[10:12] = MAX_SEGMENT_DESCRIPTORS.to_bytes(2, "big")
    d[12:16] = MAX_DESCRIPTOR_LIST_LENGTH.to_bytes(4, "big")
    d[16:20] = max_segment_length(lu).to_bytes(4, "big")
    d[20:24] = MAX_INLINE_DATA.to_bytes(4, "big")
    # HELD DATA LIMIT 0, MAXIMUM STREAM DEVICE TRANSFER SIZE 0
    d[34:36] = MAX_CONCURRENT_COPIES.to_bytes(2, "big")   # TOTAL CONCURRENT COPIES
    d[36] = MAX_CONCURRENT_COPIES                       # MAXIMUM CONCURRENT COPIES
    d[37] = lu.block_size.bit_length() - 1              # DATA SEGMENT GRANULARITY (log2)
    d[43] = len(IMPLEMENTED_DESCRIPTORS)
    d += IMPLEMENTED_DESCRIPTORS
    d[0:4] = (len(d) - 4).to_bytes(4, "big")
    return bytes(d)


def max_segment_length(lu: LogicalUnit) -> int:
    """Bytes one block-to-block segment may copy: what its 16-bit block count
    can say at this LU's block size."""
    return 0xFFFF * lu.block_size


@COMMANDS.register(0x84, "RECEIVE COPY OPERATING PARAMETERS", 16, _rcr_usage(OPERATING_PARAMETERS),
                   sa=OPERATING_PARAMETERS, medium=False)
def receive_copy_operating_parameters(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return ScsiResult(data=operating_parameters(lu)[:_rcr_alloc(cmd)])


# ---------------------------------------------------------------- VPD 8Fh
def _tpc_descriptor(dtype: int, body: bytes) -> bytes:
    body += bytes(-(len(body) + 4) % 4)                # descriptors are padded to 4 bytes
    return dtype.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def vpd_third_party_copy(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Third-party Copy VPD page (SPC-4 §7.8.17) for the LID1 copy manager."""
    table = lu.commands
    cmds = bytearray()
    for op, sas in ((0x83, (0x00,)),
                    (0x84, (COPY_STATUS, OPERATING_PARAMETERS, FAILED_SEGMENT_DETAILS))):
        have = bytes(sa for sa in sas if table.find(op, sa) is not None)
        if have:
            cmds += bytes((op, len(have))) + have
    descs = [
        _tpc_descriptor(0x0001, bytes((len(cmds),)) + bytes(cmds)),       # Supported Commands
        _tpc_descriptor(0x0004, bytes(4)                                   # Parameter Data
                        + MAX_CSCD_DESCRIPTORS.to_bytes(2, "big")
                        + MAX_SEGMENT_DESCRIPTORS.to_bytes(2, "big")
                        + MAX_DESCRIPTOR_LIST_LENGTH.to_bytes(4, "big")
                        + MAX_INLINE_DATA.to_bytes(4, "big") + bytes(12)),
        _tpc_descriptor(0x0008, bytes((len(IMPLEMENTED_DESCRIPTORS),))     # Supported Descriptors
                        + IMPLEMENTED_DESCRIPTORS),
        _tpc_descriptor(0x000C, bytes(2)),      # Supported CSCD IDs: none of the special ones
        _tpc_descriptor(0x8001, MAX_CONCURRENT_COPIES.to_bytes(4, "big")   # General Copy Operations
                        + MAX_CONCURRENT_COPIES.to_bytes(4, "big")
                        + max_segment_length(lu).to_bytes(4, "big")
                        + bytes((lu.block_size.bit_length() - 1, 0)) + bytes(18)),
    ]
    body = b"".join(descs)
    return bytes((0, 0x8F)) + len(body).to_bytes(2, "big") + body


spc.VPD_PAGES[0x8F] = vpd_third_party_copy
