"""ALUA (SPC-4 §5.16): target port groups, REPORT/SET TARGET PORT GROUPS,
per-state command filtering, unit attentions, composition with reservations.

In-memory: LogicalUnits driven with Nexus objects whose target port names
are exactly what the iSCSI transport builds (``<iqn>,t,0x<tpgt>``).
"""

from __future__ import annotations

import struct

import pytest

from storaged.scsi import alua as A
from storaged.scsi.sense import Key
from storaged.scsi.types import Nexus, Status
from tests.scsi_util import N1, N2, assert_check, clear_ua, good, make_lu, parse_sense, run

TGT = "iqn.2024-01.test:tgt"
# N1/N2 arrive through TGT tpgt 1.  N3 arrives through TGT tpgt 2.
N3 = Nexus("iqn.2024-01.test:init3,i,0x000000000003", A.port_name(TGT, 2),
           relative_port_id=2, initiator_name="iqn.2024-01.test:init3", target_name=TGT)


def rtpg(fmt: int = 0, alloc: int = 4096) -> bytes:
    return bytes([0xA3, (fmt << 5) | 0x0A, 0, 0, 0, 0]) + alloc.to_bytes(4, "big") + bytes(2)


def stpg(descs: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    data = bytes(4) + b"".join(bytes((s, 0)) + g.to_bytes(2, "big") for s, g in descs)
    cdb = bytes([0xA4, 0x0A, 0, 0, 0, 0]) + len(data).to_bytes(4, "big") + bytes(2)
    return cdb, data


def parse_rtpg(d: bytes, ext: bool = False) -> tuple[dict, list[dict]]:
    """RTPG data; ``ext``: extended header (FORMAT TYPE in byte 4 bits 6:4)."""
    length = int.from_bytes(d[0:4], "big")
    hdr = {"length": length}
    pos = 4
    if ext:
        hdr.update(fmt=(d[4] >> 4) & 7, ttime=d[5])
        pos = 8
    assert len(d) == length + 4
    groups = []
    while pos < len(d):
        n = d[pos + 7]
        groups.append({"pref": bool(d[pos] & 0x80), "state": d[pos] & 0x0F,
                       "sup": d[pos + 1], "id": int.from_bytes(d[pos + 2:pos + 4], "big"),
                       "status": d[pos + 5],
                       "ports": [int.from_bytes(d[pos + 8 + 4 * i + 2:pos + 8 + 4 * i + 4], "big")
                                 for i in range(n)]})
        pos += 8 + 4 * n
    return hdr, groups


def vpd83(lu, nexus) -> dict[int, bytes]:
    d = good(run(lu, [0x12, 1, 0x83, 0x10, 0, 0], nexus=nexus)).data
    out = {}
    pos = 4
    while pos < len(d):
        assoc, dtype, n = (d[pos + 1] >> 4) & 3, d[pos + 1] & 0xF, d[pos + 3]
        if assoc == 1:
            out[dtype] = d[pos + 4:pos + 4 + n]
        pos += 4 + n
    return out


@pytest.fixture
def lu(tmp_path):
    unit = make_lu(str(tmp_path / "lu.img"))
    clear_ua(unit, N2)
    clear_ua(unit, N3)
    return unit


def drain(lu, nexus) -> None:
    """Clear a nexus's unit attentions with REQUEST SENSE (allowed in every state)."""
    for _ in range(20):
        s = parse_sense(good(run(lu, [0x03, 0, 0, 0, 18, 0], nexus=nexus)).data)
        if s["key"] != Key.UNIT_ATTENTION:
            return
    raise AssertionError("unit attentions never cleared")


def ha(lu, local_state=A.AO, remote_state=A.STANDBY, **kw):
    """Node A of an HA pair: group 1 local (tpgt 1), group 2 local (tpgt 2),
    group 3 = the peer's ports (tpgt 3 and 4)."""
    alua = lu.alua
    alua.set_local_ports([(TGT, 1), (TGT, 2)])
    alua.configure([A.GroupConfig(1, local_state, preferred=True),
                    A.GroupConfig(2, kw.get("second", A.AO), ports=[(TGT, 2)]),
                    A.GroupConfig(3, remote_state, ports=[(TGT, 3), (TGT, 4)], remote=True)])
    for n in (N1, N2, N3):
        drain(lu, n)
    return alua


# ---------------------------------------------------------------- default
def test_default_one_active_optimized_group(lu):
    assert lu.alua_check is None                       # nothing on the hot path
    d = good(run(lu, [0x12, 0, 0, 0, 96, 0])).data
    assert (d[5] >> 4) & 3 == 3                       # TPGS: implicit + explicit
    hdr, groups = parse_rtpg(good(run(lu, rtpg())).data)
    assert [(g["id"], g["state"], g["ports"]) for g in groups] == [(1, A.AO, [1])]
    assert groups[0]["sup"] == 0xCF                   # T O U S AN AO supported
    desigs = vpd83(lu, N1)
    assert int.from_bytes(desigs[4], "big") == 1      # relative target port
    assert int.from_bytes(desigs[5], "big") == 1      # target port group


def test_rtpg_extended_header_and_allocation(lu):
    lu.alua.configure([A.GroupConfig(1, transition_time=30)])
    clear_ua(lu, N1)
    hdr, groups = parse_rtpg(good(run(lu, rtpg(fmt=1))).data, ext=True)
    assert hdr == {"length": 4 + 12, "fmt": 1, "ttime": 30}
    assert len(groups) == 1
    assert good(run(lu, rtpg(alloc=6))).data == bytes((0, 0, 0, 12, 0x00, 0xCF))
    assert_check(run(lu, rtpg(fmt=2)), Key.ILLEGAL_REQUEST, 0x24)


def test_rtpg_lists_local_and_peer_groups(lu):
    ha(lu)
    _, groups = parse_rtpg(good(run(lu, rtpg())).data)
    got = [(g["id"], g["state"], g["pref"], g["ports"]) for g in groups]
    assert got == [(1, A.AO, True, [1]), (2, A.AO, False, [2]),
                   (3, A.STANDBY, False, [3, 4])]
    # VPD 0x83 names the port and group the command came through.
    d3 = vpd83(lu, N3)
    assert int.from_bytes(d3[4], "big") == 2 and int.from_bytes(d3[5], "big") == 2
    d1 = vpd83(lu, N1)
    assert int.from_bytes(d1[4], "big") == 1 and int.from_bytes(d1[5], "big") == 1


def test_rsoc_lists_rtpg_and_stpg(lu):
    for op in (0xA3, 0xA4):
        cdb = [0xA3, 0x0C, 0x02, op, 0, 0x0A, 0, 0, 0, 64, 0, 0]
        d = good(run(lu, cdb)).data
        assert d[1] & 7 == 3, op                      # supported, per standard
        assert d[4] == op and d[5] & 0x1F == 0x0A


# ---------------------------------------------------------------- states x commands
READ10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
WRITE10 = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]
COMMANDS = {
    "tur": ([0x00] * 6, None),
    "read": (READ10, None),
    "write": (WRITE10, b"\0" * 512),
    "read_capacity": ([0x25] + [0] * 9, None),
    "read_capacity16": ([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0], None),
    "sync_cache": ([0x35] + [0] * 9, None),
    "inquiry": ([0x12, 0, 0, 0, 96, 0], None),
    "request_sense": ([0x03, 0, 0, 0, 18, 0], None),
    "report_luns": ([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], None),
    "mode_sense": ([0x1A, 0, 0x3F, 0, 255, 0], None),
    "pr_in": ([0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], None),
    "rtpg": (list(rtpg()), None),
    "stpg": ([0xA4, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], None),   # empty list: no-op
    "rsoc": ([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], None),
}
ALLOWED = {
    A.AO: set(COMMANDS),
    A.ANO: set(COMMANDS),
    A.STANDBY: {"inquiry", "request_sense", "report_luns", "mode_sense", "pr_in", "rtpg",
                "stpg", "rsoc", "read_capacity", "read_capacity16"},
    A.UNAVAILABLE: {"inquiry", "request_sense", "report_luns", "rtpg", "stpg"},
    A.TRANSITIONING: {"inquiry", "request_sense", "report_luns", "rtpg"},
    A.OFFLINE: {"inquiry", "request_sense", "report_luns", "rtpg"},
}
ASCQ = {A.STANDBY: 0x0B, A.UNAVAILABLE: 0x0C, A.TRANSITIONING: 0x0A, A.OFFLINE: 0x12}


