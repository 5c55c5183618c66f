"""LogicalUnit: INQUIRY/VPD, capacity, I/O at every CDB size, errors, UAs, hooks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.block.base import BlockDeviceError
from storaged.block.file import FileBlockDevice
from storaged.scsi.commands import Access, CommandSpec
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.table import DEFAULT_TABLE
from storaged.scsi.types import ScsiCommand, ScsiResult, Status
from tests.scsi_util import N1, N2, assert_check, clear_ua, parse_sense, run

MiB = 1024 * 1024
SIZE = 16 * MiB
BS = 512
NBLOCKS = SIZE // BS
WWN = "6001405" + "0123456789abcdef" + "fedcba987"



class RecordingDevice:
    """Wraps a BlockDevice and records writes (with their FUA flag) and flushes."""

    def __init__(self, inner: FileBlockDevice) -> None:
        self.inner = inner
        self.block_size = inner.block_size
        self.read_only = inner.read_only
        self.writes: list[tuple[int, int, bool]] = []
        self.flushes = 0
        self.fail_reads = False
        self.fail_writes = False

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            raise BlockDeviceError(5, "injected read error")
        return self.inner.read(offset, length)

    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.inner.readinto(offset, buf)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.fail_writes:
            raise BlockDeviceError(5, "injected write error")
        self.writes.append((offset, len(data), fua))
        self.inner.write(offset, data, fua=fua)

    def flush(self) -> None:
        self.flushes += 1
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.inner.is_mapped(offset, length)

    def refresh_size(self) -> int:
        return self.inner.refresh_size()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def dev(tmp_path):
    inner = FileBlockDevice(str(tmp_path / "lun0.img"), block_size=BS, create_size=SIZE)
    d = RecordingDevice(inner)
    yield d
    inner.close()


def make_lu(dev, **kw) -> LogicalUnit:
    kw.setdefault("name", "lun0")
    kw.setdefault("serial", "SN-0001")
    kw.setdefault("wwn", WWN)
    return LogicalUnit(dev, **kw)


@pytest.fixture
def lu(dev):
    unit = make_lu(dev)
    clear_ua(unit, N1)
    return unit


# ---------------------------------------------------------------- CDB builders
def tur():
    return [0x00, 0, 0, 0, 0, 0]


def inquiry(evpd=0, page=0, alloc=255, b1=None):
    return [0x12, evpd if b1 is None else b1, page, alloc >> 8, alloc & 0xFF, 0]


def cdb6(op, lba, n):
    return [op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0]


def cdb10(op, lba, n, b1=0, control=0):
    return [op, b1] + list(struct.pack(">I", lba)) + [0] + list(struct.pack(">H", n)) + [control]


def cdb12(op, lba, n, b1=0):
    return [op, b1] + list(struct.pack(">II", lba, n)) + [0, 0]


def cdb16(op, lba, n, b1=0):
    return [op, b1] + list(struct.pack(">QI", lba, n)) + [0, 0]


def rc16(alloc=32, lba=0, pmi=0):
    return [0x9E, 0x10] + list(struct.pack(">QI", lba, alloc)) + [pmi, 0]


def pattern(nblocks: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(nblocks * BS))


# ---------------------------------------------------------------- INQUIRY
def test_standard_inquiry_fields(lu):
    r = run(lu, inquiry(alloc=260))
    assert r.status == Status.GOOD
    d = r.data
    assert len(d) >= 36
    assert d[0] == 0x00                      # qualifier 0, direct access
    assert d[1] & 0x80 == 0                  # not removable
    assert d[2] == 0x06                      # SPC-4
    assert d[3] & 0x0F == 2 and d[3] & 0x10  # response format 2, HiSup
    assert d[4] == len(d) - 5
    assert d[5] & 0x30 == 0x30               # TPGS 3: implicit and explicit ALUA
    assert d[7] & 0x02                       # CmdQue
    assert d[8:16] == b"STORAGED"
    assert d[16:32] == b"storaged LUN    "
    assert d[32:36] == b"0001"
    descs = {int.from_bytes(d[58 + 2 * i:60 + 2 * i], "big") for i in range(8)}
    assert {0x0460, 0x04C0}.issubset(descs)   # SPC-4, SBC-3 (libiscsi's sbc3_support)


def test_inquiry_allocation_length_truncates(lu):
    full = run(lu, inquiry(alloc=255)).data
    for alloc in (0, 1, 5, 36):
        r = run(lu, inquiry(alloc=alloc))
        assert r.status == Status.GOOD
        assert r.data == full[:alloc]
    assert run(lu, inquiry(alloc=256)).data == full


def test_inquiry_evpd0_with_page_code_is_invalid(lu):
    s = assert_check(run(lu, inquiry(evpd=0, page=0x80)), 5, 0x24)
    assert s["sks"][0] & 0xC0 == 0xC0 and s["sks"][2] == 2   # C/D=1, byte 2


def test_inquiry_unknown_vpd_page_is_invalid(lu):
    assert_check(run(lu, inquiry(evpd=1, page=0xC7)), 5, 0x24)


def test_supported_vpd_pages_are_all_readable(lu):
    d = run(lu, inquiry(evpd=1, page=0)).data
    assert d[1] == 0x00
    pages = list(d[4:4 + d[3]])
    assert pages == sorted(pages)
    assert {0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2}.issubset(pages)
    for page in pages:
        r = run(lu, inquiry(evpd=1, page=page, alloc=1024))
        assert r.status == Status.GOOD
        assert r.data[1] == page
        if page == 0x83:
            assert int.from_bytes(r.data[2:4], "big") == len(r.data) - 4
        else:
            assert r.data[3] == len(r.data) - 4


def test_vpd_unit_serial(lu):
    d = run(lu, inquiry(evpd=1, page=0x80)).data
    assert d[4:4 + d[3]] == b"SN-0001"


def designators(page: bytes) -> list[dict]:
    out = []
    pos = 4
    end = 4 + int.from_bytes(page[2:4], "big")
    while pos < end:
        b0, b1, dlen = page[pos], page[pos + 1], page[pos + 3]
        out.append({"proto": b0 >> 4, "code_set": b0 & 0xF, "piv": bool(b1 & 0x80),
                    "assoc": (b1 >> 4) & 3, "type": b1 & 0xF,
                    "data": page[pos + 4:pos + 4 + dlen]})
        pos += 4 + dlen
    assert pos == end
    return out


def test_vpd_device_identification(lu):
    d = run(lu, inquiry(evpd=1, page=0x83, alloc=1024)).data
    ds = designators(d)
    naa = [x for x in ds if x["type"] == 3]
    assert len(naa) == 1 and naa[0]["assoc"] == 0 and naa[0]["code_set"] == 1
    assert naa[0]["data"] == bytes.fromhex(WWN) and naa[0]["data"][0] >> 4 == 6
    t10 = [x for x in ds if x["type"] == 1]
    assert t10 and t10[0]["data"].startswith(b"STORAGED") and t10[0]["code_set"] == 2
    rel = [x for x in ds if x["type"] == 4]
    assert rel[0]["assoc"] == 1 and rel[0]["piv"] and rel[0]["proto"] == 5
    assert int.from_bytes(rel[0]["data"][2:4], "big") == N1.relative_port_id
    tpg = [x for x in ds if x["type"] == 5]
    assert tpg and tpg[0]["assoc"] == 1
    names = {x["assoc"]: x for x in ds if x["type"] == 8}
    assert names[1]["code_set"] == 3
    assert names[1]["data"].rstrip(b"\0").decode() == N1.target_port
    assert len(names[1]["data"]) % 4 == 0
    assert names[2]["data"].rstrip(b"\0").decode() == N1.target_name


def test_vpd_block_limits_and_characteristics(lu):
    bl = run(lu, inquiry(evpd=1, page=0xB0)).data
    assert bl[3] == 0x3C and len(bl) == 64
    max_xfer = int.from_bytes(bl[8:12], "big")
    assert max_xfer == lu.max_transfer_blocks > 0
    assert int.from_bytes(bl[6:8], "big") == 1 << lu.lbppbe
    assert int.from_bytes(bl[20:24], "big") == 0        # no UNMAP yet
    assert int.from_bytes(bl[24:28], "big") == 0
    bdc = run(lu, inquiry(evpd=1, page=0xB1)).data
    assert int.from_bytes(bdc[4:6], "big") == 1        # non-rotating
    lbp = run(lu, inquiry(evpd=1, page=0xB2)).data
    assert lbp[5] & 0xE0 == 0                          # LBPU/LBPWS/LBPWS10 clear
    ext = run(lu, inquiry(evpd=1, page=0x86)).data
    assert ext[3] == 0x3C and ext[5] & 0x01            # SIMPSUP


def test_bad_wwn_rejected(dev):
    with pytest.raises(ValueError):
        make_lu(dev, wwn="5" + "0" * 31)
    with pytest.raises(ValueError):
        make_lu(dev, wwn="6" + "0" * 30)


# ---------------------------------------------------------------- capacity
def test_read_capacity10_and_16(lu):
    r = run(lu, cdb10(0x25, 0, 0))
    last, bs = struct.unpack(">II", r.data)
    assert (last, bs) == (NBLOCKS - 1, BS)
    d = run(lu, rc16()).data
    assert len(d) == 32
    assert int.from_bytes(d[0:8], "big") == NBLOCKS - 1
    assert int.from_bytes(d[8:12], "big") == BS
    assert d[12] & 0x01 == 0                          # PROT_EN
    assert d[13] & 0x0F == 3                          # 4096/512 -> LBPPBE 3
    assert d[14] & 0xC0 == 0                          # LBPME/LBPRZ
    for alloc in range(0, 16):
        r = run(lu, rc16(alloc=alloc))
        assert r.status == Status.GOOD and r.data == d[:alloc]


def test_read_capacity_pmi_rules(lu):
    assert_check(run(lu, cdb10(0x25, 5, 0)), 5, 0x24)
    ok = run(lu, [0x25, 0, 0, 0, 0, 5, 0, 0, 1, 0])
    assert ok.status == Status.GOOD
    assert_check(run(lu, rc16(lba=5)), 5, 0x24)
    assert run(lu, rc16(lba=5, pmi=1)).status == Status.GOOD


class HugeDevice:
    block_size = 512
    read_only = False
    size = (1 << 33) * 512

    def read(self, offset, length):
        return bytes(length)


def test_read_capacity10_saturates_for_big_luns():
    unit = make_lu(HugeDevice())
    clear_ua(unit, N1)
    last, _ = struct.unpack(">II", run(unit, cdb10(0x25, 0, 0)).data)
    assert last == 0xFFFFFFFF
    d = run(unit, rc16()).data
    assert int.from_bytes(d[0:8], "big") == (1 << 33) - 1


# ---------------------------------------------------------------- read / write
@pytest.mark.parametrize("wsize", [6, 10, 12, 16])
@pytest.mark.parametrize("rsize", [6, 10, 12, 16])
def test_read_write_round_trip_all_cdb_sizes(lu, wsize, rsize):
    lba, n = 1000 + wsize * 10 + rsize, 3
    data = pattern(n, wsize * 31 + rsize)
    wcdb = {6: cdb6(0x0A, lba, n), 10: cdb10(0x2A, lba, n), 12: cdb12(0xAA, lba, n),
            16: cdb16(0x8A, lba, n)}[wsize]
    r = run(lu, wcdb, data)
    assert r.status == Status.GOOD and r.transfer_length == n * BS
    rcdb = {6: cdb6(0x08, lba, n), 10: cdb10(0x28, lba, n), 12: cdb12(0xA8, lba, n),
            16: cdb16(0x88, lba, n)}[rsize]
    r = run(lu, rcdb)
    assert r.status == Status.GOOD
    assert bytes(r.data) == data


def test_read6_zero_length_means_256_blocks(lu):
    r = run(lu, cdb6(0x08, 0, 0))
    assert r.status == Status.GOOD and len(r.data) == 256 * BS


def test_zero_length_transfers_are_not_errors(lu, dev):
    for cdb in (cdb10(0x28, 0, 0), cdb12(0xA8, 0, 0), cdb16(0x88, 0, 0),
                cdb10(0x2A, 0, 0), cdb12(0xAA, 0, 0), cdb16(0x8A, 0, 0)):
        r = run(lu, cdb)
        assert r.status == Status.GOOD and not r.data and r.transfer_length == 0
    assert dev.writes == []


def test_read_at_end_of_lun(lu):
    for n in (1, 7, 256):
        r = run(lu, cdb16(0x88, NBLOCKS - n, n))
        assert r.status == Status.GOOD and len(r.data) == n * BS


@pytest.mark.parametrize("cdb", [
    cdb10(0x28, NBLOCKS, 1), cdb10(0x28, NBLOCKS - 1, 2), cdb10(0x28, 0xFFFFFFFF, 1),
    cdb10(0x28, NBLOCKS + 1, 0), cdb10(0x28, 0x80000000, 0),
    cdb12(0xA8, NBLOCKS, 1), cdb16(0x88, 0xFFFFFFFFFFFFFFFF, 1),
    cdb16(0x88, 1 << 63, 256), cdb6(0x08, 0x1FFFFF, 1),
    cdb10(0x2A, NBLOCKS - 1, 2), cdb16(0x8A, NBLOCKS, 1), cdb6(0x0A, NBLOCKS, 1),
    cdb10(0x2F, NBLOCKS, 1), cdb16(0x8F, NBLOCKS - 1, 2),
    cdb10(0x2E, NBLOCKS, 1), cdb10(0x35, NBLOCKS + 1, 0), cdb16(0x91, NBLOCKS - 1, 2),
    cdb10(0x34, NBLOCKS + 1, 0), cdb16(0x90, 0xFFFFFFFFFFFFFFFF, 1),
])
def test_lba_out_of_range(lu, dev, cdb):
    r = run(lu, cdb, bytes(2 * BS))
    assert_check(r, 5, 0x21)
    assert dev.writes == []


@pytest.mark.parametrize("op,build", [(0x28, cdb10), (0xA8, cdb12), (0x88, cdb16),
                                      (0x2A, cdb10), (0xAA, cdb12), (0x8A, cdb16),
                                      (0x2F, cdb10), (0x8F, cdb16), (0x2E, cdb10)])
def test_protection_fields_rejected(lu, dev, op, build):
    for prot in range(1, 8):
        s = assert_check(run(lu, build(op, 0, 1, b1=prot << 5), bytes(BS)), 5, 0x24)
        assert s["sks"][2] == 1
    assert dev.writes == []


def test_dpo_fua_accepted_and_fua_is_durable(lu, dev):
    for b1 in (0x10, 0x08, 0x18):
        assert run(lu, cdb10(0x28, 0, 1, b1=b1)).status == Status.GOOD
    flushes = []
    for cdb in (cdb10(0x2A, 8, 1, b1=0x08), cdb16(0x8A, 9, 1, b1=0x18), cdb12(0xAA, 10, 1)):
        before = dev.flushes
        assert run(lu, cdb, bytes(BS)).status == Status.GOOD
        flushes.append(dev.flushes - before)
    # FUA writes are flushed before GOOD (after the write, outside the medium lock).
    assert flushes == [1, 1, 0]


def test_synchronize_cache_flushes(lu, dev):
    assert run(lu, cdb10(0x35, 0, 0)).status == Status.GOOD
    assert run(lu, cdb16(0x91, 10, 20, b1=0x02)).status == Status.GOOD   # IMMED
    assert dev.flushes == 2


def test_prefetch_returns_good(lu):
    for n in (0, 1, 256):
        assert run(lu, cdb10(0x34, 0, n)).status == Status.GOOD
        assert run(lu, cdb16(0x90, NBLOCKS - max(n, 1), n, b1=0x02)).status == Status.GOOD


def test_transfer_longer_than_maximum_is_invalid(dev):
    unit = make_lu(dev, max_transfer_bytes=64 * BS)
    clear_ua(unit, N1)
    assert run(unit, cdb10(0x28, 0, 64)).status == Status.GOOD
    s = assert_check(run(unit, cdb10(0x28, 0, 65)), 5, 0x24)
    assert s["sks"][2] == 7


# ---------------------------------------------------------------- Data-Out residuals
def test_write_with_less_data_writes_only_whole_blocks(lu, dev):
    run(lu, cdb10(0x2A, 0, 2), b"a" * 2 * BS)
    r = run(lu, cdb10(0x2A, 0, 2), b"b" * BS)            # EDTL = one block
    assert r.status == Status.GOOD and r.transfer_length == 2 * BS
    back = run(lu, cdb10(0x28, 0, 2)).data
    assert back[:BS] == b"b" * BS and back[BS:] == b"a" * BS


def test_write_with_no_or_partial_block_writes_nothing(lu, dev):
    dev.writes.clear()
    for data in (None, b"", b"x" * 200):
        r = run(lu, cdb10(0x2A, 0, 1), data)
        assert r.status == Status.GOOD and r.transfer_length == BS
    assert dev.writes == []


def test_write_with_more_data_writes_only_cdb_length(lu, dev):
    run(lu, cdb10(0x2A, 0, 2), b"a" * 2 * BS)
    r = run(lu, cdb10(0x2A, 0, 1), b"b" * 10000)
    assert r.status == Status.GOOD and r.transfer_length == BS
    back = run(lu, cdb10(0x28, 0, 2)).data
    assert back[:BS] == b"b" * BS and back[BS:] == b"a" * BS


# ---------------------------------------------------------------- VERIFY
def test_verify_bytchk_compare(lu):
    data = pattern(4, 3)
    run(lu, cdb10(0x2A, 100, 4), data)
    assert run(lu, cdb10(0x2F, 100, 4, b1=0x02), data).status == Status.GOOD
    bad = bytearray(data)
    bad[777] ^= 0x58
    s = assert_check(run(lu, cdb16(0x8F, 100, 4, b1=0x02), bytes(bad)), 0xE, 0x1D)
    assert s["valid"] and s["info"] == 777
    r = run(lu, cdb12(0xAF, 100, 4), bytes(bad))            # BYTCHK=0: no compare
    assert r.status == Status.GOOD and r.transfer_length == 0


def test_verify_bytchk_one_block_pattern(lu):
    block = bytes(range(256)) * 2
    run(lu, cdb10(0x2A, 200, 3), block * 3)
    r = run(lu, cdb10(0x2F, 200, 3, b1=0x06), block)
    assert r.status == Status.GOOD and r.transfer_length == BS
    run(lu, cdb10(0x2A, 201, 1), bytes(BS))
    s = assert_check(run(lu, cdb10(0x2F, 200, 3, b1=0x06), block), 0xE, 0x1D)
    assert s["info"] == BS + 1       # block 1 is zeros; byte 0 of the pattern is zero too
    assert_check(run(lu, cdb10(0x2F, 200, 3, b1=0x04), block), 5, 0x24)   # BYTCHK 10b


def test_write_and_verify(lu, dev):
    data = pattern(2, 9)
    dev.writes.clear()
    for op, build in ((0x2E, cdb10), (0xAE, cdb12), (0x8E, cdb16)):
        r = run(lu, build(op, 300, 2, b1=0x02), data)
        assert r.status == Status.GOOD and r.transfer_length == 2 * BS
        assert run(lu, cdb10(0x28, 300, 2)).data == data
    assert len(dev.writes) == 3


# ---------------------------------------------------------------- errors
def test_unknown_opcode(lu):
    s = assert_check(run(lu, [0xC5] + [0] * 15), 5, 0x20)
    assert s["sks"][2] == 0


def test_reservation_commands_are_in_the_table(lu):
    # Their behaviour is tested in test_scsi_pr.py.
    for op in (0x16, 0x17, 0x56, 0x57):
        assert lu.commands.find(op) is not None
    assert all(lu.commands.find(0x5E, sa) for sa in range(4))
    assert all(lu.commands.find(0x5F, sa) for sa in range(8))


def test_unknown_service_action_points_at_byte1(lu):
    s = assert_check(run(lu, [0x9E, 0x05] + [0] * 14), 5, 0x24)
    assert s["sks"][0] & 0x40 and s["sks"][2] == 1


def test_naca_refused(lu):
    s = assert_check(run(lu, cdb10(0x28, 0, 1, control=0x04)), 5, 0x24)
    assert s["sks"][2] == 9 and s["sks"][0] & 0x0F == 0x08 | 2


def test_short_cdb_is_invalid(lu):
    assert_check(run(lu, [0x28, 0, 0, 0]), 5, 0x24)


def test_read_only_lu(dev):
    unit = make_lu(dev, read_only=True)
    clear_ua(unit, N1)
    for cdb in (cdb10(0x2A, 0, 1), cdb16(0x8A, 0, 1), cdb6(0x0A, 0, 1), cdb10(0x2E, 0, 1)):
        assert_check(run(unit, cdb, bytes(BS)), 7, 0x27)
    assert dev.writes == []
    assert run(unit, cdb10(0x28, 0, 1)).status == Status.GOOD
    ms = run(unit, [0x1A, 0, 0x3F, 0, 255, 0]).data
    assert ms[2] & 0x80
    unit.read_only = False
    assert run(unit, cdb10(0x2A, 0, 1), bytes(BS)).status == Status.GOOD


def test_medium_errors_from_failing_device(lu, dev):
    dev.fail_reads = True
    assert_check(run(lu, cdb10(0x28, 0, 1)), 3, 0x11)
    assert_check(run(lu, cdb10(0x2F, 0, 1)), 3, 0x11)
    dev.fail_reads = False
    dev.fail_writes = True
    assert_check(run(lu, cdb10(0x2A, 0, 1), bytes(BS)), 3, 0x0C)
    dev.fail_writes = False
    assert run(lu, cdb10(0x2A, 0, 1), bytes(BS)).status == Status.GOOD


def test_offline_lu(lu):
    lu.online = False
    assert_check(run(lu, tur()), 2, 0x04, 0x12)
    assert_check(run(lu, cdb10(0x28, 0, 1)), 2, 0x04, 0x12)
    assert_check(run(lu, cdb10(0x25, 0, 0)), 2, 0x04, 0x12)
    assert run(lu, inquiry()).status == Status.GOOD
    rs = run(lu, [0x03, 0, 0, 0, 255, 0]).data
    assert parse_sense(rs)["key"] == 2
    lu.online = True
    assert_check(run(lu, tur()), 6, 0x28)       # NOT READY TO READY CHANGE
    assert run(lu, tur()).status == Status.GOOD


def test_start_stop_unit_non_removable(lu, dev):
    s = assert_check(run(lu, [0x1B, 0x01, 0, 0, 0x02, 0]), 5, 0x24)   # LOEJ eject
    assert s["sks"][2] == 4
    assert_check(run(lu, [0x1B, 0, 0, 0, 0x03, 0]), 5, 0x24)          # LOEJ load
    assert run(lu, [0x1B, 0, 0, 0, 0x01, 0]).status == Status.GOOD     # START
    flushes = dev.flushes
    assert run(lu, [0x1B, 0, 0, 0, 0x00, 0]).status == Status.GOOD     # STOP flushes
    assert dev.flushes == flushes + 1
    assert run(lu, [0x1B, 0, 0, 0, 0x04, 0]).status == Status.GOOD     # STOP NO_FLUSH
    assert dev.flushes == flushes + 1
    assert run(lu, tur()).status == Status.GOOD


def test_prevent_allow(lu):
    assert run(lu, [0x1E, 0, 0, 0, 1, 0]).status == Status.GOOD
    assert lu.nexus_state(N1).prevent
    assert run(lu, [0x1E, 0, 0, 0, 0, 0]).status == Status.GOOD
    assert not lu.nexus_state(N1).prevent
    assert_check(run(lu, [0x1E, 0, 0, 0, 2, 0]), 5, 0x24)


def test_read_defect_data(lu):
    r = run(lu, [0x37, 0, 0x18 | 0x03, 0, 0, 0, 0, 0, 32, 0])
    assert r.status == Status.GOOD and r.data == bytes((0, 0x1B, 0, 0))
    r = run(lu, [0xB7, 0x05, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0])
    assert r.status == Status.GOOD and r.data == bytes((0, 0x05)) + bytes(6)
    assert run(lu, [0x37, 0, 0, 0, 0, 0, 0, 0, 2, 0]).data == bytes(2)


# ---------------------------------------------------------------- unit attentions
def test_power_on_ua_on_first_command_then_cleared(dev):
    unit = make_lu(dev)
    assert run(unit, inquiry()).status == Status.GOOD       # INQUIRY: not reported
    assert_check(run(unit, cdb10(0x28, 0, 1)), 6, 0x29, 0x00)
    assert run(unit, cdb10(0x28, 0, 1)).status == Status.GOOD
    assert_check(run(unit, tur(), nexus=N2), 6, 0x29, 0x00)   # every nexus gets its own
    assert run(unit, tur(), nexus=N2).status == Status.GOOD


def test_request_sense_reports_and_clears_ua(dev):
    unit = make_lu(dev)
    r = run(unit, [0x03, 0, 0, 0, 252, 0])
    assert r.status == Status.GOOD
    s = parse_sense(r.data)
    assert (s["key"], s["asc"], s["ascq"]) == (6, 0x29, 0)
    assert run(unit, tur()).status == Status.GOOD
    r = run(unit, [0x03, 0x01, 0, 0, 252, 0])              # DESC=1, nothing pending
    s = parse_sense(r.data)
    assert s["code"] == 0x72 and s["key"] == 0


def test_resize_reports_capacity_changed(lu, dev, tmp_path):
    import os
    os.truncate(str(tmp_path / "lun0.img"), SIZE * 2)
    assert lu.resize() == 2 * NBLOCKS
    assert_check(run(lu, cdb10(0x25, 0, 0)), 6, 0x2A, 0x09)
    last, _ = struct.unpack(">II", run(lu, cdb10(0x25, 0, 0)).data)
    assert last == 2 * NBLOCKS - 1


def test_reset_supersedes_queued_uas(lu):
    lu.add_unit_attention(0x2A, 0x09)
    lu.add_unit_attention(0x2A, 0x09)      # no duplicates
    assert lu.pending_unit_attentions(N1) == [(0x2A, 0x09)]
    lu.reset()
    assert lu.pending_unit_attentions(N1) == [(0x29, 0x03)]
    lu.add_unit_attention(0x3F, 0x0E)      # subsumed by the pending reset
    assert lu.pending_unit_attentions(N1) == [(0x29, 0x03)]


def test_nexus_loss_forgets_state(lu):
    run(lu, [0x1E, 0, 0, 0, 1, 0])
    lu.nexus_lost(N1)
    assert_check(run(lu, tur()), 6, 0x29, 0x00)
    assert not lu.nexus_state(N1).prevent


# ---------------------------------------------------------------- dispatch hooks
def test_access_check_hook_runs_before_handler(lu, dev):
    seen = []

    def check(unit, cmd, spec):
        seen.append(spec.access)
        if spec.access == Access.WRITE:
            return ScsiResult(status=Status.RESERVATION_CONFLICT)
        return None

    lu.access_check = check
    assert run(lu, cdb10(0x2A, 0, 1), bytes(BS)).status == Status.RESERVATION_CONFLICT
    assert run(lu, cdb10(0x28, 0, 1)).status == Status.GOOD
    assert run(lu, inquiry()).status == Status.GOOD
    assert seen == [Access.WRITE, Access.READ, Access.ALLOWED]
    assert dev.writes == []


def test_register_new_command_in_private_table(dev):
    table = DEFAULT_TABLE.copy()

    def boom(unit, cmd):
        raise RuntimeError("bug")

    table.register(CommandSpec(0x42, "UNMAP", lambda u, c: ScsiResult(transfer_length=0), 10,
                               bytes([0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04]),
                               access=Access.WRITE, write=True))
    table.register(CommandSpec(0x9E, "GET LBA STATUS", boom, 16,
                               bytes([0x9E, 0x12] + [0xFF] * 12 + [0, 0x04]), sa=0x12))
    unit = make_lu(dev, commands=table)
    clear_ua(unit, N1)
    assert run(unit, [0x42] + [0] * 9).status == Status.GOOD
    assert_check(run(unit, [0x9E, 0x12] + [0] * 14), 4, 0x44)      # HARDWARE ERROR
    ops = rsoc_all(unit)
    assert (0x42, 0, False) in ops and (0x9E, 0x12, True) in ops
    # the default table is untouched
    unit2 = make_lu(dev)
    clear_ua(unit2, N1)
    assert_check(run(unit2, [0x42] + [0] * 9), 5, 0x20)


def test_usage_maps_match_cdb_lengths():
    for spec in DEFAULT_TABLE.all():
        assert len(spec.usage) == spec.cdb_len
        assert spec.usage[0] == spec.opcode
        if spec.sa is not None:
            assert spec.usage[1] & 0x1F == spec.sa


def test_may_block(lu):
    assert lu.may_block(ScsiCommand(bytes(cdb10(0x35, 0, 0)), 0, N1))
    assert lu.may_block(ScsiCommand(bytes(cdb10(0x2A, 0, 1, b1=0x08)), 0, N1))
    assert not lu.may_block(ScsiCommand(bytes(cdb10(0x2A, 0, 1)), 0, N1))
    assert not lu.may_block(ScsiCommand(bytes(cdb10(0x28, 0, 1)), 0, N1))
    lu.wce = False
    assert lu.may_block(ScsiCommand(bytes(cdb10(0x2A, 0, 1)), 0, N1))


# ---------------------------------------------------------------- REPORT SUPPORTED OPCODES
def rsoc(options=0, opcode=0, sa=0, rctd=False, alloc=65535):
    return [0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, sa >> 8, sa & 0xFF] \
        + list(struct.pack(">I", alloc)) + [0, 0]


def rsoc_all(unit, rctd=False):
    d = run(unit, rsoc(rctd=rctd)).data
    n = int.from_bytes(d[0:4], "big")
    assert n == len(d) - 4
    out = []
    pos = 4
    while pos < len(d):
        op, sa, flags = d[pos], int.from_bytes(d[pos + 2:pos + 4], "big"), d[pos + 5]
        assert bool(flags & 0x02) == rctd
        out.append((op, sa, bool(flags & 0x01)))
        if rctd:
            assert int.from_bytes(d[pos + 8:pos + 10], "big") == 0x0A
        pos += 20 if rctd else 8
    return out


def test_rsoc_all_commands(lu):
    ops = rsoc_all(lu)
    for op in (0x00, 0x03, 0x08, 0x0A, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x5A,
               0x88, 0x8A, 0xA0):
        assert (op, 0, False) in ops
    assert (0x9E, 0x10, True) in ops and (0xA3, 0x0C, True) in ops
    for _op, sa, servactv in ops:
        assert servactv or sa == 0
    assert ops == sorted(ops)
    assert rsoc_all(lu, rctd=True) == ops


def test_rsoc_one_command(lu):
    for op, sa, servactv in rsoc_all(lu):
        opt_ok, opt_bad = (2, 1) if servactv else (1, 2)
        r = run(lu, rsoc(opt_ok, op, sa))
        assert r.status == Status.GOOD
        d = r.data
        assert d[1] & 0x07 == 0x03
        cdb_len = int.from_bytes(d[2:4], "big")
        assert cdb_len and d[4] == op and len(d) == 4 + cdb_len
        assert_check(run(lu, rsoc(opt_bad, op, sa)), 5, 0x24)
    usage = run(lu, rsoc(1, 0x28)).data[4:]
    assert usage[1] & 0x18 == 0x18                    # DPO/FUA, as MODE SENSE DPOFUA says
    d = run(lu, rsoc(1, 0x2A, rctd=True)).data
    assert d[1] & 0x80 and len(d) == 4 + 10 + 12
    assert run(lu, rsoc(1, 0xC5)).data == bytes((0, 0x01, 0, 0))   # not supported
    assert run(lu, rsoc(3, 0x28)).status == Status.GOOD
    assert_check(run(lu, rsoc(5)), 5, 0x24)


def test_report_supported_tmfs(lu):
    d = run(lu, [0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]).data
    assert len(d) == 4 and d[0] & 0x08 and d[0] & 0x80     # LURS, ATS
    d = run(lu, [0xA3, 0x0D, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0]).data
    assert len(d) == 16 and d[3] == 0x0C


# ---------------------------------------------------------------- fuzz
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cdb=st.binary(min_size=1, max_size=16), data=st.none() | st.binary(max_size=2048))
def test_random_cdbs_never_raise(lu, cdb, data):
    r = run(lu, cdb, data)
    assert isinstance(r, ScsiResult)
    assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
    if r.status == Status.CHECK_CONDITION:
        s = parse_sense(r.sense)
        assert s["key"] in (2, 3, 5, 6, 7, 0xE)
