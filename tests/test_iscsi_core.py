"""The sans-IO iSCSI core driven in memory by a tiny initiator."""

from __future__ import annotations

from storaged.iscsi import text
from storaged.iscsi.chap import Credentials
from storaged.iscsi.connection import Connection
from storaged.iscsi.pdu import Op, build
from storaged.iscsi.target import Registry, TargetContext
from storaged.scsi.types import ScsiResult, TmfResponse
from tests.iscsi_initiator import Initiator

TARGET = "iqn.2026-11.org.storaged:t1"
LOCAL = ("127.0.0.1", 3260)


class FakeScsi:
    """Records commands; READs return a pattern, everything else GOOD."""

    def __init__(self) -> None:
        self.luns = {0: object()}
        self.commands = []

    def execute(self, cmd):
        self.commands.append(cmd)
        if cmd.cdb[0] == 0x28:
            n = int.from_bytes(cmd.cdb[7:9], "big") * 512
            return ScsiResult(data=bytes(i % 251 for i in range(n)))
        return ScsiResult()

    def task_management(self, fn, lun, nexus):
        return TmfResponse.COMPLETE

    def nexus_lost(self, nexus):
        pass

    def set_luns(self, luns):
        self.luns = luns


def make(open_access=True, acls=None, chap=None, params=None):
    reg = Registry()
    reg.targets[TARGET] = TargetContext(TARGET, FakeScsi(), portals=[LOCAL],
                                        open_access=open_access, acls=acls or {},
                                        chap=chap, params=params or {})
    conn = Connection(reg, LOCAL, ("127.0.0.1", 40000))
    return reg, conn, Initiator(conn)


def run(ini: Initiator):
    """Execute pending commands against the fake SCSI target and collect output."""
    out = []
    while ini.executed:
        task = ini.executed.pop(0)
        res = ini.conn.target.scsi.execute(task.command)
        ini.conn.complete(task, res)
        out += ini.collect()
    return out


def test_login_without_auth_and_read():
    _reg, _conn, ini = make()
    rsp = ini.full_login(TARGET)
    assert rsp.opcode == Op.LOGIN_RSP
    assert rsp.w36 >> 16 == 0
    assert rsp.flags & 0x80 and rsp.flags & 3 == 3
    assert rsp.lun & 0xFFFF != 0  # TSIH assigned
    keys = dict(text.decode(rsp.data))
    assert "MaxRecvDataSegmentLength" in keys
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    assert ini.scsi(cdb, edtl=4096, read=True) == []
    pdus = run(ini)
    data = b"".join(p.data for p in pdus if p.opcode == Op.DATA_IN)
    assert data == bytes(i % 251 for i in range(4096))
    last = pdus[-1]
    assert last.opcode == Op.DATA_IN and last.flags & 0x01 and last.b3 == 0


def test_read_residual_underflow_and_overflow():
    _reg, _conn, ini = make()
    ini.full_login(TARGET)
    ini.scsi(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), edtl=1024, read=True)
    (pdu,) = run(ini)
    assert pdu.flags & 0x02 and pdu.w44 == 512  # underflow
    ini.scsi(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]), edtl=512, read=True)
    (pdu,) = run(ini)
    assert pdu.flags & 0x04 and pdu.w44 == 512 and len(pdu.data) == 512  # overflow


def test_write_with_r2t():
    _reg, conn, ini = make(params={"InitialR2T": "Yes", "ImmediateData": "No"})
    ini.full_login(TARGET, extra=[("InitialR2T", "Yes"), ("ImmediateData", "No"),
                                  ("MaxBurstLength", "4096")])
    pdus = ini.scsi(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 16, 0]), edtl=8192, write=True)
    r2ts = [p for p in pdus if p.opcode == Op.R2T]
    assert len(r2ts) == 1 and r2ts[0].w40 == 0 and r2ts[0].w44 == 4096
    payload = bytes(range(256)) * 32
    for p in (r2ts[0],):
        hdr = build(Op.DATA_OUT, flags=0x80, data_len=4096, itt=p.itt, w20=p.w20, w36=0,
                    w40=p.w40)
        more = ini.send(hdr, payload[p.w40:p.w40 + 4096])
    (r2t2,) = [p for p in more if p.opcode == Op.R2T]
    assert r2t2.w40 == 4096 and r2t2.w36 == 1
    hdr = build(Op.DATA_OUT, flags=0x80, data_len=4096, itt=r2t2.itt, w20=r2t2.w20, w36=0,
                w40=4096)
    ini.send(hdr, payload[4096:])
    (rsp,) = run(ini)
    assert rsp.opcode == Op.SCSI_RSP and rsp.b3 == 0
    cmd = conn.target.scsi.commands[-1]
    assert bytes(cmd.data_out) == payload


