"""Runtime view of the configured targets, as the protocol core needs it.

The daemon builds these from the state store and swaps them on live config
changes; the sans-IO core only reads them.  Sessions register here so that
session reinstatement (RFC 7143 §6.3.5) and target-wide task management can
reach other connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storaged.iscsi.chap import Credentials

if TYPE_CHECKING:
    from storaged.iscsi.connection import Connection
    from storaged.lb.director import Director
    from storaged.scsi.target import ScsiTarget


@dataclass
class TargetContext:
    """One iSCSI target node: name, access control, CHAP and its SCSI target."""

    name: str
    scsi: ScsiTarget
    tpgt: int = 1
    portals: list[tuple[str, int]] = field(default_factory=list)
    open_access: bool = False
    acls: dict[str, Credentials | None] = field(default_factory=dict)
    chap: Credentials | None = None
    params: dict[str, str] = field(default_factory=dict)
    queue_depth: int = 128
    alias: str = ""
    denied: frozenset[str] = frozenset()
    """Fenced initiators (storaged.control.fence_ops): refused whatever the ACL says."""

    def allowed(self, initiator: str) -> bool:
        """May this initiator log in and see the target (ACL or open access)?"""
        name = initiator.lower()
        if name in self.denied:
            return False
        return self.open_access or name in self.acls

    def credentials(self, initiator: str) -> Credentials | None:
        """CHAP credentials this initiator must present, or None for no CHAP."""
        acl = self.acls.get(initiator.lower())
        if acl is not None:
            return acl
        return self.chap

    def served_on(self, addr: tuple[str, int]) -> bool:
        """Is this target reachable through the portal the connection came in on?"""
        ip, port = addr[0], addr[1]
        for pip, pport in self.portals:
            if pport == port and pip in (ip, "0.0.0.0", "::"):
                return True
        return False


class Registry:
    """All targets and live sessions of one daemon."""

    def __init__(self) -> None:
        self.targets: dict[str, TargetContext] = {}
        self.sessions: dict[tuple[str, int, str], Connection] = {}
        self.next_tsih = 1
        self.director: Director | None = None
        """Login balancing on group portals (storaged.iscsi.redirect); None: none."""
        self.portal_logins: dict[tuple[str, int], int] = {}
        """Normal-session logins per local portal since start (health checks read it)."""

    def target(self, name: str) -> TargetContext | None:
        return self.targets.get(name.lower())

    def visible(self, initiator: str, addr: tuple[str, int]) -> list[TargetContext]:
        """Targets an initiator may discover through this portal (SendTargets)."""
        return [t for t in self.targets.values()
                if t.allowed(initiator) and t.served_on(addr)]

    def allocate_tsih(self) -> int:
        tsih = self.next_tsih
        self.next_tsih = self.next_tsih % 0xFFFF + 1
        return tsih

    def connections(self, target: str | None = None) -> list[Connection]:
        return [c for (_, _, t), c in self.sessions.items() if target is None or t == target]