@pytest.mark.parametrize("state", sorted(ALLOWED), ids=lambda s: A.STATE_NAMES[s])
def test_every_command_class_in_every_state(lu, state):
    ha(lu, second=state)
    # N3 comes through group 2 (in ``state``); N1 through group 1 (active/optimized).
    for name, (cdb, data) in COMMANDS.items():
        r = run(lu, cdb, data, nexus=N3)
        if name in ALLOWED[state]:
            assert r.status == Status.GOOD, (name, r.sense and parse_sense(r.sense))
        else:
            assert_check(r, Key.NOT_READY, 0x04, ASCQ[state])
        good(run(lu, cdb, data, nexus=N1))            # the other group is unaffected
    # REQUEST SENSE reports the state as sense data (no UA pending).
    d = good(run(lu, [0x03, 0, 0, 0, 18, 0], nexus=N3)).data
    s = parse_sense(d)
    if state in ASCQ:
        assert (s["key"], s["asc"], s["ascq"]) == (Key.NOT_READY, 0x04, ASCQ[state])
    else:
        assert s["key"] == Key.NO_SENSE


def test_echo_buffer_modes_pass_in_standby(tmp_path):
    # storaged has no READ BUFFER; a table with a stand-in shows that the
    # echo buffer modes pass the standby filter and the data mode does not.
    from storaged.scsi.commands import CommandSpec
    from storaged.scsi.table import DEFAULT_TABLE
    from storaged.scsi.types import ScsiResult

    table = DEFAULT_TABLE.copy()
    table.register(CommandSpec(0x3C, "READ BUFFER(10)", lambda lu, cmd: ScsiResult(data=b"x"),
                               10, bytes([0x3C, 0x1F] + [0xFF] * 7 + [0x04])))
    unit = make_lu(str(tmp_path / "e.img"), commands=table)
    ha(unit, second=A.STANDBY)
    good(run(unit, [0x3C, 0x0A, 0, 0, 0, 0, 0, 0, 4, 0], nexus=N3))     # echo buffer
    good(run(unit, [0x3C, 0x0B, 0, 0, 0, 0, 0, 0, 4, 0], nexus=N3))     # echo descriptor
    assert_check(run(unit, [0x3C, 0x02, 0, 0, 0, 0, 0, 0, 4, 0], nexus=N3),
                 Key.NOT_READY, 0x04, 0x0B)                              # data mode