def test_chap_success_and_failure():
    creds = Credentials("alice", "secretsecret12")
    _reg, _conn, ini = make(chap=creds)
    rsp = ini.full_login(TARGET, chap=("alice", "secretsecret12"))
    assert rsp.w36 >> 16 == 0 and rsp.flags & 3 == 3
    _reg, _conn, ini = make(chap=creds)
    rsp = ini.full_login(TARGET, chap=("alice", "wrongwrongwrong"))
    assert rsp.w36 >> 16 == 0x0201
    assert ini.closed


def test_acl_refuses_and_hides_target():
    _reg, _conn, ini = make(open_access=False, acls={"iqn.2026-11.test:other": None})
    rsp = ini.full_login(TARGET)
    assert rsp.w36 >> 16 == 0x0202
    _reg, _conn, ini = make(open_access=False, acls={"iqn.2026-11.test:other": None})
    rsp = ini.login([("InitiatorName", ini.name), ("SessionType", "Discovery"),
                     ("AuthMethod", "None")], 0, 1)
    rsp = ini.login([], 1, 3)
    assert rsp.w36 >> 16 == 0
    hdr = build(Op.TEXT_REQ, flags=0x80, data_len=len(b"SendTargets=All\0"), itt=9,
                w20=0xFFFFFFFF, w24=ini.cmdsn, immediate=True)
    (rsp,) = ini.send(hdr, b"SendTargets=All\0")
    assert rsp.opcode == Op.TEXT_RSP and TARGET.encode() not in rsp.data


def test_sendtargets_lists_visible_target():
    _reg, _conn, ini = make()
    ini.login([("InitiatorName", ini.name), ("SessionType", "Discovery"),
               ("AuthMethod", "None")], 0, 1)
    ini.login([], 1, 3)
    hdr = build(Op.TEXT_REQ, flags=0x80, data_len=16, itt=9, w20=0xFFFFFFFF, w24=ini.cmdsn,
                immediate=True)
    (rsp,) = ini.send(hdr, b"SendTargets=All\0")
    pairs = text.decode(rsp.data)
    assert ("TargetName", TARGET) in pairs
    assert ("TargetAddress", "127.0.0.1:3260,1") in pairs


def test_cmdsn_out_of_window_is_ignored_and_gap_waits():
    _reg, _conn, ini = make()
    ini.full_login(TARGET)
    ini.cmdsn += 1  # leave a gap
    ini.scsi(bytes([0x00] * 6))
    assert not ini.executed  # waits for the missing CmdSN
    ini.cmdsn -= 2
    ini.scsi(bytes([0x00] * 6))
    assert len(ini.executed) == 2
    ini.cmdsn += 100000
    ini.scsi(bytes([0x00] * 6))
    assert len(ini.executed) == 2


def test_nop_out_ping_echoes_data():
    _reg, _conn, ini = make()
    ini.full_login(TARGET)
    hdr = build(Op.NOP_OUT, flags=0x80, data_len=5, itt=77, w20=0xFFFFFFFF, w24=ini.cmdsn,
                immediate=True)
    (rsp,) = ini.send(hdr, b"hello")
    assert rsp.opcode == Op.NOP_IN and rsp.itt == 77 and rsp.data == b"hello"


def test_unknown_opcode_rejected_and_garbage_drops():
    _reg, _conn, ini = make()
    ini.full_login(TARGET)
    (rej,) = ini.send(build(0x1C, flags=0x80, itt=5))
    assert rej.opcode == Op.REJECT and rej.b2 == 0x05
    _reg, conn, ini = make()
    conn.receive_data(b"\xff" * 48)
    ini.collect()
    assert ini.closed


