"""Login redirection on a group portal (RFC 7143 §6.2.1, §11.13.5, §13.8).

A portal configured as a virtual service with ``storaged lb -A`` is a group
portal: a Login of a normal session there is answered with status class 1
("target moved temporarily" 0x0101, or "permanently" 0x0102 when the service
says so) and ``TargetAddress=host:port,tpgt`` of the real server the
service's scheduler chose (:mod:`storaged.lb.director`).  The initiator then
logs in there.  Discovery sessions are never redirected: the group portal
answers SendTargets itself and lists the group portal as every target's
address, so initiators keep coming back to it.

The connection core calls these helpers; they only read the registry and
ask its director (``Registry.director``, None when no service is set up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storaged.lb.director import SessionView, portal_text

if TYPE_CHECKING:
    from storaged.iscsi.target import Registry, TargetContext

#: Vendor-specific text key (RFC 7143 §13.16 "X-reversed.vendor.dns_name"):
#: a Text Request with it asks how many normal sessions the portal the
#: connection came in on holds; the group portal's health checks use it
#: (storaged.lb.health) to count the sessions of real servers on other nodes.
SESSIONS_KEY = "X-org.storaged.sessions"
#: Its companion: normal-session logins at that portal since the node started.
LOGINS_KEY = "X-org.storaged.logins"
#: The InitiatorName of those health checks (their discovery logins log at debug).
HEALTH_INITIATOR = "iqn.2026-11.org.storaged:lb-health"

LOGIN_FORBIDDEN = 0x0202
LOGIN_NOT_FOUND = 0x0203
LOGIN_SERVICE_UNAVAILABLE = 0x0301


def group_portal(registry: Registry, local: tuple[str, int]) -> str | None:
    """The group portal (``ip:port``) a connection came in on, or None."""
    director = registry.director
    if director is None or director.group_for(local) is None:
        return None
    return portal_text(local)


def login_redirect(registry: Registry, local: tuple[str, int], peer: tuple[str, int],
                   initiator: str, target_name: str, now: float
                   ) -> tuple[int, list[tuple[str, str]]] | None:
    """The answer to a normal-session Login on a group portal: (status, keys).

    None: ``local`` is not a group portal (log in here as usual).  The target
    must be known here and allow the initiator (its ACL is checked before
    any address is given away); with every real server down or quiesced the
    answer is 0x0301 "service unavailable" (§11.13.5: retry later).
    """
    if group_portal(registry, local) is None:
        return None
    target = registry.target(target_name)
    if target is None:
        return LOGIN_NOT_FOUND, []
    if not target.allowed(initiator):
        return LOGIN_FORBIDDEN, []
    assert registry.director is not None
    choice = registry.director.choose(local, initiator, peer, target.name,
                                      list(registry.sessions.values()), now)
    if choice is None:
        return LOGIN_SERVICE_UNAVAILABLE, []
    return choice.status, [("TargetAddress", f"{choice.portal},{target.tpgt}")]


def portal_sessions(registry: Registry, local: tuple[str, int]) -> int:
    """Logged-in normal sessions whose connection came in on portal ``local``."""
    return sum(1 for c in registry.sessions.values() if c.full_feature and c.local == local)


def answer_counts(registry: Registry, local: tuple[str, int], key: str) -> str | None:
    """The value of a vendor count key asked on portal ``local`` (None: not ours)."""
    if key == SESSIONS_KEY:
        return str(portal_sessions(registry, local))
    if key == LOGINS_KEY:
        return str(registry.portal_logins.get(tuple(local[:2]), 0))  # type: ignore[arg-type]
    return None


def logged_in(registry: Registry, conn: SessionView) -> None:
    """A normal session entered full feature phase: count it for its portal and
    tell the director (its real-server counters and pending redirects)."""
    local = tuple(conn.local[:2])
    registry.portal_logins[local] = registry.portal_logins.get(local, 0) + 1  # type: ignore
    if registry.director is not None:
        registry.director.logged_in(conn)


def group_targets(registry: Registry, initiator: str, value: str | None,
                  current: TargetContext | None) -> list[TargetContext]:
    """Targets SendTargets lists on a group portal: those the initiator may see
    (the group serves them all through its real servers)."""
    if value == "All":
        return [t for t in registry.targets.values() if t.allowed(initiator)]
    if not value:
        return [current] if current is not None else []
    t = registry.target(value)
    return [t] if t is not None and t.allowed(initiator) else []
