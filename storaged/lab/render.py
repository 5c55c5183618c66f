"""``lab status`` as a rich table and as JSON (from :func:`storaged.lab.probe.survey`)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from storaged.lab.plan import LabSpec
from storaged.lab.probe import NodeView, survey
from storaged.lab.records import LabResource


def _view_text(v: NodeView) -> tuple[str, str]:
    """(view, quorum) columns of a cluster node."""
    c = v.cluster
    if c is None:
        return "-", "no node process"
    view = c.get("view")
    if view is None:
        return "none yet", "-"
    letter = "s" if v.node.role == "storage" else "c"
    members = ",".join(f"{letter}{m}" for m in view["members"])
    quorum = (f"{'quorate' if view['quorate'] else 'NOT quorate'} "
              f"{view['votes']}/{view['expected_votes']}")
    if c.get("pending_fence"):
        quorum += " fencing " + ",".join(f"{letter}{n}" for n in c["pending_fence"])
    return f"{view['id']} [{members}]", quorum


def _mount_text(v: NodeView) -> str:
    if v.node.role != "cluster":
        return ""
    if not v.mounted:
        return "not mounted"
    if v.mount is None:
        return "mounted, status not answering"  # its node waits (e.g. for a fence)
    m = v.mount
    text = f"journal {m.get('slot', '?')}"
    if m.get("withdrawn"):
        text += f" WITHDRAWN ({m['withdrawn']})"
    return text


def _portal_text(spec: LabSpec, v: NodeView) -> str:
    if v.node.role != "storage":
        return ""
    if v.holds_vip:
        return f"HOLDS {spec.vip}"
    return "fenced (port down)" if v.vip_stale else "standby"


def _fence_text(v: NodeView) -> str:
    if v.node.role != "cluster":
        return ""
    if not v.fence_known:
        return "?"
    return "FENCED at " + ",".join(v.fenced_by) if v.fenced_by else "access"


def status_table(spec: LabSpec, resources: list[LabResource]) -> Table:
    """Nodes, addresses, processes, view/quorum, SAN fence state and mounts."""
    views = survey(spec, resources)
    owner = ",".join(v.node.name for v in views if v.holds_vip) or "nobody"
    t = Table(title=f"lab {spec.lab_id} ({spec.directory}, {spec.subnet}), "
                    f"floating portal {spec.vip} on {owner}")
    for col in ("node", "role", "namespace", "address", "processes", "view", "quorum",
                "portal", "SAN access", "mount"):
        t.add_column(col)
    for v in views:
        procs = ", ".join(f"{label.split('/')[-1]} {pid}" + ("" if alive else " (gone)")
                          for label, pid, alive in v.processes) or "-"
        view, quorum = _view_text(v)
        t.add_row(*(escape(x) for x in (v.node.name, v.node.role, v.node.netns,
                                          v.node.address, procs, view, quorum,
                                          _portal_text(spec, v), _fence_text(v),
                                          _mount_text(v))))
    return t


def status_json(spec: LabSpec, resources: list[LabResource]) -> dict[str, Any]:
    """The same as :func:`status_table`, machine-readable."""
    nodes = []
    views = survey(spec, resources)
    for v in views:
        nodes.append({"node": v.node.name, "role": v.node.role, "netns": v.node.netns,
                      "address": v.node.address,
                      "processes": [{"label": label, "pid": pid, "alive": alive}
                                    for label, pid, alive in v.processes],
                      "cluster": v.cluster, "mounted": v.mounted, "mount": v.mount,
                      "fenced_by": v.fenced_by if v.fence_known else None,
                      "holds_vip": v.holds_vip})
    return {"lab": spec.lab_id, "dir": spec.directory, "subnet": spec.subnet,
            "vip": spec.vip, "vip_holders": [v.node.name for v in views if v.holds_vip],
            "nodes": nodes}
