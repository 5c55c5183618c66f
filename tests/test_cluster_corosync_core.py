"""The corosync membership core (sans-IO) on a simulated CPG bus.

The bus gives what CPG guarantees (extended virtual synchrony): every member
gets the same configuration changes and, between two of them, the same
messages in the same order.  Real corosync runs in tests/test_cluster_corosync.py.
"""

from __future__ import annotations

import pytest

from storaged.cluster.config import ClusterConfig, NodeEntry
from storaged.cluster.corosync.binding import (
    REASON_JOIN,
    REASON_LEAVE,
    REASON_NODEDOWN,
    REASON_PROCDOWN,
)
from storaged.cluster.corosync.membership import CorosyncMembership
from storaged.cluster.fencing import parse_fence_history
from storaged.cluster.membership import Fenced, FenceRequest, Reset, ViewInstalled
from storaged.state.errors import ValidationError


def config() -> ClusterConfig:
    return ClusterConfig(name="t", membership="corosync", nodes={
        i: NodeEntry(f"10.0.0.{i}:7870") for i in (1, 2, 3)})


class Bus:
    """One CPG group: members in join order; each member is (node, pid) -> core."""

    def __init__(self) -> None:
        self.cores: dict[tuple[int, int], CorosyncMembership] = {}
        self.ring = 1

    def add(self, node: int, pid: int, inc: int | None = None) -> CorosyncMembership:
        core = CorosyncMembership(node, config(), inc or node * 100, pid)
        core.totem(self.ring, [1, 2, 3])
        core.quorum_changed(True, self.ring, [1, 2, 3])
        return core

    def members(self) -> list[tuple[int, int, int]]:
        return [(n, p, 0) for n, p in sorted(self.cores)]

    def join(self, core: CorosyncMembership) -> None:
        self.cores[(core.node, core.pid)] = core
        self.confchg([], [(core.node, core.pid, REASON_JOIN)])

    def remove(self, key: tuple[int, int], reason: int) -> None:
        del self.cores[key]
        self.confchg([(key[0], key[1], reason)], [])

    def confchg(self, left, joined) -> None:  # noqa: ANN001
        for c in list(self.cores.values()):
            c.confchg(self.members(), left, joined)
        self.pump()

    def pump(self) -> None:
        """Deliver queued multicasts in one total order until quiet."""
        while True:
            queue = [(k, d) for k, c in sorted(self.cores.items()) for d in c.mcast]
            for c in self.cores.values():
                c.mcast = []
            if not queue:
                return
            for (n, p), data in queue:
                for c in list(self.cores.values()):
                    c.deliver(n, p, data)


def views(core: CorosyncMembership) -> list:
    return [e.view for e in core.events if isinstance(e, ViewInstalled)]


def full_bus() -> tuple[Bus, list[CorosyncMembership]]:
    bus = Bus()
    cores = []
    for n in (2, 3, 1):  # not in node order: the view must not depend on join order
        c = bus.add(n, 1000 + n)
        bus.join(c)
        cores.append(c)
    return bus, sorted(cores, key=lambda c: c.node)


def test_every_member_installs_the_same_views():
    _, cores = full_bus()
    last = [c.view for c in cores]
    assert all(v == last[0] for v in last), last
    v = last[0]
    assert v.nodes == (1, 2, 3) and v.quorate and v.coordinator == 1
    assert v.members == ((1, 100), (2, 200), (3, 300))
    # Ids grow on every node, and one id names one member list everywhere.
    seen: dict[tuple, tuple] = {}
    for c in cores:
        ids = [x.id for x in views(c)]
        assert ids == sorted(set(ids)), ids
        for x in views(c):
            assert seen.setdefault(x.id, x.members) == x.members


def test_procdown_is_fenced_by_the_coordinator():
    bus, (c1, c2, _) = full_bus()
    for c in (c1, c2):
        c.events.clear()
    bus.remove((3, 1003), REASON_PROCDOWN)
    for c in (c1, c2):
        (v,) = views(c)
        assert v.nodes == (1, 2) and v.quorate and v.removed == ((3, 300),)
        assert c.pending_fence == {(3, 300)}
    assert [e for e in c1.events if isinstance(e, FenceRequest)] == [FenceRequest(3, 300)]
    assert not [e for e in c2.events if isinstance(e, FenceRequest)]
    c1.fenced(3, 300)
    bus.pump()
    for c in (c1, c2):
        assert Fenced(3, 300) in c.events and not c.pending_fence
        assert (3, 300) in c.dead


