"""Membership and quorum cores in memory (sans-IO): simulated network and clocks."""

from __future__ import annotations

from storaged.cluster.config import ClusterConfig, NodeEntry
from storaged.cluster.membership import Membership, Reset, SkewWarning, ViewInstalled
from storaged.cluster.quorum import compute


def cfg(n: int, **kw) -> ClusterConfig:
    return ClusterConfig(name="m", nodes={i: NodeEntry(f"127.0.0.{i}:7870")
                                          for i in range(1, n + 1)}, token_ms=1000, **kw)


class Net:
    """Delivers every message instantly; ``cut`` holds directed links that drop."""

    def __init__(self, c: ClusterConfig, skew: dict[int, float] | None = None) -> None:
        self.nodes = {n: Membership(n, c, 100 + n, 0.0) for n in c.nodes}
        self.now = 0.0
        self.skew = skew or {}
        self.cut: set[tuple[int, int]] = set()
        self.down: set[int] = set()
        self.views: dict[int, list] = {n: [] for n in c.nodes}
        self.events: dict[int, list] = {n: [] for n in c.nodes}

    def run(self, seconds: float, step: float = 0.02) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for n, m in self.nodes.items():
                if n not in self.down:
                    m.tick(self.now, self.now + self.skew.get(n, 0.0))
            self.deliver()

    def deliver(self) -> None:
        moved = True
        while moved:
            moved = False
            for n, m in self.nodes.items():
                out, m.out = m.out, []
                for ev in m.events:
                    self.events[n].append(ev)
                    if isinstance(ev, ViewInstalled):
                        self.views[n].append(ev.view)
                m.events = []
                if n in self.down:
                    continue
                for dst, msg in out:
                    moved = True
                    if dst in self.down or (n, dst) in self.cut:
                        continue
                    self.nodes[dst].receive(n, m.inc, dict(msg), self.now,
                                            self.now + self.skew.get(dst, 0.0))

    def view(self, n: int):
        return self.nodes[n].view


def test_quorum_rules():
    votes = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert compute(votes, [1, 2, 3]).quorate
    assert not compute(votes, [1, 2]).quorate
    assert compute(votes, [1, 2, 3], configured_expected=7).quorum == 4
    two = {1: 1, 2: 1}
    assert not compute(two, [1], two_node=True, all_seen=False).quorate  # implies wfa
    assert compute(two, [1], two_node=True, all_seen=True).quorate
    assert not compute(votes, [1, 2, 3], wait_for_all=True, all_seen=False).quorate


def test_all_nodes_agree_on_one_view():
    net = Net(cfg(5))
    net.run(2.0)
    views = {n: net.view(n) for n in net.nodes}
    assert len({v.id for v in views.values()}) == 1
    v = views[1]
    assert v.nodes == (1, 2, 3, 4, 5) and v.quorate and v.coordinator == 1


def test_failure_detection_and_fencing_request():
    net = Net(cfg(3))
    net.run(1.5)
    first = net.view(1).id
    net.down.add(1)                       # the coordinator dies
    net.run(1.0 + 0.5)                    # token (1 s) + a heartbeat or two
    v2, v3 = net.view(2), net.view(3)
    assert v2 == v3 and v2.id > first and v2.nodes == (2, 3) and v2.quorate
    assert v2.removed == ((1, 101),) and v2.pending_fence == ((1, 101),)
    assert any(type(e).__name__ == "FenceRequest" for e in net.events[2])
    net.nodes[2].fenced(1, 101)
    net.deliver()
    assert not net.nodes[3].pending_fence


def test_view_ids_unique_and_monotonic_across_partition():
    net = Net(cfg(5))
    net.run(1.5)
    for a in (1, 2, 3):
        for b in (4, 5):
            net.cut |= {(a, b), (b, a)}
    net.run(2.0)
    by_id: dict = {}
    for views in net.views.values():
        ids = [v.id for v in views]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for v in views:
            assert by_id.setdefault(v.id, v.members) == v.members  # one id, one member list
    assert net.view(1).nodes == (1, 2, 3) and net.view(1).quorate
    assert net.view(4).nodes == (4, 5) and not net.view(4).quorate


