"""SAN-level fencing state: which initiators belong to a cluster node, and
whether that node is fenced (record kinds ``fence_node`` and ``fence_event``).

A :class:`FenceNode` (key = cluster node name) maps the node to its iSCSI
initiator names and its SCSI-3 PR reservation keys, and says whether it is
fenced now.  Every fence and unfence also appends a :class:`FenceEvent`
(key = a zero-padded sequence number, so the store lists them in order):
who asked, when, through which endpoint.

Both are runtime state, not configuration (no ``CONFIG_SECTION``): a
``config restore`` must never unfence a node, and a restart keeps a fenced
node fenced because the daemon re-applies every fenced record at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from storaged.state.errors import ValidationError
from storaged.state.records import Record, _collect
from storaged.state.validate import check_bool, check_int, normalize_iscsi_name

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
FENCE_ACTIONS = ("off", "on", "map", "unmap")


def normalize_node(value: object) -> str:
    """A cluster node name as pacemaker's ``plug``/``port`` gives it (a host name)."""
    if isinstance(value, str) and _NODE_RE.match(value.strip()):
        return value.strip()
    raise ValidationError(f"invalid node name {value!r}: use letters, digits, '.', '_', '-' "
                          "(at most 63 characters)")


def normalize_pr_key(value: object) -> int:
    """A PR reservation key: an int or hex text (``0x1a2b`` or ``1a2b``), 1..2^64-1."""
    if isinstance(value, bool):
        raise ValidationError(f"invalid reservation key {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            value = int(text, 16)
        except ValueError:
            raise ValidationError(f"invalid reservation key {value!r}: use hex, e.g. "
                                  "0x1a2b0000") from None
    if not isinstance(value, int) or not 0 < value < 2**64:
        raise ValidationError(f"reservation key {value!r} must be 1..2^64-1")
    return value


@dataclass
class FenceNode(Record):
    """One cluster node as the storage node knows it, and its fence state."""

    RECORD_KIND: ClassVar[str] = "fence_node"

    node: str
    initiators: list[str] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    fenced: bool = False
    since: float = 0.0
    """When the node was last fenced or unfenced (Unix time, 0 = never)."""
    by: str = ""
    """Who fenced/unfenced it last (``user@endpoint``)."""

    @property
    def key(self) -> str:
        return self.node

    def problems(self) -> list[str]:
        errors: list[str] = []
        node = _collect(errors, normalize_node, self.node)
        if node:
            self.node = node
        if not isinstance(self.initiators, list) or not isinstance(self.keys, list):
            errors.append("initiators and keys must be lists")
            return errors
        inis = [_collect(errors, normalize_iscsi_name, i) for i in self.initiators]
        keys = [_collect(errors, normalize_pr_key, k) for k in self.keys]
        if not errors:
            self.initiators = list(dict.fromkeys(inis))
            self.keys = list(dict.fromkeys(keys))
        if not self.initiators and not self.keys and not errors:
            errors.append(f"node {self.node}: give at least one initiator IQN or PR key")
        _collect(errors, check_bool, self.fenced, "fenced")
        if not isinstance(self.since, (int, float)) or isinstance(self.since, bool):
            errors.append("since must be a number")
        if not isinstance(self.by, str):
            errors.append("by must be a string")
        return errors


@dataclass
class FenceEvent(Record):
    """One fence, unfence or mapping change, as history (``storaged fence history``)."""

    RECORD_KIND: ClassVar[str] = "fence_event"

    seq: int
    node: str
    action: str
    at: float
    by: str = ""
    detail: str = ""

    @property
    def key(self) -> str:
        return f"{self.seq:016d}"

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, check_int, self.seq, "seq", 1, 10**16 - 1)
        _collect(errors, normalize_node, self.node)
        if self.action not in FENCE_ACTIONS:
            errors.append(f"action must be one of {', '.join(FENCE_ACTIONS)}")
        if not isinstance(self.at, (int, float)) or isinstance(self.at, bool):
            errors.append("at must be a number")
        for name in ("by", "detail"):
            if not isinstance(getattr(self, name), str):
                errors.append(f"{name} must be a string")
        return errors
