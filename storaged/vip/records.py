"""Floating portal addresses as persistent config (``vips`` in ``config save``).

One record per address, keyed by the IPv4 address itself (without prefix),
so one address can never be configured twice with different prefixes.  The
record lives in each storage node's state store, like the cluster fencing
settings: run the same ``storaged vip add`` on every node that may hold the
address (or copy it with ``config save``/``restore``).  A node without the
record never competes for the address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar

from storaged.state.errors import ValidationError
from storaged.state.records import Record
from storaged.state.validate import check_bool, check_int

#: Linux interface names: at most IFNAMSIZ - 1 = 15 bytes, no '/', no whitespace.
MAX_IFNAME = 15


def parse_address(text: object) -> ipaddress.IPv4Interface:
    """``"10.0.0.100/24"`` -> IPv4Interface; ValidationError naming the problem otherwise."""
    if not isinstance(text, str) or "/" not in text:
        raise ValidationError(f"floating address must be ADDRESS/PREFIX (e.g. 10.0.0.100/24), "
                              f"got {text!r}")
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError as e:
        raise ValidationError(f"invalid floating address {text!r}: {e}") from None
    if iface.version != 4:
        raise ValidationError(f"floating address {text!r}: only IPv4 is supported "
                              "(IPv6 needs unsolicited neighbour advertisements, not done yet)")
    ip = iface.ip
    broadcast = iface.network.prefixlen < 31 and ip == iface.network.broadcast_address
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or broadcast:
        raise ValidationError(f"floating address {text!r} is not a unicast host address")
    return iface


def check_ifname(name: object) -> str:
    """A valid Linux interface name."""
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_IFNAME \
            or name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise ValidationError(f"interface name must be 1-{MAX_IFNAME} bytes without '/', ':' "
                              f"or spaces, got {name!r}")
    return name


@dataclass
class FloatingAddress(Record):
    """``storaged vip add ADDRESS/PREFIX --dev IFACE``: an address one quorate node holds.

    ``preference`` lists node ids, most preferred first (nodes not listed come
    last, by id): among the members of a view, the node in place ``p`` asks
    for the address ``p x preference_delay_ms`` after the view change, and
    only the best two queue (:data:`storaged.vip.core.CANDIDATES`).  Once
    held, an address stays where it is until its holder fails, leaves or
    loses quorum (no failback: a move costs the initiators a reconnect).
    """

    RECORD_KIND: ClassVar[str] = "vip"
    CONFIG_SECTION: ClassVar[str | None] = "vips"
    CONFIG_LABEL: ClassVar[str] = "floating address"

    address: str
    dev: str
    preference: list[int] = field(default_factory=list)
    preference_delay_ms: int = 500
    garp_count: int = 5
    """Gratuitous ARPs sent when the address is taken (IPaddr2's default: 5)."""
    garp_interval_ms: int = 200
    reannounce_s: int = 0
    """Send one more gratuitous ARP every this many seconds while held (0: never)."""
    lockspace: str = "default"
    """The DLM lockspace holding the address locks (``vip:ADDRESS``, EX)."""
    require_synced_clock: bool = False
    """Do not take the address while this node's kernel clock warns (unsynchronized, or
    maxerror above the cluster's ``clock_warn_ms``); default: warn only."""

    @property
    def ip(self) -> str:
        """The address without its prefix (the record key)."""
        return self.address.split("/", 1)[0]

    @property
    def prefixlen(self) -> int:
        return int(self.address.split("/", 1)[1])

    @property
    def key(self) -> str:
        return self.ip

    @property
    def lock_name(self) -> str:
        """The DLM resource whose EX holder owns the address."""
        return f"vip:{self.ip}"

    def rank(self, node: int) -> int:
        """Position of ``node`` in the preference list (unlisted nodes after all listed)."""
        return self.preference.index(node) if node in self.preference else len(self.preference)

    def problems(self) -> list[str]:
        errors: list[str] = []
        try:
            iface = parse_address(self.address)
            self.address = f"{iface.ip}/{iface.network.prefixlen}"
        except ValidationError as e:
            errors += e.errors
        try:
            check_ifname(self.dev)
        except ValidationError as e:
            errors += e.errors
        if not isinstance(self.preference, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4095
                for n in self.preference):
            errors.append(f"preference must be a list of node ids 1-4095, got {self.preference!r}")
        elif len(set(self.preference)) != len(self.preference):
            errors.append(f"preference lists a node twice: {self.preference}")
        for name, lo, hi in (("preference_delay_ms", 0, 60_000), ("garp_count", 0, 100),
                             ("garp_interval_ms", 10, 10_000), ("reannounce_s", 0, 86_400)):
            try:
                check_int(getattr(self, name), name, lo, hi)
            except ValidationError as e:
                errors.append(str(e))
        try:
            check_bool(self.require_synced_clock, "require_synced_clock")
        except ValidationError as e:
            errors.append(str(e))
        if not isinstance(self.lockspace, str) or not 0 < len(self.lockspace) <= 64:
            errors.append(f"lockspace must be a name of 1-64 characters, got {self.lockspace!r}")
        return errors
