"""MODE SENSE / MODE SELECT, WCE, D_SENSE and SWP on a LogicalUnit."""

from __future__ import annotations

import struct

import pytest

from storaged.block.file import FileBlockDevice
from storaged.scsi import sense
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, Status

BS = 512
SIZE = 16 * 1024 * 1024
NBLOCKS = SIZE // BS
N1 = Nexus("iqn.a,i,0x1", "iqn.t,t,0x1", 1, "iqn.a", "iqn.t")
N2 = Nexus("iqn.b,i,0x2", "iqn.t,t,0x1", 1, "iqn.b", "iqn.t")


class FuaRecorder(FileBlockDevice):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.fua: list[bool] = []

        self.flushes = 0

    def write(self, offset, data, fua=False):
        self.fua.append(fua)
        super().write(offset, data, fua=fua)

    def flush(self):
        self.flushes += 1
        super().flush()


@pytest.fixture
def dev(tmp_path):
    d = FuaRecorder(str(tmp_path / "disk"), block_size=BS, create_size=SIZE)
    yield d
    d.close()


@pytest.fixture
def lu(dev):
    unit = LogicalUnit(dev, name="m", serial="M1", wwn="6" + "ab" * 15 + "c")
    for n in (N1, N2):
        while run(unit, [0] * 6, nexus=n).status != Status.GOOD:
            pass
    return unit


def run(lu, cdb, data=None, nexus=N1) -> ScsiResult:
    return lu.execute(ScsiCommand(bytes(cdb), 0, nexus, data))


def key_asc(r: ScsiResult) -> tuple[int, int, int]:
    s = r.sense
    if s[0] & 0x7F in (0x72, 0x73):
        return s[1] & 0xF, s[2], s[3]
    return s[2] & 0xF, s[12], s[13]


def sense6(page=0x3F, pc=0, dbd=False, alloc=255, sub=0):
    return [0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0]


def sense10(page=0x3F, pc=0, dbd=False, llbaa=False, alloc=1024):
    return [0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), (pc << 6) | page, 0, 0, 0, 0,
            alloc >> 8, alloc & 0xFF, 0]


def select6(plist: bytes, pf=True, sp=False):
    return [0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, len(plist), 0]


def select10(plist: bytes, pf=True):
    n = len(plist)
    return [0x55, 0x10 if pf else 0, 0, 0, 0, 0, 0, n >> 8, n & 0xFF, 0]


def pages_of(data: bytes, hdr: int, bdlen: int) -> dict[int, bytes]:
    out = {}
    pos = hdr + bdlen
    while pos < len(data):
        code, plen = data[pos] & 0x3F, data[pos + 1]
        out[code] = data[pos:pos + 2 + plen]
        pos += 2 + plen
    assert pos == len(data)
    return out


def get_page(lu, code, pc=0) -> bytes:
    d = run(lu, sense6(code, pc=pc, dbd=True)).data
    assert d[3] == 0
    return pages_of(d, 4, 0)[code]


def select_page(lu, page: bytes, nexus=N1, ten=False) -> ScsiResult:
    page = bytes([page[0] & 0x3F]) + page[1:]      # PS is reserved in MODE SELECT
    if ten:
        plist = bytes(8) + page
        return run(lu, select10(plist), plist, nexus)
    plist = bytes(4) + page
    return run(lu, select6(plist), plist, nexus)


# ---------------------------------------------------------------- MODE SENSE
def test_mode_sense6_all_pages_with_block_descriptor(lu):
    d = run(lu, sense6()).data
    assert d[0] == len(d) - 1
    assert d[2] == 0x10                          # DPOFUA, not write protected
    assert d[3] == 8
    nb, bs = struct.unpack(">I", d[4:8])[0], int.from_bytes(d[9:12], "big")
    assert (nb, bs) == (NBLOCKS, BS)
    pages = pages_of(d, 4, 8)
    assert sorted(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][2] & 0x04                  # WCE on by default
    assert pages[0x0A][2] & 0x04 == 0             # D_SENSE off
    assert pages[0x0A][4] & 0x08 == 0             # SWP off


