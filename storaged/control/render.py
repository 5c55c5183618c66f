"""Turn ``describe()`` output into a tree of labels (for ``storaged ls``).

Kept apart from the CLI so the same tree can be shown by other front ends;
``render_plain`` gives the text form used when stdout is not a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storaged.control.ops import format_size


@dataclass
class Node:
    """One line of the tree and its children."""

    label: str
    children: list[Node] = field(default_factory=list)

    def add(self, label: str) -> Node:
        """Append and return a child."""
        child = Node(label)
        self.children.append(child)
        return child


def backstore_label(b: dict[str, Any]) -> str:
    """``disk0  file /srv/d.img  1.0GiB  bs=512  write-back [lun0 of iqn...]``."""
    size = format_size(b["size"]) if b["size"] else "whole device"
    flags = [f"bs={b['block_size']}", "write-back" if b["wce"] else "write-through"]
    if b.get("direct"):
        flags.append("O_DIRECT")
    if b.get("shared"):
        flags.append("shared")
    if b["read_only"]:
        flags.append("read-only")
    if not b["online"]:
        flags.append("OFFLINE")
    users = ", ".join(f"lun{u['lun']} of {u['iqn']}" for u in b.get("used_by", []))
    text = f"{b['name']}  {b['kind']} {b['path']}  {size}  {' '.join(flags)}"
    return text + (f"  [{users}]" if users else "  [unused]")


def target_node(t: dict[str, Any]) -> Node:
    """A target subtree: portals, luns, acls, chap, params."""
    access = "open access" if t["open_access"] else "acl-only"
    node = Node(f"{t['iqn']}  tpgt={t['tpgt']}  {access}  queue_depth={t['queue_depth']}")
    portals = node.add(f"portals ({len(t['portals'])})")
    for p in t["portals"]:
        portals.add(p)
    luns = node.add(f"luns ({len(t['luns'])})")
    for lun in t["luns"]:
        path = f" ({lun['path']})" if lun.get("path") else ""
        luns.add(f"lun{lun['lun']} -> {lun['backstore']}{path}")
    acls = node.add(f"acls ({len(t['acls'])})")
    for acl in t["acls"]:
        chap = f"  chap: {acl['chap']}" if acl["chap"] else ""
        acls.add(f"{acl['initiator']}{chap}")
    node.add(f"chap: {t['chap'] or 'none'}")
    if t["params"]:
        params = node.add(f"params ({len(t['params'])})")
        for key, value in t["params"].items():
            params.add(f"{key}={value}")
    return node


def config_tree(desc: dict[str, Any], title: str = "storaged") -> Node:
    """The whole ``describe()`` result as a tree."""
    root = Node(title)
    s = desc["settings"]
    root.add(f"settings: nop_interval={s['nop_interval']}s nop_timeout={s['nop_timeout']}s "
             f"default_portal={s['default_portal']}")
    backstores = root.add(f"backstores ({len(desc['backstores'])})")
    for b in desc["backstores"]:
        backstores.add(backstore_label(b))
    targets = root.add(f"targets ({len(desc['targets'])})")
    for t in desc["targets"]:
        targets.children.append(target_node(t))
    nfs = desc.get("nfs")
    if nfs is not None:
        ns = nfs["settings"]
        node = root.add(f"nfs exports ({len(nfs['exports'])}): listen={ns['listen'] or 'off'} "
                        f"portmap={ns['portmap']} grace={ns['grace']}s")
        for e in nfs["exports"]:
            node.add(f"{e['path']} -> {e['directory']}  {' '.join(e['clients'])}  "
                     f"({e['options']})")
    arrays = desc.get("raid_arrays") or []
    if arrays:
        node = root.add(f"raid arrays ({len(arrays)})")
        for a in arrays:
            used = f"backstore {a['backstore']}" if a["backstore"] else "not exported"
            node.add(f"{a['name']}: raid{a['level']} {a['size_text']} over "
                     f"{len(a['members'])} members ({used})").children.extend(
                Node(m) for m in a["members"])
    cluster = desc.get("cluster")
    if cluster is not None:
        here = cluster["local_node"]
        node = root.add(f"cluster {cluster['name']}: {len(cluster['nodes'])} nodes, "
                        f"token={cluster['token_ms']}ms fencer={cluster['fencer']}"
                        f"{' two_node' if cluster['two_node'] else ''}")
        for nid, n in sorted(cluster["nodes"].items(), key=lambda kv: int(kv[0])):
            me = "  (this host)" if here is not None and int(nid) == here else ""
            node.add(f"node {nid}: {n['address']} votes={n['votes']}{me}")
    vips = desc.get("vips") or []
    if vips:
        node = root.add(f"floating addresses ({len(vips)})")
        for v in vips:
            pref = ",".join(map(str, v["preference"]))
            node.add(f"{v['address']} dev {v['dev']}{' preference ' + pref if pref else ''}")
    groups = desc.get("alua") or []
    if groups:
        node = root.add(f"alua target port groups ({len(groups)})")
        for g in groups:
            flags = [f for f in ("preferred", "remote") if g[f]]
            rest = "every other local port" if g["id"] == 1 else "no ports"
            ports = ", ".join(g["ports"]) or rest
            node.add(f"{g['id']}: {g['state']}{' ' + ' '.join(flags) if flags else ''}  "
                     f"[{ports}]")
    return root


def render_plain(node: Node, depth: int = 0) -> str:
    """Indented plain text, two spaces per level, ``o- `` before each entry."""
    lines = [("  " * (depth - 1) + "o- " if depth else "") + node.label]
    lines += [render_plain(child, depth + 1) for child in node.children]
    return "\n".join(lines)
