"""Thin provisioning: UNMAP, WRITE SAME (with/without UNMAP), GET LBA STATUS,
VPD B0h/B2h and READ CAPACITY(16) on LUs over sparse files."""

from __future__ import annotations

import os
import struct

import pytest

from storaged.scsi import thin
from storaged.scsi.types import Status
from tests.scsi_util import (
    BS,
    MiB,
    assert_check,
    cdb10,
    cdb16,
    good,
    inquiry_vpd,
    make_lu,
    read16,
    rsoc_all,
    run,
    write16,
)

SIZE = 16 * MiB
NBLOCKS = SIZE // BS
FS = 4096                 # filesystem block: what a punch frees


@pytest.fixture
def lu(tmp_path):
    unit = make_lu(str(tmp_path / "thin.img"), SIZE)
    yield unit
    unit.device.close()


def allocated(lu) -> int:
    return os.fstat(lu.device.fd).st_blocks * 512


def unmap_cdb(plen: int, anchor: int = 0) -> list[int]:
    return [0x42, anchor, 0, 0, 0, 0, 0, plen >> 8, plen & 0xFF, 0]


def unmap_params(*ranges: tuple[int, int], bddl: int | None = None) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    bddl = len(descs) if bddl is None else bddl
    return struct.pack(">HH4x", 6 + len(descs), bddl) + descs


def unmap(lu, *ranges, **kw):
    params = unmap_params(*ranges, **kw)
    return run(lu, unmap_cdb(len(params)), params)


def lba_status(lu, lba: int, alloc: int = 4096) -> list[tuple[int, int, int]]:
    r = good(run(lu, [0x9E, 0x12] + list(struct.pack(">QI", lba, alloc)) + [0, 0]))
    data = bytes(r.data)
    n = (int.from_bytes(data[0:4], "big") - 4) // 16
    out = []
    for i in range(n):
        at = 8 + 16 * i
        if at + 16 > len(data):
            break
        lba_, count, status = struct.unpack_from(">QIB", data, at)
        out.append((lba_, count, status & 0x0F))
    return out


# ---------------------------------------------------------------- reporting
def test_thin_lu_reports_provisioning(lu):
    rc = bytes(good(run(lu, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])).data)
    assert rc[14] & 0x80 and rc[14] & 0x40                     # LBPME, LBPRZ
    b2 = inquiry_vpd(lu, 0xB2)
    assert b2[5] & 0xE0 == 0xE0                                # LBPU, LBPWS, LBPWS10
    assert b2[5] & 0x04                                        # LBPRZ
    assert b2[5] & 0x02 == 0                                   # no ANC_SUP
    assert b2[6] & 0x07 == 0x02                                # thin provisioned
    b0 = inquiry_vpd(lu, 0xB0)
    assert b0[4] & 0x01 == 0                                   # WSNZ=0
    assert int.from_bytes(b0[20:24], "big") == 0xFFFFFFFF     # MAXIMUM UNMAP LBA COUNT
    assert int.from_bytes(b0[24:28], "big") == thin.MAX_UNMAP_DESCRIPTORS
    assert int.from_bytes(b0[28:32], "big") == FS // BS        # OPTIMAL UNMAP GRANULARITY
    assert b0[32] & 0x80                                       # UGAVALID, alignment 0
    assert int.from_bytes(b0[32:36], "big") & 0x7FFFFFFF == 0
    assert int.from_bytes(b0[36:44], "big") == lu.max_write_same_blocks < 0x10000
    ops = rsoc_all(lu)
    assert {(0x42, 0), (0x41, 0), (0x93, 0), (0x9E, 0x12)} <= ops


def test_fully_provisioned_lu_offers_no_unmap(tmp_path):
    lu = make_lu(str(tmp_path / "thick.img"), SIZE, thin=False)
    rc = bytes(good(run(lu, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])).data)
    assert rc[14] & 0xC0 == 0
    b2 = inquiry_vpd(lu, 0xB2)
    assert b2[5] == 0 and b2[6] & 0x07 == 0
    b0 = inquiry_vpd(lu, 0xB0)
    assert int.from_bytes(b0[20:28], "big") == 0
    ops = rsoc_all(lu)
    assert (0x42, 0) not in ops and (0x48, 2) not in ops
    assert (0x9E, 0x12) in ops                                  # everything mapped
    assert lba_status(lu, 0) == [(0, NBLOCKS, thin.MAPPED)]
    assert (0x41, 0) in ops and (0x93, 0) in ops                # WRITE SAME stays
    assert_check(run(lu, unmap_cdb(24), unmap_params((0, 8))), 5, 0x20)
    assert_check(run(lu, cdb10(0x41, 0, 8, b1=0x08), bytes(BS)), 5, 0x24)   # UNMAP bit
    good(run(lu, cdb10(0x41, 0, 8), b"\xab" * BS))
    lu.device.close()