def test_mode_sense10_long_lba_descriptor(lu):
    d = run(lu, sense10(llbaa=True)).data
    assert int.from_bytes(d[0:2], "big") == len(d) - 2
    assert d[4] & 0x01 and int.from_bytes(d[6:8], "big") == 16
    assert int.from_bytes(d[8:16], "big") == NBLOCKS
    assert int.from_bytes(d[20:24], "big") == BS
    d = run(lu, sense10(dbd=True)).data
    assert int.from_bytes(d[6:8], "big") == 0
    assert sorted(pages_of(d, 8, 0)) == [0x08, 0x0A, 0x1C]


def test_mode_sense_page_controls(lu):
    ch = get_page(lu, 0x0A, pc=1)
    assert ch[2] & 0x04 and ch[4] & 0x08          # D_SENSE and SWP changeable
    assert get_page(lu, 0x08, pc=1)[2] & 0x04     # WCE changeable
    assert get_page(lu, 0x0A, pc=2) == get_page(lu, 0x0A, pc=0)
    r = run(lu, sense6(0x0A, pc=3))
    assert r.status == Status.CHECK_CONDITION and key_asc(r) == (5, 0x39, 0)


def test_mode_sense_control_page_direct_matches_all_pages(lu):
    allp = pages_of(run(lu, sense6(dbd=True)).data, 4, 0)
    assert allp[0x0A] == get_page(lu, 0x0A)
    ct = allp[0x0A]
    assert ct[2] >> 5 <= 1                         # TST 0 or 1
    assert (ct[3] >> 1) & 3 != 2                   # QERR != 2
    assert (ct[4] >> 4) & 3 != 1                   # UA_INTLCK_CTRL != 1


def test_mode_sense_invalid_requests(lu):
    r = run(lu, sense6(0x19))
    assert key_asc(r) == (5, 0x24, 0)
    r = run(lu, sense6(0x0A, sub=0x01))
    assert key_asc(r) == (5, 0x24, 0)


def test_mode_sense_allocation_length(lu):
    full = run(lu, sense6()).data
    r = run(lu, sense6(alloc=4))
    assert r.data == full[:4] and r.data[0] == len(full) - 1


# ---------------------------------------------------------------- MODE SELECT
def test_mode_select_wce_changes_write_behaviour(lu, dev):
    flushes = dev.flushes
    run(lu, [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], bytes(BS))
    assert dev.flushes == flushes                  # write-back: no flush
    page = bytearray(get_page(lu, 0x08))
    page[2] &= ~0x04
    r = select_page(lu, page)
    assert r.status == Status.GOOD and r.transfer_length == 4 + len(page)
    assert get_page(lu, 0x08)[2] & 0x04 == 0
    assert not lu.wce
    flushes = dev.flushes
    run(lu, [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], bytes(BS))
    assert dev.flushes == flushes + 1              # write-through: every write is flushed
    # the other nexus is told, the issuer is not
    r = run(lu, [0] * 6, nexus=N2)
    assert key_asc(r) == (6, 0x2A, 0x01)
    assert run(lu, [0] * 6, nexus=N1).status == Status.GOOD
    page[2] |= 0x04
    assert select_page(lu, page, ten=True).status == Status.GOOD
    assert lu.wce


def test_mode_select_same_values_does_not_raise_ua(lu):
    assert select_page(lu, get_page(lu, 0x0A)).status == Status.GOOD
    assert run(lu, [0] * 6, nexus=N2).status == Status.GOOD


def test_d_sense_switches_sense_format(lu):
    bad_read = [0x88, 0] + [0xFF] * 8 + [0, 0, 0, 1, 0, 0]
    r = run(lu, bad_read)
    assert r.sense[0] == 0x70 and key_asc(r) == (5, 0x21, 0)
    page = bytearray(get_page(lu, 0x0A))
    page[2] |= 0x04
    assert select_page(lu, page).status == Status.GOOD
    assert lu.d_sense
    r = run(lu, bad_read)
    assert r.sense[0] == 0x72 and key_asc(r) == (5, 0x21, 0)
    # a unit attention is descriptor format too
    r = run(lu, [0] * 6, nexus=N2)
    assert r.sense[0] == 0x72 and key_asc(r) == (6, 0x2A, 0x01)
    # field pointers travel in a sense-key specific descriptor
    r = run(lu, [0x28, 0xE0, 0, 0, 0, 0, 0, 0, 1, 0])
    assert r.sense[0] == 0x72
    assert r.sense[8] == 0x02 and r.sense[12] & 0x80 and r.sense[14] == 1
    page[2] &= ~0x04
    assert select_page(lu, page).status == Status.GOOD
    assert run(lu, bad_read).sense[0] == 0x70


