"""The READ/WRITE quick path (storaged.scsi.sbc.quick_rw) against the general
path (LogicalUnit.execute), in the SCSI layer and through the iSCSI core."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.iscsi.connection import QUEUED, Connection
from storaged.iscsi.pdu import Op, build
from storaged.iscsi.target import Registry, TargetContext
from storaged.scsi.sbc import quick_rw
from storaged.scsi.target import ScsiTarget
from storaged.scsi.types import Status
from tests.iscsi_initiator import Initiator
from tests.scsi_util import BS, N1, N2, cdb10, cdb16, clear_ua, make_lu, run

KEY = (N1.initiator_port, N1.target_port)
SIZE = 1 << 20
BLOCKS = SIZE // BS


def _pair(tmp_path, name: str = "q"):
    """Two LUs on files with the same content: one for each path."""
    lus = [make_lu(str(tmp_path / f"{name}{i}.img"), SIZE, n=i) for i in (1, 2)]
    pattern = bytes(range(256)) * (SIZE // 256)
    for lu in lus:
        lu.device.write(0, pattern)
    return lus


def _medium(lu) -> bytes:
    return os.pread(lu.device.fd, SIZE, 0)


def test_plain_reads_and_writes_take_the_quick_path(tmp_path):
    quick, general = _pair(tmp_path)
    for op, make in ((0x28, cdb10), (0x88, cdb16)):
        cdb = bytes(make(op, 7, 3))
        data = quick_rw(quick, KEY, cdb, 3 * BS, None)
        assert data is not None and data == run(general, cdb).data
    for op, make in ((0x2A, cdb10), (0x8A, cdb16)):
        payload = os.urandom(5 * BS)
        cdb = bytes(make(op, BLOCKS - 5, 5))
        assert quick_rw(quick, KEY, cdb, len(payload), memoryview(payload)) == b""
        assert run(general, cdb, payload).status == Status.GOOD
    assert _medium(quick) == _medium(general)


def _reserve_by_n2(lu) -> None:
    clear_ua(lu, N2)
    assert run(lu, [0x16, 0, 0, 0, 0, 0], nexus=N2).status == Status.GOOD   # RESERVE(6)


def _refusals():
    """(name, LU change, CDB, expected length, data): the general path decides."""
    w = os.urandom(4 * BS)
    return [
        ("unit attention", lambda lu: lu.add_unit_attention(0x2A, 0x09), cdb10(0x2A, 0, 4), w),
        ("offline", lambda lu: setattr(lu, "online", False), cdb10(0x28, 0, 4), None),
        ("write protect", lambda lu: setattr(lu, "read_only", True), cdb10(0x2A, 0, 4), w),
        ("write cache off", lambda lu: setattr(lu, "wce", False), cdb16(0x8A, 0, 4), w),
        ("FUA", None, cdb10(0x2A, 0, 4, b1=0x08), w),
        ("RDPROTECT", None, cdb16(0x88, 0, 4, b1=0x20), None),
        ("out of range", None, cdb16(0x88, BLOCKS - 3, 4), None),
        ("zero length", None, cdb10(0x28, 0, 0), None),
        ("READ(6)", None, [0x08, 0, 0, 0, 4, 0], None),
        ("reserved by another nexus", _reserve_by_n2, cdb10(0x28, 0, 4), None),
    ]


@pytest.mark.parametrize("name,change,cdb,data", _refusals(), ids=[r[0] for r in _refusals()])
def test_every_other_case_goes_the_general_way(tmp_path, name, change, cdb, data):
    quick, _general = _pair(tmp_path)
    if change is not None:
        change(quick)
    before = _medium(quick)
    view = None if data is None else memoryview(data)
    assert quick_rw(quick, KEY, bytes(cdb), 4 * BS, view) is None
    assert _medium(quick) == before


def test_naca_and_length_mismatch_go_the_general_way(tmp_path):
    quick, _general = _pair(tmp_path)
    naca = bytes(cdb10(0x28, 0, 4)[:9] + [0x04])
    assert quick_rw(quick, KEY, naca, 4 * BS, None) is None
    assert quick_rw(quick, KEY, bytes(cdb10(0x28, 0, 4)), 3 * BS, None) is None  # residual
    short = memoryview(bytes(3 * BS))
    assert quick_rw(quick, KEY, bytes(cdb10(0x2A, 0, 4)), 4 * BS, short) is None


_CDBS = st.tuples(st.sampled_from([0x28, 0x88, 0x2A, 0x8A]),
                  st.integers(0, BLOCKS + 2), st.integers(0, 40),
                  st.sampled_from([0, 0, 0, 0x08, 0x10, 0x20, 0x02]),
                  st.sampled_from([0, 0, 0, 0x04]), st.sampled_from([0, 0, 1, -1]))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=st.lists(_CDBS, min_size=1, max_size=12),
       wce=st.booleans(), ua=st.booleans())
def test_quick_path_agrees_with_execute(tmp_path, commands, wce, ua):
    """Whenever quick_rw runs a command, execute gives GOOD, the same data and
    the same medium; whenever it declines, nothing changed."""
    quick, general = _pair(tmp_path, "h")
    for lu in (quick, general):
        lu.wce = wce
        if ua:
            lu.add_unit_attention(0x2A, 0x09)
    for op, lba, n, b1, control, skew in commands:
        cdb = bytearray(cdb10(op, lba & 0xFFFFFFFF, n, b1) if op in (0x28, 0x2A)
                        else cdb16(op, lba, n, b1))
        cdb[-1] = control
        expected = max(0, (n + skew) * BS)
        data = os.urandom(expected) if op in (0x2A, 0x8A) else None
        before = _medium(quick)
        got = quick_rw(quick, KEY, bytes(cdb), expected,
                       None if data is None else memoryview(data))
        ref = run(general, bytes(cdb), data)
        if got is None:
            assert _medium(quick) == before
            run(quick, bytes(cdb), data)         # keep the twins in step
        else:
            assert ref.status == Status.GOOD and ref.sense is None
            if data is None:
                assert got == ref.data and len(got) == expected
            else:
                assert got == b"" and ref.transfer_length == expected
        assert _medium(quick) == _medium(general)


# ---------------------------------------------------------------- iSCSI core
TARGET = "iqn.2026-11.org.storaged:quick"
LOCAL = ("127.0.0.1", 3260)


def _session(tmp_path, name: str, with_quick: bool) -> Initiator:
    lu = make_lu(str(tmp_path / f"{name}.img"), SIZE, n=1)
    lu.device.write(0, bytes(range(256)) * (SIZE // 256))
    scsi = ScsiTarget(TARGET)
    scsi.set_luns({0: lu})
    reg = Registry()
    reg.targets[TARGET] = TargetContext(TARGET, scsi, portals=[LOCAL], open_access=True)
    calls: list[bytes] = []

    def quick(scsi_target, _name, key, lun, cdb, expected, data, _alone, _defer):
        result = quick_rw(scsi_target.luns[lun], key, cdb, expected, data)
        if result is not None:
            calls.append(cdb)
        return result

    conn = Connection(reg, LOCAL, ("127.0.0.1", 40000), quick=quick if with_quick else None)
    ini = Initiator(conn)
    ini.quick_calls = calls          # type: ignore[attr-defined]
    assert ini.full_login(TARGET).w36 >> 16 == 0
    return ini


def _run_executed(ini: Initiator) -> list:
    """Run the commands the core handed out as Execute events; the PDUs sent."""
    pdus = []
    while ini.executed:
        task = ini.executed.pop(0)
        ini.conn.complete(task, ini.conn.target.scsi.execute(task.command))
        pdus += ini.collect()
    return pdus


def _clear_power_on_ua(ini: Initiator) -> list:
    pdus = []
    for _ in range(6):
        pdus += ini.scsi(bytes([0] * 6)) + _run_executed(ini)
    return pdus


def _drive(ini: Initiator) -> list[tuple]:
    """A mix of commands; every PDU the target sends, as comparable fields."""
    out = []

    def settle(pdus):
        out.extend((p.opcode, p.flags, p.b3, p.itt, p.w24, p.w28, p.w32, p.w36, p.w44,
                    bytes(p.data)) for p in list(pdus) + _run_executed(ini))

    settle(_clear_power_on_ua(ini))
    payload = bytes((7 * i) & 0xFF for i in range(8 * BS))
    settle(ini.scsi(bytes(cdb10(0x2A, 16, 8)), edtl=8 * BS, write=True, data=payload))
    settle(ini.scsi(bytes(cdb10(0x28, 16, 8)), edtl=8 * BS, read=True))
    settle(ini.scsi(bytes(cdb16(0x88, 12, 8)), edtl=8 * BS, read=True))
    settle(ini.scsi(bytes(cdb10(0x28, 0, 8)), edtl=4 * BS, read=True))       # residual
    settle(ini.scsi(bytes(cdb10(0x28, BLOCKS, 1)), edtl=BS, read=True))      # out of range
    settle(ini.scsi(bytes(cdb10(0x2A, 0, 2, b1=0x08)), edtl=2 * BS, write=True,
                    data=payload[:2 * BS]))                                    # FUA
    settle(ini.scsi(bytes(cdb16(0x8A, 40, 8)), edtl=8 * BS, write=True,
                    data=payload[:4 * BS], final=True))                        # R2T for the rest
    return out


def test_core_quick_path_sends_what_the_general_path_sends(tmp_path):
    plain = _session(tmp_path, "plain", with_quick=False)
    fast = _session(tmp_path, "fast", with_quick=True)
    assert _drive(fast) == _drive(plain)
    assert len(fast.quick_calls) == 3            # type: ignore[attr-defined]
    assert os.pread(fast.conn.target.scsi.luns[0].device.fd, SIZE, 0) == \
        os.pread(plain.conn.target.scsi.luns[0].device.fd, SIZE, 0)


def test_core_quick_path_waits_for_cmdsn_order(tmp_path):
    """A READ that arrives ahead of its CmdSN is not run early."""
    ini = _session(tmp_path, "order", with_quick=True)
    _clear_power_on_ua(ini)
    ini.cmdsn += 1                                  # leave a gap
    late = ini.itt
    assert ini.scsi(bytes(cdb10(0x28, 0, 1)), edtl=BS, read=True) == []
    assert ini.quick_calls == []                    # type: ignore[attr-defined]
    ini.cmdsn -= 2
    first = ini.itt
    pdus = ini.scsi(bytes(cdb10(0x28, 1, 1)), edtl=BS, read=True) + _run_executed(ini)
    data_in = [p for p in pdus if p.opcode == Op.DATA_IN]
    assert [p.itt for p in data_in] == [first, late]
    assert all(p.flags & 0x01 and len(p.data) == BS for p in data_in)
    assert ini.quick_calls == []     # type: ignore[attr-defined]  # a queue: general path


class _Later:
    """A QuickCommand that queues every command and finishes them on demand."""

    def __init__(self) -> None:
        self.pending: list = []

    def __call__(self, scsi_target, _name, key, lun, cdb, expected, data, _alone, defer):
        result = bytes([0xA5]) * expected if data is None else b""
        self.pending.append((defer(), cdb, result))
        return QUEUED


def _later_session(tmp_path, name: str) -> tuple[Initiator, _Later]:
    later = _Later()
    ini = _session(tmp_path, name, with_quick=False)
    # Same session, now with a quick path that finishes commands later.
    ini.conn._quick = lambda *a: later(ini.conn.target.scsi, "", None, *a)
    _clear_power_on_ua(ini)
    return ini, later


def test_core_queued_quick_commands_finish_later_in_any_order(tmp_path):
    ini, later = _later_session(tmp_path, "later")
    outputs = []
    ini.conn.on_output = lambda: outputs.append(1)
    first, second = ini.itt, ini.itt + 1
    assert ini.scsi(bytes(cdb10(0x28, 0, 1)), edtl=BS, read=True) == []
    assert ini.scsi(bytes(cdb10(0x2A, 0, 1)), edtl=BS, write=True, data=bytes(BS)) == []
    assert set(ini.conn.tasks) == {first, second}
    (done1, _c1, r1), (done2, _c2, r2) = later.pending
    done2(r2)
    done1(r1)
    pdus = ini.collect()
    assert [(p.opcode, p.itt) for p in pdus] == [(Op.SCSI_RSP, second), (Op.DATA_IN, first)]
    assert pdus[1].data == bytes([0xA5]) * BS and pdus[1].flags & 0x01
    assert [p.w24 for p in pdus] == sorted(p.w24 for p in pdus)     # StatSN in send order
    assert not ini.conn.tasks and len(outputs) == 2


def test_core_queued_quick_command_aborted_sends_no_status(tmp_path):
    ini, later = _later_session(tmp_path, "abort")
    itt = ini.itt
    ini.scsi(bytes(cdb10(0x28, 0, 1)), edtl=BS, read=True)
    tmf = bytearray(build(Op.TMF_REQ, flags=0x80 | 1, itt=0x777, w20=itt,
                          w24=ini.cmdsn, w28=0, w32=ini.cmdsn - 1))
    tmf[0] |= 0x40                                      # immediate
    rsp = ini.send(bytes(tmf))
    assert rsp[0].opcode == Op.TMF_RSP and rsp[0].b2 == 0    # FUNCTION COMPLETE
    done, _cdb, result = later.pending[0]
    done(result)
    assert ini.collect() == []


def test_core_queued_quick_failures(tmp_path):
    """A failed READ goes the general way; a failed WRITE drops the connection."""
    ini, later = _later_session(tmp_path, "fail")
    itt = ini.itt
    ini.scsi(bytes(cdb10(0x28, 3, 1)), edtl=BS, read=True)
    later.pending[0][0](None)
    assert ini.collect() == []
    assert [t.itt for t in ini.executed] == [itt]          # an Execute event now
    pdus = _run_executed(ini)
    assert pdus[0].opcode == Op.DATA_IN and pdus[0].itt == itt and len(pdus[0].data) == BS
    ini.scsi(bytes(cdb10(0x2A, 0, 1)), edtl=BS, write=True, data=bytes(BS))
    later.pending[1][0](None)
    assert ini.conn.closed
    assert all(p.opcode != Op.SCSI_RSP for p in ini.collect())
