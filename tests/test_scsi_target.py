"""ScsiTarget: LUN map, REPORT LUNS, nonexistent LUNs, task management, nexus loss."""

from __future__ import annotations

import pytest

from storaged.block.file import FileBlockDevice
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.target import ScsiTarget
from storaged.scsi.types import (
    Nexus,
    ScsiCommand,
    ScsiResult,
    Status,
    TmfFunction,
    TmfResponse,
    decode_lun,
    encode_lun,
)

BS = 512
N1 = Nexus("iqn.a,i,0x1", "iqn.t,t,0x1", 1, "iqn.a", "iqn.t")
N2 = Nexus("iqn.b,i,0x2", "iqn.t,t,0x1", 1, "iqn.b", "iqn.t")


def wwn(i: int) -> str:
    return "6" + f"{i:031x}"


@pytest.fixture
def devs(tmp_path):
    out = [FileBlockDevice(str(tmp_path / f"d{i}"), block_size=BS, create_size=1 << 20)
           for i in range(3)]
    yield out
    for d in out:
        d.close()


@pytest.fixture
def target(devs):
    t = ScsiTarget("iqn.t")
    t.set_luns({0: LogicalUnit(devs[0], name="a", serial="A", wwn=wwn(1)),
                1: LogicalUnit(devs[1], name="b", serial="B", wwn=wwn(2))})
    for lun in (0, 1):
        for n in (N1, N2):
            settle(t, lun, n)
    return t


def run(t: ScsiTarget, lun: int, cdb, data=None, nexus=N1) -> ScsiResult:
    return t.execute(ScsiCommand(bytes(cdb), lun, nexus, data))


def settle(t: ScsiTarget, lun: int, nexus: Nexus) -> None:
    for _ in range(10):
        if run(t, lun, [0] * 6, nexus=nexus).status == Status.GOOD:
            return
    raise AssertionError("UAs never cleared")


def key_asc(r: ScsiResult) -> tuple[int, int, int]:
    assert r.status == Status.CHECK_CONDITION, r
    s = r.sense
    if s[0] & 0x7F in (0x72, 0x73):
        return s[1] & 0xF, s[2], s[3]
    return s[2] & 0xF, s[12], s[13]


def report_luns(select=0, alloc=4096):
    return [0xA0, 0, select, 0, 0, 0] + list(alloc.to_bytes(4, "big")) + [0, 0]


def luns_of(data: bytes) -> list[int]:
    n = int.from_bytes(data[0:4], "big")
    assert n % 8 == 0 and data[4:8] == bytes(4)
    return [decode_lun(data[8 + i:16 + i]) for i in range(0, n, 8)]


# ---------------------------------------------------------------- REPORT LUNS
def test_report_luns_from_any_lun(target):
    for lun in (0, 1, 7):
        r = run(target, lun, report_luns())
        assert r.status == Status.GOOD
        assert luns_of(r.data) == [0, 1]
    assert luns_of(run(target, 0, report_luns(select=2)).data) == [0, 1]
    assert luns_of(run(target, 0, report_luns(select=1)).data) == []


def test_report_luns_encoding_and_truncation(devs):
    t = ScsiTarget("iqn.t")
    t.set_luns({300: LogicalUnit(devs[0], name="x", serial="X", wwn=wwn(9)),
                5: LogicalUnit(devs[1], name="y", serial="Y", wwn=wwn(8))})
    d = run(t, 0, report_luns()).data
    assert d[8:16] == encode_lun(5) and d[16:24] == encode_lun(300)
    assert d[16] >> 6 == 1                                 # flat space addressing
    r = run(t, 0, report_luns(alloc=16))
    assert len(r.data) == 16 and int.from_bytes(r.data[0:4], "big") == 16


def test_report_luns_invalid_fields(target):
    assert key_asc(run(target, 0, report_luns(alloc=15))) == (5, 0x24, 0)
    assert key_asc(run(target, 9, report_luns(alloc=8))) == (5, 0x24, 0)
    assert key_asc(run(target, 0, report_luns(select=3))) == (5, 0x24, 0)


# ---------------------------------------------------------------- nonexistent LUN
def test_inquiry_to_missing_lun(target):
    r = run(target, 5, [0x12, 0, 0, 0, 96, 0])
    assert r.status == Status.GOOD
    assert r.data[0] == 0x7F                               # qualifier 011b, type 1Fh
    assert r.data[4] == len(r.data) - 5
    r = run(target, 5, [0x12, 1, 0, 0, 96, 0])
    assert r.status == Status.GOOD and r.data[0] == 0x7F