def test_check_slot_only_while_restrictive(lu):
    alua = ha(lu, second=A.ANO)
    assert lu.alua_check is None                       # AO + ANO: hot path untouched
    alua.set_state(2, A.STANDBY)
    assert lu.alua_check is not None
    alua.set_state(2, A.AO)
    assert lu.alua_check is None
    alua.configure([A.GroupConfig(3, A.UNAVAILABLE, ports=[(TGT, 9)], remote=True)])
    assert lu.alua_check is None                       # a remote group never restricts here


# ---------------------------------------------------------------- unit attentions
def test_implicit_change_sets_ua_for_every_nexus(lu):
    alua = ha(lu)
    alua.set_state(2, A.STANDBY)
    for n in (N1, N2, N3):
        assert_check(run(lu, [0] * 6, nexus=n), Key.UNIT_ATTENTION, 0x2A, 0x06)
    good(run(lu, [0] * 6, nexus=N1))
    _, groups = parse_rtpg(good(run(lu, rtpg())).data)
    assert groups[1]["status"] == A.STATUS_IMPLICIT


def test_configure_announces_membership_and_state_changes(lu):
    alua = ha(lu)
    assert alua.configure([g.config for g in alua.groups.values()]) == []
    good(run(lu, [0] * 6, nexus=N3))                  # nothing changed: no UA
    # N3's port moves from group 2 (AO) to a new standby group 4.
    cfgs = [g.config for g in alua.groups.values() if g.id != 2]
    cfgs.append(A.GroupConfig(4, A.STANDBY, ports=[(TGT, 2)]))
    assert alua.configure(cfgs) == [2, 4]
    for n in (N1, N3):
        assert_check(run(lu, [0] * 6, nexus=n), Key.UNIT_ATTENTION, 0x2A, 0x06)
    assert_check(run(lu, READ10, nexus=N3), Key.NOT_READY, 0x04, 0x0B)
    assert alua.group_id(N3) == 4 and alua.groups[4].status == A.STATUS_IMPLICIT


