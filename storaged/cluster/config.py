"""Cluster configuration records: the cluster (identical on every node) and the local node.

``ClusterConfig`` is what corosync.conf holds: the cluster name, every node's
id, address and votes, the timeouts and the quorum options.  ``LocalNode``
says which of those nodes this state directory is.  Both live in the LMDB
state store like every other piece of configuration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from storaged.state.errors import ValidationError
from storaged.state.records import Record
from storaged.state.validate import check_bool, check_int, normalize_portal, split_portal

NO_QUORUM_POLICIES = ("stop", "freeze", "ignore")
FENCERS = ("manual", "test", "command", "agent", "pacemaker")
#: who decides membership and quorum: storaged's own ZeroMQ heartbeats, or corosync (CPG +
#: votequorum, see storaged.cluster.corosync); DLM messages travel over ZeroMQ either way
MEMBERSHIP_PROVIDERS = ("storaged", "corosync")
MAX_NODE_ID = 4095


@dataclass
class NodeEntry(Record):
    """One node of the cluster: ``address`` is the host:port its messaging socket binds."""

    address: str
    votes: int = 1
    name: str = ""
    """The node's name for fence agents (pacemaker's ``plug``); "" = ``node<id>``."""
    fence_delay_ms: int = 0
    """Static delay before this node is fenced (like pcmk_delay_base): in a
    two-node cluster give it to one node, so that node wins a fence race."""

    def problems(self) -> list[str]:
        errors: list[str] = []
        if not isinstance(self.name, str) or (self.name and not all(
                c.isalnum() or c in "-_." for c in self.name)) or len(self.name) > 63:
            errors.append(f"node name must be [A-Za-z0-9._-], at most 63, got {self.name!r}")
        try:
            check_int(self.fence_delay_ms, "fence_delay_ms", 0, 3_600_000)
        except ValidationError as e:
            errors.append(str(e))
        try:
            self.address = normalize_portal(self.address)
        except ValidationError as e:
            errors.append(f"address: {e}")
        try:
            check_int(self.votes, "votes", 0, 255)
        except ValidationError as e:
            errors.append(str(e))
        return errors


@dataclass
class ClusterConfig(Record):
    """The cluster: nodes, timeouts (milliseconds) and quorum options; key ``cluster``.

    ``consensus_ms`` 0 means 1.2 x ``token_ms`` and ``heartbeat_ms`` 0 means
    ``token_ms / 5`` (corosync-like defaults: token 3 s, consensus 3.6 s).
    ``expected_votes`` 0 means the sum of all nodes' votes.  ``two_node``
    implies ``wait_for_all``.  ``version`` grows on every change so nodes
    can tell which copy is newer.
    """

    RECORD_KIND: ClassVar[str] = "cluster"
    CONFIG_SECTION: ClassVar[str | None] = "cluster"
    CONFIG_SINGLETON: ClassVar[bool] = True
    CONFIG_LABEL: ClassVar[str] = "cluster"
    KEY: ClassVar[str] = "cluster"

    name: str
    nodes: dict[int, NodeEntry] = field(default_factory=dict)
    token_ms: int = 3000
    consensus_ms: int = 0
    heartbeat_ms: int = 0
    expected_votes: int = 0
    two_node: bool = False
    wait_for_all: bool = False
    no_quorum_policy: str = "stop"
    fencer: str = "manual"
    fence_command: list[str] = field(default_factory=list)
    fence_delay_ms: int = 0
    fence_delay_max_ms: int = 0
    """Random extra delay 0..this before fencing (like pcmk_delay_max)."""
    fence_agent: str = ""
    """For fencer 'agent': a fence-agents agent (name in /usr/sbin or a path)."""
    fence_options: dict[str, str] = field(default_factory=dict)
    """For fencer 'agent': stdin options passed to it as stonithd does (ip, username...)."""
    skew_warn_ms: int = 1000
    #: a node whose kernel clock is unsynchronized or whose maxerror exceeds this warns
    clock_warn_ms: int = 1000
    lockspaces: list[str] = field(default_factory=lambda: ["default"])
    version: int = 1
    membership: str = "storaged"
    """Membership/quorum provider: ``storaged`` (heartbeats over ZeroMQ, the
    default) or ``corosync`` (node ids, views and quorum from the local
    corosync; token, two_node and wait_for_all are then corosync's)."""

    @property
    def key(self) -> str:
        return self.KEY

    # ---------------------------------------------------------- derived values

    @property
    def token(self) -> float:
        """Failure detection timeout in seconds."""
        return self.token_ms / 1000

    @property
    def consensus(self) -> float:
        """Time a view change may take before it is retried, seconds (1.2 x token)."""
        return (self.consensus_ms or int(self.token_ms * 1.2)) / 1000

    @property
    def heartbeat(self) -> float:
        """Heartbeat interval in seconds."""
        return (self.heartbeat_ms or max(1, self.token_ms // 5)) / 1000

    def votes(self) -> dict[int, int]:
        """Votes of every configured node."""
        return {n: e.votes for n, e in self.nodes.items()}

    def node_name(self, node: int) -> str:
        """The name fence agents know ``node`` by (``plug``)."""
        entry = self.nodes.get(node)
        return entry.name if entry is not None and entry.name else f"node{node}"

    def fence_delay(self, node: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before fencing ``node``: the cluster's and the node's
        static delay plus a random 0..fence_delay_max_ms (pcmk_delay_base/max)."""
        entry = self.nodes.get(node)
        ms = self.fence_delay_ms + (entry.fence_delay_ms if entry is not None else 0)
        if self.fence_delay_max_ms:
            ms += (rng or random).uniform(0, self.fence_delay_max_ms)
        return ms / 1000

    def address(self, node: int) -> tuple[str, int]:
        """(host, port) of ``node``."""
        return split_portal(self.nodes[node].address)

    # -------------------------------------------------------------- checking

    def problems(self) -> list[str]:
        errors: list[str] = []
        if not isinstance(self.name, str) or not self.name or len(self.name) > 64 \
                or not all(c.isalnum() or c in "-_." for c in self.name):
            errors.append(f"cluster name must be 1-64 characters [A-Za-z0-9._-], "
                          f"got {self.name!r}")
        if not isinstance(self.nodes, dict) or not self.nodes:
            errors.append("a cluster needs at least one node")
        else:
            seen: dict[str, int] = {}
            for nid, entry in sorted(self.nodes.items()):
                if not isinstance(nid, int) or isinstance(nid, bool) \
                        or not 1 <= nid <= MAX_NODE_ID:
                    errors.append(f"node id must be 1-{MAX_NODE_ID}, got {nid!r}")
                    continue
                if not isinstance(entry, NodeEntry):
                    errors.append(f"node {nid}: must be a NodeEntry")
                    continue
                errors += [f"node {nid}: {m}" for m in entry.problems()]
                if entry.address in seen:
                    errors.append(f"node {nid}: address {entry.address} is also node "
                                  f"{seen[entry.address]}'s")
                seen[entry.address] = nid
        for name, lo, hi in (("token_ms", 10, 600_000), ("consensus_ms", 0, 600_000),
                             ("heartbeat_ms", 0, 60_000), ("expected_votes", 0, 65535),
                             ("fence_delay_ms", 0, 3_600_000),
                             ("fence_delay_max_ms", 0, 3_600_000), ("skew_warn_ms", 1, 3_600_000),
                             ("clock_warn_ms", 1, 3_600_000),
                             ("version", 1, 2**62)):
            try:
                check_int(getattr(self, name), name, lo, hi)
            except ValidationError as e:
                errors.append(str(e))
        for name in ("two_node", "wait_for_all"):
            try:
                check_bool(getattr(self, name), name)
            except ValidationError as e:
                errors.append(str(e))
        if self.no_quorum_policy not in NO_QUORUM_POLICIES:
            errors.append(f"no_quorum_policy must be one of {', '.join(NO_QUORUM_POLICIES)}")
        if self.membership not in MEMBERSHIP_PROVIDERS:
            errors.append(f"membership must be one of {', '.join(MEMBERSHIP_PROVIDERS)}")
        if self.fencer not in FENCERS:
            errors.append(f"fencer must be one of {', '.join(FENCERS)}")
        if not isinstance(self.fence_command, list) or \
                not all(isinstance(a, str) for a in self.fence_command):
            errors.append("fence_command must be a list of strings")
        elif self.fencer == "command" and not self.fence_command:
            errors.append("fencer 'command' needs fence_command")
        if not isinstance(self.fence_agent, str):
            errors.append("fence_agent must be a string")
        elif self.fencer == "agent" and not self.fence_agent:
            errors.append("fencer 'agent' needs fence_agent (e.g. fence_storaged)")
        if not isinstance(self.fence_options, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                and "\n" not in k + v for k, v in self.fence_options.items()):
            errors.append("fence_options must map option names to values (no '=' in names, "
                          "no newlines)")
        elif {"action", "plug", "port"} & set(self.fence_options):
            errors.append("fence_options must not set action or plug (the fencer does)")
        if not isinstance(self.lockspaces, list) or not self.lockspaces or not all(
                isinstance(n, str) and 0 < len(n) <= 64 for n in self.lockspaces):
            errors.append("lockspaces must be a non-empty list of names (1-64 characters)")
        if self.two_node and isinstance(self.nodes, dict) and len(self.nodes) != 2:
            errors.append("two_node needs exactly two nodes")
        return errors

    @classmethod
    def _decode(cls, data: dict[str, Any], errors: list[str]) -> None:
        nodes = data.get("nodes")
        if isinstance(nodes, dict):
            out: dict[Any, Any] = {}
            for k, v in nodes.items():
                if not (isinstance(k, str) and k.isdigit()):
                    errors.append(f"node id {k!r} is not a number")
                    continue
                try:
                    out[int(k)] = NodeEntry.from_dict(v)
                except ValidationError as e:
                    errors.append(f"node {k}: {e}")
            data["nodes"] = out


@dataclass
class LocalNode(Record):
    """Which configured node this state directory is (key ``local``)."""

    RECORD_KIND: ClassVar[str] = "cluster_local"
    CONFIG_SECTION: ClassVar[str | None] = "cluster_node"
    CONFIG_SINGLETON: ClassVar[bool] = True
    CONFIG_LABEL: ClassVar[str] = "cluster node id"
    KEY: ClassVar[str] = "local"

    node_id: int

    @property
    def key(self) -> str:
        return self.KEY

    def problems(self) -> list[str]:
        try:
            check_int(self.node_id, "node_id", 1, MAX_NODE_ID)
        except ValidationError as e:
            return [str(e)]
        return []