def test_request_sense_to_missing_lun(target):
    r = run(target, 5, [0x03, 0, 0, 0, 18, 0])
    assert r.status == Status.GOOD
    assert (r.data[2] & 0xF, r.data[12], r.data[13]) == (5, 0x25, 0)


def test_other_commands_to_missing_lun(target):
    assert key_asc(run(target, 5, [0] * 6)) == (5, 0x25, 0)
    assert key_asc(run(target, 5, [0x28] + [0] * 9)) == (5, 0x25, 0)


def test_io_is_routed_to_the_right_lu(target):
    run(target, 0, [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], b"0" * BS)
    run(target, 1, [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], b"1" * BS)
    assert run(target, 0, [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).data == b"0" * BS
    assert run(target, 1, [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).data == b"1" * BS


# ---------------------------------------------------------------- LUN map changes
def test_set_luns_raises_reported_luns_changed(target, devs):
    lu2 = LogicalUnit(devs[2], name="c", serial="C", wwn=wwn(3))
    target.set_luns({**target.luns, 2: lu2})
    assert key_asc(run(target, 0, [0] * 6)) == (6, 0x3F, 0x0E)
    assert key_asc(run(target, 1, [0] * 6, nexus=N2)) == (6, 0x3F, 0x0E)
    # REPORT LUNS clears it on every LU for that nexus
    assert luns_of(run(target, 0, report_luns(), nexus=N2).data) == [0, 1, 2]
    assert run(target, 0, [0] * 6, nexus=N2).status == Status.GOOD
    # the new LU starts with POWER ON
    assert key_asc(run(target, 2, [0] * 6)) == (6, 0x29, 0x00)


def test_set_luns_same_map_is_silent(target):
    target.set_luns(dict(target.luns))
    assert run(target, 0, [0] * 6).status == Status.GOOD


# ---------------------------------------------------------------- task management
def test_lun_reset_ua_for_every_nexus(target):
    assert target.task_management(TmfFunction.LOGICAL_UNIT_RESET, 0, N1) == \
        TmfResponse.COMPLETE
    assert key_asc(run(target, 0, [0] * 6, nexus=N1)) == (6, 0x29, 0x03)
    assert key_asc(run(target, 0, [0] * 6, nexus=N2)) == (6, 0x29, 0x03)
    assert run(target, 0, [0] * 6).status == Status.GOOD
    assert run(target, 1, [0] * 6).status == Status.GOOD    # other LU untouched


def test_tmf_unknown_lun(target):
    for fn in (TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.ABORT_TASK,
               TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET):
        assert target.task_management(fn, 9, N1) == TmfResponse.NO_LUN
    assert target.task_management(TmfFunction.ABORT_TASK, 0, N1) == TmfResponse.COMPLETE
    assert target.task_management(TmfFunction.CLEAR_ACA, 0, N1) == TmfResponse.NOT_SUPPORTED


def test_target_resets(target):
    assert target.task_management(TmfFunction.TARGET_WARM_RESET, 0, N1) == \
        TmfResponse.COMPLETE
    for lun in (0, 1):
        assert key_asc(run(target, lun, [0] * 6, nexus=N2)) == (6, 0x29, 0x03)
    assert target.task_management(TmfFunction.TARGET_COLD_RESET, 0, N1) == \
        TmfResponse.COMPLETE
    for lun in (0, 1):
        assert key_asc(run(target, lun, [0] * 6, nexus=N1)) == (6, 0x29, 0x01)


def test_nexus_lost(target):
    run(target, 0, [0x1E, 0, 0, 0, 1, 0])
    target.nexus_lost(N1)
    assert key_asc(run(target, 0, [0] * 6)) == (6, 0x29, 0x00)
    assert key_asc(run(target, 1, [0] * 6)) == (6, 0x29, 0x00)
    assert run(target, 0, [0] * 6, nexus=N2).status == Status.GOOD


def test_may_block(target):
    assert target.may_block(ScsiCommand(bytes([0x35] + [0] * 9), 0, N1))
    assert not target.may_block(ScsiCommand(bytes([0x28] + [0] * 9), 0, N1))
    assert not target.may_block(ScsiCommand(bytes([0x35] + [0] * 9), 7, N1))


def test_invalid_lun_numbers_rejected(devs):
    t = ScsiTarget("iqn.t")
    with pytest.raises(ValueError):
        t.set_luns({0x4000: LogicalUnit(devs[0], name="z", serial="Z", wwn=wwn(4))})
