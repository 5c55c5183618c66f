"""SPC-4 primary commands: INQUIRY and VPD pages, TEST UNIT READY, REQUEST
SENSE, MODE SENSE/SELECT, REPORT LUNS, REPORT SUPPORTED OPERATION CODES,
REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from storaged.scsi import modepages as mp
from storaged.scsi import sense
from storaged.scsi.alua import request_sense_not_ready
from storaged.scsi.commands import SA_LOCATORS, Access, CommandSet, CommandSpec
from storaged.scsi.sense import Key
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, encode_lun

COMMANDS = CommandSet("spc")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

C = 0x04  # CONTROL byte usage: NACA is evaluated (and refused)

VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)   # SAM-5, SPC-4, SBC-3
PROTOCOL_VERSION_DESCRIPTORS = {5: 0x0960}         # iSCSI (no version claimed)

STD_INQUIRY_LEN = 96


def _be16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def _be32(b: bytes, off: int) -> int:
    return int.from_bytes(bytes(b[off:off + 4]), "big")


# ---------------------------------------------------------------- INQUIRY
def standard_inquiry(lu: LogicalUnit) -> bytes:
    d = bytearray(STD_INQUIRY_LEN)
    d[0] = 0x00                                   # qualifier 000b, direct access block
    d[1] = 0x80 if lu.removable else 0x00         # RMB
    d[2] = 0x06                                   # SPC-4
    d[3] = 0x12                                   # HISUP=1, RESPONSE DATA FORMAT=2
    d[4] = STD_INQUIRY_LEN - 5
    d[5] = (lu.tpgs & 3) << 4 | (0x08 if getattr(lu, "third_party_copy", False)
                                                else 0)
    d[6] = 0x00
    d[7] = 0x02                                   # CMDQUE
    d[8:16] = lu.vendor.ljust(8).encode()
    d[16:32] = lu.product.ljust(16).encode()
    d[32:36] = lu.revision.ljust(4).encode()
    descs = list(VERSION_DESCRIPTORS)
    proto = PROTOCOL_VERSION_DESCRIPTORS.get(lu.protocol_id)
    if proto is not None:
        descs.append(proto)
    for i, v in enumerate(descs[:8]):
        d[58 + 2 * i:60 + 2 * i] = v.to_bytes(2, "big")
    return bytes(d)


def no_lun_inquiry(vendor: str = "STORAGED", product: str = "no LUN") -> bytes:
    """Standard INQUIRY data for a LUN that does not exist (qualifier 011b, type 1Fh)."""
    d = bytearray(36)
    d[0] = 0x7F
    d[2] = 0x06
    d[3] = 0x12
    d[4] = 31
    d[7] = 0x02
    d[8:16] = vendor[:8].ljust(8).encode()
    d[16:32] = product[:16].ljust(16).encode()
    d[32:36] = b"0001"
    return bytes(d)


def _designator(code_set: int, assoc: int, dtype: int, data: bytes,
                protocol: int | None = None) -> bytes:
    b0 = code_set & 0x0F
    b1 = ((assoc & 3) << 4) | (dtype & 0x0F)
    if protocol is not None:
        b0 |= (protocol & 0x0F) << 4
        b1 |= 0x80                                 # PIV
    return bytes((b0, b1, 0, len(data))) + data


def _name_string(name: str) -> bytes:
    raw = name.encode("utf-8") + b"\0"
    raw += b"\0" * (-len(raw) % 4)
    return raw[:252]


def _vpd(code: int, body: bytes, long: bool = False) -> bytes:
    if long:
        return bytes((0, code)) + len(body).to_bytes(2, "big") + body
    return bytes((0, code, 0, len(body))) + body


def vpd_supported(lu: LogicalUnit, nexus: Nexus) -> bytes:
    return _vpd(0x00, bytes(sorted(VPD_PAGES)))


def vpd_serial(lu: LogicalUnit, nexus: Nexus) -> bytes:
    return _vpd(0x80, lu.serial.encode("ascii"))


def vpd_device_id(lu: LogicalUnit, nexus: Nexus) -> bytes:
    proto = lu.protocol_id
    out = [
        _designator(1, 0, 3, bytes.fromhex(lu.wwn)),                         # NAA
        _designator(2, 0, 1, lu.vendor.ljust(8).encode() + lu.serial.encode()[:64]),
    ]
    if nexus.relative_port_id:
        out.append(_designator(1, 1, 4, nexus.relative_port_id.to_bytes(4, "big"), proto))
    out.append(_designator(1, 1, 5, (lu.alua.group_id(nexus) & 0xFFFF).to_bytes(4, "big"),
                           proto))
    if nexus.target_port:
        out.append(_designator(3, 1, 8, _name_string(nexus.target_port), proto))
    if nexus.target_name:
        out.append(_designator(3, 2, 8, _name_string(nexus.target_name), proto))
    return _vpd(0x83, b"".join(out), long=True)


def vpd_extended_inquiry(lu: LogicalUnit, nexus: Nexus) -> bytes:
    d = bytearray(60)
    d[1] = 0x01                                    # SIMPSUP
    d[2] = 0x01                                    # V_SUP: volatile cache
    d[3] = 0x01                                    # LUICLR
    return _vpd(0x86, bytes(d))


def vpd_block_limits(lu: LogicalUnit, nexus: Nexus) -> bytes:
    d = bytearray(60)
    d[1] = getattr(lu, "max_compare_and_write", 0) & 0xFF
    d[2:4] = (1 << lu.lbppbe).to_bytes(2, "big")         # optimal transfer granularity
    d[4:8] = lu.max_transfer_blocks.to_bytes(4, "big")   # maximum transfer length
    d[8:12] = lu.max_transfer_blocks.to_bytes(4, "big")  # optimal transfer length
    d[16:20] = getattr(lu, "max_unmap_lba_count", 0).to_bytes(4, "big")
    d[20:24] = getattr(lu, "max_unmap_block_descriptors", 0).to_bytes(4, "big")
    gran = getattr(lu, "optimal_unmap_granularity", 0)
    d[24:28] = gran.to_bytes(4, "big")
    if getattr(lu, "ugavalid", False):                   # UGAVALID + UNMAP GRANULARITY ALIGNMENT
        d[28:32] = (0x80000000 | getattr(lu, "unmap_granularity_alignment", 0)).to_bytes(4, "big")
    d[32:40] = getattr(lu, "max_write_same_blocks", 0).to_bytes(8, "big")
    # Atomic writes (SBC-4): no alignment, granularity or boundary limits.
    d[40:44] = getattr(lu, "max_atomic_transfer_blocks", 0).to_bytes(4, "big")
    if getattr(lu, "wsnz", False):
        d[0] |= 0x01
    return _vpd(0xB0, bytes(d))


def vpd_block_characteristics(lu: LogicalUnit, nexus: Nexus) -> bytes:
    d = bytearray(60)
    d[0:2] = (1).to_bytes(2, "big")                # MEDIUM ROTATION RATE: non-rotating
    if lu.commands.find(0x48, 0x02) is not None:   # SANITIZE BLOCK ERASE supported:
        d[3] |= 0x40                               # WABEREQ 01b, erased blocks read as zeros
    return _vpd(0xB1, bytes(d))


def vpd_logical_block_provisioning(lu: LogicalUnit, nexus: Nexus) -> bytes:
    d = bytearray(4)
    flags = 0
    if getattr(lu, "lbpu", False):
        flags |= 0x80
    if getattr(lu, "lbpws", False):
        flags |= 0x40
    if getattr(lu, "lbpws10", False):
        flags |= 0x20
    if lu.lbprz:
        flags |= 0x04
    d[1] = flags
    d[2] = 0x02 if lu.lbpme else 0x00              # PROVISIONING TYPE: thin / full
    return _vpd(0xB2, bytes(d))


VPD_PAGES: dict[int, Callable[[LogicalUnit, Nexus], bytes]] = {
    0x00: vpd_supported,
    0x80: vpd_serial,
    0x83: vpd_device_id,
    0x86: vpd_extended_inquiry,
    0xB0: vpd_block_limits,
    0xB1: vpd_block_characteristics,
    0xB2: vpd_logical_block_provisioning,
}
"""VPD page code -> builder.  Later features add pages here (0x8F third-party copy...)."""


@COMMANDS.register(0x12, "INQUIRY", 6, [0x12, 0x01, 0xFF, 0xFF, 0xFF, C],
                   medium=False, ua_exempt=True)
def inquiry(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    if cdb[1] & 0x02:                              # CMDDT (obsolete)
        return lu.invalid_cdb(1, 1)
    alloc = _be16(cdb, 3)
    page = cdb[2]
    if not cdb[1] & 0x01:
        if page:
            return lu.invalid_cdb(2)
        data = standard_inquiry(lu)
    else:
        build = VPD_PAGES.get(page)
        if build is None:
            return lu.invalid_cdb(2)
        data = build(lu, cmd.nexus)
    return ScsiResult(data=data[:alloc])


# ---------------------------------------------------------------- TUR, REQUEST SENSE
@COMMANDS.register(0x00, "TEST UNIT READY", 6, [0x00, 0, 0, 0, 0, C])
def test_unit_ready(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return ScsiResult()


@COMMANDS.register(0x03, "REQUEST SENSE", 6, [0x03, 0x01, 0, 0, 0xFF, C],
                   medium=False, ua_exempt=True)
def request_sense(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    desc = bool(cdb[1] & 0x01)
    ua = lu.take_unit_attention(cmd.nexus)
    alua = request_sense_not_ready(lu, cmd.nexus)
    if ua is not None:
        data = sense.build(Key.UNIT_ATTENTION, ua[0], ua[1], descriptor=desc)
    elif alua is not None:     # port in standby/unavailable/... (SPC-4 §5.16.2.4)
        data = sense.build(Key.NOT_READY, alua[0], alua[1], descriptor=desc)
    elif not lu.online:
        data = sense.build(Key.NOT_READY, 0x04, 0x12, descriptor=desc)
    else:
        data = sense.build(Key.NO_SENSE, 0x00, 0x00, descriptor=desc)
    return ScsiResult(data=data[:cdb[4]])


# ---------------------------------------------------------------- MODE SENSE / SELECT
def _mode_sense(lu: LogicalUnit, cmd: ScsiCommand, ten: bool) -> ScsiResult:
    cdb = cmd.cdb
    dbd = cdb[1] & 0x08
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    sub = cdb[3]
    alloc = _be16(cdb, 7) if ten else cdb[4]
    if pc == 3:
        return lu.check(Key.ILLEGAL_REQUEST, 0x39, 0x00)    # SAVING PARAMETERS NOT SUPPORTED
    pages = lu.mode
    if page == mp.ALL_PAGES:
        if sub not in (0x00, 0xFF):
            return lu.invalid_cdb(3)
        codes = pages.codes()
    else:
        if page not in pages.defs:
            return lu.invalid_cdb(2, 5)
        if sub not in (0x00, 0xFF):
            return lu.invalid_cdb(3)
        codes = [page]
    body = b"".join(pages.page(c, pc) for c in codes)
    bd = b""
    if not dbd:
        nb = 0 if pc == 1 else lu.num_blocks
        bs = 0 if pc == 1 else lu.block_size
        if llbaa:
            bd = nb.to_bytes(8, "big") + bytes(4) + bs.to_bytes(4, "big")
        else:
            bd = min(nb, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + bs.to_bytes(3, "big")
    dsp = (0x80 if lu.write_protected else 0x00) | 0x10     # WP, DPOFUA
    if ten:
        total = 8 + len(bd) + len(body)
        hdr = (total - 2).to_bytes(2, "big") + bytes((0, dsp, 0x01 if llbaa else 0, 0)) \
            + len(bd).to_bytes(2, "big")
    else:
        total = 4 + len(bd) + len(body)
        hdr = bytes((total - 1, 0, dsp, len(bd)))
    return ScsiResult(data=(hdr + bd + body)[:alloc])


@COMMANDS.register(0x1A, "MODE SENSE(6)", 6, [0x1A, 0x08, 0xFF, 0xFF, 0xFF, C],
                   access=Access.READ, medium=False)
def mode_sense6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _mode_sense(lu, cmd, False)


@COMMANDS.register(0x5A, "MODE SENSE(10)", 10, [0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, C],
                   access=Access.READ, medium=False)
def mode_sense10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _mode_sense(lu, cmd, True)


def _mode_select(lu: LogicalUnit, cmd: ScsiCommand, ten: bool) -> ScsiResult:
    cdb = cmd.cdb
    pf = cdb[1] & 0x10
    if cdb[1] & 0x01:                              # SP: no savable pages
        return lu.invalid_cdb(1, 0)
    plen = _be16(cdb, 7) if ten else cdb[4]
    if plen == 0:
        return ScsiResult(transfer_length=0)
    raw = cmd.data_out
    data = bytes(raw[:plen]) if raw is not None else b""
    hlen = 8 if ten else 4
    if len(data) < hlen:
        return lu.param_list_length_error()
    if ten:
        longlba = data[4] & 0x01
        bdlen = _be16(data, 6)
        bdlen_at = 6
    else:
        longlba = 0
        bdlen = data[3]
        bdlen_at = 3
    pos = hlen
    if bdlen:
        dlen = 16 if longlba else 8
        if bdlen % dlen:
            return lu.invalid_param(bdlen_at)
        if pos + bdlen > len(data):
            return lu.param_list_length_error()
        for off in range(pos, pos + bdlen, dlen):
            if longlba:
                nb = int.from_bytes(data[off:off + 8], "big")
                bs_at = off + 12
                bs = int.from_bytes(data[off + 12:off + 16], "big")
                cap = lu.num_blocks
            else:
                nb = int.from_bytes(data[off:off + 4], "big")
                bs_at = off + 5
                bs = int.from_bytes(data[off + 5:off + 8], "big")
                cap = min(lu.num_blocks, 0xFFFFFFFF)
            if nb not in (0, cap):
                return lu.invalid_param(off)
            if bs != lu.block_size:
                return lu.invalid_param(bs_at)
        pos += bdlen
    if pos < len(data) and not pf:
        return lu.invalid_cdb(1, 4)
    pages = lu.mode
    new: dict[int, bytes] = {}
    while pos < len(data):
        if pos + 2 > len(data):
            return lu.param_list_length_error()
        code = data[pos] & 0x3F
        if data[pos] & 0x40:                       # SPF: we have no subpages
            return lu.invalid_param(pos, 6)
        pdef = pages.defs.get(code)
        if pdef is None:
            return lu.invalid_param(pos, 5)
        if data[pos + 1] + 2 != pdef.length:
            return lu.invalid_param(pos + 1)
        if pos + pdef.length > len(data):
            return lu.param_list_length_error()
        page = data[pos:pos + pdef.length]
        cur = new.get(code, pages.current[code])
        changeable = pdef.changeable
        for i in range(2, pdef.length):
            diff = (page[i] ^ cur[i]) & ~changeable[i] & 0xFF
            if diff:
                return lu.invalid_param(pos + i, diff.bit_length() - 1)
        new[code] = bytes((code, page[1])) + page[2:]
        pos += pdef.length
    changed = False
    for code, page in new.items():
        if pages.current[code] != page:
            pages.current[code] = bytearray(page)
            changed = True
    if changed:
        lu._refresh_mode_state()
        lu.add_unit_attention(0x2A, 0x01, except_nexus=cmd.nexus)  # MODE PARAMETERS CHANGED
    return ScsiResult(transfer_length=plen)


@COMMANDS.register(0x15, "MODE SELECT(6)", 6, [0x15, 0x11, 0, 0, 0xFF, C],
                   access=Access.CONFLICT, medium=False)
def mode_select6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _mode_select(lu, cmd, False)


@COMMANDS.register(0x55, "MODE SELECT(10)", 10, [0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, C],
                   access=Access.CONFLICT, medium=False)
def mode_select10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _mode_select(lu, cmd, True)


# ---------------------------------------------------------------- REPORT LUNS
REPORT_LUNS_SELECT = (0x00, 0x01, 0x02)


def report_luns_data(cdb: bytes, luns: Iterable[int]) -> tuple[bytes | None, int]:
    """REPORT LUNS parameter data, or (None, field byte) for an invalid CDB."""
    select = cdb[2]
    alloc = _be32(cdb, 6)
    if select not in REPORT_LUNS_SELECT:
        return None, 2
    if alloc < 16:
        return None, 6
    listed = [] if select == 0x01 else sorted(luns)   # no well-known LUs
    body = b"".join(encode_lun(n) for n in listed)
    data = len(body).to_bytes(4, "big") + bytes(4) + body
    return data[:alloc], 0


@COMMANDS.register(0xA0, "REPORT LUNS", 12, [0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
                   medium=False, ua_exempt=True)
def report_luns(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    # A ScsiTarget answers REPORT LUNS itself with its whole LUN inventory;
    # a lone logical unit reports just the LUN it was addressed as.
    data, bad = report_luns_data(cmd.cdb, [cmd.lun])
    if data is None:
        return lu.invalid_cdb(bad)
    lu.clear_unit_attention(cmd.nexus, 0x3F, 0x0E)
    return ScsiResult(data=data)


# ---------------------------------------------------------------- MAINTENANCE IN
def _timeouts(spec: CommandSpec) -> bytes:
    return bytes((0, 0x0A, 0, 0)) + spec.nominal_timeout.to_bytes(4, "big") \
        + spec.recommended_timeout.to_bytes(4, "big")


@COMMANDS.register(0xA3, "REPORT SUPPORTED OPERATION CODES", 12,
                   [0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
                   sa=0x0C, medium=False)
def report_supported_opcodes(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = _be16(cdb, 4)
    alloc = _be32(cdb, 6)
    table = lu.commands
    if options == 0:
        out = bytearray()
        for spec in table.all():
            servactv = spec.opcode in SA_LOCATORS
            out += bytes((spec.opcode, 0)) + (spec.sa or 0).to_bytes(2, "big")
            out += bytes((0, (0x02 if rctd else 0) | (0x01 if servactv else 0)))
            out += spec.cdb_len.to_bytes(2, "big")
            if rctd:
                out += _timeouts(spec)
        data = len(out).to_bytes(4, "big") + bytes(out)
    elif options in (1, 2, 3):
        has_sa = opcode in SA_LOCATORS
        if (options == 1 and has_sa) or (options == 2 and not has_sa):
            return lu.invalid_cdb(2, 2)
        spec = table.find(opcode, sa if has_sa else None)
        if spec is None:
            data = bytes((0, 0x01, 0, 0))             # SUPPORT 001b: not supported
        else:
            data = bytes((0, (0x80 if rctd else 0) | 0x03)) + spec.cdb_len.to_bytes(2, "big") \
                + spec.usage + (_timeouts(spec) if rctd else b"")
    else:
        return lu.invalid_cdb(2, 2)
    return ScsiResult(data=data[:alloc])


SUPPORTED_TMFS = 0xDA
"""ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET."""


@COMMANDS.register(0xA3, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", 12,
                   [0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
                   sa=0x0D, medium=False)
def report_supported_tmfs(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    repd = bool(cdb[2] & 0x80)
    alloc = _be32(cdb, 6)
    data = bytes((SUPPORTED_TMFS, 0x00, 0x00, 0x0C if repd else 0x00))
    if repd:
        data += bytes(12)
    return ScsiResult(data=data[:alloc])
