"""SAN-level fencing operations (``storaged fence ...``, and the fence agent).

Fencing a cluster node here cuts it off this storage node: for the initiator
names and PR keys mapped to it (:class:`storaged.state.fence.FenceNode`),
every LU removes its registrations as a PREEMPT AND ABORT would, its iSCSI
sessions are dropped and its logins refused until it is unfenced.  The
operations only change records; the daemon applies them in
``Runtime.reconcile`` (after every mutating operation, and at start, so a
node fenced offline or before a restart stays fenced).  Every change is
appended to the history with who asked for it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from storaged.control.mgmt_auth import make_verifier
from storaged.control.ops import ConfigError, _op
from storaged.state import Txn
from storaged.state.fence import FenceEvent, FenceNode, normalize_node, normalize_pr_key
from storaged.state.mgmt import MgmtEndpoint, MgmtUser
from storaged.state.validate import normalize_iscsi_name

#: history kept per store; older events are dropped first
MAX_HISTORY = 10000


def _node(txn: Txn, node: str) -> FenceNode:
    name = normalize_node(node)
    rec = txn.get(FenceNode, name)
    if rec is None:
        raise ConfigError(f"unknown node {name!r}: map it first with "
                          "'storaged fence map NODE --initiator IQN'")
    return rec


def _record(txn: Txn, node: str, action: str, by: str, detail: str = "") -> FenceEvent:
    keys = txn.keys(FenceEvent)
    seq = int(max(keys)) + 1 if keys else 1
    event = FenceEvent(seq=seq, node=node, action=action, at=time.time(), by=by or "unknown",
                       detail=detail)
    event.validate()
    txn.put(event)
    for old in sorted(keys)[:max(0, len(keys) + 1 - MAX_HISTORY)]:
        txn.delete(FenceEvent, old)
    return event


def describe_node(rec: FenceNode) -> dict[str, Any]:
    """A node's mapping and state, keys in hex as sg_persist prints them."""
    return {"node": rec.node, "initiators": list(rec.initiators),
            "keys": [f"0x{k:x}" for k in rec.keys], "fenced": rec.fenced,
            "since": rec.since, "by": rec.by}


@_op()
def fence_map(txn: Txn, node: str, initiators: list[str] | None = None,
              keys: list[str | int] | None = None, by: str = "") -> dict[str, Any]:
    """Map cluster node ``node`` to its initiator IQNs and PR keys (replacing
    any earlier mapping; a fenced node stays fenced, with the new mapping)."""
    name = normalize_node(node)
    old = txn.get(FenceNode, name)
    rec = FenceNode(node=name, initiators=[normalize_iscsi_name(i) for i in initiators or []],
                    keys=[normalize_pr_key(k) for k in keys or []],
                    fenced=old.fenced if old else False, since=old.since if old else 0.0,
                    by=old.by if old else "")
    rec.validate()
    for other in txn.list(FenceNode):
        if other.node != name:
            both = set(other.initiators) & set(rec.initiators)
            if both:
                raise ConfigError(f"initiator {sorted(both)[0]} is already mapped to node "
                                  f"{other.node!r}")
    txn.put(rec)
    _record(txn, name, "map", by, " ".join([*rec.initiators, *(f"0x{k:x}" for k in rec.keys)]))
    return describe_node(rec)


@_op()
def fence_unmap(txn: Txn, node: str, by: str = "") -> dict[str, Any]:
    """Forget a node's mapping; refused while it is fenced (unfence it first)."""
    rec = _node(txn, node)
    if rec.fenced:
        raise ConfigError(f"node {rec.node!r} is fenced; unfence it ('storaged fence on') "
                          "before removing its mapping")
    txn.delete(FenceNode, rec.node)
    _record(txn, rec.node, "unmap", by)
    return {"node": rec.node, "unmapped": True}


def _set(txn: Txn, node: str, fenced: bool, by: str) -> dict[str, Any]:
    rec = _node(txn, node)
    changed = rec.fenced != fenced
    rec.fenced, rec.since, rec.by = fenced, time.time(), by or "unknown"
    txn.put(rec)
    _record(txn, rec.node, "off" if fenced else "on", rec.by,
            "" if changed else ("already fenced" if fenced else "already unfenced"))
    return {**describe_node(rec), "changed": changed}


