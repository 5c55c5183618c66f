"""Gratuitous ARP frames (pure): the announcement a new address holder broadcasts.

The frame is an ARP *request* whose sender and target protocol addresses
are both the floating address (an "ARP Announcement", RFC 5227 §2.3 and
§3; RFC 826 for the packet layout), broadcast on the link, as IPaddr2's
``send_arp`` does by default.  Neighbours that already cache the address
update it to the sender's hardware address (RFC 826's merge step), so
clients and routers follow the address to its new holder at once instead
of after their ARP cache times out.
"""

from __future__ import annotations

import ipaddress
import struct

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST = b"\xff" * 6
#: Ethernet frames are padded to 60 bytes (without FCS).
MIN_FRAME = 60

_ARP = struct.Struct("!HHBBH6s4s6s4s")


def parse_mac(text: str) -> bytes:
    """``"1a:96:55:b6:34:89"`` -> 6 bytes."""
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def garp_frame(mac: bytes, ip: str) -> bytes:
    """The Ethernet frame announcing that ``ip`` is at ``mac``."""
    if len(mac) != 6:
        raise ValueError("a MAC address has 6 bytes")
    addr = ipaddress.IPv4Address(ip).packed
    arp = _ARP.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, mac, addr, b"\0" * 6, addr)
    frame = BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(MIN_FRAME, b"\0")


def parse_arp(frame: bytes) -> dict[str, object] | None:
    """Decode an Ethernet ARP frame (for captures); None if it is not IPv4-over-Ethernet ARP."""
    if len(frame) < 14 + _ARP.size or struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, 14)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4):
        return None
    return {"dst": format_mac(frame[:6]), "src": format_mac(frame[6:12]), "op": op,
            "sha": format_mac(sha), "spa": str(ipaddress.IPv4Address(spa)),
            "tha": format_mac(tha), "tpa": str(ipaddress.IPv4Address(tpa)),
            "gratuitous": spa == tpa}
