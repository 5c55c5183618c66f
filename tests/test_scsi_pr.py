"""Persistent reservations and SPC-2 RESERVE/RELEASE, in memory (storaged.scsi.pr)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.block.file import FileBlockDevice
from storaged.scsi import pr
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.target import ScsiTarget
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult, Status, TmfFunction

BS = 512
WWN = "6001405" + "0123456789abcdef" + "fedcba987"
TGT = "iqn.2024-01.test:tgt"
TP1 = f"{TGT},t,0x0001"
TP2 = "iqn.2024-01.test:tgt2,t,0x0002"


def nexus(n: int, isid: int | None = None, target_port: str = TP1, rel: int = 1) -> Nexus:
    name = f"iqn.2024-01.test:node{n}"
    isid = n if isid is None else isid
    return Nexus(f"{name},i,0x{isid:012x}", target_port, relative_port_id=rel,
                 initiator_name=name, target_name=target_port.partition(",")[0])


N1, N2, N3 = nexus(1), nexus(2), nexus(3)
OBSERVER = nexus(9)

WE, EA, WERO, EARO, WEAR, EAAR = 1, 3, 5, 6, 7, 8
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, RIEK, MOVE = range(8)


class DictStore:
    """A PrStore keeping the saved state in memory."""

    def __init__(self) -> None:
        self.data: dict[str, Any] | None = None
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        return self.data

    def save(self, data: dict[str, Any] | None) -> None:
        self.saves += 1
        self.data = data


@pytest.fixture
def dev(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1024 * 1024)
    d = FileBlockDevice(str(path), block_size=BS)
    yield d
    d.close()


@pytest.fixture
def lu(dev) -> LogicalUnit:
    unit = LogicalUnit(dev, name="pr", serial="s1", wwn=WWN)
    for n in (N1, N2, N3):
        clear_ua(unit, n)
    return unit


def run(lu: LogicalUnit, n: Nexus, cdb: bytes, data: bytes | None = None) -> ScsiResult:
    return lu.execute(ScsiCommand(cdb=cdb, lun=0, nexus=n, data_out=data,
                                  expected_length=len(data) if data else 0))


def clear_ua(lu: LogicalUnit, n: Nexus) -> list[tuple[int, int]]:
    """Send TEST UNIT READY until no unit attention is left; return the UAs seen."""
    seen = []
    for _ in range(20):
        r = run(lu, n, bytes(6))
        if r.status != Status.CHECK_CONDITION or (r.sense[2] & 0x0F) != 6:
            return seen
        seen.append((r.sense[12], r.sense[13]))
    raise AssertionError("unit attentions never end")


def params(key: int = 0, sark: int = 0, flags: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack(">QQ4xBxxx", key, sark, flags) + extra


def prout(lu: LogicalUnit, n: Nexus, sa: int, key: int = 0, sark: int = 0, ptype: int = 0,
          flags: int = 0, extra: bytes = b"", scope: int = 0,
          data: bytes | None = None) -> ScsiResult:
    body = params(key, sark, flags, extra) if data is None else data
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, (scope << 4) | ptype, len(body), 0)
    return run(lu, n, cdb, body)


def prin(lu: LogicalUnit, n: Nexus, sa: int, alloc: int = 8192) -> ScsiResult:
    return run(lu, n, struct.pack(">BB5xHB", 0x5E, sa, alloc, 0))


def read_keys(lu: LogicalUnit) -> tuple[int, list[int]]:
    """(PRgeneration, keys), read through an observer nexus nobody checks UAs of."""
    clear_ua(lu, OBSERVER)
    r = prin(lu, OBSERVER, 0)
    assert r.status == Status.GOOD
    d = bytes(r.data)
    gen, length = struct.unpack(">II", d[:8])
    return gen, [struct.unpack(">Q", d[8 + i:16 + i])[0] for i in range(0, length, 8)]


def read_reservation(lu: LogicalUnit) -> tuple[int, int] | None:
    """(key, type) of the reservation, or None (read like read_keys)."""
    clear_ua(lu, OBSERVER)
    r = prin(lu, OBSERVER, 1)
    assert r.status == Status.GOOD
    d = bytes(r.data)
    if struct.unpack(">I", d[4:8])[0] == 0:
        return None
    return struct.unpack(">Q", d[8:16])[0], d[21] & 0x0F


def read10(lu: LogicalUnit, n: Nexus) -> int:
    return run(lu, n, struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)).status


def write10(lu: LogicalUnit, n: Nexus) -> int:
    return run(lu, n, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), bytes(BS)).status


def asc(r: ScsiResult) -> tuple[int, int, int]:
    assert r.status == Status.CHECK_CONDITION
    return r.sense[2] & 0x0F, r.sense[12], r.sense[13]


GOOD, CONFLICT = Status.GOOD, Status.RESERVATION_CONFLICT


# ---------------------------------------------------------------- registration
def test_register_read_keys_and_generation(lu):
    assert lu.access_check is None
    assert read_keys(lu) == (0, [])
    assert prout(lu, N1, REGISTER, sark=0xA1).status == GOOD
    assert prout(lu, N2, RIEK, sark=0xB2).status == GOOD
    assert read_keys(lu) == (2, [0xA1, 0xB2])
    # Registering again with the wrong reservation key conflicts (libiscsi reregister).
    assert prout(lu, N1, REGISTER, key=0, sark=0xA2).status == CONFLICT
    # Changing the key with the right one works; RIEK ignores the old key.
    assert prout(lu, N1, REGISTER, key=0xA1, sark=0xA2).status == GOOD
    assert prout(lu, N2, RIEK, key=0x999, sark=0xB3).status == GOOD
    assert read_keys(lu) == (4, [0xA2, 0xB3])
    # Unregister; an unregistered nexus registering key 0 is a no-op.
    assert prout(lu, N1, REGISTER, key=0xA2, sark=0).status == GOOD
    assert prout(lu, N3, REGISTER, sark=0).status == GOOD
    assert read_keys(lu) == (5, [0xB3])
    # Registrations alone never refuse commands.
    assert lu.access_check is None
    assert write10(lu, N1) == GOOD


def test_unregistered_nexus_with_key_conflicts(lu):
    assert prout(lu, N1, REGISTER, key=5, sark=6).status == CONFLICT
    for sa in (RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT):
        assert prout(lu, N1, sa, key=5, sark=6, ptype=WE).status == CONFLICT


def test_registrations_are_per_i_t_nexus(lu):
    same_host_new_isid = nexus(1, isid=0x99)
    other_port = nexus(1, target_port=TP2, rel=2)
    assert prout(lu, N1, REGISTER, sark=1).status == GOOD
    for n in (same_host_new_isid, other_port):
        clear_ua(lu, n)
        assert lu.pr.find(n) is None
        # not registered: its key does not match anything
        assert prout(lu, n, RESERVE, key=1, ptype=WE).status == CONFLICT
    assert prout(lu, same_host_new_isid, REGISTER, sark=1).status == GOOD
    assert read_keys(lu)[1] == [1, 1]


def test_registrations_survive_nexus_loss_and_resets(lu):
    prout(lu, N1, REGISTER, sark=7)
    prout(lu, N1, RESERVE, key=7, ptype=WERO)
    lu.nexus_lost(N1)
    lu.reset()
    clear_ua(lu, N1)
    clear_ua(lu, N2)
    assert read_keys(lu)[1] == [7]
    assert read_reservation(lu) == (7, WERO)
    assert write10(lu, N1) == GOOD
    assert write10(lu, N2) == CONFLICT


def test_param_list_errors(lu):
    r = prout(lu, N1, REGISTER, data=params(sark=1)[:20])
    assert asc(r) == (5, 0x1A, 0x00)
    r = prout(lu, N1, RESERVE, data=params(key=1) + bytes(4))
    assert asc(r) == (5, 0x1A, 0x00)
    # SPEC_I_PT is only for REGISTER; RIEK refuses it.
    r = prout(lu, N1, RIEK, sark=1, flags=0x08)
    assert asc(r) == (5, 0x26, 0x00)
    # Service actions past REGISTER AND MOVE do not exist.
    assert asc(prout(lu, N1, 8))[:2] == (5, 0x24)
    assert asc(prin(lu, N1, 4))[:2] == (5, 0x24)


# ---------------------------------------------------------------- reservations and access
ACCESS = {
    # type: (registered reads, registered writes, unregistered reads, unregistered writes)
    WE: (GOOD, CONFLICT, GOOD, CONFLICT),
    EA: (CONFLICT, CONFLICT, CONFLICT, CONFLICT),
    WERO: (GOOD, GOOD, GOOD, CONFLICT),
    EARO: (GOOD, GOOD, CONFLICT, CONFLICT),
    WEAR: (GOOD, GOOD, GOOD, CONFLICT),
    EAAR: (GOOD, GOOD, CONFLICT, CONFLICT),
}


@pytest.mark.parametrize("ptype", sorted(ACCESS))
def test_access_rules(lu, ptype):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    assert prout(lu, N1, RESERVE, key=1, ptype=ptype).status == GOOD
    expected_key = 0 if ptype in (WEAR, EAAR) else 1
    assert read_reservation(lu) == (expected_key, ptype)
    assert lu.access_check is pr.access_check
    assert (read10(lu, N1), write10(lu, N1)) == (GOOD, GOOD)
    reg_r, reg_w, unreg_r, unreg_w = ACCESS[ptype]
    assert (read10(lu, N2), write10(lu, N2)) == (reg_r, reg_w)
    assert (read10(lu, N3), write10(lu, N3)) == (unreg_r, unreg_w)
    # MODE SELECT (CONFLICT class) follows the write column; TUR, INQUIRY,
    # READ CAPACITY and PERSISTENT RESERVE IN are always allowed.
    mode_select = struct.pack(">BBxxBB", 0x15, 0x10, 0, 0)
    assert run(lu, N3, mode_select).status == unreg_w
    for cdb in (bytes(6), bytes((0x12, 0, 0, 0, 96, 0)), bytes((0x25,)) + bytes(9)):
        assert run(lu, N3, cdb).status == GOOD
    assert prin(lu, N3, 0).status == GOOD
    # Release; everything is allowed again and the check is uninstalled.
    assert prout(lu, N1, RELEASE, key=1, ptype=ptype).status == GOOD
    assert lu.access_check is None
    assert write10(lu, N3) == GOOD


def test_reserve_conflicts_and_repeats(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    assert prout(lu, N1, RESERVE, key=1, ptype=WE).status == GOOD
    assert prout(lu, N1, RESERVE, key=1, ptype=WE).status == GOOD      # same: no-op
    assert prout(lu, N1, RESERVE, key=1, ptype=EA).status == CONFLICT  # holder changes type
    assert prout(lu, N2, RESERVE, key=2, ptype=WE).status == CONFLICT  # someone else
    assert prout(lu, N1, RESERVE, key=2, ptype=WE).status == CONFLICT  # wrong key
    assert asc(prout(lu, N1, RESERVE, key=1, ptype=2))[:2] == (5, 0x24)   # bad type
    assert asc(prout(lu, N1, RESERVE, key=1, ptype=WE, scope=1))[:2] == (5, 0x24)
    gen = read_keys(lu)[0]
    prout(lu, N1, RELEASE, key=1, ptype=WE)
    assert read_keys(lu)[0] == gen         # RESERVE/RELEASE leave PRgeneration alone


def test_all_registrants_share_the_reservation(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    assert prout(lu, N1, RESERVE, key=1, ptype=WEAR).status == GOOD
    assert prout(lu, N2, RESERVE, key=2, ptype=WEAR).status == GOOD    # also a holder
    assert prout(lu, N2, RESERVE, key=2, ptype=EAAR).status == CONFLICT
    # The reserving registrant leaves: the reservation stays with the others.
    assert prout(lu, N1, REGISTER, key=1, sark=0).status == GOOD
    assert read_reservation(lu) == (0, WEAR)
    assert write10(lu, N2) == GOOD
    assert write10(lu, N1) == CONFLICT
    # The last one leaves: released.
    assert prout(lu, N2, RIEK, sark=0).status == GOOD
    assert read_reservation(lu) is None
    assert lu.access_check is None


@pytest.mark.parametrize("ptype,ua", [(WE, False), (EA, False), (WERO, True), (EARO, True)])
def test_holder_unregistering_releases(lu, ptype, ua):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N1, RESERVE, key=1, ptype=ptype)
    assert prout(lu, N1, REGISTER, key=1, sark=0).status == GOOD
    assert read_reservation(lu) is None
    assert clear_ua(lu, N2) == ([pr.UA_RESERVATIONS_RELEASED] if ua else [])
    assert clear_ua(lu, N1) == []


def test_release_rules(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    assert prout(lu, N1, RELEASE, key=1, ptype=WE).status == GOOD      # nothing reserved
    prout(lu, N1, RESERVE, key=1, ptype=WERO)
    assert prout(lu, N2, RELEASE, key=2, ptype=WERO).status == GOOD    # not the holder: no-op
    assert read_reservation(lu) == (1, WERO)
    assert prout(lu, N3, RELEASE, key=3, ptype=WERO).status == CONFLICT
    assert asc(prout(lu, N1, RELEASE, key=1, ptype=WE)) == (5, 0x26, 0x04)
    assert prout(lu, N1, RELEASE, key=1, ptype=WERO).status == GOOD
    assert clear_ua(lu, N2) == [pr.UA_RESERVATIONS_RELEASED]
    assert clear_ua(lu, N1) == [] and clear_ua(lu, N3) == []


def test_clear(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N1, RESERVE, key=1, ptype=EA)
    gen = read_keys(lu)[0]
    assert prout(lu, N2, CLEAR, key=2).status == GOOD
    assert clear_ua(lu, N1) == [pr.UA_RESERVATIONS_PREEMPTED]
    assert clear_ua(lu, N2) == [] and clear_ua(lu, N3) == []
    assert read_keys(lu) == (gen + 1, [])
    assert read_reservation(lu) is None
    assert lu.access_check is None


# ---------------------------------------------------------------- preempt
def test_preempt_removes_registrations_without_reservation(lu):
    # libiscsi ProutPreempt.RemoveRegistration
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    gen = read_keys(lu)[0]
    assert prout(lu, N2, PREEMPT, key=2, sark=1, ptype=EA).status == GOOD
    assert read_keys(lu) == (gen + 1, [2])
    assert read_reservation(lu) is None
    assert clear_ua(lu, N1) == [pr.UA_REGISTRATIONS_PREEMPTED]
    assert clear_ua(lu, N2) == []
    # Key zero without an all-registrants reservation is invalid; unknown keys conflict.
    assert asc(prout(lu, N2, PREEMPT, key=2, sark=0, ptype=EA)) == (5, 0x26, 0x00)
    assert prout(lu, N2, PREEMPT, key=2, sark=77, ptype=EA).status == CONFLICT


def test_preempt_takes_over_the_reservation(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N3, RIEK, sark=3)
    prout(lu, N1, RESERVE, key=1, ptype=WERO)
    assert prout(lu, N2, PREEMPT, key=2, sark=1, ptype=WERO).status == GOOD
    assert read_reservation(lu) == (2, WERO)
    assert read_keys(lu)[1] == [2, 3]
    assert clear_ua(lu, N1) == [pr.UA_REGISTRATIONS_PREEMPTED]
    assert clear_ua(lu, N3) == []          # same type and scope: nothing released
    # Changing the type tells the remaining registrants the old one was released.
    assert prout(lu, N3, PREEMPT, key=3, sark=2, ptype=EARO).status == GOOD
    assert read_reservation(lu) == (3, EARO)
    assert clear_ua(lu, N2) == [pr.UA_REGISTRATIONS_PREEMPTED]
    assert write10(lu, N1) == CONFLICT and read10(lu, N1) == CONFLICT


def test_preempt_all_registrants_with_key_zero(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N3, RIEK, sark=3)
    prout(lu, N1, RESERVE, key=1, ptype=EAAR)
    assert prout(lu, N2, PREEMPT, key=2, sark=0, ptype=WE).status == GOOD
    assert read_keys(lu)[1] == [2]
    assert read_reservation(lu) == (2, WE)
    assert clear_ua(lu, N1) == [pr.UA_REGISTRATIONS_PREEMPTED]
    assert clear_ua(lu, N3) == [pr.UA_REGISTRATIONS_PREEMPTED]


def test_preempt_own_key_after_reconnect(lu):
    """fence_scsi unfencing after a reconnect: the old ISID holds the
    reservation with key K; the new one registers K and PREEMPTs K."""
    old, new = nexus(1, isid=0x10), nexus(1, isid=0x20)
    clear_ua(lu, old)
    prout(lu, old, RIEK, sark=0xF1)
    prout(lu, old, RESERVE, key=0xF1, ptype=WERO)
    prout(lu, N2, RIEK, sark=0xF2)
    lu.nexus_lost(old)
    clear_ua(lu, new)
    assert prout(lu, new, RIEK, sark=0xF1).status == GOOD
    assert prout(lu, new, PREEMPT, key=0xF1, sark=0xF1, ptype=WERO).status == GOOD
    assert read_keys(lu)[1] == [0xF2, 0xF1]
    assert pr.initiator_ids(new)[0] in [r.initiator for r in lu.pr.regs.values()]
    assert lu.pr.holder is lu.pr.find(new)
    assert clear_ua(lu, N2) == []


def test_preempt_and_abort_aborts_preempted_nexuses(lu):
    target = ScsiTarget(TGT)
    target.set_luns({3: lu})
    aborted: list[tuple[str, int]] = []
    target.on_abort_nexus = lambda n, lun: aborted.append((n.initiator_port, lun))
    n3b = nexus(3, isid=0x33)
    for n in (N1, N2, N3, n3b):
        clear_ua(lu, n)           # REPORTED LUNS DATA HAS CHANGED
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N3, RIEK, sark=3)
    prout(lu, n3b, RIEK, sark=3)
    prout(lu, N1, RESERVE, key=1, ptype=WERO)
    assert prout(lu, N1, PREEMPT_ABORT, key=1, sark=3, ptype=WERO).status == GOOD
    assert sorted(aborted) == sorted([(N3.initiator_port, 3), (n3b.initiator_port, 3)])
    assert read_reservation(lu) == (1, WERO)
    assert write10(lu, N3) == Status.CHECK_CONDITION            # UA first ...
    assert write10(lu, N3) == CONFLICT                          # ... then fenced
    assert write10(lu, N2) == GOOD
    # Preempting its own key never aborts the caller's tasks.
    aborted.clear()
    assert prout(lu, N1, PREEMPT_ABORT, key=1, sark=1, ptype=WERO).status == GOOD
    assert aborted == []
    # Unmapped LUs no longer call the target.
    target.set_luns({})
    assert lu.abort_hooks == []


# ---------------------------------------------------------------- IN data formats
def test_read_full_status_and_capabilities(lu):
    prout(lu, N1, RIEK, sark=0x1111)
    prout(lu, N2, RIEK, sark=0x2222, flags=0x04)          # ALL_TG_PTS
    prout(lu, N1, RESERVE, key=0x1111, ptype=EARO)
    d = bytes(prin(lu, N3, 3).data)
    gen, length = struct.unpack(">II", d[:8])
    assert length == len(d) - 8
    pos, descs = 8, []
    while pos < len(d):
        key, flags, st, rel, tlen = struct.unpack(">Q4xBB4xHI", d[pos:pos + 24])
        tid = d[pos + 24:pos + 24 + tlen]
        descs.append((key, flags, st, rel, pr.decode_transport_id(tid)[0]))
        pos += 24 + tlen
    assert descs == [
        (0x1111, 0x01, EARO, 1, "iqn.2024-01.test:node1,i,0x000000000001"),
        (0x2222, 0x02, 0, 1, "iqn.2024-01.test:node2,i,0x000000000002"),
    ]
    caps = bytes(prin(lu, N1, 2).data)
    assert caps[:2] == b"\x00\x08"
    assert caps[2] == 0x1D                  # CRH SIP_C ATP_C PTPL_C
    assert caps[3] & 0x80 and (caps[3] >> 4) & 7 <= 5
    assert caps[4:6] == b"\xea\x01"         # all six types
    # READ KEYS truncated to the header keeps the full ADDITIONAL LENGTH.
    r = prin(lu, N1, 0, alloc=8)
    assert len(r.data) == 8 and struct.unpack(">I", bytes(r.data)[4:8])[0] == 16


def test_transport_ids():
    tid = pr.encode_transport_id("iqn.2024-01.test:x,i,0x00023d000001")
    assert tid[0] == 0x45 and len(tid) % 4 == 0 and len(tid) >= 24
    assert pr.decode_transport_id(tid) == ("iqn.2024-01.test:x,i,0x00023d000001", len(tid))
    name_only = pr.encode_transport_id("iqn.2024-01.test:x")
    assert name_only[0] == 0x05
    assert pr.decode_transport_id(name_only)[0] == "iqn.2024-01.test:x"
    assert pr.decode_transport_id(b"\x01\x00\x00\x14" + bytes(20)) is None   # SAS, not iSCSI
    assert pr.decode_transport_id(tid[:10]) is None
    assert pr.nexus_transport_id(N1) == pr.encode_transport_id(N1.initiator_port)


def test_spec_i_pt_and_all_tg_pts(lu):
    other_port = nexus(1, target_port=TP2, rel=2)
    clear_ua(lu, other_port)
    tids = pr.encode_transport_id(N2.initiator_port) + pr.encode_transport_id(
        "iqn.2024-01.test:node3")
    extra = struct.pack(">I", len(tids)) + tids
    assert prout(lu, N1, REGISTER, sark=9, flags=0x08 | 0x04, extra=extra).status == GOOD
    assert read_keys(lu)[1] == [9, 9, 9]
    # N1 is registered through every target port, N2 and any node3 port too.
    for n in (N1, other_port, N2, N3, nexus(3, isid=0x77)):
        assert lu.pr.find(n) is not None
    # A bad TransportID refuses the whole command and changes nothing.
    bad = b"\x01\x00\x00\x14" + bytes(20)
    clear_ua(lu, nexus(4))
    r = prout(lu, nexus(4), REGISTER, sark=4, flags=0x08,
              extra=struct.pack(">I", len(bad)) + bad)
    assert asc(r) == (5, 0x26, 0x00)
    assert len(read_keys(lu)[1]) == 3
    # A registered nexus may not use SPEC_I_PT.
    r = prout(lu, N1, REGISTER, key=9, sark=10, flags=0x08, extra=struct.pack(">I", 0))
    assert asc(r) == (5, 0x26, 0x00)


def test_register_and_move(lu):
    prout(lu, N1, RIEK, sark=1)
    prout(lu, N1, RESERVE, key=1, ptype=WE)
    tid = pr.encode_transport_id(N2.initiator_port)
    body = struct.pack(">QQxBHI", 1, 0x22, 0x02, 1, len(tid)) + tid      # UNREG
    assert prout(lu, N1, MOVE, data=body).status == GOOD
    assert read_reservation(lu) == (0x22, WE)
    assert read_keys(lu)[1] == [0x22]
    assert write10(lu, N2) == GOOD and write10(lu, N1) == CONFLICT
    # Only the holder may move; not to itself; key zero is invalid.
    prout(lu, N3, RIEK, sark=3)
    body3 = struct.pack(">QQxBHI", 3, 0x33, 0, 1, len(tid)) + tid
    assert prout(lu, N3, MOVE, data=body3).status == CONFLICT
    self_tid = pr.encode_transport_id(N2.initiator_port)
    body_self = struct.pack(">QQxBHI", 0x22, 0x44, 0, 1, len(self_tid)) + self_tid
    assert asc(prout(lu, N2, MOVE, data=body_self)) == (5, 0x26, 0x00)
    body0 = struct.pack(">QQxBHI", 0x22, 0, 0, 1, len(tid)) + tid
    assert asc(prout(lu, N2, MOVE, data=body0)) == (5, 0x26, 0x00)


# ---------------------------------------------------------------- APTPL
def test_aptpl_saves_and_restores(dev):
    store = DictStore()
    a = LogicalUnit(dev, name="pr", serial="s1", wwn=WWN, pr_store=store)
    clear_ua(a, N1)
    clear_ua(a, N2)
    prout(a, N2, RIEK, sark=2)
    assert store.data is None                       # APTPL not asked for
    prout(a, N1, RIEK, sark=1, flags=0x01)
    prout(a, N1, RESERVE, key=1, ptype=WERO)
    assert store.data is not None and store.data["aptpl"] and store.data["type"] == WERO
    saved = store.data
    # "Restart": a new LU on the same store comes back with everything.
    b = LogicalUnit(dev, name="pr", serial="s1", wwn=WWN, pr_store=store)
    assert b.pr.describe()["registrations"] == a.pr.describe()["registrations"]
    clear_ua(b, N1)
    clear_ua(b, N3)
    assert read_reservation(b) == (1, WERO)
    assert read_keys(b)[0] == saved["generation"]
    assert write10(b, N1) == GOOD and write10(b, N3) == CONFLICT
    assert prin(b, N1, 2).data[3] & 0x01                          # PTPL_A
    # APTPL=0 on the next registration deletes the saved state.
    assert prout(b, N1, REGISTER, key=1, sark=5).status == GOOD
    assert store.data is None
    c = LogicalUnit(dev, name="pr", serial="s1", wwn=WWN, pr_store=store)
    assert c.pr.regs == {} and c.access_check is None


def test_admin_clear(lu):
    store = DictStore()
    lu.pr.store = store
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N1, RIEK, sark=1, flags=0x01)        # the last APTPL bit received counts
    prout(lu, N1, RESERVE, key=1, ptype=EA)
    assert store.data is not None
    before = lu.pr.admin_clear()
    assert len(before["registrations"]) == 2 and before["reservation"]["type"] == EA
    assert store.data is None
    assert clear_ua(lu, N1) == [pr.UA_RESERVATIONS_PREEMPTED]
    assert lu.access_check is None and read_keys(lu)[1] == []


# ---------------------------------------------------------------- SPC-2 RESERVE/RELEASE
RESERVE6 = bytes((0x16, 0, 0, 0, 0, 0))
RELEASE6 = bytes((0x17, 0, 0, 0, 0, 0))
RESERVE10 = bytes((0x56,)) + bytes(9)
RELEASE10 = bytes((0x57,)) + bytes(9)
MODE_SENSE6 = bytes((0x1A, 0, 0x3F, 0, 255, 0))


@pytest.mark.parametrize("reserve,release", [(RESERVE6, RELEASE6), (RESERVE10, RELEASE10)])
def test_spc2_reserve_release(lu, reserve, release):
    assert run(lu, N1, reserve).status == GOOD
    assert run(lu, N1, reserve).status == GOOD                 # again: fine
    assert run(lu, N2, reserve).status == CONFLICT
    assert run(lu, N2, release).status == GOOD                 # not the holder: no-op
    assert run(lu, N1, MODE_SENSE6).status == GOOD
    for cdb in (MODE_SENSE6, bytes(6), struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)):
        assert run(lu, N2, cdb).status == CONFLICT
    assert run(lu, N2, bytes((0x12, 0, 0, 0, 96, 0))).status == GOOD     # INQUIRY
    assert run(lu, N2, bytes((0x03, 0, 0, 0, 18, 0))).status == GOOD     # REQUEST SENSE
    # PERSISTENT RESERVE IN/OUT conflict for everyone, the holder too.
    assert prin(lu, N1, 0).status == CONFLICT
    assert prout(lu, N1, RIEK, sark=1).status == CONFLICT
    assert run(lu, N1, release).status == GOOD
    assert lu.access_check is None
    assert run(lu, N2, reserve).status == GOOD
    assert run(lu, N2, release).status == GOOD


def test_spc2_third_party_refused(lu):
    assert asc(run(lu, N1, bytes((0x56, 0x10)) + bytes(8)))[:2] == (5, 0x24)


@pytest.mark.parametrize("how", ["lun_reset", "warm_reset", "cold_reset", "nexus_loss"])
def test_spc2_released_by_resets_and_nexus_loss(lu, how):
    target = ScsiTarget(TGT)
    target.set_luns({0: lu})
    clear_ua(lu, N1)
    assert run(lu, N1, RESERVE6).status == GOOD
    if how == "nexus_loss":
        target.nexus_lost(N1)
    else:
        fn = {"lun_reset": TmfFunction.LOGICAL_UNIT_RESET,
              "warm_reset": TmfFunction.TARGET_WARM_RESET,
              "cold_reset": TmfFunction.TARGET_COLD_RESET}[how]
        target.task_management(fn, 0, N1)
    clear_ua(lu, N2)
    assert run(lu, N2, RESERVE6).status == GOOD
    assert run(lu, N2, RELEASE6).status == GOOD


def test_spc2_nexus_loss_of_another_nexus_keeps_it(lu):
    assert run(lu, N1, RESERVE6).status == GOOD
    lu.nexus_lost(N2)
    clear_ua(lu, N2)
    assert run(lu, N2, RESERVE6).status == CONFLICT


def test_spc2_and_persistent_reservations(lu):
    """SPC-4 §5.14.3: with registrations, RESERVE/RELEASE conflict except for
    the holder and registrants of registrants-only/all-registrants types."""
    prout(lu, N1, RIEK, sark=1)
    assert run(lu, N1, RESERVE6).status == CONFLICT        # registered, no reservation
    assert run(lu, N2, RELEASE6).status == CONFLICT
    prout(lu, N2, RIEK, sark=2)
    prout(lu, N1, RESERVE, key=1, ptype=WE)
    assert run(lu, N1, RESERVE6).status == GOOD            # holder: no-op
    assert run(lu, N1, RELEASE6).status == GOOD
    assert read_reservation(lu) == (1, WE)
    assert run(lu, N2, RESERVE6).status == CONFLICT        # registrant of WE: conflict
    prout(lu, N1, RELEASE, key=1, ptype=WE)
    prout(lu, N1, RESERVE, key=1, ptype=WERO)
    assert run(lu, N2, RESERVE6).status == GOOD            # registrant of WE-RO: no-op
    assert run(lu, N3, RESERVE6).status == CONFLICT
    assert lu.pr.spc2 is None
    assert read_reservation(lu) == (1, WERO)


def test_no_access_check_without_reservations(lu):
    """The READ/WRITE hot path pays one attribute test when nothing is reserved."""
    prout(lu, N1, RIEK, sark=1)
    assert lu.access_check is None
    run(lu, N1, RESERVE6)        # conflicts (registered), installs nothing
    assert lu.access_check is None


# ---------------------------------------------------------------- robustness
_op = st.tuples(
    st.sampled_from([N1, N2, N3, nexus(1, isid=0x42)]),
    st.integers(0, 9),                                   # service action
    st.sampled_from([0, 1, 2, 3]),                       # keys from a small set
    st.sampled_from([0, 1, 2, 3]),
    st.sampled_from([0, 1, 2, 3, 5, 6, 7, 8, 9]),        # type, some invalid
    st.sampled_from([0, 0, 0, 1]),                       # scope
    st.integers(0, 0x0F),                                # SPEC_I_PT / ALL_TG_PTS / APTPL
    st.binary(max_size=40),                              # trailing parameter bytes
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_random_prout_sequences_keep_invariants(dev, ops):
    """Any sequence of PERSISTENT RESERVE OUT commands gets a SCSI answer
    (never an internal error) and leaves a consistent state."""
    lu = LogicalUnit(dev, name="pr", serial="s1", wwn=WWN, pr_store=DictStore())
    for n, sa, key, sark, ptype, scope, flags, extra in ops:
        clear_ua(lu, n)
        r = prout(lu, n, sa, key=key, sark=sark, ptype=ptype, scope=scope, flags=flags,
                  extra=extra)
        assert r.status in (GOOD, CONFLICT, Status.CHECK_CONDITION)
        if r.status == Status.CHECK_CONDITION:
            assert r.sense[2] & 0x0F == 5, r.sense          # ILLEGAL REQUEST only
        state = lu.pr
        assert all(reg.key for reg in state.regs.values())
        if state.type:
            assert state.regs and state.holder is not None
            assert state.holder in state.regs.values()
            assert lu.access_check is pr.access_check
        else:
            assert state.holder is None and lu.access_check is None
        for m in (N1, N2, N3):
            clear_ua(lu, m)
            assert run(lu, m, bytes(6)).status == GOOD          # TUR is always allowed
    saved = lu.pr.store.data
    if saved is not None:
        again = LogicalUnit(dev, name="pr", serial="s1", wwn=WWN, pr_store=lu.pr.store)
        assert again.pr.to_dict() == lu.pr.to_dict()