def test_removed_node_rejoins_as_new_incarnation():
    net = Net(cfg(3))
    net.run(1.5)
    net.cut |= {(3, 1), (3, 2), (1, 3), (2, 3)}
    net.run(1.5)
    assert net.view(1).nodes == (1, 2)
    net.cut.clear()
    net.run(1.5)
    resets = [e for e in net.events[3] if isinstance(e, Reset)]
    assert resets and resets[0].old_inc == 103
    v = net.view(1)
    assert v.nodes == (1, 2, 3) and v.incarnation(3) == resets[-1].new_inc


def test_clean_leave_needs_no_fencing():
    net = Net(cfg(3))
    net.run(1.5)
    net.nodes[3].leave()
    net.deliver()
    net.down.add(3)
    net.run(0.5)
    v = net.view(1)
    assert v.nodes == (1, 2) and v.left == ((3, 103),) and not v.pending_fence


def test_two_node_waits_for_all_once():
    net = Net(cfg(2, two_node=True))
    net.down.add(2)
    net.run(1.5)
    assert not net.view(1).quorate        # never saw node 2
    net.down.clear()
    net.run(1.0)
    assert net.view(1).quorate and net.view(1).nodes == (1, 2)
    net.down.add(2)
    net.run(1.5)
    assert net.view(1).nodes == (1,) and net.view(1).quorate  # two_node: 1 vote is enough


def test_clock_skew_is_measured_and_warned():
    net = Net(cfg(2), skew={2: 2.5})
    net.run(1.5)
    skew = net.nodes[1].skew[2]
    assert abs(skew - 2.5) < 0.05
    assert any(isinstance(e, SkewWarning) and e.warn for e in net.events[1])
    assert net.nodes[1].status(net.now)["skew_warn"] == [2]


def test_kernel_clock_state_travels_in_heartbeats_and_warns():
    from storaged.cluster.membership import ClockWarning

    net = Net(cfg(3, clock_warn_ms=500))
    net.nodes[1].set_local_clock(True, 20_000)        # synced, 20 ms maxerror
    net.nodes[2].set_local_clock(False, 16_000_000)   # STA_UNSYNC (no NTP client)
    net.nodes[3].set_local_clock(True, 900_000)       # synced, but 0.9 s > 0.5 s
    net.run(1.0)
    clock = net.nodes[1].status(net.now)["clock"]
    assert clock["1"] == {"synced": True, "maxerror_ms": 20.0, "warn": False}
    assert clock["2"] == {"synced": False, "maxerror_ms": 16000.0, "warn": True}
    assert clock["3"]["warn"] and clock["3"]["synced"]
    warned = {e.node for e in net.events[1] if isinstance(e, ClockWarning) and e.warn}
    assert warned == {2, 3}
    net.nodes[2].set_local_clock(True, 10_000)         # an NTP client took over
    net.run(1.0)
    assert not net.nodes[1].status(net.now)["clock"]["2"]["warn"]
    assert any(isinstance(e, ClockWarning) and e.node == 2 and not e.warn
               for e in net.events[1])


def test_read_kernel_clock_reports_a_state():
    from storaged.cluster.clock import read_kernel_clock

    clock = read_kernel_clock()
    assert clock is not None  # adjtimex(2) with modes 0 needs no privilege
    assert clock.maxerror_us >= 0 and isinstance(clock.synced, bool)
    if clock.status & 0x40:  # STA_UNSYNC
        assert not clock.synced


def test_rejoining_lowest_id_node_is_not_removed_again():
    """Node 1 (the coordinator after it rejoins) used to propose a view before its first
    heartbeat as the new incarnation: the others acked, then removed and fenced it again
    because they still knew only its dead incarnation (a reset every few ticks)."""
    from storaged.cluster.membership import FenceRequest

    net = Net(cfg(3))
    net.run(1.5)
    net.cut |= {(1, 2), (1, 3), (2, 1), (3, 1)}
    net.run(3.0)
    assert net.view(2).nodes == (2, 3)
    net.cut.clear()
    net.run(3.0)
    resets = [e for e in net.events[1] if isinstance(e, Reset)]
    fences = {e.inc for n in (2, 3) for e in net.events[n] if isinstance(e, FenceRequest)}
    assert len(resets) == 1 and fences == {101}
    assert net.view(2).nodes == (1, 2, 3) and net.view(2).incarnation(1) == resets[0].new_inc