def test_clean_leave_is_not_fenced():
    bus, (c1, c2, _) = full_bus()
    bus.remove((3, 1003), REASON_LEAVE)
    assert c1.view.nodes == (1, 2) and c1.view.left == ((3, 300),)
    assert not c1.pending_fence and not c2.pending_fence
    assert not [e for e in c1.events if isinstance(e, FenceRequest)]


def test_no_hello_on_a_stale_quorum_after_nodedown():
    """A partition: CPG reports nodes down before corosync's new ring and quorum
    reach us.  The old quorum (quorate) must not make the minority's view quorate."""
    bus, (_, _, c3) = full_bus()
    bus.cores = {(3, 1003): c3}
    c3.events.clear()
    bus.confchg([(1, 1001, REASON_NODEDOWN), (2, 1002, REASON_NODEDOWN)], [])
    assert views(c3) == [], "installed a view on the old ring's quorum"
    c3.totem(7, [3])
    bus.pump()
    assert views(c3) == []  # quorum still about ring 1
    c3.quorum_changed(False, 7, [3])
    bus.pump()
    (v,) = views(c3)
    assert v.nodes == (3,) and not v.quorate
    assert not [e for e in c3.events if isinstance(e, FenceRequest)]  # not quorate


def test_quorum_change_alone_installs_a_new_view():
    bus, cores = full_bus()
    before = cores[0].view
    for c in cores:
        c.quorum_changed(False, bus.ring, [1, 2, 3])
    bus.pump()
    after = [c.view for c in cores]
    assert all(v == after[0] for v in after)
    assert not after[0].quorate and after[0].id > before.id and after[0].nodes == (1, 2, 3)


def test_fenced_node_that_returns_starts_a_new_incarnation():
    bus, (c1, c2, c3) = full_bus()
    # Node 3 is cut off (its process lives on), the majority fences it.
    bus.cores = {k: v for k, v in bus.cores.items() if k[0] != 3}
    bus.confchg([(3, 1003, REASON_NODEDOWN)], [])
    c1.fenced(3, 300)
    bus.pump()
    assert (3, 300) in c1.dead
    # The link comes back: CPG merges the groups.
    bus.cores[(3, 1003)] = c3
    c3.events.clear()
    bus.confchg([], [(3, 1003, REASON_JOIN)])
    resets = [e for e in c3.events if isinstance(e, Reset)]
    assert resets and resets[0].old_inc == 300
    for c in (c1, c2, c3):
        assert c.view.nodes == (1, 2, 3)
        assert c.view.incarnation(3) == c3.inc != 300


def test_parse_fence_history():
    xml = """<pacemaker-result api-version="2.25" request="stonith_admin --history n3">
      <list name="fencing history" count="2">
        <fence_event action="off" target="n3" client="stonith_admin.1" origin="n1"
                     status="success" delegate="n1" completed="2026-12-07 01:51:29Z"/>
        <fence_event action="reboot" target="n3" status="failed"
                     completed="2026-12-07 01:50:00 +00:00"/>
        <fence_event action="off" target="n2" status="success"
                     completed="2026-12-07 01:00:00Z"/>
      </list><status code="0" message="OK"/></pacemaker-result>"""
    events = parse_fence_history(xml, "n3")
    assert [(a, s) for a, s, _ in events] == [("off", "success"), ("reboot", "failed")]
    assert events[0][2] - events[1][2] == 89
    assert parse_fence_history("not xml", "n3") == []


def test_membership_setting_is_validated():
    cfg = config()
    cfg.validate()
    cfg.membership = "etcd"
    with pytest.raises(ValidationError, match="membership must be one of storaged, corosync"):
        cfg.validate()
    assert ClusterConfig(name="x", nodes={1: NodeEntry("10.0.0.1")}).membership == "storaged"


