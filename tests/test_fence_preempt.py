"""``PersistentReservations.admin_preempt`` (SAN fencing) on an in-memory LU:
the fenced node's registrations go as after a PREEMPT AND ABORT, with the
unit attentions and task aborts SPC-4 requires, and APTPL state is saved."""

from __future__ import annotations

from storaged.scsi.lu import LogicalUnit
from storaged.scsi.types import Status
from tests import test_scsi_pr
from tests.test_scsi_pr import (
    EAAR,
    N1,
    N2,
    N3,
    REGISTER,
    RESERVE,
    WERO,
    DictStore,
    clear_ua,
    prout,
    read_keys,
    read_reservation,
    write10,
)

dev = test_scsi_pr.dev   # fixtures
lu = test_scsi_pr.lu
NODE1 = "iqn.2024-01.test:node1"


def _setup(lu: LogicalUnit, ptype: int) -> None:
    for k, n in ((1, N1), (2, N2), (3, N3)):
        assert prout(lu, n, REGISTER, sark=k).status == Status.GOOD
    assert prout(lu, N1, RESERVE, key=1, ptype=ptype).status == Status.GOOD
    for n in (N1, N2, N3):
        clear_ua(lu, n)


def test_fence_holder_of_wero(lu):
    _setup(lu, WERO)
    aborted = []
    lu.abort_hooks.append(lambda unit, nexus: aborted.append(nexus.initiator_port))
    gen0, _ = read_keys(lu)
    r = lu.pr.admin_preempt([NODE1], [])
    assert r == {"registrations": 1, "released": True}
    gen, keys = read_keys(lu)
    assert keys == [2, 3] and gen == gen0 + 1
    assert read_reservation(lu) is None
    assert aborted == [N1.initiator_port]
    assert clear_ua(lu, N1) == [(0x2A, 0x05)]       # REGISTRATIONS PREEMPTED
    assert clear_ua(lu, N2) == [(0x2A, 0x04)]       # RESERVATIONS RELEASED
    assert clear_ua(lu, N3) == [(0x2A, 0x04)]
    assert lu.pr.admin_preempt([NODE1], []) == {"registrations": 0, "released": False}


def test_fence_by_key_all_registrants(lu):
    _setup(lu, EAAR)
    assert lu.pr.admin_preempt([], [2]) == {"registrations": 1, "released": False}
    assert read_keys(lu)[1] == [1, 3]
    assert read_reservation(lu) == (0, EAAR)        # all-registrants: key 0, still held
    assert write10(lu, N2) == Status.CHECK_CONDITION   # the UA comes first
    assert clear_ua(lu, N2) == []
    assert write10(lu, N2) == Status.RESERVATION_CONFLICT
    assert clear_ua(lu, N3) == []                   # no release: nothing for the others


def test_fence_saves_aptpl(dev):
    store = DictStore()
    unit = LogicalUnit(dev, name="pr", serial="s1", wwn="6001405" + "0" * 25,
                       pr_store=store)
    for n in (N1, N2):
        clear_ua(unit, n)
    assert prout(unit, N1, REGISTER, sark=1, flags=0x01).status == Status.GOOD
    assert prout(unit, N2, REGISTER, sark=2, flags=0x01).status == Status.GOOD
    unit.pr.admin_preempt([NODE1], [])
    assert [r["key"] for r in store.data["registrations"]] == [2]