def test_swp_write_protects(lu):
    page = bytearray(get_page(lu, 0x0A))
    page[4] |= 0x08
    assert select_page(lu, page).status == Status.GOOD
    assert run(lu, sense6()).data[2] & 0x80        # WP in the header
    r = run(lu, [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], bytes(BS))
    assert key_asc(r) == (7, 0x27, 0)
    assert run(lu, [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).status == Status.GOOD
    page[4] &= ~0x08
    assert select_page(lu, page).status == Status.GOOD
    assert run(lu, [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], bytes(BS)).status == Status.GOOD


def test_lun_reset_restores_mode_pages(lu):
    page = bytearray(get_page(lu, 0x0A))
    page[4] |= 0x08
    page[2] |= 0x04
    assert select_page(lu, page).status == Status.GOOD
    lu.reset()
    assert key_asc(run(lu, [0] * 6)) == (6, 0x29, 0x03)
    assert get_page(lu, 0x0A)[4] & 0x08 == 0
    assert not lu.write_protected and not lu.d_sense


def test_mode_select_rejects_unchangeable_field(lu):
    page = bytearray(get_page(lu, 0x0A))
    page[2] |= 0x20                                  # TST is not changeable
    r = select_page(lu, page)
    assert key_asc(r) == (5, 0x26, 0)
    sks = r.sense[15:18]
    assert sks[0] & 0x80 and not sks[0] & 0x40       # parameter list, not CDB
    assert int.from_bytes(sks[1:3], "big") == 4 + 2 and sks[0] & 0x07 == 5
    assert get_page(lu, 0x0A)[2] & 0x20 == 0


def test_mode_select_parameter_list_errors(lu):
    page = get_page(lu, 0x08)
    plist = bytes(4) + page
    # truncated page
    short = plist[:-3]
    r = run(lu, select6(short), short)
    assert key_asc(r) == (5, 0x1A, 0)
    # header only but shorter than a header
    r = run(lu, select6(b"\0\0"), b"\0\0")
    assert key_asc(r) == (5, 0x1A, 0)
    # wrong page length
    bad = bytearray(plist)
    bad[5] = 10
    r = run(lu, select6(bytes(bad[:16])), bytes(bad[:16]))
    assert key_asc(r) == (5, 0x26, 0)
    # unknown page
    bad = bytes(4) + bytes([0x19, 6]) + bytes(6)
    r = run(lu, select6(bad), bad)
    assert key_asc(r) == (5, 0x26, 0)
    # SP=1: no savable pages
    r = run(lu, select6(plist, sp=True), plist)
    assert key_asc(r) == (5, 0x24, 0)
    # PF=0 with pages
    r = run(lu, select6(plist, pf=False), plist)
    assert key_asc(r) == (5, 0x24, 0)
    # zero length is a no-op
    assert run(lu, select6(b"")).status == Status.GOOD


def test_mode_select_block_descriptor(lu):
    good = bytes([0, 0, 0, 8]) + NBLOCKS.to_bytes(4, "big") + b"\0" + BS.to_bytes(3, "big")
    assert run(lu, select6(good), good).status == Status.GOOD
    zero_blocks = bytes([0, 0, 0, 8]) + bytes(5) + BS.to_bytes(3, "big")
    assert run(lu, select6(zero_blocks), zero_blocks).status == Status.GOOD
    other_bs = bytes([0, 0, 0, 8]) + bytes(5) + (4096).to_bytes(3, "big")
    assert key_asc(run(lu, select6(other_bs), other_bs)) == (5, 0x26, 0)


def test_sense_build_fixed_info_over_32_bits_is_not_valid():
    raw = sense.build(3, 0x11, 0, info=1 << 40)
    assert raw[0] == 0x70
    raw = sense.build(3, 0x11, 0, info=1234)
    assert raw[0] == 0xF0 and int.from_bytes(raw[3:7], "big") == 1234
    assert sense.field_pointer(9, 2) == bytes((0xCA, 0, 9))
    assert sense.field_pointer(300, cdb=False) == bytes((0x80, 1, 44))
