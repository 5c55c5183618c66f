"""The kernel side of floating addresses: pyroute2 for addresses, AF_PACKET for ARP.

Everything here acts on the network namespace the process runs in (a
daemon started with ``ip netns exec`` manages that namespace's links).
Every call is a short synchronous netlink or socket operation; the asyncio
shell runs them in a worker thread, because pyroute2's synchronous API runs
an event loop of its own (and uvloop, the daemon's loop, cannot open
netlink sockets for its asynchronous API).
"""

from __future__ import annotations

import socket
from typing import Any

from storaged.vip.arp import ETH_P_ARP, garp_frame, parse_mac


class NetError(Exception):
    """The kernel refused an address operation; the message names the interface and why."""


def _iproute() -> Any:
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise NetError("pyroute2 is not installed (pip install pyroute2)") from None
    return IPRoute()


def _index(ipr: Any, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise NetError(f"no interface {dev!r} in this network namespace")
    return int(found[0])


def addresses(dev: str) -> list[str]:
    """IPv4 addresses on ``dev`` as ``ADDRESS/PREFIX``."""
    with _iproute() as ipr:
        idx = _index(ipr, dev)
        return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=idx, family=socket.AF_INET)]


def has_address(dev: str, ip: str) -> bool:
    """Is ``ip`` configured on ``dev``?"""
    try:
        return any(a.split("/")[0] == ip for a in addresses(dev))
    except NetError:
        return False


def add_address(dev: str, ip: str, prefixlen: int) -> None:
    """Add ``ip/prefixlen`` to ``dev`` (already present is fine)."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        idx = _index(ipr, dev)
        try:
            ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST
                raise NetError(f"cannot add {ip}/{prefixlen} to {dev}: {e}") from None


def remove_address(dev: str, ip: str, prefixlen: int) -> bool:
    """Remove ``ip/prefixlen`` from ``dev``; False if it was not there."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        try:
            idx = _index(ipr, dev)
        except NetError:
            return False
        try:
            ipr.addr("del", index=idx, address=ip, prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code == 99:  # EADDRNOTAVAIL: not configured
                return False
            raise NetError(f"cannot remove {ip}/{prefixlen} from {dev}: {e}") from None
    return True


def mac_address(dev: str) -> bytes:
    """The hardware address of ``dev``."""
    with _iproute() as ipr:
        link = ipr.get_links(_index(ipr, dev))[0]
        mac = link.get("IFLA_ADDRESS")
    if not mac:
        raise NetError(f"interface {dev!r} has no hardware address")
    return parse_mac(mac)


def send_garp(dev: str, ip: str) -> None:
    """Broadcast one gratuitous ARP for ``ip`` from ``dev`` (AF_PACKET, needs CAP_NET_RAW)."""
    frame = garp_frame(mac_address(dev), ip)
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((dev, ETH_P_ARP))
            s.send(frame)
    except OSError as e:
        raise NetError(f"cannot send gratuitous ARP for {ip} on {dev}: {e.strerror}") from None