def test_header_digest_negotiated_and_checked():
    _reg, conn, ini = make()
    rsp = ini.full_login(TARGET, extra=[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")])
    assert dict(text.decode(rsp.data))["HeaderDigest"] == "CRC32C"
    ini.hd = ini.dd = True
    ini.scsi(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), edtl=512, read=True)
    (pdu,) = run(ini)
    assert len(pdu.data) == 512
    conn.receive_data(b"\x00" * 52)  # NOP-Out with a wrong header digest
    ini.collect()
    assert ini.closed


def test_idle_initiator_is_pinged_and_dead_one_dropped():
    _reg, conn, ini = make()
    ini.full_login(TARGET)
    conn.touch(0.0)
    conn.tick(conn.nop_interval + 1)
    (ping,) = ini.collect()
    assert ping.opcode == Op.NOP_IN and ping.itt == 0xFFFFFFFF and ping.w20 != 0xFFFFFFFF
    # The initiator answers with ITT 0xffffffff echoing the TTT: no longer pending.
    hdr = build(Op.NOP_OUT, flags=0x80, itt=0xFFFFFFFF, w20=ping.w20, w24=ini.cmdsn,
                immediate=True)
    assert ini.send(hdr) == []
    assert conn.ping_sent_at is None
    conn.tick(1000.0)
    (ping2,) = ini.collect()
    assert ping2.opcode == Op.NOP_IN
    conn.tick(1000.0 + conn.nop_timeout + 1)  # no answer this time
    ini.collect()
    assert ini.closed


def test_abort_task_of_command_waiting_for_data():
    _reg, conn, ini = make()
    ini.full_login(TARGET, extra=[("InitialR2T", "Yes"), ("ImmediateData", "No")])
    pdus = ini.scsi(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]), edtl=4096, write=True)
    assert [p.opcode for p in pdus] == [Op.R2T]
    itt = pdus[0].itt
    hdr = build(Op.TMF_REQ, flags=0x80 | 1, itt=500, w20=itt, w24=ini.cmdsn, w32=ini.cmdsn - 1,
                immediate=True)
    (rsp,) = ini.send(hdr)
    assert rsp.opcode == Op.TMF_RSP and rsp.b2 == TmfResponse.COMPLETE
    # Late data for the aborted task is discarded silently; no SCSI response follows.
    late = build(Op.DATA_OUT, flags=0x80, data_len=512, itt=itt, w20=pdus[0].w20, w36=0)
    assert ini.send(late, b"x" * 512) == []
    assert not ini.executed
    # A completed task is no longer there: "task does not exist".
    ini.scsi(bytes(6))
    run(ini)
    hdr = build(Op.TMF_REQ, flags=0x80 | 1, itt=501, w20=ini.itt - 1, w24=ini.cmdsn,
                w32=ini.cmdsn - 1, immediate=True)
    (rsp,) = ini.send(hdr)
    assert rsp.b2 == TmfResponse.NO_TASK


def test_logout_closes_session():
    reg, conn, ini = make()
    ini.full_login(TARGET)
    assert reg.sessions
    (rsp,) = ini.send(build(Op.LOGOUT_REQ, flags=0x80, itt=42, w24=ini.cmdsn, immediate=True))
    assert rsp.opcode == Op.LOGOUT_RSP and rsp.b2 == 0 and rsp.itt == 42
    assert ini.closed and not reg.sessions


def test_operational_negotiation_results():
    _reg, _conn, ini = make()
    rsp = ini.full_login(TARGET, extra=[("MaxBurstLength", "999999999"),
                                        ("FirstBurstLength", "4096"), ("InitialR2T", "No"),
                                        ("ImmediateData", "No"), ("X-vendor.key", "1"),
                                        ("MaxConnections", "4"), ("DefaultTime2Wait", "0")])
    keys = dict(text.decode(rsp.data))
    assert keys["MaxBurstLength"] == "Reject"  # out of range (§13.13: 512..2^24-1)
    assert keys["FirstBurstLength"] == "4096"  # min(4096, ours)
    assert keys["InitialR2T"] == "No" and keys["ImmediateData"] == "No"
    assert keys["X-vendor.key"] == "NotUnderstood"
    assert keys["MaxConnections"] == "1"
    assert keys["DefaultTime2Wait"] == "2"  # max(0, 2)


def test_extended_cdb_ahs_reaches_scsi_layer():
    _reg, conn, ini = make()
    ini.full_login(TARGET)
    cdb32 = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + bytes(range(8, 32))
    ahs_body = cdb32[16:]
    ahs = (len(ahs_body) + 1).to_bytes(2, "big") + b"\x01\x00" + ahs_body
    ahs += bytes(-len(ahs) & 3)
    hdr = bytearray(build(Op.SCSI_CMD, flags=0x81, ahs_len=len(ahs) // 4, itt=ini.itt,
                          w24=ini.cmdsn))
    hdr[32:48] = cdb32[:16]
    ini.itt += 1
    ini.cmdsn += 1
    ini.send(bytes(hdr) + ahs)
    run(ini)
    assert conn.target.scsi.commands[-1].cdb == cdb32