def test_configure_keeps_live_state_of_unchanged_groups(lu):
    alua = ha(lu)
    cdb, data = stpg([(A.ANO, 1)])
    good(run(lu, cdb, data, nexus=N1))
    assert alua.groups[1].state == A.ANO
    # Re-applying the same config (e.g. an unrelated change) keeps the explicit state.
    changed = alua.configure([g.config for g in alua.groups.values()])
    assert changed == [] and alua.groups[1].state == A.ANO


def test_stpg_changes_state_and_ua_spares_the_issuer(lu):
    ha(lu)
    cdb, data = stpg([(A.STANDBY, 1), (A.ANO, 2)])
    r = good(run(lu, cdb, data, nexus=N3))
    assert r.transfer_length == len(data)
    good(run(lu, [0] * 6, nexus=N3))                  # issuer: no UA, group 2 now ANO
    assert_check(run(lu, [0] * 6, nexus=N2), Key.UNIT_ATTENTION, 0x2A, 0x06)
    assert_check(run(lu, [0] * 6, nexus=N1), Key.UNIT_ATTENTION, 0x2A, 0x06)
    assert_check(run(lu, READ10, nexus=N1), Key.NOT_READY, 0x04, 0x0B)
    _, groups = parse_rtpg(good(run(lu, rtpg(), nexus=N3)).data)
    assert [(g["state"], g["status"]) for g in groups[:2]] == \
        [(A.STANDBY, A.STATUS_EXPLICIT), (A.ANO, A.STATUS_EXPLICIT)]
    # An initiator on a standby port may make it active again (explicit failback).
    cdb, data = stpg([(A.AO, 1)])
    good(run(lu, cdb, data, nexus=N1))
    good(run(lu, READ10, nexus=N1))


@pytest.mark.parametrize("descs,field", [
    ([(A.AO, 7)], 6),                 # no such group
    ([(A.TRANSITIONING, 1)], 4),      # cannot be requested
    ([(A.OFFLINE, 1)], 4),
    ([(A.AO, 3)], 6),                 # the peer's group
    ([(A.AO, 1), (A.ANO, 1)], 10),    # same group twice
])
def test_stpg_invalid_parameter_changes_nothing(lu, descs, field):
    alua = ha(lu)
    cdb, data = stpg(descs)
    s = assert_check(run(lu, cdb, data), Key.ILLEGAL_REQUEST, 0x26)
    assert int.from_bytes(s["sks"][1:3], "big") == field
    assert [g.state for g in alua.groups.values()] == [A.AO, A.AO, A.STANDBY]
    good(run(lu, [0] * 6, nexus=N2))                  # and no UA either


def test_stpg_length_errors_and_empty_list(lu):
    ha(lu)
    cdb, data = stpg([(A.AO, 1)])
    bad = bytearray(cdb)
    bad[9] = 6
    assert_check(run(lu, bytes(bad), data[:6]), Key.ILLEGAL_REQUEST, 0x1A)
    empty = bytes([0xA4, 0x0A] + [0] * 10)
    assert good(run(lu, empty)).transfer_length == 0


def test_stpg_refused_when_explicit_disabled(lu):
    lu.alua.configure([A.GroupConfig(1, explicit=False)])
    clear_ua(lu, N1)
    d = good(run(lu, [0x12, 0, 0, 0, 96, 0])).data
    assert (d[5] >> 4) & 3 == 1                       # implicit only
    cdb, data = stpg([(A.STANDBY, 1)])
    assert_check(run(lu, cdb, data), Key.ILLEGAL_REQUEST, 0x20)


# ---------------------------------------------------------------- with reservations
def _prout(lu, sa, key, sa_key=0, ptype=0, nexus=N1):
    cdb = [0x5F, sa, ptype, 0, 0, 0, 0, 0, 24, 0]
    data = struct.pack(">QQ", key, sa_key) + bytes(8)
    return run(lu, cdb, data, nexus=nexus)


def test_alua_is_checked_before_reservations(lu):
    alua = ha(lu)
    good(_prout(lu, 0, 0, 0xAA, nexus=N1))          # N1 registers key AA
    good(_prout(lu, 1, 0xAA, ptype=0x03, nexus=N1))  # and holds Exclusive Access
    assert run(lu, READ10, nexus=N3).status == Status.RESERVATION_CONFLICT
    alua.set_state(2, A.STANDBY)
    drain(lu, N3)
    drain(lu, N1)
    # Standby answers first, before the reservation is considered ...
    assert_check(run(lu, READ10, nexus=N3), Key.NOT_READY, 0x04, 0x0B)
    # ... while PR IN is allowed in standby and still works.
    good(run(lu, [0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], nexus=N3))
    good(run(lu, READ10, nexus=N1))                  # holder on an active port
    alua.set_state(2, A.AO)
    clear_ua(lu, N3)
    assert run(lu, READ10, nexus=N3).status == Status.RESERVATION_CONFLICT


