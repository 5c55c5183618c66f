"""ALUA target port group records (record kind ``alua_group``, key = group id).

One :class:`AluaGroup` per configured target port group (SPC-4 §5.16).  The
daemon turns them into ``storaged.scsi.alua.GroupConfig`` objects; group 1
exists implicitly (active/optimized, every local port) when no record says
otherwise.  Ports are written ``<target iqn>,<tpgt>``: the relative target
port identifier an initiator sees is the TPGT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from storaged.state.errors import ValidationError
from storaged.state.records import Record, _collect
from storaged.state.validate import check_bool, check_int, normalize_iscsi_name

ALUA_STATES = ("active/optimized", "active/non-optimized", "standby", "unavailable",
               "offline", "transitioning")
"""Asymmetric access states an admin may configure (implicit transitions)."""

STATE_ALIASES = {"ao": "active/optimized", "optimized": "active/optimized",
                 "active": "active/optimized", "ano": "active/non-optimized",
                 "non-optimized": "active/non-optimized"}
MAX_GROUP_ID = 0xFFFF


def normalize_state(value: object) -> str:
    """Canonical ALUA state name (accepts ao/ano/optimized/non-optimized aliases)."""
    if isinstance(value, str):
        v = value.strip().lower()
        v = STATE_ALIASES.get(v, v)
        if v in ALUA_STATES:
            return v
    raise ValidationError(f"invalid ALUA state {value!r}: use one of {', '.join(ALUA_STATES)}")


def normalize_port(value: object) -> str:
    """``<target iqn>,<tpgt>`` with a canonical IQN and a TPGT in 1..65535."""
    if not isinstance(value, str) or "," not in value:
        raise ValidationError(f"invalid target port {value!r}: use <target iqn>,<tpgt>")
    iqn, _, tpgt = value.rpartition(",")
    name = normalize_iscsi_name(iqn.strip())
    try:
        tag = int(tpgt.strip())
    except ValueError:
        raise ValidationError(f"invalid TPGT in target port {value!r}") from None
    check_int(tag, "tpgt", 1, 65535)
    return f"{name},{tag}"


def split_port(port: str) -> tuple[str, int]:
    """(iqn, tpgt) of a normalized port string."""
    iqn, _, tpgt = port.rpartition(",")
    return iqn, int(tpgt)


@dataclass
class AluaGroup(Record):
    """One target port group: id, state, preferred bit, member ports.

    ``remote`` marks the HA peer's ports: listed in REPORT TARGET PORT
    GROUPS with the state configured here, never served locally.
    ``explicit``: initiators may change the state with SET TARGET PORT
    GROUPS.  ``transition_time``: implicit transition time in seconds
    reported in the extended RTPG header (0 = unspecified).
    """

    RECORD_KIND: ClassVar[str] = "alua_group"
    CONFIG_SECTION: ClassVar[str | None] = "alua_groups"
    CONFIG_LABEL: ClassVar[str] = "alua group"

    @classmethod
    def config_ref(cls, key: str) -> str:
        return f"alua group {key}"

    id: int
    state: str = "active/optimized"
    preferred: bool = False
    ports: list[str] = field(default_factory=list)
    remote: bool = False
    explicit: bool = True
    transition_time: int = 0
    revision: int = 0
    """Bumped by every ``alua group set``, so re-setting a state an initiator
    changed with SET TARGET PORT GROUPS still reaches the live group."""

    @property
    def key(self) -> str:
        return str(self.id)

    def problems(self) -> list[str]:
        errors: list[str] = []
        _collect(errors, check_int, self.id, "group id", 1, MAX_GROUP_ID)
        state = _collect(errors, normalize_state, self.state)
        if state:
            self.state = state
        _collect(errors, check_bool, self.preferred, "preferred")
        _collect(errors, check_bool, self.remote, "remote")
        _collect(errors, check_bool, self.explicit, "explicit")
        _collect(errors, check_int, self.transition_time, "transition_time", 0, 255)
        _collect(errors, check_int, self.revision, "revision", 0, 2**63 - 1)
        if not isinstance(self.ports, list):
            errors.append("ports must be a list of <target iqn>,<tpgt>")
            return errors
        out: list[str] = []
        for p in self.ports:
            norm = _collect(errors, normalize_port, p)
            if norm in out:
                errors.append(f"port {norm} listed twice")
            elif norm:
                out.append(norm)
        if len(out) > 255:
            errors.append("a target port group holds at most 255 ports")
        if not errors:
            self.ports = out
        return errors