def test_sparse_file_device_is_thin(tmp_path):
    lu = make_lu(str(tmp_path / "a.img"), SIZE)
    assert lu.device.thin and lu.lbpme
    lu.device.close()


# ---------------------------------------------------------------- UNMAP
def test_unmap_punches_holes_and_reads_zeros(lu):
    good(write16(lu, 0, b"\x5a" * (2 * MiB)))
    before = allocated(lu)
    assert before >= 2 * MiB
    good(unmap(lu, (0, 1024), (2048, 1024)))                   # two 512 KiB holes
    assert allocated(lu) <= before - MiB
    assert read16(lu, 0, 1024) == bytes(1024 * BS)
    assert read16(lu, 1024, 1024) == b"\x5a" * (1024 * BS)
    assert read16(lu, 2048, 1024) == bytes(1024 * BS)
    assert lu.device.is_mapped(0, 512 * 1024) == [(0, 512 * 1024, False)]


def test_unmap_of_part_of_a_filesystem_block_zeroes_but_stays_mapped(lu):
    good(write16(lu, 0, b"\x11" * FS))
    good(unmap(lu, (1, 2)))
    data = read16(lu, 0, FS // BS)
    assert data == b"\x11" * BS + bytes(2 * BS) + b"\x11" * (FS - 3 * BS)
    assert lba_status(lu, 0)[0][:3:2] == (0, thin.MAPPED)


def test_unmap_refusals_change_nothing(lu):
    good(write16(lu, 0, b"\x77" * FS))
    # a descriptor past the end refuses the whole command
    assert_check(unmap(lu, (0, 8), (NBLOCKS - 1, 2)), 5, 0x21)
    assert read16(lu, 0, 8) == b"\x77" * FS
    assert_check(run(lu, unmap_cdb(4), bytes(4)), 5, 0x1A)     # < 8 bytes
    assert_check(run(lu, unmap_cdb(24, anchor=1), unmap_params((0, 8))), 5, 0x24)
    many = [(i * 8, 8) for i in range(thin.MAX_UNMAP_DESCRIPTORS + 1)]
    params = unmap_params(*many)
    assert_check(run(lu, unmap_cdb(len(params)), params), 5, 0x26)
    assert read16(lu, 0, 8) == b"\x77" * FS
    lu.read_only = True
    assert_check(unmap(lu, (0, 8)), 7, 0x27)
    lu.read_only = False
    good(run(lu, unmap_cdb(0)))                                # nothing to do
    good(unmap(lu, (NBLOCKS - 8, 0), (NBLOCKS, 0)))            # empty descriptors


def test_unmap_ignores_truncated_descriptor(lu):
    good(write16(lu, 0, b"\x33" * (2 * FS)))
    params = unmap_params((0, 8), (8, 8), bddl=16 + 8)         # second one cut short
    good(run(lu, unmap_cdb(len(params)), params))
    assert read16(lu, 0, 8) == bytes(FS)
    assert read16(lu, 8, 8) == b"\x33" * FS


# ---------------------------------------------------------------- WRITE SAME
@pytest.mark.parametrize("sixteen", [False, True])
def test_write_same_writes_pattern(lu, sixteen):
    block = bytes(range(256)) * 2
    cdb = cdb16(0x93, 100, 300) if sixteen else cdb10(0x41, 100, 300)
    r = good(run(lu, cdb, block))
    assert r.transfer_length == BS
    assert read16(lu, 100, 300) == block * 300
    assert read16(lu, 99, 1) == bytes(BS) and read16(lu, 400, 1) == bytes(BS)


@pytest.mark.parametrize("sixteen", [False, True])
def test_write_same_unmap_deallocates(lu, sixteen):
    good(write16(lu, 0, b"\xee" * MiB))
    before = allocated(lu)
    cdb = cdb16(0x93, 0, 2048, b1=0x08) if sixteen else cdb10(0x41, 0, 2048, b1=0x08)
    good(run(lu, cdb, b"\xff" * BS))            # SBC-3: data is not written when unmapping
    assert allocated(lu) <= before - MiB
    assert read16(lu, 0, 2048) == bytes(MiB)
    assert lba_status(lu, 0) == [(0, NBLOCKS, thin.DEALLOCATED)]


def test_write_same_zero_blocks_means_to_the_end(lu):
    good(write16(lu, NBLOCKS - 64, b"\x99" * (64 * BS)))
    good(run(lu, cdb16(0x93, NBLOCKS - 64, 0, b1=0x08), bytes(BS)))
    assert read16(lu, NBLOCKS - 64, 64) == bytes(64 * BS)
    good(run(lu, cdb10(0x41, NBLOCKS - 16, 0), b"\x42" * BS))
    assert read16(lu, NBLOCKS - 16, 16) == b"\x42" * (16 * BS)
    # from LBA 0 the whole LU is longer than MAXIMUM WRITE SAME LENGTH? (16 MiB: no)
    assert NBLOCKS <= lu.max_write_same_blocks


def test_write_same_limits_and_errors(lu):
    lu.max_write_same_blocks = 100
    assert_check(run(lu, cdb16(0x93, 0, 101), bytes(BS)), 5, 0x24)
    good(run(lu, cdb16(0x93, 0, 100), bytes(BS)))
    assert_check(run(lu, cdb16(0x93, 0, 0), bytes(BS)), 5, 0x24)          # 0: to the end
    good(run(lu, cdb16(0x93, NBLOCKS - 100, 0), bytes(BS)))
    assert_check(run(lu, cdb16(0x93, NBLOCKS - 1, 2), bytes(BS)), 5, 0x21)
    assert_check(run(lu, cdb16(0x93, NBLOCKS + 1, 0), bytes(BS)), 5, 0x21)
    assert_check(run(lu, cdb16(0x93, 0, 1), bytes(BS // 2)), 5, 0x24)      # short Data-Out
    assert_check(run(lu, cdb16(0x93, 0, 1), bytes(2 * BS)), 5, 0x24)       # long Data-Out
    assert_check(run(lu, cdb16(0x93, 0, 1, b1=0x10), bytes(BS)), 5, 0x24)  # ANCHOR
    assert_check(run(lu, cdb16(0x93, 0, 1, b1=0x20), bytes(BS)), 5, 0x24)  # WRPROTECT
    assert_check(run(lu, cdb16(0x93, 0, 1, b1=0x02), bytes(BS)), 5, 0x24)  # LBDATA
    assert_check(run(lu, cdb10(0x41, 0, 1, b1=0x01), bytes(BS)), 5, 0x24)  # reserved
    lu.read_only = True
    assert_check(run(lu, cdb16(0x93, 0, 1), bytes(BS)), 7, 0x27)


def test_write_same16_ndob(lu):
    good(write16(lu, 0, b"\x01" * FS))
    r = good(run(lu, cdb16(0x93, 0, 8, b1=0x01)))       # NDOB: zeros, no Data-Out
    assert r.transfer_length == 0
    assert read16(lu, 0, 8) == bytes(FS)


def test_write_same_write_through_flushes(lu, monkeypatch):
    flushes = []
    monkeypatch.setattr(lu.device, "flush", lambda: flushes.append(1))
    lu.wce = False
    good(run(lu, cdb10(0x41, 0, 8), bytes(BS)))
    assert flushes


# ---------------------------------------------------------------- GET LBA STATUS
def test_get_lba_status_reports_extents(lu):
    good(write16(lu, 0, b"\x01" * (64 * BS)))
    good(write16(lu, 128, b"\x02" * (64 * BS)))
    st = lba_status(lu, 0)
    assert st[:3] == [(0, 64, thin.MAPPED), (64, 64, thin.DEALLOCATED),
                      (128, 64, thin.MAPPED)]
    assert st[3] == (192, NBLOCKS - 192, thin.DEALLOCATED)
    assert len(st) == 4
    # from the middle of an extent
    assert lba_status(lu, 100)[0] == (100, 28, thin.DEALLOCATED)
    # the allocation length limits the descriptors; the header tells what was built
    r = good(run(lu, [0x9E, 0x12] + list(struct.pack(">QI", 0, 24)) + [0, 0]))
    assert len(r.data) == 24 and int.from_bytes(r.data[0:4], "big") == 20
    assert_check(run(lu, [0x9E, 0x12] + list(struct.pack(">QI", NBLOCKS, 24)) + [0, 0]),
                 5, 0x21)


def test_get_lba_status_after_unmap_single_physical_blocks(lu):
    per = FS // BS
    good(write16(lu, 0, b"A" * ((256 + per) * BS)))
    for lba in range(0, 256, per):
        good(unmap(lu, (lba, per)))
        assert lba_status(lu, lba)[0] == (lba, per, thin.DEALLOCATED)
        assert lba_status(lu, lba + per)[0][::2] == (lba + per, thin.MAPPED)


def test_lba_status_windows_merge(lu, monkeypatch):
    monkeypatch.setattr(thin, "STATUS_WINDOW", 64 * 1024)   # 128 blocks per question
    good(write16(lu, 0, b"\x01" * (1000 * BS)))
    st = thin.lba_status(lu, 0, 10)
    assert st[0] == (0, 1000, thin.MAPPED)
    assert st[1] == (1000, NBLOCKS - 1000, thin.DEALLOCATED)


def test_allocation_shrinks_on_disk(lu):
    """The space really goes back to the filesystem (what `du` shows)."""
    good(write16(lu, 0, os.urandom(4 * MiB)))
    full = allocated(lu)
    good(unmap(lu, (0, 8192)))
    assert allocated(lu) < full - 3 * MiB
    assert Status.GOOD == run(lu, [0x35] + [0] * 9).status