def test_shared_alua_across_lus(tmp_path):
    shared = A.Alua()
    lus = [make_lu(str(tmp_path / f"{i}.img"), n=i) for i in range(2)]
    for unit in lus:
        shared.attach(unit)
        clear_ua(unit, N1)
    shared.set_state(1, A.UNAVAILABLE)
    for unit in lus:
        assert_check(run(unit, [0] * 6), Key.UNIT_ATTENTION, 0x2A, 0x06)
        assert_check(run(unit, READ10), Key.NOT_READY, 0x04, 0x0C)


# ---------------------------------------------------------------- through the iSCSI core
def test_through_the_iscsi_transport(tmp_path):
    """The sans-IO iSCSI connection names the port (target, TPGT) a session
    logged in through; ALUA answers by that port's group."""
    from storaged.iscsi.connection import Connection
    from storaged.iscsi.pdu import Op
    from storaged.iscsi.target import Registry, TargetContext
    from storaged.scsi.target import ScsiTarget
    from tests.iscsi_initiator import Initiator

    iqn, local = "iqn.2026-11.org.storaged:alua", ("127.0.0.1", 3260)
    unit = make_lu(str(tmp_path / "t.img"))
    scsi = ScsiTarget(iqn)
    scsi.set_luns({0: unit})
    unit.alua.set_local_ports([(iqn, 1), (iqn, 2)])
    unit.alua.configure([A.GroupConfig(5, A.STANDBY, ports=[(iqn, 2)])])

    def session(tpgt: int) -> Initiator:
        reg = Registry()
        reg.targets[iqn] = TargetContext(iqn, scsi, tpgt=tpgt, portals=[local], open_access=True)
        ini = Initiator(Connection(reg, local, ("127.0.0.1", 40000 + tpgt)),
                        name=f"iqn.2026-11.test:ini{tpgt}")
        assert ini.full_login(iqn).opcode == Op.LOGIN_RSP
        return ini

    def command(ini: Initiator, cdb: bytes, edtl: int = 0) -> tuple[int, bytes]:
        ini.scsi(cdb, edtl=edtl, read=edtl > 0)
        pdus = []
        while ini.executed:
            task = ini.executed.pop(0)
            ini.conn.complete(task, scsi.execute(task.command))
            pdus += ini.collect()
        data = b"".join(p.data for p in pdus if p.opcode == Op.DATA_IN)
        rsp = [p for p in pdus if p.opcode == Op.SCSI_RSP]
        status = rsp[0].b3 if rsp else Status.GOOD
        return status, (rsp[0].data[2:] if rsp and status == Status.CHECK_CONDITION else data)

    standby, active = session(2), session(1)
    for ini in (standby, active):
        status, sense = command(ini, bytes(6))
        assert parse_sense(sense)["key"] == Key.UNIT_ATTENTION    # power on
    status, sense = command(standby, bytes(READ10), 512)
    assert status == Status.CHECK_CONDITION
    s = parse_sense(sense)
    assert (s["key"], s["asc"], s["ascq"]) == (Key.NOT_READY, 0x04, 0x0B)
    assert command(active, bytes(READ10), 512)[0] == Status.GOOD
    status, page = command(standby, bytes([0x12, 1, 0x83, 0x04, 0, 0]), 1024)
    desig = {}
    pos = 4
    while pos < len(page):
        if (page[pos + 1] >> 4) & 3 == 1 and page[pos + 1] & 0xF in (4, 5):
            desig[page[pos + 1] & 0xF] = int.from_bytes(page[pos + 4:pos + 8], "big")
        pos += 4 + page[pos + 3]
    assert desig == {4: 2, 5: 5}
    status, data = command(active, rtpg(), 4096)
    _, groups = parse_rtpg(data)
    assert [(g["id"], g["state"], g["ports"]) for g in groups] == [
        (1, A.AO, [1]), (5, A.STANDBY, [2])]
