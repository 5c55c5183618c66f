"""The PR state backend seam (storaged.scsi.pr_backend), in memory.

Two LogicalUnits stand for two storage nodes serving one LU; a group backend
hands every change's Update to the other one, as the cluster backend does
over the network (tests/test_shared_pr.py runs the real thing).  Whatever
the split of commands between the nodes, the group must behave exactly like
one LU that sees every command: same statuses, same state, same unit
attentions and aborted nexuses.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storaged.block.file import FileBlockDevice
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.pr_backend import LOCAL, Update
from storaged.scsi.types import Nexus, ScsiResult, Status
from tests.test_scsi_pr import (
    CLEAR,
    PREEMPT,
    PREEMPT_ABORT,
    REGISTER,
    RELEASE,
    RESERVE,
    RIEK,
    WERO,
    WWN,
    DictStore,
    clear_ua,
    prout,
    read_keys,
    read_reservation,
)

TP_A = "iqn.2024-01.test:tgt,t,0x0001"
TP_B = "iqn.2024-01.test:tgt,t,0x0002"


def nexus(host: int, tp: str) -> Nexus:
    name = f"iqn.2024-01.test:host{host}"
    rel = 1 if tp == TP_A else 2
    return Nexus(f"{name},i,0x{0x100 + host * 4 + rel:012x}", tp, relative_port_id=rel,
                 initiator_name=name, target_name=tp.partition(",")[0])


class GroupBackend:
    """Every change made on one member is applied by the others before it returns."""

    blocking = False

    def __init__(self) -> None:
        self.members: list[LogicalUnit] = []
        self.updates: list[dict] = []

    def join(self, lu: LogicalUnit) -> None:
        self.members.append(lu)
        lu.pr.backend = self

    def run(self, pr, change) -> ScsiResult:  # noqa: ANN001
        result, update = change()
        if update is not None:
            wire = json.loads(json.dumps(update.to_dict()))     # what goes over the network
            self.updates.append(wire)
            for lu in self.members:
                if lu.pr is not pr:
                    assert lu.pr.apply_update(Update.from_dict(wire))
        return result

    async def arun(self, pr, change) -> ScsiResult:  # noqa: ANN001
        return self.run(pr, change)

    def stale(self, pr) -> None:  # noqa: ANN001
        return None


def make_lu(path: str, store: DictStore | None = None) -> tuple[LogicalUnit, list[str]]:
    dev = FileBlockDevice(path, block_size=512)
    lu = LogicalUnit(dev, name="shared", serial="s1", wwn=WWN, pr_store=store)
    aborted: list[str] = []
    lu.abort_hooks.append(lambda _lu, n: aborted.append(n.initiator_port))
    return lu, aborted


def image(tmp_path, name: str) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


def state(lu: LogicalUnit) -> dict:
    d = lu.pr.to_dict()
    d.pop("seq")
    return d


def test_change_reports_an_update_only_when_the_state_changed(tmp_path):
    lu, _ = make_lu(image(tmp_path, "d"))
    n = nexus(1, TP_A)
    clear_ua(lu, n)
    seen: list = []

    class Spy:
        blocking = False

        def run(self, pr, change):  # noqa: ANN001
            result, update = change()
            seen.append(update)
            return result

        def stale(self, pr) -> None:  # noqa: ANN001
            return None

    lu.pr.backend = Spy()
    assert prout(lu, n, RIEK, sark=7).status == Status.GOOD
    assert prout(lu, n, RESERVE, key=7, ptype=WERO).status == Status.GOOD
    assert prout(lu, n, RESERVE, key=7, ptype=WERO).status == Status.GOOD   # no change
    assert prout(lu, n, RESERVE, key=8, ptype=WERO).status == Status.RESERVATION_CONFLICT
    assert [u is not None for u in seen] == [True, True, False, False]
    assert [u.seq for u in seen if u] == [1, 2]
    assert seen[1].state["type"] == WERO and seen[1].state["generation"] == 1
    lu.pr.backend = LOCAL
    lu.device.close()


def test_update_applies_state_unit_attentions_aborts_and_aptpl(tmp_path):
    store_a, store_b = DictStore(), DictStore()
    a, aborted_a = make_lu(image(tmp_path, "a"), store_a)
    b, aborted_b = make_lu(image(tmp_path, "a"), store_b)
    group = GroupBackend()
    group.join(a)
    group.join(b)
    h1, h2 = nexus(1, TP_A), nexus(2, TP_B)
    clear_ua(a, h1)
    clear_ua(b, h2)
    assert prout(a, h1, RIEK, sark=1, flags=0x01).status == Status.GOOD     # APTPL
    assert prout(b, h2, RIEK, sark=2, flags=0x01).status == Status.GOOD
    assert prout(b, h2, RESERVE, key=2, ptype=WERO).status == Status.GOOD
    assert state(a) == state(b) and a.pr.seq == b.pr.seq == 3
    assert store_a.data is not None and store_a.data == store_b.data    # saved on each node
    assert read_keys(a) == read_keys(b) == (2, [1, 2])
    # PREEMPT AND ABORT through A of the holder on B: B's nexus loses its
    # registration, its tasks are aborted on B, it hears REGISTRATIONS PREEMPTED.
    assert prout(a, h1, PREEMPT_ABORT, key=1, sark=2, ptype=WERO).status == Status.GOOD
    assert aborted_b == [h2.initiator_port] and aborted_a == []
    assert clear_ua(b, h2) == [(0x2A, 0x05)]
    assert clear_ua(a, h1) == []
    assert read_reservation(b) == (1, WERO) and read_keys(b) == read_keys(a) == (3, [1])
    # An old or repeated update changes nothing.
    assert not b.pr.apply_update(Update.from_dict(group.updates[-1]))
    assert not b.pr.apply_update(Update.from_dict(group.updates[0]))
    assert state(a) == state(b)
    # Dropping APTPL deletes the saved state on every node.
    h3 = nexus(3, TP_B)
    clear_ua(b, h3)
    assert prout(b, h3, RIEK, sark=3).status == Status.GOOD
    assert store_a.data is None and store_b.data is None
    a.device.close()
    b.device.close()


def test_seq_survives_an_aptpl_restart(tmp_path):
    store = DictStore()
    lu, _ = make_lu(image(tmp_path, "d"), store)
    n = nexus(1, TP_A)
    clear_ua(lu, n)
    for key in (5, 6, 7):
        assert prout(lu, n, RIEK, sark=key, flags=0x01).status == Status.GOOD
    lu.device.close()
    again, _ = make_lu(image(tmp_path, "d2"), store)
    assert again.pr.seq == 3 and again.pr.generation == 3
    again.device.close()


HOSTS = (1, 2, 3)
KEYS = (0, 0x11, 0x22, 0x33)
TYPES = (1, 3, 5, 6, 7, 8)
command = st.tuples(st.sampled_from([REGISTER, RIEK, RESERVE, RELEASE, CLEAR, PREEMPT,
                                     PREEMPT_ABORT]),
                    st.sampled_from(HOSTS), st.sampled_from((TP_A, TP_B)),
                    st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(TYPES),
                    st.sampled_from((0, 0x04)))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(command, min_size=1, max_size=25))
def test_two_nodes_behave_like_one_lu(tmp_path, cmds):
    """Commands split over two nodes by target port give the statuses, state,
    unit attentions and aborts of one LU receiving all of them."""
    path = image(tmp_path, "shared")
    ref, aborted_ref = make_lu(path)
    a, aborted_a = make_lu(path)
    b, aborted_b = make_lu(path)
    group = GroupBackend()
    group.join(a)
    group.join(b)
    node = {TP_A: a, TP_B: b}
    try:
        every = [nexus(h, tp) for h in HOSTS for tp in (TP_A, TP_B)]
        for n in every:
            clear_ua(ref, n)
            clear_ua(node[n.target_port], n)
        for sa, host, tp, key, sark, ptype, flags in cmds:
            n = nexus(host, tp)
            want = prout(ref, n, sa, key=key, sark=sark, ptype=ptype, flags=flags)
            got = prout(node[tp], n, sa, key=key, sark=sark, ptype=ptype, flags=flags)
            assert (got.status, bytes(got.sense or b"")) == \
                (want.status, bytes(want.sense or b"")), (sa, host, tp)
        assert state(a) == state(b) == state(ref)
        assert a.pr.seq == b.pr.seq
        assert sorted(aborted_a + aborted_b) == sorted(aborted_ref)
        for n in every:
            assert node[n.target_port].pending_unit_attentions(n) == \
                ref.pending_unit_attentions(n), n.initiator_port
    finally:
        for lu in (ref, a, b):
            lu.device.close()


def test_admin_clear_and_san_fencing_reach_every_node(tmp_path):
    import asyncio

    a, aborted_a = make_lu(image(tmp_path, "a"))
    b, aborted_b = make_lu(image(tmp_path, "a"))
    group = GroupBackend()
    group.join(a)
    group.join(b)
    h1, h2 = nexus(1, TP_A), nexus(2, TP_B)
    clear_ua(a, h1)
    clear_ua(b, h2)
    assert prout(a, h1, RIEK, sark=1).status == Status.GOOD
    assert prout(b, h2, RIEK, sark=2).status == Status.GOOD
    assert prout(a, h1, RESERVE, key=1, ptype=WERO).status == Status.GOOD
    # storaged fence off of host 2 (SAN level) run on node A: gone on B too,
    # its tasks aborted on B where it is logged in.
    got = asyncio.run(a.pr.admin_preempt_everywhere(["iqn.2024-01.test:host2"], []))
    assert got == {"registrations": 1, "released": False}
    assert aborted_b == [h2.initiator_port] and aborted_a == []
    assert clear_ua(b, h2) == [(0x2A, 0x05)]
    assert state(a) == state(b) and read_keys(b) == (3, [1])
    # storaged pr clear through node B clears node A and tells its initiators.
    before = asyncio.run(b.pr.admin_clear_everywhere())
    assert [r["key"] for r in before["registrations"]] == [f"0x{1:016x}"]
    assert clear_ua(a, h1) == [(0x2A, 0x03)]
    assert state(a) == state(b) and read_keys(a) == (4, [])
    assert a.pr.seq == b.pr.seq
    a.device.close()
    b.device.close()
