"""Membership from corosync (sans-IO): CPG views and votequorum's quorum as storaged views.

The shell feeds corosync's callbacks (:meth:`CorosyncMembership.confchg`,
:meth:`~CorosyncMembership.totem`, :meth:`~CorosyncMembership.quorum_changed`,
:meth:`~CorosyncMembership.deliver`) and multicasts what the core appends to
``mcast`` through CPG (agreed order); it acts on ``events`` exactly as for
storaged's own membership: :class:`ViewInstalled`, :class:`FenceRequest`,
:class:`Fenced`, :class:`Reset`.  The DLM therefore consumes views from
either provider the same way.

Agreement.  Every storaged node joins the CPG group ``storaged.<cluster>``.
CPG gives extended virtual synchrony: every member sees the same
configuration changes and, between two of them, the same messages in the
same order.  After each configuration change every member multicasts a
``hello`` (its incarnation, installed view sequence, quorum flag, pending
fences, fenced pairs).  Each member installs a view once it delivered a
hello from every current member since the change, computed only from those
hellos, so all members install the same view under the same id:

* members: (node id, incarnation) of the group members;
* id: ``(seq, lowest node id)``, ``seq`` one above the highest sequence any
  hello reported (the first view of a configuration) or one above the
  installed one (a later view in the same configuration, e.g. after a quorum
  change): ids grow on every node and one id names one member list;
* quorate: every hello said quorate.  A node says hello only once its
  quorum notification is for the same totem ring as its latest totem
  configuration and that ring no longer holds a node CPG reported down, so a
  stale quorum flag from before a partition never reaches a view.

Fencing.  A member that leaves CPG with reason ``nodedown`` or ``procdown``
left uncleanly (``leave`` is a clean :func:`cpg_leave`); its (node,
incarnation) becomes a pending fence.  The coordinator (lowest node id) of
a quorate view asks the shell to fence (:class:`FenceRequest`) and
multicasts ``fenced`` on success, which every member applies in the same
order.  A pair that was fenced is dead: if it is still in the group (a
partitioned node that came back) it starts a new incarnation
(:class:`Reset`), dropping everything it held.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from storaged.cluster.config import ClusterConfig
from storaged.cluster.corosync.binding import REASON_LEAVE, REASON_NODEDOWN, REASONS
from storaged.cluster.membership import (
    Fenced,
    FenceRequest,
    Pair,
    Reset,
    View,
    ViewInstalled,
)
from storaged.cluster.quorum import QuorumInfo

Member = tuple[int, int, int]  # (nodeid, pid, reason)


@dataclass
class _Hello:
    inc: int
    seq: int
    quorate: bool
    pending: set[Pair]
    dead: set[Pair]


def _pairs(raw: Any) -> set[Pair]:
    return {(int(a), int(b)) for a, b in raw or ()}


class CorosyncMembership:
    """Membership of one node, driven by corosync (duck-types ``Membership``)."""

    provider = "corosync"

    def __init__(self, node_id: int, config: ClusterConfig, incarnation: int, pid: int) -> None:
        self.node = node_id
        self.inc = incarnation
        self.pid = pid
        self.config = config
        self.out: list[tuple[int, dict[str, Any]]] = []   # ZeroMQ messages: none
        self.mcast: list[bytes] = []                       # CPG messages to send
        self.events: list[Any] = []
        self.view: View | None = None
        self.group: dict[tuple[int, int], int] = {}        # (nodeid, pid) -> reason joined
        self.incs: dict[tuple[int, int], int] = {}         # (nodeid, pid) -> incarnation
        self.hellos: dict[tuple[int, int], _Hello] = {}    # since the last confchg
        self.round_installed = False
        self.pending_fence: set[Pair] = set()
        self.dead: set[Pair] = set()
        self.left = False
        self.clocks: dict[int, tuple[bool, int]] = {}
        # Ring state: the latest totem configuration and quorum notification.
        self.ring_seq: int | None = None
        self.ring_nodes: set[int] = set()
        self.q_seq: int | None = None
        self.q_quorate = False
        self.q_nodes: set[int] = set()
        self.nodedown: set[int] = set()
        self.need_hello = False
        self.votequorum: dict[str, Any] = {}               # set by the shell (status only)
        self.names: dict[int, str] = {}                    # corosync node names (cmap)
        self.log: list[str] = []                           # last 8 CPG changes (status)

    # --------------------------------------------------------------- queries

    def quorate(self) -> bool:
        return self.view is not None and self.view.quorate

    def alive(self, now: float) -> dict[int, int]:
        """Group members (with incarnations where known), like ``Membership.alive``."""
        _ = now
        return {n: self.incs.get((n, p), 0) for n, p in sorted(self.group)}

    def status(self, now: float) -> dict[str, Any]:
        v = self.view
        vq = self.votequorum
        return {
            "node": self.node, "incarnation": self.inc,
            "view": None if v is None else {
                "id": v.label(), "members": list(v.nodes), "quorate": v.quorate,
                "votes": v.quorum.votes, "expected_votes": v.quorum.expected,
                "quorum": v.quorum.quorum, "wait_for_all": v.quorum.wait_for_all},
            "alive": list(self.alive(now)),
            "pending_fence": sorted(n for n, _ in self.pending_fence),
            "skew_ms": {}, "skew_warn": [],
            "clock": {str(n): {"synced": s, "maxerror_ms": round(e / 1000, 3), "warn": False}
                      for n, (s, e) in sorted(self.clocks.items())},
            "corosync": {
                "ring": self.ring_seq, "ring_members": sorted(self.ring_nodes),
                "quorate": self.q_quorate, "quorum_members": sorted(self.q_nodes),
                "cpg_members": sorted({n for n, _ in self.group}),
                "names": {str(n): s for n, s in sorted(self.names.items())},
                "recent_changes": list(self.log),
                **vq},
        }

    def set_local_clock(self, synced: bool, maxerror_us: int) -> None:
        self.clocks[self.node] = (synced, maxerror_us)

    # -------------------------------------------- inputs that do nothing here

    def tick(self, now: float, wall: float) -> None:
        """Timers belong to corosync: nothing to do."""

    def receive(self, src: int, inc: int, msg: dict[str, Any], now: float, wall: float) -> None:
        """ZeroMQ membership messages are not used with corosync."""

    # ------------------------------------------------------- corosync input

    def totem(self, ring_seq: int, nodes: list[int]) -> None:
        """A totem (ring) configuration: ``nodes`` are the corosync nodes in the ring."""
        if ring_seq != self.ring_seq:
            # A new ring is newer than any nodedown CPG reported before it: a node that
            # is in it again (its corosync came back) is simply a ring member.
            self.nodedown.clear()
        self.ring_seq = ring_seq
        self.ring_nodes = set(nodes)
        self._maybe_hello()

    def quorum_changed(self, quorate: bool, ring_seq: int, nodes: list[int]) -> None:
        """libquorum's notification: ``quorate`` for the ring ``ring_seq`` of ``nodes``."""
        changed = quorate != self.q_quorate
        self.q_quorate, self.q_seq, self.q_nodes = quorate, ring_seq, set(nodes)
        if changed:
            self.need_hello = True
        self._maybe_hello()

    def confchg(self, members: list[Member], left: list[Member], joined: list[Member]) -> None:
        """A CPG configuration change of our group (same order on every member)."""
        self.log = (self.log + [
            f"members {sorted(n for n, _, _ in members)}"
            + "".join(f", {n} {REASONS.get(r, r)}" for n, _, r in left + joined)])[-8:]
        installed = {} if self.view is None else dict(self.view.members)
        for n, p, reason in left:
            self.group.pop((n, p), None)
            inc = self.incs.pop((n, p), None)
            if reason == REASON_NODEDOWN:
                self.nodedown.add(n)
            if inc is None or installed.get(n) != inc:
                continue
            if reason != REASON_LEAVE and (n, inc) not in self.dead:
                self.pending_fence.add((n, inc))
        for n, p, reason in members:
            self.group[(n, p)] = reason
            self.nodedown.discard(n)
        if (self.node, self.pid) not in self.group:
            # corosync sees our pid through its own pid namespace (storaged in a
            # container): our own join is the one entry of our node id that joined now.
            mine = [p for n, p, _ in joined if n == self.node]
            if len(mine) == 1 and not self.hellos.get((self.node, mine[0])):
                self.pid = mine[0]
        self.hellos = {}
        self.round_installed = False
        self.need_hello = True
        self._maybe_hello()

    def deliver(self, nodeid: int, pid: int, data: bytes) -> None:
        """One CPG message (agreed order)."""
        try:
            msg = json.loads(data)
            kind = msg["t"]
        except (ValueError, KeyError, TypeError):
            return
        key = (nodeid, pid)
        if key not in self.group:
            return
        if kind == "hello":
            try:
                h = _Hello(int(msg["inc"]), int(msg["seq"]), bool(msg["q"]),
                           _pairs(msg.get("pf")), _pairs(msg.get("dead")))
            except (KeyError, TypeError, ValueError):
                return  # not from a storaged node of this version: never counts as hello'd
            self.incs[key] = h.inc
            self.hellos[key] = h
            self.dead |= h.dead
            if (self.node, self.inc) in h.dead and key != (self.node, self.pid):
                self._reset()
                return
            self._maybe_install()
        elif kind == "fenced":
            try:
                pair = (int(msg["p"][0]), int(msg["p"][1]))
            except (KeyError, TypeError, ValueError, IndexError):
                return
            self.dead.add(pair)
            if pair in self.pending_fence:
                self.pending_fence.discard(pair)
                self.events.append(Fenced(*pair))
            if pair == (self.node, self.inc):
                self._reset()

    # ------------------------------------------------------------- commands

    def fenced(self, node: int, inc: int) -> None:
        """The fencer confirmed ``node``: tell every member (applied on delivery)."""
        self.mcast.append(json.dumps({"t": "fenced", "p": [node, inc]}).encode())

    def leave(self) -> None:
        """Leave cleanly: the shell calls cpg_leave, peers see reason ``leave``."""
        self.left = True

    def lost(self) -> None:
        """The connection to corosync is gone: install a non-quorate view of this node
        alone at once (the DLM stops or freezes), and forget the group.  A reconnect
        starts a new incarnation: the others saw this process leave uncleanly."""
        v = self.view
        self.group = {}
        self.incs = {}
        self.hellos = {}
        self.q_quorate = False
        self.q_seq = self.ring_seq = None
        self.ring_nodes = set()
        self.nodedown = set()
        old = self.inc
        self.inc = old + 1
        self.events.append(Reset(old, self.inc))
        seq = 0 if v is None else v.id[0] + 1
        self.view = View((seq, self.node), ((self.node, self.inc),),
                         QuorumInfo(False, 0, 0, 0, False))
        self.round_installed = False
        self.need_hello = True
        self.events.append(ViewInstalled(self.view))

    # ------------------------------------------------------------- internals

    def ring_current(self) -> bool:
        """Quorum and totem agree on the ring, and it holds no node CPG saw go down."""
        return (self.ring_seq is not None and self.q_seq == self.ring_seq
                and not (self.ring_nodes & self.nodedown)
                and {n for n, _ in self.group} <= self.ring_nodes)

    def _maybe_hello(self) -> None:
        if self.left or not self.need_hello or (self.node, self.pid) not in self.group:
            return
        if not self.ring_current():
            return
        self.need_hello = False
        self.mcast.append(json.dumps({
            "t": "hello", "inc": self.inc, "seq": 0 if self.view is None else self.view.id[0],
            "q": self.q_quorate, "pf": sorted(self.pending_fence),
            "dead": sorted(self.dead)}).encode())

    def _maybe_install(self) -> None:
        live = [k for k in sorted(self.group) if k in self.hellos
                and (k[0], self.hellos[k].inc) not in self.dead]
        if len(live) != len(self.group):
            return
        hellos = [self.hellos[k] for k in live]
        members = tuple(sorted((n, self.hellos[(n, p)].inc) for n, p in live))
        if len({n for n, _ in members}) != len(members):
            return  # two processes claim one node id: wait until one goes
        quorate = all(h.quorate for h in hellos)
        v = self.view
        if v is not None and v.members == members and v.quorate == quorate \
                and self.round_installed:
            return
        if self.round_installed and v is not None:
            seq = v.id[0] + 1
        else:
            seq = max(h.seq for h in hellos) + 1
        dead = set(self.dead)
        for h in hellos:
            dead |= h.dead
        pending = set(self.pending_fence)
        for h in hellos:
            pending |= h.pending
        pending = pending - dead - set(members)
        old = set() if v is None else set(v.members)
        gone = old - set(members)
        removed = gone & pending
        vq = self.votequorum
        q = QuorumInfo(quorate=quorate, votes=int(vq.get("total_votes", len(members))),
                       expected=int(vq.get("expected_votes", 0)),
                       quorum=int(vq.get("quorum", 0)),
                       wait_for_all=bool(vq.get("wait_for_all", False)) and not quorate)
        view = View((seq, members[0][0]), members, q, tuple(sorted(removed)),
                    tuple(sorted(gone - removed)), tuple(sorted(pending)))
        self.round_installed = True
        self.view = view
        self.dead = dead
        self.pending_fence = pending
        self.events.append(ViewInstalled(view))
        if view.coordinator == self.node and view.quorate:
            for pair in sorted(pending):
                self.events.append(FenceRequest(*pair))

    def _reset(self) -> None:
        old = self.inc
        self.inc = old + 1
        self.view = None
        self.round_installed = False
        self.events.append(Reset(old, self.inc))
        self.need_hello = True
        self._maybe_hello()
