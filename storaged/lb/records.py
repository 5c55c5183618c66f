"""Virtual services as persistent config (``lb_services`` in ``config save``).

One record per virtual service (the VIP portal that answers logins with a
redirect), holding its scheduler, persistence and real servers in the
order ``ipvsadm -a`` added them (the kernel's list is the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from storaged.lb.sched import SCHEDULERS
from storaged.state.errors import ValidationError
from storaged.state.records import Record
from storaged.state.validate import normalize_portal

#: ``-b`` scheduler flags ipvsadm knows that mean something for logins.
SCHED_FLAGS = ("sh-fallback", "sh-port")
#: ``--pe``: persistence engines; "iqn" keys persistence on the initiator name.
PERSISTENCE_ENGINES = ("", "iqn")
#: ``--redirect``: the Login status a redirect carries (RFC 7143 §11.13.5):
#: "temporary" 0x0101 (initiators come back to the group portal next time),
#: "permanent" 0x0102 (they may remember the real server's portal).
REDIRECT_KINDS = ("temporary", "permanent")
MAX_WEIGHT = 65535


def _int(errors: list[str], value: Any, what: str, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        errors.append(f"{what} must be an integer {lo}..{hi}, got {value!r}")


@dataclass
class VirtualService(Record):
    """``ipvsadm -A -t VIP -s SCHED [-p TIMEOUT] [-M NETMASK] [--pe iqn] [-b FLAGS]``,
    plus ``--redirect temporary|permanent`` (the Login status of the redirect)."""

    RECORD_KIND: ClassVar[str] = "lb_service"
    CONFIG_SECTION: ClassVar[str | None] = "lb_services"
    CONFIG_LABEL: ClassVar[str] = "virtual service"

    vip: str
    scheduler: str = "wlc"
    flags: list[str] = field(default_factory=list)
    persistent: int = 0
    netmask: str = "255.255.255.255"
    pe: str = ""
    reals: list[dict[str, Any]] = field(default_factory=list)
    redirect: str = "temporary"

    @property
    def key(self) -> str:
        return self.vip

    def problems(self) -> list[str]:
        errors: list[str] = []
        try:
            self.vip = normalize_portal(self.vip)
        except ValidationError as e:
            errors.extend(e.errors)
        if self.scheduler not in SCHEDULERS:
            errors.append(f"unknown scheduler {self.scheduler!r} "
                          f"(one of {', '.join(SCHEDULERS)})")
        if not isinstance(self.flags, list) or any(f not in SCHED_FLAGS for f in self.flags):
            errors.append(f"scheduler flags must be among {', '.join(SCHED_FLAGS)}")
        _int(errors, self.persistent, "persistence timeout", 0, 2**31 - 1)
        if self.pe not in PERSISTENCE_ENGINES:
            errors.append(f"unknown persistence engine {self.pe!r} (use iqn)")
        if self.redirect not in REDIRECT_KINDS:
            errors.append(f"unknown redirect kind {self.redirect!r} (temporary or permanent)")
        try:
            import ipaddress
            ipaddress.IPv4Network(f"0.0.0.0/{self.netmask}")
        except (ValueError, TypeError):
            errors.append(f"invalid persistence netmask {self.netmask!r}")
        seen: set[str] = set()
        if not isinstance(self.reals, list):
            errors.append("reals must be a list")
            return errors
        for r in self.reals:
            if not isinstance(r, dict) or set(r) - {"portal", "weight", "upper", "lower"}:
                errors.append(f"bad real server entry {r!r}")
                continue
            try:
                r["portal"] = normalize_portal(r.get("portal"))
            except ValidationError as e:
                errors.extend(e.errors)
                continue
            if r["portal"] in seen:
                errors.append(f"real server {r['portal']} is listed twice")
            seen.add(r["portal"])
            r.setdefault("weight", 1)
            r.setdefault("upper", 0)
            r.setdefault("lower", 0)
            _int(errors, r["weight"], "weight", 0, MAX_WEIGHT)
            _int(errors, r["upper"], "upper threshold", 0, 2**31 - 1)
            _int(errors, r["lower"], "lower threshold", 0, 2**31 - 1)
            if r["portal"] == self.vip:
                errors.append(f"real server {r['portal']} is the virtual service itself")
        return errors
