"""ALUA config operations: target port groups (``storaged alua group ...``).

Registered in the shared operation table (see ``storaged.control.ops``), so
they run offline on the store or live through the daemon, which then
reconciles its :class:`storaged.scsi.alua.Alua` with the records: a group
whose record changed takes the new state as an implicit transition and every
I_T nexus gets ASYMMETRIC ACCESS STATE CHANGED.
"""

from __future__ import annotations

from typing import Any

from storaged.control.ops import ConfigError, _op
from storaged.state import Target, Txn
from storaged.state.alua import AluaGroup, normalize_port

DEFAULT_GROUP = 1


def _check_ports(txn: Txn, group: AluaGroup) -> None:
    """A port belongs to one group; a remote group names no local port."""
    local = {f"{t.iqn},{t.tpgt}" for t in txn.list(Target)}
    for other in txn.list(AluaGroup):
        if other.id == group.id:
            continue
        both = set(other.ports) & set(group.ports)
        if both:
            raise ConfigError(f"port {sorted(both)[0]} is already in group {other.id}")
    if group.remote:
        mine = sorted(set(group.ports) & local)
        if mine:
            raise ConfigError(f"port {mine[0]} is a local target port; a remote group "
                              "lists the HA peer's ports")


def describe_group(g: AluaGroup) -> dict[str, Any]:
    return {"id": g.id, "state": g.state, "preferred": g.preferred, "remote": g.remote,
            "explicit": g.explicit, "transition_time": g.transition_time,
            "ports": list(g.ports)}


def _default() -> AluaGroup:
    return AluaGroup(id=DEFAULT_GROUP)


@_op()
def alua_group_create(txn: Txn, id: int, state: str = "active/optimized",
                      preferred: bool = False, ports: list[str] | None = None,
                      remote: bool = False, explicit: bool = True,
                      transition_time: int = 0) -> dict[str, Any]:
    """Create target port group ``id`` (group 1, the default group, always
    exists: change it with alua_group_set)."""
    if txn.get(AluaGroup, str(id)) is not None or id == DEFAULT_GROUP:
        raise ConfigError(f"target port group {id} already exists")
    g = AluaGroup(id=id, state=state, preferred=preferred, ports=list(ports or []),
                  remote=remote, explicit=explicit, transition_time=transition_time)
    g.validate()
    _check_ports(txn, g)
    txn.put(g)
    return describe_group(g)


@_op()
def alua_group_set(txn: Txn, id: int, state: str | None = None, preferred: bool | None = None,
                   add_ports: list[str] | None = None, remove_ports: list[str] | None = None,
                   explicit: bool | None = None, transition_time: int | None = None,
                   remote: bool | None = None) -> dict[str, Any]:
    """Change a group: state (an implicit transition), preferred bit, ports."""
    g = txn.get(AluaGroup, str(id)) if isinstance(id, int) else None
    if g is None:
        if id != DEFAULT_GROUP:
            raise ConfigError(f"target port group {id!r} does not exist")
        g = _default()
    if state is not None:
        g.state = state
    if preferred is not None:
        g.preferred = preferred
    if explicit is not None:
        g.explicit = explicit
    if transition_time is not None:
        g.transition_time = transition_time
    if remote is not None:
        if id == DEFAULT_GROUP and remote:
            raise ConfigError("group 1 holds the local ports; it cannot be remote")
        g.remote = remote
    for p in add_ports or []:
        norm = normalize_port(p)
        if norm not in g.ports:
            g.ports.append(norm)
    for p in remove_ports or []:
        norm = normalize_port(p)
        if norm not in g.ports:
            raise ConfigError(f"port {norm} is not in group {id}")
        g.ports.remove(norm)
    g.revision += 1
    g.validate()
    _check_ports(txn, g)
    txn.put(g)
    return describe_group(g)


@_op()
def alua_group_remove(txn: Txn, id: int) -> dict[str, Any]:
    """Delete a group; its ports fall back to group 1.  Removing group 1
    resets it to the default (active/optimized)."""
    if not txn.delete(AluaGroup, str(id)) and id != DEFAULT_GROUP:
        raise ConfigError(f"target port group {id!r} does not exist")
    return {"id": id}


def stored_groups(txn: Txn) -> list[AluaGroup]:
    """Configured groups, group 1 included (default when not stored)."""
    groups = {g.id: g for g in txn.list(AluaGroup)}
    groups.setdefault(DEFAULT_GROUP, _default())
    return [groups[k] for k in sorted(groups)]


@_op(mutating=False)
def alua_ls(txn: Txn) -> dict[str, Any]:
    """Configured target port groups (the daemon answers with live states)."""
    return {"live": False, "groups": [describe_group(g) for g in stored_groups(txn)]}