def test_cli_init_with_corosync_membership(tmp_path):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "storaged", "--dir", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=30)

    r = cli("cluster", "init", "prod", "--id", "1", "--membership", "corosync",
            "--fencer", "pacemaker", "--node", "1=10.0.0.1", "--node", "2=10.0.0.2")
    assert r.returncode == 0, r.stderr
    r = cli("cluster", "status")
    assert "providers: membership corosync, fencing pacemaker" in r.stdout, r.stdout
    assert "node process: not running" in r.stdout
    r = cli("cluster", "init", "prod", "--id", "1", "--membership", "zookeeper",
            "--node", "1=10.0.0.1")
    assert r.returncode != 0 and "zookeeper" in r.stderr and "corosync" in r.stderr


def test_node_without_corosync_names_the_problem(tmp_path):
    """A node with membership=corosync and no corosync in its network namespace (the
    test machine's root namespace runs none: corosync runs only inside the netns tests)
    fails to start with a message saying so, and frees its port."""
    import asyncio

    from storaged.cluster.node import ClusterNode

    cfg = ClusterConfig(name="t", membership="corosync",
                        nodes={1: NodeEntry("127.0.0.1:45990"), 2: NodeEntry("127.0.0.2:45990")})

    async def main() -> None:
        node = ClusterNode(cfg, 1, fencer=None)
        try:
            with pytest.raises(RuntimeError, match="corosync membership: .*CS_ERR_LIBRARY"):
                await node.start()
        finally:
            await node.stop()
        # The port is free again: the failed start closed its sockets.
        node2 = ClusterNode(ClusterConfig(name="t", nodes=cfg.nodes), 1)
        await node2.start()
        await node2.stop()
    asyncio.run(main())


def test_node_back_in_corosync_without_storaged_does_not_block_views():
    """Node 3's host dies (nodedown) and its corosync comes back without storaged: the
    new ring holds node 3 again, which must not look like a stale ring forever."""
    bus, (c1, c2, _) = full_bus()
    bus.cores = {k: v for k, v in bus.cores.items() if k[0] != 3}
    bus.confchg([(3, 1003, REASON_NODEDOWN)], [])
    for c in (c1, c2):
        c.totem(8, [1, 2])
        c.quorum_changed(True, 8, [1, 2])
    bus.pump()
    assert c1.view.nodes == (1, 2) and c1.view.quorate
    for c in (c1, c2):  # corosync 3 is back (ring 9), storaged 3 is not
        c.events.clear()
        c.totem(9, [1, 2, 3])
        c.quorum_changed(True, 9, [1, 2, 3])
    assert c1.ring_current()
    bus.remove((2, 1002), REASON_PROCDOWN)  # a later change still makes a view
    assert c1.view.nodes == (1,) and c1.view.quorate


def test_lost_corosync_connection_is_not_quorate_and_a_new_incarnation():
    _, (c1, _, _) = full_bus()
    c1.events.clear()
    c1.lost()
    (reset,) = [e for e in c1.events if isinstance(e, Reset)]
    (v,) = views(c1)
    assert reset.old_inc == 100 and c1.inc == 101
    assert v.nodes == (1,) and not v.quorate and v.incarnation(1) == 101
    assert not c1.quorate() and not c1.ring_current()


def test_cli_node_without_corosync_fails_with_a_message(tmp_path):
    import subprocess
    import sys
    d = str(tmp_path)
    init = subprocess.run([sys.executable, "-m", "storaged", "--dir", d, "cluster", "init",
                           "c", "--id", "1", "--membership", "corosync", "--node",
                           "1=127.0.0.1:45991"], capture_output=True, text=True, timeout=30)
    assert init.returncode == 0, init.stderr
    r = subprocess.run([sys.executable, "-m", "storaged", "--dir", d, "cluster", "node"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "corosync membership: cmap_initialize: CS_ERR_LIBRARY (is corosync running in " \
        "this network namespace?)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_own_pid_as_corosync_sees_it():
    """In a container corosync reports another pid for us: the join tells which."""
    bus = Bus()
    c1 = bus.add(1, 1001)
    c2 = bus.add(2, 1002)
    bus.join(c1)
    c2.pid = 55  # our getpid() inside the container; corosync says 1002
    bus.cores[(2, 1002)] = c2
    bus.confchg([], [(2, 1002, REASON_JOIN)])
    assert c2.pid == 1002
    assert c1.view.nodes == (1, 2) and c2.view == c1.view
