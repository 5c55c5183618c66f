"""EXTENDED COPY (LID1), RECEIVE COPY RESULTS and VPD 8Fh: copies within one
LU and between two LUs of a ScsiTarget (VMware XCOPY), limits, errors."""

from __future__ import annotations

import os
import struct

import pytest

from storaged.scsi import thin, xcopy
from storaged.scsi.target import ScsiTarget
from storaged.scsi.types import ScsiCommand, ScsiResult, Status
from tests.scsi_util import (
    BS,
    N1,
    N2,
    MiB,
    assert_check,
    clear_ua,
    good,
    inquiry_vpd,
    make_lu,
    read16,
    run,
    write16,
)

SIZE = 8 * MiB
TARGET = N1.target_name


@pytest.fixture
def target(tmp_path):
    lu0 = make_lu(str(tmp_path / "a.img"), SIZE, n=0)
    lu1 = make_lu(str(tmp_path / "b.img"), SIZE, n=1)
    t = ScsiTarget(TARGET)
    t.set_luns({0: lu0, 1: lu1})
    for lu in (lu0, lu1):
        clear_ua(lu, N1)
        clear_ua(lu, N2)
    yield t
    lu0.device.close()
    lu1.device.close()


def tx(t: ScsiTarget, lun: int, cdb, data=None, nexus=N1) -> ScsiResult:
    return t.execute(ScsiCommand(bytes(cdb), lun, nexus, data))


def cscd(lu, *, dtype: int = 0xE4, naa: bool = True, periph: int = 0,
         block_len: int | None = None, lu_id_type: int = 0) -> bytes:
    d = bytearray(32)
    d[0] = dtype
    d[1] = (lu_id_type << 6) | periph
    if naa:
        value = bytes.fromhex(lu.wwn)
        d[4], d[5] = 0x01, 0x03                           # binary, LU, NAA
    else:
        value = lu.vendor.ljust(8).encode() + lu.serial.encode()
        d[4], d[5] = 0x02, 0x01                           # ASCII, LU, T10 vendor ID
    d[7] = len(value)
    d[8:8 + len(value)] = value
    d[29:32] = (lu.block_size if block_len is None else block_len).to_bytes(3, "big")
    return bytes(d)


def b2b(src: int, dst: int, n: int, src_lba: int, dst_lba: int, dc: int = 0) -> bytes:
    return struct.pack(">BBHHH2xHQQ", 0x02, dc << 1, 0x18, src, dst, n, src_lba, dst_lba)


def params(cscds: list[bytes], segs: list[bytes], list_id: int = 1, usage: int = 0,
           inline: int = 0) -> bytes:
    c, s = b"".join(cscds), b"".join(segs)
    head = bytes((list_id, usage << 3)) + len(c).to_bytes(2, "big") + bytes(4) \
        + len(s).to_bytes(4, "big") + inline.to_bytes(4, "big")
    return head + c + s


def xcopy_cdb(plen: int) -> list[int]:
    return [0x83, 0x00] + [0] * 8 + list(plen.to_bytes(4, "big")) + [0, 0]


def rcr_cdb(sa: int, list_id: int = 0, alloc: int = 1024) -> list[int]:
    return [0x84, sa, list_id] + [0] * 7 + list(alloc.to_bytes(4, "big")) + [0, 0]


def do_xcopy(t, lun, p, nexus=N1):
    return tx(t, lun, xcopy_cdb(len(p)), p, nexus)


# ---------------------------------------------------------------- copying
def test_copy_between_two_luns(target):
    lu0, lu1 = target.luns[0], target.luns[1]
    data = os.urandom(300 * BS)
    good(write16(lu0, 10, data))
    p = params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 300, 10, 1000)], usage=2)
    r = good(do_xcopy(target, 0, p))
    assert r.transfer_length == len(p)
    assert read16(lu1, 1000, 300) == data
    # the copy manager may be the destination too, named by T10 vendor ID
    p = params([cscd(lu1, naa=False), cscd(lu0)], [b2b(0, 1, 300, 1000, 5000)], usage=3,
               list_id=0)
    good(do_xcopy(target, 1, p))
    assert read16(lu0, 5000, 300) == data


