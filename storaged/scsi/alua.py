"""Asymmetric logical unit access: target port groups (SPC-4 §5.16).

ALUA lets a multipath initiator learn which target ports reach a logical
unit best.  Target ports are grouped; every group has one *target port
asymmetric access state* (SPC-4 §5.16.2.4):

=====================  ====  =======================================================
state                  code  commands
=====================  ====  =======================================================
active/optimized       0h    all
active/non-optimized   1h    all (slower path: initiators prefer optimized ports)
standby                2h    the diagnostic/management list of §5.16.2.4.4 + READ CAPACITY
unavailable            3h    only INQUIRY, REPORT LUNS, REQUEST SENSE, RTPG, STPG
offline                Eh    only INQUIRY, REPORT LUNS, REQUEST SENSE, RTPG
transitioning          Fh    only INQUIRY, REPORT LUNS, REQUEST SENSE, RTPG
=====================  ====  =======================================================

A refused command ends in CHECK CONDITION, NOT READY with LOGICAL UNIT NOT
ACCESSIBLE and the state's ASCQ: 04h/0Bh TARGET PORT IN STANDBY STATE,
04h/0Ch TARGET PORT IN UNAVAILABLE STATE, 04h/0Ah ASYMMETRIC ACCESS STATE
TRANSITION; offline uses 04h/12h LOGICAL UNIT NOT READY, OFFLINE.

Groups here are daemon-wide: one :class:`Alua` serves every logical unit of
the daemon (an HA node fails over as a whole).  Group 1 always exists and
holds every local target port not listed in another group, so a daemon with
no ALUA configuration reports one active/optimized group with all its ports,
exactly as before.  A *remote* group describes the peer node's ports of an HA
pair: REPORT TARGET PORT GROUPS lists it (so an initiator sees both nodes'
paths and their states) but no command ever arrives through it here.

Relative target port identifiers are the iSCSI target portal group tags, as
the transport already reports them in VPD page 83h.

Composition with reservations: the check runs in :meth:`LogicalUnit.execute`
after unit attentions and before the reservation check (``access_check``),
through its own ``alua_check`` slot.  That slot is None unless some local
group is in a restricting state (standby, unavailable, offline,
transitioning), so the common path costs one attribute test.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storaged.scsi.commands import Access, CommandSet, CommandSpec
from storaged.scsi.sense import Key
from storaged.scsi.types import Nexus, ScsiCommand, ScsiResult

COMMANDS = CommandSet("alua")
"""The commands this module implements (listed in :mod:`storaged.scsi.table`)."""

if TYPE_CHECKING:
    from storaged.scsi.lu import LogicalUnit

C = 0x04  # CONTROL byte usage (NACA evaluated)

AO = 0x0              # active/optimized
ANO = 0x1             # active/non-optimized
STANDBY = 0x2
UNAVAILABLE = 0x3
OFFLINE = 0xE
TRANSITIONING = 0xF

STATE_NAMES = {
    AO: "active/optimized",
    ANO: "active/non-optimized",
    STANDBY: "standby",
    UNAVAILABLE: "unavailable",
    OFFLINE: "offline",
    TRANSITIONING: "transitioning",
}
STATE_CODES = {
    "active/optimized": AO, "ao": AO, "optimized": AO, "active": AO,
    "active/non-optimized": ANO, "ano": ANO, "non-optimized": ANO,
    "standby": STANDBY, "unavailable": UNAVAILABLE, "offline": OFFLINE,
    "transitioning": TRANSITIONING,
}
EXPLICIT_STATES = (AO, ANO, STANDBY, UNAVAILABLE)
"""States SET TARGET PORT GROUPS may request (SPC-4 §6.46: transitioning is
never requested; offline is a secondary state set only by the target)."""

# Supported-state bits of a target port group descriptor (SPC-4 §6.37, table 307).
T_SUP, O_SUP, LBD_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP = 0x80, 0x40, 0x10, 0x08, 0x04, 0x02, 0x01
SUPPORTED = T_SUP | O_SUP | U_SUP | S_SUP | AN_SUP | AO_SUP

# STATUS CODE of a descriptor (SPC-4 §6.37, table 308).
STATUS_NONE = 0x00
STATUS_EXPLICIT = 0x01    # altered by SET TARGET PORT GROUPS
STATUS_IMPLICIT = 0x02    # altered by implicit asymmetric access state transition

UA_ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06)

# Sense for a refused command per state (SPC-4 §5.16.2.4.4-§5.16.2.4.6, §5.16.2.5).
REFUSAL_ASCQ = {STANDBY: 0x0B, UNAVAILABLE: 0x0C, TRANSITIONING: 0x0A, OFFLINE: 0x12}

INQUIRY, REQUEST_SENSE, REPORT_LUNS = 0x12, 0x03, 0xA0
MAINTENANCE_IN, MAINTENANCE_OUT = 0xA3, 0xA4
SA_TPG = 0x0A                       # REPORT / SET TARGET PORT GROUPS
SA_RSOC, SA_RSTMF = 0x0C, 0x0D      # REPORT SUPPORTED OPERATION CODES / TMFS
READ_BUFFER_10, WRITE_BUFFER = 0x3C, 0x3B
ECHO_BUFFER_MODES = (0x0A, 0x0B)    # echo buffer / echo buffer descriptor

_ALWAYS = frozenset({INQUIRY, REQUEST_SENSE, REPORT_LUNS})
_STANDBY_PLAIN = _ALWAYS | frozenset({
    0x4C, 0x4D,              # LOG SELECT, LOG SENSE
    0x15, 0x55, 0x1A, 0x5A,  # MODE SELECT(6/10), MODE SENSE(6/10)
    0x1C, 0x1D,              # RECEIVE DIAGNOSTIC RESULTS, SEND DIAGNOSTIC
    0x5E, 0x5F,              # PERSISTENT RESERVE IN / OUT
    0x25,                    # READ CAPACITY(10): see below
})
# MAINTENANCE IN/OUT service actions allowed per state.  SPC-4 lists only
# REPORT/SET TARGET PORT GROUPS; REPORT SUPPORTED OPERATION CODES and TMFs are
# allowed in standby too (SPC-5 adds them; they describe, never touch, the LU).
# READ CAPACITY(10)/(16) are not in SPC-4's standby list, but hosts size a
# disk before multipath picks its paths (Linux sd probe, ESX): refusing them
# makes a standby path fail discovery.  LIO allows them for the same reason.
_STANDBY_SA = {MAINTENANCE_IN: frozenset({SA_TPG, SA_RSOC, SA_RSTMF}),
               MAINTENANCE_OUT: frozenset({SA_TPG}),
               0x9E: frozenset({0x10})}           # SERVICE ACTION IN(16) / READ CAPACITY(16)
_UNAVAILABLE_SA = {MAINTENANCE_IN: frozenset({SA_TPG}), MAINTENANCE_OUT: frozenset({SA_TPG})}
_TRANSITIONING_SA = {MAINTENANCE_IN: frozenset({SA_TPG})}

ALLOWED: dict[int, tuple[frozenset[int], dict[int, frozenset[int]]]] = {
    STANDBY: (_STANDBY_PLAIN, _STANDBY_SA),
    UNAVAILABLE: (_ALWAYS, _UNAVAILABLE_SA),
    TRANSITIONING: (_ALWAYS, _TRANSITIONING_SA),
    OFFLINE: (_ALWAYS, _TRANSITIONING_SA),
}
"""state -> (plain opcodes allowed, {opcode: service actions allowed})."""

DEFAULT_GROUP = 1


def port_name(target: str, tpgt: int) -> str:
    """The SCSI target port name of an iSCSI target portal group (RFC 7143 §4.4.1)."""
    return f"{target},t,0x{tpgt:04x}"


@dataclass
class GroupConfig:
    """What the admin configured for one target port group.

    ``ports`` are (target name, TPGT) pairs; the relative target port
    identifier of each is its TPGT.  ``remote`` marks the peer node's group
    of an HA pair; ``explicit`` allows SET TARGET PORT GROUPS to change it.
    ``transition_time`` (seconds, 0-255) is the implicit transition time
    reported in the extended RTPG header.
    """

    id: int
    state: int = AO
    preferred: bool = False
    ports: list[tuple[str, int]] = field(default_factory=list)
    remote: bool = False
    explicit: bool = True
    transition_time: int = 0
    revision: int = 0
    """Changes whenever the admin sets the group, so an unchanged-looking
    configuration still overrides a state SET TARGET PORT GROUPS chose."""


class PortGroup:
    """A configured group plus its live state."""

    __slots__ = ("config", "state", "status")

    def __init__(self, config: GroupConfig) -> None:
        self.config = config
        self.state = config.state
        self.status = STATUS_NONE

    @property
    def id(self) -> int:
        return self.config.id

    def describe(self) -> dict:
        c = self.config
        return {"id": c.id, "state": STATE_NAMES[self.state], "preferred": c.preferred,
                "remote": c.remote, "explicit": c.explicit,
                "transition_time": c.transition_time,
                "ports": [f"{t},{g}" for t, g in c.ports],
                "status": ("none", "altered by SET TARGET PORT GROUPS",
                           "altered implicitly")[self.status]}


def _default_config() -> GroupConfig:
    return GroupConfig(DEFAULT_GROUP)


class Alua:
    """Target port groups of one daemon and the logical units they govern."""

    def __init__(self) -> None:
        self.groups: dict[int, PortGroup] = {DEFAULT_GROUP: PortGroup(_default_config())}
        self.local_ports: dict[str, tuple[str, int]] = {}
        """Target port name -> (target, TPGT) of every local port (the
        daemon's targets, plus any port a command arrived on)."""
        self._port_group: dict[str, PortGroup] = {}
        self._lus: weakref.WeakSet[LogicalUnit] = weakref.WeakSet()
        self.tpgs = 3
        """INQUIRY TPGS field: 1 implicit only, 3 implicit and explicit."""
        self._restrictive = False

    # ------------------------------------------------------------ configuration
    def attach(self, lu: LogicalUnit) -> None:
        """Make ``lu`` governed by these groups (replaces its own default)."""
        old = getattr(lu, "alua", None)
        if old is not None and old is not self:
            old._lus.discard(lu)
        lu.alua = self
        self._lus.add(lu)
        lu.alua_check = self.check if self._restrictive else None

    def set_local_ports(self, ports: Iterable[tuple[str, int]]) -> None:
        """The daemon's own target ports, as (target name, TPGT)."""
        self.local_ports = {port_name(t, g): (t, g) for t, g in ports}

    def configure(self, configs: Iterable[GroupConfig]) -> list[int]:
        """Replace the configured groups.  A group whose configuration did not
        change keeps its live state (it may have been changed by SET TARGET
        PORT GROUPS); a new or changed one takes the configured state as an
        implicit transition.  When anything changed (states, members, PREF:
        what REPORT TARGET PORT GROUPS returns) every I_T nexus gets
        ASYMMETRIC ACCESS STATE CHANGED.  Returns the ids of the groups that
        were added, changed or removed."""
        new: dict[int, PortGroup] = {}
        changed: list[int] = []
        wanted = {c.id: c for c in configs}
        wanted.setdefault(DEFAULT_GROUP, _default_config())
        for gid, cfg in sorted(wanted.items()):
            cur = self.groups.get(gid)
            if cur is not None and cur.config == cfg:
                new[gid] = cur
                continue
            g = PortGroup(cfg)
            if cur is not None and cur.state == cfg.state:
                g.status = cur.status
            elif cur is not None or (cfg.state != AO and not cfg.remote):
                g.status = STATUS_IMPLICIT     # its ports left group 1 (active/optimized)
            changed.append(gid)
            new[gid] = g
        changed += [gid for gid in self.groups if gid not in new]
        self.groups = new
        self._port_group = {port_name(t, tpgt): g for g in new.values() if not g.config.remote
                            for t, tpgt in g.config.ports}
        self._resync()
        if changed:
            self._announce(None)
        return sorted(changed)

    def set_state(self, gid: int, state: int, nexus: Nexus | None = None) -> bool:
        """Change one group's state; ``nexus`` is the I_T nexus of a SET TARGET
        PORT GROUPS (explicit transition), None for an implicit one.  Returns
        True if the state changed."""
        g = self.groups[gid]
        g.status = STATUS_IMPLICIT if nexus is None else STATUS_EXPLICIT
        if g.state == state:
            return False
        g.state = state
        self._resync()
        self._announce(nexus)
        return True

    def _resync(self) -> None:
        self._restrictive = any(g.state not in (AO, ANO) for g in self.groups.values()
                                if not g.config.remote)
        explicit = any(g.config.explicit for g in self.groups.values() if not g.config.remote)
        self.tpgs = 3 if explicit else 1
        check = self.check if self._restrictive else None
        for lu in list(self._lus):
            lu.alua_check = check

    def _announce(self, nexus: Nexus | None) -> None:
        """ASYMMETRIC ACCESS STATE CHANGED (2Ah/06h) for every I_T nexus of
        every LU, but not the one whose SET TARGET PORT GROUPS caused it
        (SPC-4 §5.16.2.6)."""
        for lu in list(self._lus):
            lu.add_unit_attention(*UA_ASYMMETRIC_ACCESS_STATE_CHANGED, except_nexus=nexus)

    # ------------------------------------------------------------ lookups
    def group_of(self, nexus: Nexus) -> PortGroup:
        """The group of the target port a command arrived through."""
        g = self._port_group.get(nexus.target_port)
        return g if g is not None else self.groups[DEFAULT_GROUP]

    def group_id(self, nexus: Nexus) -> int:
        return self.group_of(nexus).config.id

    def state_of(self, nexus: Nexus) -> int:
        return self.group_of(nexus).state

    def describe(self) -> list[dict]:
        """Groups with their live states and relative port ids (for the CLI)."""
        out = []
        for gid, g in sorted(self.groups.items()):
            d = g.describe()
            d["relative_port_ids"] = [rel for rel, _ in self._members(g)]
            if gid == DEFAULT_GROUP:
                d["ports"] = [f"{t},{p}" for _, (t, p) in self._members(g)]
            out.append(d)
        return out

    def _members(self, g: PortGroup) -> list[tuple[int, tuple[str, int]]]:
        """(relative port id, (target, tpgt)) of a group's ports, one per id."""
        ports = list(g.config.ports)
        if g.config.id == DEFAULT_GROUP:
            ports += [p for name, p in sorted(self.local_ports.items())
                      if name not in self._port_group]
        seen: dict[int, tuple[str, int]] = {}
        for t, tpgt in ports:
            seen.setdefault(tpgt, (t, tpgt))
        return sorted(seen.items())

    # ------------------------------------------------------------ command path
    def check(self, lu: LogicalUnit, cmd: ScsiCommand, spec: CommandSpec) -> ScsiResult | None:
        """Installed as ``lu.alua_check`` while some local group restricts
        access: refuse what the arrival port's state does not allow."""
        state = self.state_of(cmd.nexus)
        if state == AO or state == ANO:
            return None
        plain, by_sa = ALLOWED[state]
        op = spec.opcode
        if op in plain:
            return None
        sas = by_sa.get(op)
        if sas is not None and spec.sa in sas:
            return None
        if op in (READ_BUFFER_10, WRITE_BUFFER) and state != OFFLINE \
                and (cmd.cdb[1] & 0x1F) in ECHO_BUFFER_MODES:
            return None
        return lu.check(Key.NOT_READY, 0x04, REFUSAL_ASCQ[state])

    def not_ready_sense(self, nexus: Nexus) -> tuple[int, int] | None:
        """(asc, ascq) REQUEST SENSE reports on a port in a refusing state."""
        state = self.state_of(nexus)
        ascq = REFUSAL_ASCQ.get(state)
        return None if ascq is None else (0x04, ascq)

    # ------------------------------------------------------------ parameter data
    def report(self, nexus: Nexus, extended: bool) -> bytes:
        """REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.37)."""
        if nexus.target_port and nexus.target_port not in self.local_ports \
                and nexus.target_name and nexus.relative_port_id:
            self.local_ports[nexus.target_port] = (nexus.target_name, nexus.relative_port_id)
        body = bytearray()
        for _gid, g in sorted(self.groups.items()):
            c = g.config
            members = self._members(g)[:255]
            body += bytes(((0x80 if c.preferred else 0) | g.state, SUPPORTED))
            body += c.id.to_bytes(2, "big")
            body += bytes((0, g.status, 0, len(members)))
            for rel, _ in members:
                body += bytes(2) + (rel & 0xFFFF).to_bytes(2, "big")
        if extended:
            ttime = max((g.config.transition_time for g in self.groups.values()), default=0)
            hdr = (len(body) + 4).to_bytes(4, "big") + bytes((0x10, min(ttime, 255), 0, 0))
        else:
            hdr = len(body).to_bytes(4, "big")
        return hdr + bytes(body)


# ---------------------------------------------------------------- commands
def _alua(lu: LogicalUnit) -> Alua:
    return lu.alua


@COMMANDS.register(MAINTENANCE_IN, "REPORT TARGET PORT GROUPS", 12,
                   [MAINTENANCE_IN, 0xE0 | SA_TPG, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
                   sa=SA_TPG, medium=False)
def report_target_port_groups(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """MAINTENANCE IN / REPORT TARGET PORT GROUPS (SPC-4 §6.37).

    PARAMETER DATA FORMAT 000b: length header only; 001b: extended header
    with the implicit transition time.  Other formats are reserved."""
    cdb = cmd.cdb
    fmt = cdb[1] >> 5
    if fmt not in (0, 1):
        return lu.invalid_cdb(1, 7)
    alloc = int.from_bytes(bytes(cdb[6:10]), "big")
    data = _alua(lu).report(cmd.nexus, fmt == 1)
    return ScsiResult(data=data[:alloc])


@COMMANDS.register(MAINTENANCE_OUT, "SET TARGET PORT GROUPS", 12,
                   [MAINTENANCE_OUT, SA_TPG, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
                   sa=SA_TPG, access=Access.CONFLICT, medium=False)
def set_target_port_groups(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """MAINTENANCE OUT / SET TARGET PORT GROUPS: explicit ALUA (SPC-4 §6.46).

    The parameter list is a 4-byte reserved header and 4-byte descriptors
    (ASYMMETRIC ACCESS STATE, TARGET PORT GROUP).  Every descriptor is
    checked before any state changes, so a bad list changes nothing.  A
    remote group (the HA peer's ports) or one with explicit ALUA disabled
    cannot be changed here: INVALID FIELD IN PARAMETER LIST."""
    alua = _alua(lu)
    plen = int.from_bytes(bytes(cmd.cdb[6:10]), "big")
    if plen == 0:
        return ScsiResult(transfer_length=0)
    if alua.tpgs & 2 == 0:
        return lu.invalid_opcode()
    raw = cmd.data_out
    data = bytes(raw[:plen]) if raw is not None else b""
    if len(data) < plen or plen < 4 or (plen - 4) % 4:
        return lu.param_list_length_error()
    wanted: dict[int, int] = {}
    for off in range(4, plen, 4):
        state = data[off] & 0x0F
        gid = int.from_bytes(data[off + 2:off + 4], "big")
        g = alua.groups.get(gid)
        if g is None:
            return lu.invalid_param(off + 2)
        if state not in EXPLICIT_STATES:
            return lu.invalid_param(off, 3)
        if g.config.remote or not g.config.explicit or gid in wanted:
            return lu.invalid_param(off + 2)
        wanted[gid] = state
    for gid, state in wanted.items():
        alua.set_state(gid, state, cmd.nexus)
    return ScsiResult(transfer_length=plen)


def request_sense_not_ready(lu: LogicalUnit, nexus: Nexus) -> tuple[int, int] | None:
    """Used by REQUEST SENSE: the ALUA NOT READY condition of a port, if any."""
    if lu.alua_check is None:
        return None
    return lu.alua.not_ready_sense(nexus)


__all__ = [
    "ALLOWED", "ANO", "AO", "OFFLINE", "STANDBY", "STATE_CODES", "STATE_NAMES",
    "TRANSITIONING", "UNAVAILABLE", "Alua", "GroupConfig", "PortGroup", "port_name",
    "report_target_port_groups", "request_sense_not_ready", "set_target_port_groups",
]
