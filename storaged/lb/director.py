"""The live side of ``storaged lb``: which real server takes a login to a group portal.

Sans-IO: the daemon feeds the virtual services from the store
(:meth:`Director.configure`), the health of the real servers
(:meth:`Director.set_health`) and, with every decision, the sessions this
node's registry holds and the current time; the login code asks
:meth:`Director.choose` and answers the Login with a redirect
(RFC 7143 §6.2.1, §11.13.5 status class 1, the TargetAddress key of §13.8).

Connection counts, as LVS keeps them per real server (see
:mod:`storaged.lb.sched` for what active/inactive mean to the schedulers):

* **active** -- logged-in sessions at the real server's portal: counted in
  this node's registry for a portal of this node, and as the real server
  last reported it to the health check (:mod:`storaged.lb.health`, a
  discovery login asking ``X-org.storaged.sessions``) for one on another node;
* **inactive** -- logins redirected to the real server within the last
  ``pending_timeout`` seconds that have not yet shown up as sessions there
  (a session at a portal of this node clears its initiator's redirect; new
  logins another node reports clear as many of the oldest): a
  burst of logins is spread before any of them is counted as active, as
  LVS spreads new connections before they are established.

A real server that is down (its portal refuses TCP connections, see
:mod:`storaged.lb.health`) is given weight 0 in the scheduler while it is
down, as keepalived's ``inhibit_on_failure`` does: no scheduler chooses it,
and a persistence template pointing at it is dropped.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from storaged.lb.sched import Request, Service, addr_key, fold_name
from storaged.state.validate import split_portal

if TYPE_CHECKING:
    from storaged.lb.records import VirtualService

#: Login status for a redirect (§11.13.5): class 1, "target moved".
MOVED_TEMPORARILY = 0x0101
MOVED_PERMANENTLY = 0x0102
#: How long an issued redirect counts as an inactive connection of its real server.
PENDING_TIMEOUT = 30.0


class SessionView(Protocol):
    """What the director reads of a logged-in session (an iSCSI Connection)."""

    local: tuple[str, int]
    initiator: str
    full_feature: bool


def portal_text(address: tuple[str, int]) -> str:
    """(host, port) as a normalized portal string (``ip:port`` / ``[v6]:port``)."""
    host, port = address[0], address[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is None:
            return f"[{ip.compressed}]:{port}"
        ip = mapped
    return f"{ip}:{port}"


@dataclass
class Choice:
    """A redirect: Login status and the TargetAddress portal (``ip:port``)."""

    status: int
    portal: str


@dataclass
class _Real:
    portal: str
    weight: int
    upper: int
    lower: int
    up: bool = True
    redirects: int = 0
    logins: int = 0
    active: int = 0
    inactive: int = 0
    reported: int | None = None  # sessions the node itself reported (health check)
    logins_seen: int | None = None  # its login count at the last health check

    @property
    def effective_weight(self) -> int:
        return self.weight if self.up else 0


class Group:
    """One virtual service (group portal): its scheduler state and its real servers."""

    def __init__(self, record: VirtualService) -> None:
        self.vip = record.vip
        self.service = Service(record.scheduler, record.persistent, frozenset(record.flags))
        self.reals: dict[str, _Real] = {}
        # (issued at, real portal, initiator name, initiator address)
        self.pending: list[tuple[float, str, str, str]] = []
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self.update(record)

    def update(self, record: VirtualService) -> None:
        """Apply an edited record the way ipvsadm -E/-a/-e/-d would, keeping the
        scheduler's state (rr cursor, hash tables, templates) for what did not change."""
        self.permanent = record.redirect == "permanent"
        self.netmask = record.netmask
        self.pe = record.pe
        self.service.set_scheduler(record.scheduler, frozenset(record.flags))
        self.service.timeout = record.persistent
        wanted = {r["portal"]: {"weight": 1, "upper": 0, "lower": 0, **r} for r in record.reals}
        for portal in [p for p in self.reals if p not in wanted]:
            self.service.del_dest(portal)
            del self.reals[portal]
        for portal, r in wanted.items():  # record order = ipvsadm -a order
            real = self.reals.get(portal)
            if real is None:
                real = self.reals[portal] = _Real(portal, r["weight"], r["upper"], r["lower"])
                self.service.add_dest(portal, real.effective_weight, real.upper, real.lower)
            elif (real.weight, real.upper, real.lower) != (r["weight"], r["upper"], r["lower"]):
                real.weight, real.upper, real.lower = r["weight"], r["upper"], r["lower"]
                self.service.edit_dest(portal, real.effective_weight, real.upper, real.lower)

    def set_health(self, portal: str, up: bool, sessions: int | None = None,
                   logins: int | None = None, local: bool = False) -> bool:
        """Record a health check: up or down, the sessions the real server
        reported and its login count; True if it went up or down.  For a
        ``local`` portal (this node's) logins already ended their pending
        redirects as they happened (:meth:`logged_in`)."""
        real = self.reals.get(portal)
        if real is None:
            return False
        if up and not local:
            # Logins there since the last check (or, without that count, the
            # rise of its sessions) followed our redirects: no longer pending.
            if logins is not None and real.logins_seen is not None:
                done = logins - real.logins_seen
            elif sessions is not None:
                done = sessions - (real.reported or 0)
            else:
                done = 0
            mine = [i for i, p in enumerate(self.pending) if p[1] == portal][:max(0, done)]
            for i in reversed(mine):
                del self.pending[i]
        real.logins_seen = logins
        real.reported = sessions if up else None
        if real.up == up:
            return False
        real.up = up
        self.service.edit_dest(portal, real.effective_weight, real.upper, real.lower)
        return True

    def refresh(self, sessions: Iterable[SessionView], now: float, timeout: float,
                local: Collection[str] = ()) -> None:
        """Recount active/inactive connections per real server and feed the
        scheduler; ``local`` are the portals of this node (counted here)."""
        self.pending = [p for p in self.pending if now - p[0] < timeout]
        active = dict.fromkeys(self.reals, 0)
        for conn in sessions:
            if not conn.full_feature:
                continue
            portal = portal_text(conn.local)
            if portal not in active:
                continue
            active[portal] += 1
            self.logged_in(conn)
        for portal, real in self.reals.items():
            here = portal in local or active[portal]
            real.active = active[portal] if here else (real.reported or 0)
            real.inactive = sum(1 for p in self.pending if p[1] == portal)
            self.service.set_counts(portal, real.active, real.inactive)

    def logged_in(self, conn: SessionView) -> None:
        """A session at a real server on this node reached full feature phase:
        count it once, and the redirect it followed (if any) is no longer pending."""
        portal = portal_text(conn.local)
        real = self.reals.get(portal)
        if real is None or conn in self._seen:
            return
        self._seen.add(conn)
        real.logins += 1
        for i, (_t, p, ini, _src) in enumerate(self.pending):
            if p == portal and ini == conn.initiator:
                del self.pending[i]
                break

    def persistence_key(self, initiator: str, peer: tuple[str, int]) -> str:
        """The template key: the initiator's IQN (``--pe iqn``) or its address
        masked with the persistence netmask (``-M``), as ip_vs_sched_persist does."""
        if self.pe == "iqn":
            return initiator
        ip = ipaddress.ip_address(peer[0])
        if ip.version == 4:
            net = ipaddress.IPv4Network(f"{ip}/{self.netmask}", strict=False)
            return str(net.network_address)
        return str(ip)

    def choose(self, initiator: str, peer: tuple[str, int], target: str, now: float
               ) -> Choice | None:
        """The scheduler's pick for one login (counts must be fresh); None: no
        real server may take it."""
        try:
            src = addr_key(peer[0])
        except ValueError:
            src = 0
        req = Request(src=src, dst=fold_name(target), port=peer[1])
        key = self.persistence_key(initiator, peer) if self.service.timeout else None
        dest = self.service.schedule(req, now, key)
        if dest is None:
            return None
        real = self.reals[dest.name]
        real.redirects += 1
        self.pending.append((now, dest.name, initiator, portal_text(peer)))
        real.inactive += 1
        self.service.set_counts(dest.name, real.active, real.inactive)
        return Choice(MOVED_PERMANENTLY if self.permanent else MOVED_TEMPORARILY, dest.name)

    def describe(self, local: Collection[str] = ()) -> dict[str, Any]:
        """Counters per real server; ``logins`` are the logins at its portal,
        counted here for this node's portals, as reported for the others."""
        def logins(r: _Real) -> int:
            if r.portal in local or r.logins_seen is None:
                return r.logins
            return r.logins_seen

        return {"vip": self.vip, "scheduler": self.service.scheduler_name,
                "reals": {p: {"weight": r.weight, "effective_weight": r.effective_weight,
                              "up": r.up, "active": r.active, "inactive": r.inactive,
                              "redirects": r.redirects, "logins": logins(r),
                              "reported": r.reported}
                          for p, r in self.reals.items()}}


    def connections(self, now: float, timeout: float) -> list[dict[str, Any]]:
        """``ipvsadm -L -c`` for logins: redirects still pending, and the
        persistence templates (which real server an initiator key goes to)."""
        out: list[dict[str, Any]] = [
            {"state": "REDIRECTED", "expires": max(0.0, t + timeout - now), "source": src,
             "initiator": ini, "vip": self.vip, "real": p}
            for t, p, ini, src in self.pending]
        out += [{"state": "PERSIST", "expires": max(0.0, t.expires - now), "source": key,
                 "initiator": "", "vip": self.vip, "real": t.dest.name}
                for key, t in self.service.templates.items() if t.expires > now]
        return out