def test_copy_within_one_lun_large_and_overlapping(target, monkeypatch):
    monkeypatch.setattr(xcopy, "COPY_CHUNK", 64 * 1024)      # many chunks
    lu0 = target.luns[0]
    data = os.urandom(2048 * BS)
    good(write16(lu0, 0, data))
    # overlapping, destination after source: copied backwards
    good(do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 2048, 0, 100)])))
    assert read16(lu0, 100, 2048) == data
    # overlapping, destination before source: copied forwards
    good(write16(lu0, 0, data))
    good(write16(lu0, 2048, bytes(200 * BS)))
    good(do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 2048, 100, 0)])))
    assert read16(lu0, 0, 1948) == data[100 * BS:]


def test_copy_keeps_thin_destination_thin(target):
    lu0, lu1 = target.luns[0], target.luns[1]
    good(write16(lu1, 0, b"\xee" * MiB))                      # dest has data everywhere
    good(write16(lu0, 0, b"\x01" * (64 * BS)))                # source: data, then a hole
    good(do_xcopy(target, 0, params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 2048, 0, 0)])))
    assert read16(lu1, 0, 2048) == b"\x01" * (64 * BS) + bytes((2048 - 64) * BS)
    st = thin.lba_status(lu1, 0, 4)
    assert st[0] == (0, 64, thin.MAPPED)
    assert st[1][0] == 64 and st[1][2] == thin.DEALLOCATED


def test_several_segments_and_copy_status(target):
    lu0, lu1 = target.luns[0], target.luns[1]
    good(write16(lu0, 0, b"a" * BS + b"b" * BS))
    segs = [b2b(0, 1, 1, 0, 10), b2b(0, 1, 1, 1, 20), b2b(0, 1, 0, 0, 30)]
    good(do_xcopy(target, 0, params([cscd(lu0), cscd(lu1)], segs, list_id=7)))
    assert read16(lu1, 10, 1) == b"a" * BS and read16(lu1, 20, 1) == b"b" * BS
    st = bytes(good(tx(target, 0, rcr_cdb(0, 7))).data)
    assert st[:4] == bytes((0, 0, 0, 8))
    assert st[4] == 0x01                                      # completed, no errors
    assert int.from_bytes(st[5:7], "big") == 3                # segments processed
    assert st[7] == 0 and int.from_bytes(st[8:12], "big") == 2 * BS
    # held per I_T nexus, forgotten when the nexus goes
    assert_check(tx(target, 0, rcr_cdb(0, 7), nexus=N2), 5, 0x24)
    assert_check(tx(target, 0, rcr_cdb(0, 8)), 5, 0x24)
    failure = bytes(good(tx(target, 0, rcr_cdb(4, 7))).data)
    assert failure == bytes(4)
    target.nexus_lost(N1)
    clear_ua(lu0, N1)
    assert_check(tx(target, 0, rcr_cdb(0, 7)), 5, 0x24)


def test_usage_10b_holds_nothing(target):
    lu0 = target.luns[0]
    good(do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 1, 0, 1)], list_id=3, usage=2)))
    assert_check(tx(target, 0, rcr_cdb(0, 3)), 5, 0x24)


def test_parameter_list_length_zero_is_a_noop(target):
    good(tx(target, 0, xcopy_cdb(0)))


