"""Cluster membership (sans-IO): heartbeats, failure detection, agreed views, fencing state.

The core never touches a socket or a clock: the shell feeds it
``receive(src, msg, now, wall)`` and ``tick(now, wall)`` and sends what it
appends to ``out`` (``(node, message)`` pairs) and acts on ``events``.

Protocol (corosync-like timing, simpler agreement):

* Every node sends a heartbeat to every configured node each ``heartbeat``
  seconds.  A node not heard from for ``token`` seconds is considered failed.
* The *coordinator* is the lowest node id among the nodes a node considers
  alive.  When the alive set (pairs of node id and incarnation) differs from
  the installed view, the coordinator runs a two-phase view change:
  ``prep(id, members)`` to every proposed member; each member promises the
  id (refusing ids not above its last promise) and answers ``ack`` with what
  it knows (its installed view, pending fences, wait_for_all state); when
  every member acked, the coordinator sends ``commit`` and every member
  installs the view.  A change that is not complete within ``consensus``
  seconds is abandoned; members that did not answer are left out of the
  next proposal for ``token`` seconds.
* View ids are ``(seq, coordinator)`` pairs, compared as tuples, so they
  increase monotonically on every node and one id always names one member
  list: a coordinator proposes each sequence number once, and a member only
  installs a view every member acked.
* A view is quorate under votequorum rules (:mod:`storaged.cluster.quorum`).
  Members that leave a view without a clean ``leave`` are unclean: a quorate
  view's coordinator asks the shell to fence them (``FenceRequest``) and
  broadcasts ``fenced`` on confirmation; pending fences travel in every
  commit, so a new coordinator takes them over.
* A (node, incarnation) removed by a quorate view is dead for good: its
  heartbeats are answered with ``rejoin`` and the node starts again as a new
  incarnation (``Reset`` event), dropping everything it held.
* Clock skew: heartbeats carry wall-clock stamps and echo the peer's last
  stamp (NTP-style four timestamps); the offset estimate is exposed per
  peer and a ``SkewWarning`` is raised above the configured threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storaged.cluster.config import ClusterConfig
from storaged.cluster.quorum import QuorumInfo, compute

ViewId = tuple[int, int]
Pair = tuple[int, int]  # (node id, incarnation)


@dataclass(frozen=True)
class View:
    """An agreed membership view."""

    id: ViewId
    members: tuple[Pair, ...]           #: (node, incarnation), sorted by node
    quorum: QuorumInfo
    removed: tuple[Pair, ...] = ()      #: members of the previous view that left uncleanly
    left: tuple[Pair, ...] = ()         #: members that left cleanly
    pending_fence: tuple[Pair, ...] = ()

    @property
    def nodes(self) -> tuple[int, ...]:
        """Member node ids, sorted."""
        return tuple(n for n, _ in self.members)

    @property
    def coordinator(self) -> int:
        """The node that ran the view change."""
        return self.id[1]

    @property
    def quorate(self) -> bool:
        return self.quorum.quorate

    def incarnation(self, node: int) -> int | None:
        """Incarnation of ``node`` in this view, or None if it is not a member."""
        for n, i in self.members:
            if n == node:
                return i
        return None

    def label(self) -> str:
        """``seq.coordinator`` form of the id."""
        return f"{self.id[0]}.{self.id[1]}"


@dataclass(frozen=True)
class ViewInstalled:
    """A new view was agreed and installed."""

    view: View


@dataclass(frozen=True)
class FenceRequest:
    """This node coordinates a quorate view: fence ``node`` (incarnation ``inc``)."""

    node: int
    inc: int


@dataclass(frozen=True)
class Fenced:
    """``node`` (incarnation ``inc``) is confirmed fenced."""

    node: int
    inc: int


@dataclass(frozen=True)
class SkewWarning:
    """Clock offset to ``node`` crossed the threshold (``skew`` seconds, peer minus us)."""

    node: int
    skew: float
    warn: bool


@dataclass(frozen=True)
class ClockWarning:
    """Node ``node``'s kernel clock became (``warn``) or stopped being unsynchronized
    or too uncertain (``maxerror_us`` above the configured threshold)."""

    node: int
    synced: bool
    maxerror_us: int
    warn: bool


@dataclass(frozen=True)
class Reset:
    """This node was removed from the cluster: it continues as a new incarnation."""

    old_inc: int
    new_inc: int


@dataclass
class _Proposal:
    id: ViewId
    members: dict[int, int]
    deadline: float
    acks: dict[int, dict[str, Any]] = field(default_factory=dict)


def _pairs(raw: Any) -> set[Pair]:
    return {(int(a), int(b)) for a, b in raw or ()}


class Membership:
    """Membership state machine of one node."""

    def __init__(self, node_id: int, config: ClusterConfig, incarnation: int, now: float) -> None:
        if node_id not in config.nodes:
            raise ValueError(f"node {node_id} is not in cluster {config.name!r}")
        self.node = node_id
        self.inc = incarnation
        self.config = config
        self.started = now
        self.out: list[tuple[int, dict[str, Any]]] = []
        self.events: list[Any] = []
        self.view: View | None = None
        self.promised: ViewId = (0, 0)
        self.max_seq = 0
        self.proposal: _Proposal | None = None
        self.last_heard: dict[int, float] = {}
        self.peer_inc: dict[int, int] = {}
        self.peer_view: dict[int, ViewId] = {}
        self.suspect_until: dict[Pair, float] = {}
        self.dead: set[Pair] = set()
        self.leaving: set[Pair] = set()
        self.pending_fence: set[Pair] = set()
        self.fence_asked: set[Pair] = set()
        self.wfa_ok = False
        self.skew: dict[int, float] = {}
        self.rtt: dict[int, float] = {}
        self.skew_warned: set[int] = set()
        # Kernel clock state per node (this one's from set_local_clock): (synced, maxerror us)
        self.clocks: dict[int, tuple[bool, int]] = {}
        self.clock_warned: set[int] = set()
        self._echo: dict[int, tuple[float, float]] = {}
        self.next_hb = now
        self.left = False

    # --------------------------------------------------------------- queries

    def alive(self, now: float) -> dict[int, int]:
        """Nodes this node currently hears (and itself), with their incarnations."""
        out = {self.node: self.inc}
        token = self.config.token
        for n, t in self.last_heard.items():
            inc = self.peer_inc[n]
            pair = (n, inc)
            if now - t >= token or pair in self.dead or pair in self.leaving:
                continue
            if self.suspect_until.get(pair, 0.0) > now or n not in self.config.nodes:
                continue
            out[n] = inc
        return dict(sorted(out.items()))

    def quorate(self) -> bool:
        """True when the installed view is quorate."""
        return self.view is not None and self.view.quorate

    def status(self, now: float) -> dict[str, Any]:
        """JSON-ready state for ``storaged cluster status``."""
        v = self.view
        return {
            "node": self.node, "incarnation": self.inc,
            "view": None if v is None else {
                "id": v.label(), "members": [n for n, _ in v.members],
                "quorate": v.quorate, "votes": v.quorum.votes,
                "expected_votes": v.quorum.expected, "quorum": v.quorum.quorum,
                "wait_for_all": v.quorum.wait_for_all},
            "alive": list(self.alive(now)),
            "pending_fence": sorted(n for n, _ in self.pending_fence),
            "skew_ms": {str(n): round(s * 1000, 3) for n, s in sorted(self.skew.items())},
            "skew_warn": sorted(self.skew_warned),
            "clock": {str(n): {"synced": s, "maxerror_ms": round(e / 1000, 3),
                               "warn": n in self.clock_warned}
                      for n, (s, e) in sorted(self.clocks.items())},
        }

    def set_local_clock(self, synced: bool, maxerror_us: int) -> None:
        """This host's kernel clock state (storaged.cluster.clock), sent in heartbeats."""
        self._clock_state(self.node, synced, maxerror_us)

    def _clock_state(self, node: int, synced: bool, maxerror_us: int) -> None:
        self.clocks[node] = (synced, maxerror_us)
        warn = not synced or maxerror_us > self.config.clock_warn_ms * 1000
        if warn != (node in self.clock_warned):
            (self.clock_warned.add if warn else self.clock_warned.discard)(node)
            self.events.append(ClockWarning(node, synced, maxerror_us, warn))

    # ----------------------------------------------------------------- input

    def tick(self, now: float, wall: float) -> None:
        """Advance timers: heartbeats, proposal timeouts, starting view changes."""
        if self.left:
            return
        if now >= self.next_hb:
            self.next_hb = now + self.config.heartbeat
            self._heartbeat(wall)
        p = self.proposal
        if p is not None and now >= p.deadline:
            for n, inc in p.members.items():
                if n not in p.acks:
                    self.suspect_until[(n, inc)] = now + self.config.token
            self.proposal = None
        if self.proposal is None and self._settled(now):
            alive = self.alive(now)
            if min(alive) == self.node:
                current = None if self.view is None else dict(self.view.members)
                if alive != current:
                    self._propose(alive, now)

    def _settled(self, now: float) -> bool:
        """Start proposing once every node was heard, or a token timeout after start."""
        if now - self.started >= self.config.token:
            return True
        return now - self.started >= 2 * self.config.heartbeat and \
            len(self.alive(now)) == len(self.config.nodes)

    def receive(self, src: int, inc: int, msg: dict[str, Any], now: float, wall: float) -> None:
        """One message from node ``src`` (incarnation ``inc``)."""
        if self.left or src == self.node or src not in self.config.nodes:
            return
        kind = msg.get("t")
        if kind == "hb":
            self._on_heartbeat(src, inc, msg, now, wall)
            return
        if (src, inc) in self.dead:
            return
        handler = {"prep": self._on_prepare, "ack": self._on_ack, "nack": self._on_nack,
                   "commit": self._on_commit, "fenced": self._on_fenced,
                   "rejoin": self._on_rejoin, "leave": self._on_leave}.get(kind)
        if handler is not None:
            handler(src, inc, msg, now)

    def fenced(self, node: int, inc: int) -> None:
        """The shell's Fencer confirmed ``node``: tell every member."""
        self._apply_fenced((node, inc))
        if self.view is not None:
            for n, _ in self.view.members:
                if n != self.node:
                    self.out.append((n, {"t": "fenced", "p": [node, inc]}))

    def leave(self) -> None:
        """Leave cleanly: peers drop this node from the next view without fencing it."""
        for n in self.config.nodes:
            if n != self.node:
                self.out.append((n, {"t": "leave"}))
        self.left = True

    # ------------------------------------------------------------ heartbeats

    def _heartbeat(self, wall: float) -> None:
        vid = None if self.view is None else list(self.view.id)
        for n in self.config.nodes:
            if n == self.node:
                continue
            msg: dict[str, Any] = {"t": "hb", "v": vid, "ts": wall,
                                   "cv": self.config.version}
            clock = self.clocks.get(self.node)
            if clock is not None:
                msg["ck"] = [int(clock[0]), clock[1]]
            echo = self._echo.get(n)
            if echo is not None:
                msg["e"] = [echo[0], echo[1], wall]
            self.out.append((n, msg))

    def _on_heartbeat(self, src: int, inc: int, msg: dict[str, Any], now: float,
                      wall: float) -> None:
        if (src, inc) in self.dead:
            self.out.append((src, {"t": "rejoin", "p": [src, inc]}))
            return
        self.peer_inc[src] = inc
        self.last_heard[src] = now
        v = msg.get("v")
        if v is not None:
            vid = (int(v[0]), int(v[1]))
            self.peer_view[src] = vid
            self.max_seq = max(self.max_seq, vid[0])
        ck = msg.get("ck")
        if (isinstance(ck, list) and len(ck) == 2 and type(ck[1]) is int
                and ck[1] >= 0 and ck[0] in (0, 1)):
            self._clock_state(src, bool(ck[0]), ck[1])
        ts = msg.get("ts")
        if isinstance(ts, (int, float)):
            self._echo[src] = (float(ts), wall)
        echo = msg.get("e")
        if isinstance(echo, list) and len(echo) == 3:
            t1, t2, t3 = (float(x) for x in echo)
            offset = ((t2 - t1) + (t3 - wall)) / 2
            self.rtt[src] = max(0.0, (wall - t1) - (t3 - t2))
            self.skew[src] = offset
            warn = abs(offset) * 1000 > self.config.skew_warn_ms
            if warn != (src in self.skew_warned):
                (self.skew_warned.add if warn else self.skew_warned.discard)(src)
                self.events.append(SkewWarning(src, offset, warn))
        # A member that missed our commit gets it again.
        view = self.view
        if view is not None and view.coordinator == self.node and (src, inc) in view.members \
                and (v is None or (int(v[0]), int(v[1])) < view.id):
            self.out.append((src, self._commit_msg(view)))

    # ----------------------------------------------------------- view change

    def _propose(self, members: dict[int, int], now: float) -> None:
        seq = max(self.max_seq, self.promised[0], self.view.id[0] if self.view else 0) + 1
        self.max_seq = seq
        vid = (seq, self.node)
        self.proposal = _Proposal(vid, members, now + self.config.consensus)
        msg = {"t": "prep", "id": list(vid), "m": [[n, i] for n, i in members.items()]}
        for n in members:
            if n != self.node:
                self.out.append((n, msg))
        ack = self._promise(vid)
        if ack is not None:
            self._on_ack(self.node, self.inc, ack, now)

    def _promise(self, vid: ViewId) -> dict[str, Any] | None:
        if vid <= self.promised:
            return None
        self.promised = vid
        self.max_seq = max(self.max_seq, vid[0])
        v = self.view
        return {"t": "ack", "id": list(vid),
                "vid": None if v is None else list(v.id),
                "vm": [] if v is None else [list(p) for p in v.members],
                "wfa": self.wfa_ok,
                "pf": [list(p) for p in self.pending_fence],
                "dead": [list(p) for p in self.dead],
                "lv": [list(p) for p in self.leaving]}

    def _on_prepare(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        vid = (int(msg["id"][0]), int(msg["id"][1]))
        members = {int(n): int(i) for n, i in msg["m"]}
        if members.get(self.node) != self.inc or vid[1] != src:
            return
        missing = set(self.alive(now)) - set(members)
        if missing and vid > self.promised:
            # We hear nodes the coordinator left out: make it wait until it hears them too.
            self.out.append((src, {"t": "nack", "id": list(vid), "hi": list(self.promised),
                                   "alive": sorted(missing)}))
            return
        ack = self._promise(vid)
        if ack is None:
            self.out.append((src, {"t": "nack", "id": list(vid), "hi": list(self.promised)}))
        else:
            self.out.append((src, ack))

    def _on_nack(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        p = self.proposal
        if p is not None and list(p.id) == list(msg["id"]):
            self.max_seq = max(self.max_seq, int(msg["hi"][0]))
            self.proposal = None

    def _on_ack(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        p = self.proposal
        if p is None or list(p.id) != list(msg["id"]) or p.members.get(src) != inc:
            return
        p.acks[src] = msg
        if len(p.acks) == len(p.members):
            self._commit(p)

    def _commit(self, p: _Proposal) -> None:
        self.proposal = None
        base_id: ViewId = (0, 0)
        base: set[Pair] = set()
        dead: set[Pair] = set(self.dead)
        pending: set[Pair] = set(self.pending_fence)
        leaving: set[Pair] = set(self.leaving)
        wfa = self.wfa_ok
        for ack in p.acks.values():
            if ack.get("vid") is not None:
                vid = (int(ack["vid"][0]), int(ack["vid"][1]))
                if vid > base_id:
                    base_id, base = vid, _pairs(ack["vm"])
            dead |= _pairs(ack.get("dead"))
            pending |= _pairs(ack.get("pf"))
            leaving |= _pairs(ack.get("lv"))
            wfa = wfa or bool(ack.get("wfa"))
        new = set(p.members.items())
        gone = base - new
        left = gone & leaving
        removed = gone - leaving
        if set(p.members) >= set(self.config.nodes):
            wfa = True
        q = self._quorum(p.members, wfa)
        pending |= removed
        pending -= new
        if q.quorate:
            dead |= gone
        view = View(p.id, tuple(sorted(new)), q, tuple(sorted(removed)), tuple(sorted(left)),
                    tuple(sorted(pending)))
        msg = self._commit_msg(view, dead, wfa)
        for n in p.members:
            if n != self.node:
                self.out.append((n, msg))
        self._install(view, dead, wfa)

    def _commit_msg(self, view: View, dead: set[Pair] | None = None,
                    wfa: bool | None = None) -> dict[str, Any]:
        return {"t": "commit", "id": list(view.id), "m": [list(p) for p in view.members],
                "rm": [list(p) for p in view.removed], "lc": [list(p) for p in view.left],
                "pf": [list(p) for p in view.pending_fence],
                "dead": [list(p) for p in (self.dead if dead is None else dead)],
                "wfa": self.wfa_ok if wfa is None else wfa}

    def _quorum(self, members: dict[int, int], wfa: bool) -> QuorumInfo:
        cfg = self.config
        return compute(cfg.votes(), members, configured_expected=cfg.expected_votes,
                       two_node=cfg.two_node, wait_for_all=cfg.wait_for_all, all_seen=wfa)

    def _on_commit(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        vid = (int(msg["id"][0]), int(msg["id"][1]))
        members = {int(n): int(i) for n, i in msg["m"]}
        if vid[1] != src or members.get(self.node) != self.inc:
            return
        if self.view is not None and vid <= self.view.id:
            return
        wfa = bool(msg.get("wfa"))
        view = View(vid, tuple(sorted(members.items())), self._quorum(members, wfa),
                    tuple(sorted(_pairs(msg.get("rm")))), tuple(sorted(_pairs(msg.get("lc")))),
                    tuple(sorted(_pairs(msg.get("pf")))))
        self._install(view, _pairs(msg.get("dead")), wfa)

    def _install(self, view: View, dead: set[Pair], wfa: bool) -> None:
        self.promised = max(self.promised, view.id)
        self.max_seq = max(self.max_seq, view.id[0])
        self.view = view
        self.dead |= dead
        self.wfa_ok = self.wfa_ok or wfa
        self.pending_fence = set(view.pending_fence)
        self.leaving -= set(view.left)
        self.events.append(ViewInstalled(view))
        if view.coordinator == self.node and view.quorate:
            for pair in sorted(self.pending_fence):
                self.events.append(FenceRequest(*pair))

    # ------------------------------------------------------------- fencing

    def _apply_fenced(self, pair: Pair) -> None:
        if pair in self.pending_fence:
            self.pending_fence.discard(pair)
            self.events.append(Fenced(*pair))
        self.dead.add(pair)

    def _on_fenced(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        node, finc = (int(x) for x in msg["p"])
        self._apply_fenced((node, finc))

    # ------------------------------------------------------- leave / rejoin

    def _on_leave(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        self.leaving.add((src, inc))

    def _on_rejoin(self, src: int, inc: int, msg: dict[str, Any], now: float) -> None:
        node, my_inc = (int(x) for x in msg["p"])
        if (node, my_inc) != (self.node, self.inc):
            return
        old = self.inc
        self.inc = max(old + 1, int(msg.get("min_inc", 0)))
        self.view = None
        self.proposal = None
        # Heartbeat as the new incarnation before proposing anything: a peer that acked
        # a view with us before hearing the new incarnation would still count us dead
        # and remove us again at once (a rejoining lowest-id node flapped forever).
        self.next_hb = 0.0
        self.events.append(Reset(old, self.inc))
