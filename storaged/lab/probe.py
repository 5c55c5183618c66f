"""Look at a running lab from the host: everything here goes through Unix sockets in
DIR (the nodes' control and cluster sockets, the mounts' status sockets), so
nothing needs to enter a namespace to read the lab's state."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from storaged.control.client import probe_json
from storaged.lab.plan import LabSpec, Node
from storaged.lab.records import LabResource
from storaged.lab.shell import is_mounted, proc_alive, resolve_parent, vip_holders


def cluster_status(spec: LabSpec, node: Node) -> dict[str, Any] | None:
    """The node's live membership view (``storaged cluster status`` through cluster.sock)."""
    path = os.path.join(spec.node_dir(node), "cluster.sock")
    if not os.path.exists(path):
        return None
    r = probe_json(path, json.dumps({"op": "status", "args": {}, "id": 1}).encode() + b"\n")
    if not isinstance(r, dict) or not r.get("ok"):
        return None
    return r.get("result")


def mount_status(spec: LabSpec, node: Node) -> dict[str, Any] | None:
    """The mount process's status (journal slot, withdrawn, pid), from its status socket."""
    mp = spec.mountpoint(node)
    # The mount's key (clusterfs.cli.status_socket) resolves only the parent too: an
    # lstat of the mount point is a FUSE request, which blocks while that node waits.
    key = hashlib.sha1(resolve_parent(mp).encode()).hexdigest()[:16]
    path = os.path.join(spec.run_dir(node), f"{key}.sock")
    if not os.path.exists(path):
        return None
    return probe_json(path, None)


def fence_states(spec: LabSpec, storage: Node) -> dict[str, bool] | None:
    """``{cluster node name: fenced}`` as storage node ``storage`` records it."""
    from storaged.control.client import call
    from storaged.control.ops import ConfigError

    sock = os.path.join(spec.node_dir(storage), "control.sock")
    if not os.path.exists(sock):
        return None
    try:
        r = call(sock, "fence_ls", {}, timeout=3)
    except (ConfigError, OSError):
        return None
    return {n["node"]: bool(n["fenced"]) for n in r.get("nodes", [])}


def journal_clean(spec: LabSpec, slot: int) -> bool | None:
    """Whether journal ``slot`` of the shared filesystem is marked clean (flags bit 0),
    read from the image: True once a survivor replayed a dead node's journal."""
    from storaged.block.file import FileBlockDevice
    from storaged.clusterfs.format import JOURNAL_HEADER, FormatError, read_geometry
    try:
        dev = FileBlockDevice(spec.image, read_only=True)
    except (OSError, ValueError):
        return None
    try:
        geo = read_geometry(dev)
        block = dev.read(geo.journal_block(slot) * geo.bs, geo.bs)
        h = JOURNAL_HEADER.unpack(block[:JOURNAL_HEADER.size])
    except (OSError, ValueError, struct.error, KeyError, IndexError, FormatError):
        return None
    finally:
        dev.close()
    return bool(h["flags"] & 1)


@dataclass
class NodeView:
    """One row of ``lab status``."""

    node: Node
    processes: list[tuple[str, int, bool]] = field(default_factory=list)
    cluster: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None
    mounted: bool = False
    fenced_by: list[str] = field(default_factory=list)
    fence_known: bool = False
    holds_vip: bool = False
    """Storage node: the floating portal address is on its eth0 and its port is up."""
    vip_stale: bool = False
    """Storage node: the address is still on its eth0 but its bridge port is down
    (fenced after its daemon died: nobody reaches it there)."""


def survey(spec: LabSpec, resources: list[LabResource]) -> list[NodeView]:
    """What every node is doing now."""
    fences = {s.name: fence_states(spec, s) for s in spec.storage_nodes}
    holders = vip_holders(spec)
    stale = set(vip_holders(spec, reachable=False)) - set(holders)
    views = []
    for n in spec.all_nodes:
        v = NodeView(n)
        v.processes = [(r.name, r.pid, proc_alive(r.pid, r.start_ticks))
                       for r in resources if r.kind == "proc" and r.node == n.name]
        if n.role == "storage":
            v.cluster = cluster_status(spec, n)
            v.holds_vip = n.name in holders
            v.vip_stale = n.name in stale
        if n.role == "cluster":
            v.cluster = cluster_status(spec, n)
            v.mount = mount_status(spec, n)
            v.mounted = is_mounted(spec.mountpoint(n))
            for s, states in fences.items():
                if states is not None:
                    v.fence_known = True
                    if states.get(n.name):
                        v.fenced_by.append(s)
        views.append(v)
    return views