# ---------------------------------------------------------------- limits
def test_operating_parameters_and_vpd_8f_agree(target):
    lu0 = target.luns[0]
    op = bytes(good(tx(target, 0, rcr_cdb(3))).data)
    assert int.from_bytes(op[0:4], "big") == len(op) - 4
    assert op[4] & 0x01                                       # SNLID
    assert int.from_bytes(op[8:10], "big") == xcopy.MAX_CSCD_DESCRIPTORS
    assert int.from_bytes(op[10:12], "big") == xcopy.MAX_SEGMENT_DESCRIPTORS
    assert int.from_bytes(op[12:16], "big") == xcopy.MAX_DESCRIPTOR_LIST_LENGTH
    assert int.from_bytes(op[16:20], "big") == 0xFFFF * BS
    assert int.from_bytes(op[20:24], "big") == 0              # no inline data
    assert op[37] == 9                                        # 512-byte granularity
    assert op[44:44 + op[43]] == bytes((0x02, 0xE4))
    page = inquiry_vpd(lu0, 0x8F)
    assert page[1] == 0x8F and int.from_bytes(page[2:4], "big") == len(page) - 4
    descs = {}
    at = 4
    while at < len(page):
        dtype, dlen = struct.unpack_from(">HH", page, at)
        assert (dlen + 4) % 4 == 0
        descs[dtype] = page[at + 4:at + 4 + dlen]
        at += 4 + dlen
    assert set(descs) == {0x0001, 0x0004, 0x0008, 0x000C, 0x8001}
    cmds = descs[0x0001]
    assert cmds[1:1 + cmds[0]] == bytes((0x83, 1, 0x00, 0x84, 3, 0x00, 0x03, 0x04))
    pd = descs[0x0004]
    assert int.from_bytes(pd[4:6], "big") == xcopy.MAX_CSCD_DESCRIPTORS
    assert int.from_bytes(pd[6:8], "big") == xcopy.MAX_SEGMENT_DESCRIPTORS
    assert int.from_bytes(pd[8:12], "big") == xcopy.MAX_DESCRIPTOR_LIST_LENGTH
    sd = descs[0x0008]
    assert sd[1:1 + sd[0]] == bytes((0x02, 0xE4))
    assert int.from_bytes(descs[0x8001][8:12], "big") == 0xFFFF * BS
    std = bytes(good(run(lu0, [0x12, 0, 0, 0, 96, 0])).data)
    assert std[5] & 0x08                                      # 3PC


def test_descriptor_limits(target):
    lu0 = target.luns[0]
    m = xcopy.MAX_CSCD_DESCRIPTORS
    r = do_xcopy(target, 0, params([cscd(lu0)] * (m + 1), [b2b(0, 0, 1, 0, 1)]))
    assert_check(r, 5, 0x26, 0x06)                            # TOO MANY TARGET DESCRIPTORS
    s = xcopy.MAX_SEGMENT_DESCRIPTORS
    r = do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 1, 0, 1)] * (s + 1)))
    assert_check(r, 5, 0x26, 0x08)                            # TOO MANY SEGMENT DESCRIPTORS
    over = (xcopy.MAX_DESCRIPTOR_LIST_LENGTH - (m + 1) * 32) // 28 + 1
    r = do_xcopy(target, 0, params([cscd(lu0)] * (m + 1), [b2b(0, 0, 1, 0, 1)] * over))
    assert_check(r, 5, 0x1A)                                  # PARAMETER LIST LENGTH ERROR
    r = do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 1, 0, 1)], inline=4) + bytes(4))
    assert_check(r, 5, 0x26, 0x0B)                            # INLINE DATA LENGTH EXCEEDED


def test_truncated_parameter_lists(target):
    lu0 = target.luns[0]
    p = params([cscd(lu0)], [b2b(0, 0, 1, 0, 1)])
    for cut in (16 + 31, len(p) - 1, 10):
        assert_check(tx(target, 0, xcopy_cdb(cut), p[:cut]), 5, 0x1A)


def test_unsupported_descriptor_types(target):
    lu0 = target.luns[0]
    r = do_xcopy(target, 0, params([cscd(lu0, dtype=0xE0)], [b2b(0, 0, 1, 0, 1)]))
    assert_check(r, 5, 0x26, 0x07)
    stream = struct.pack(">BBHHH", 0x03, 0, 0x10, 0, 0) + bytes(12)
    r = do_xcopy(target, 0, params([cscd(lu0)], [stream]))
    assert_check(r, 5, 0x26, 0x09)
    r = do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 1, 0, 1)], usage=1))
    assert_check(r, 5, 0x26)
    r = do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 0, 1, 0, 1)], usage=3, list_id=5))
    assert_check(r, 5, 0x26)
    # a reserved LU ID TYPE is ignored (SPC-4)
    good(do_xcopy(target, 0, params([cscd(lu0, lu_id_type=3)], [b2b(0, 0, 1, 0, 1)])))