class Director:
    """Every virtual service of this node, keyed by its group portal address."""

    def __init__(self, pending_timeout: float = PENDING_TIMEOUT) -> None:
        self.groups: dict[str, Group] = {}
        self.pending_timeout = pending_timeout
        self.local: set[str] = set()
        """Portals this node listens on: their sessions are counted in the registry."""

    def set_local_portals(self, addresses: Iterable[tuple[str, int]]) -> None:
        self.local = {portal_text(a) for a in addresses}

    def configure(self, records: Iterable[VirtualService]) -> None:
        """Match the stored virtual services; unchanged services keep their state."""
        wanted = {r.vip: r for r in records}
        for vip in [v for v in self.groups if v not in wanted]:
            del self.groups[vip]
        for vip, rec in wanted.items():
            group = self.groups.get(vip)
            if group is None:
                self.groups[vip] = Group(rec)
            else:
                group.update(rec)

    def addresses(self) -> set[tuple[str, int]]:
        """The group portals this node listens on."""
        return {split_portal(v) for v in self.groups}

    def real_addresses(self) -> set[tuple[str, int]]:
        """Every real server's portal (what the health checks probe)."""
        return {split_portal(p) for g in self.groups.values() for p in g.reals}

    def group_for(self, local: tuple[str, int]) -> Group | None:
        """The virtual service a connection reached, from its local address."""
        return self.groups.get(portal_text(local))

    def set_health(self, address: tuple[str, int], up: bool, sessions: int | None = None,
                   logins: int | None = None) -> bool:
        """A health check result for a real server portal, in every group;
        True if the server went up or down."""
        portal = portal_text(address)
        changed = False
        for g in self.groups.values():
            changed = g.set_health(portal, up, sessions, logins, portal in self.local) or changed
        return changed

    def choose(self, local: tuple[str, int], initiator: str, peer: tuple[str, int],
               target: str, sessions: Iterable[SessionView], now: float) -> Choice | None:
        """Where a normal-session login to group portal ``local`` goes."""
        group = self.group_for(local)
        if group is None:
            return None
        group.refresh(sessions, now, self.pending_timeout, self.local)
        return group.choose(initiator, peer, target, now)

    def logged_in(self, conn: SessionView) -> None:
        """Called by the login code when a normal session enters full feature phase."""
        for g in self.groups.values():
            g.logged_in(conn)

    def describe(self, sessions: Iterable[SessionView], now: float) -> dict[str, Any]:
        """Live counts per service and real server (``storaged lb -L`` in a daemon)."""
        sessions = list(sessions)
        out = []
        for g in self.groups.values():
            g.refresh(sessions, now, self.pending_timeout, self.local)
            out.append(g.describe(self.local))
        entries = [e for g in self.groups.values()
                   for e in g.connections(now, self.pending_timeout)]
        return {"live": True, "services": out, "connections": entries}