@_op()
def fence_off(txn: Txn, node: str, by: str = "") -> dict[str, Any]:
    """Fence ``node``: its registrations preempted (tasks aborted), sessions
    dropped, logins refused until ``fence_on``.  Idempotent."""
    return _set(txn, node, True, by)


@_op()
def fence_on(txn: Txn, node: str, by: str = "") -> dict[str, Any]:
    """Unfence ``node``: it may log in again (it registers its key again itself)."""
    return _set(txn, node, False, by)


@_op(mutating=False)
def fence_status(txn: Txn, node: str) -> dict[str, Any]:
    """One node's mapping and whether it is fenced."""
    return describe_node(_node(txn, node))


@_op(mutating=False)
def fence_ls(txn: Txn) -> dict[str, Any]:
    """Every mapped node and its state."""
    return {"nodes": [describe_node(r) for r in txn.list(FenceNode)]}


@_op(mutating=False)
def fence_history(txn: Txn, node: str | None = None, limit: int = 100) -> dict[str, Any]:
    """The latest ``limit`` fence events, oldest first (one node's, if given)."""
    name = normalize_node(node) if node is not None else None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    events = [e for e in txn.list(FenceEvent) if name is None or e.node == name]
    events.sort(key=lambda e: e.seq)
    return {"events": [e.to_dict() for e in events[-limit:]]}


def fenced_initiators(txn: Txn) -> tuple[set[str], set[int]]:
    """Initiator names and PR keys of every fenced node (for the daemon)."""
    names: set[str] = set()
    keys: set[int] = set()
    for rec in txn.list(FenceNode):
        if rec.fenced:
            names.update(rec.initiators)
            keys.update(rec.keys)
    return names, keys


# ------------------------------------------------- the management endpoint

def describe_endpoint(rec: MgmtEndpoint) -> dict[str, Any]:
    return {"address": rec.address or None, "tls": bool(rec.tls_cert),
            "tls_cert": rec.tls_cert or None}


@_op()
def mgmt_set(txn: Txn, address: str | None = None, tls_cert: str | None = None,
             tls_key: str | None = None) -> dict[str, Any]:
    """Where the network management endpoint listens ("" or "off" = not at all),
    and its TLS certificate/key ("" = plain TCP)."""
    rec = txn.get(MgmtEndpoint, MgmtEndpoint.KEY) or MgmtEndpoint()
    if address is not None:
        rec.address = "" if address.strip().lower() in ("", "off") else address
    if tls_cert is not None:
        rec.tls_cert = tls_cert
    if tls_key is not None:
        rec.tls_key = tls_key
    rec.validate()
    for path in (rec.tls_cert, rec.tls_key):
        if path and not os.path.isfile(path):
            raise ConfigError(f"TLS file {path} does not exist")
    txn.put(rec)
    return describe_endpoint(rec)


@_op()
def mgmt_user_add(txn: Txn, name: str, password: str, replace: bool = False
                  ) -> dict[str, Any]:
    """Add (or with ``replace``, change the password of) an endpoint user.
    Only a salted SCRAM-SHA-256 verifier is stored."""
    if not isinstance(password, str) or len(password) < 8:
        raise ConfigError("password must be at least 8 characters")
    if txn.get(MgmtUser, name) is not None and not replace:
        raise ConfigError(f"user {name!r} already exists (use --replace to change its "
                          "password)")
    v = make_verifier(password)
    rec = MgmtUser(name=name, salt=v.salt.hex(), iterations=v.iterations,
                   stored_key=v.stored_key.hex(), server_key=v.server_key.hex())
    rec.validate()
    txn.put(rec)
    return {"user": rec.name, "iterations": rec.iterations}


@_op()
def mgmt_user_remove(txn: Txn, name: str) -> dict[str, Any]:
    """Remove an endpoint user."""
    if not txn.delete(MgmtUser, name):
        raise ConfigError(f"user {name!r} does not exist")
    return {"user": name, "removed": True}


@_op(mutating=False)
def mgmt_ls(txn: Txn) -> dict[str, Any]:
    """The endpoint's address and its users (names only)."""
    rec = txn.get(MgmtEndpoint, MgmtEndpoint.KEY) or MgmtEndpoint()
    return {**describe_endpoint(rec), "users": [u.name for u in txn.list(MgmtUser)]}