# ---------------------------------------------------------------- segment errors
def test_segment_errors_abort_the_copy(target):
    lu0, lu1 = target.luns[0], target.luns[1]
    nb = lu0.num_blocks
    good(write16(lu1, 0, b"\x55" * BS))
    # CSCD index out of the list
    s = assert_check(do_xcopy(target, 0, params([cscd(lu0)], [b2b(0, 1, 1, 0, 0)])),
                     0x0A, 0x0D, 0x02)
    assert s["csi"] == 0 and s["sks"] == bytes((0xA0, 0, 6))
    # beyond the end of the destination: the first segment was copied, the
    # second fails (COPY ABORTED, segment 1)
    r = do_xcopy(target, 0, params([cscd(lu0), cscd(lu1)],
                                   [b2b(0, 1, 1, 0, 0), b2b(0, 1, 16, 0, nb - 1)], list_id=9))
    s = assert_check(r, 0x0A, 0x00, 0x00)
    assert s["csi"] == 1 and s["sks"] == bytes((0xA0, 0, 20))  # second segment, DESTINATION LBA
    st = bytes(good(tx(target, 0, rcr_cdb(0, 9))).data)
    assert st[4] == 0x02 and int.from_bytes(st[5:7], "big") == 1
    assert read16(lu1, 0, 1) == bytes(BS)
    good(write16(lu1, 0, b"\x55" * BS))
    failure = bytes(good(tx(target, 0, rcr_cdb(4, 9))).data)
    assert failure[56] == Status.CHECK_CONDITION and failure[60] & 0x7F == 0x70
    # designator that names no LU of this target
    other = make_lu(os.path.join(os.path.dirname(lu0.device.path), "c.img"), MiB, n=5)
    assert_check(do_xcopy(target, 0, params([cscd(lu0), cscd(other)], [b2b(0, 1, 1, 0, 0)])),
                 0x0A, 0x0D, 0x02)
    other.device.close()
    # block length mismatch, non-block device type
    assert_check(do_xcopy(target, 0, params([cscd(lu0, block_len=4096)],
                                            [b2b(0, 0, 1, 0, 1)])), 0x0A, 0x0D, 0x03)
    assert_check(do_xcopy(target, 0, params([cscd(lu0, periph=1)], [b2b(0, 0, 1, 0, 1)])),
                 0x0A, 0x0D, 0x03)
    # write-protected destination
    lu1.read_only = True
    assert_check(do_xcopy(target, 0, params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 1, 0, 0)])),
                 0x0A, 0x00, 0x00)
    lu1.read_only = False
    assert read16(lu1, 0, 1) == b"\x55" * BS


def test_luns_of_other_targets_are_unreachable(tmp_path):
    lu0 = make_lu(str(tmp_path / "a.img"), MiB, n=0)
    lu1 = make_lu(str(tmp_path / "b.img"), MiB, n=1)
    t1, t2 = ScsiTarget(TARGET), ScsiTarget("iqn.2024-01.test:other")
    t1.set_luns({0: lu0})
    t2.set_luns({0: lu1})
    clear_ua(lu0, N1)
    r = do_xcopy(t1, 0, params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 1, 0, 0)]))
    assert_check(r, 0x0A, 0x0D, 0x02)
    # once mapped into the same target it is reachable; unmapped again, not
    t1.set_luns({0: lu0, 3: lu1})
    clear_ua(lu0, N1)
    good(do_xcopy(t1, 0, params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 1, 0, 0)])))
    t1.set_luns({0: lu0})
    clear_ua(lu0, N1)
    assert_check(do_xcopy(t1, 0, params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 1, 0, 0)])),
                 0x0A, 0x0D, 0x02)
    lu0.device.close()
    lu1.device.close()


def test_reservations_of_the_other_lu_apply(target):
    lu0, lu1 = target.luns[0], target.luns[1]

    def refuse_writes(unit, cmd, spec):
        return ScsiResult(status=Status.RESERVATION_CONFLICT) if spec.write else None

    lu1.access_check = refuse_writes
    r = do_xcopy(target, 0, params([cscd(lu0), cscd(lu1)], [b2b(0, 1, 1, 0, 0)]))
    assert_check(r, 0x0A, 0x00, 0x00)
    good(do_xcopy(target, 0, params([cscd(lu1), cscd(lu0)], [b2b(0, 1, 1, 0, 0)])))  # reads ok


def test_xcopy_runs_off_the_event_loop(target):
    cmd = ScsiCommand(bytes(xcopy_cdb(64)), 0, N1)
    assert target.may_block(cmd)
