"""ONC RPC over UDP for the small side programs (NLM, NSM, portmapper).

RFC 5531 §11 record marking is a TCP thing: over UDP one datagram carries
exactly one message.  Linux's sm-notify(8) sends SM_NOTIFY over UDP (and asks
the portmapper over UDP first), and kernel clients mounted with ``proto=udp``
speak NLM over UDP, so storaged answers these programs on UDP too.  NFS and
MOUNT stay TCP-only (large READ/WRITE replies do not fit a datagram).

The datagram is fed through the same sans-IO ``RpcConnection`` as a TCP
stream (wrapped in a single-fragment record mark), so parsing and every
error reply are shared; the reply's record mark is stripped again.
"""

from __future__ import annotations

import asyncio
import logging

from storaged.nfs.rpc import Call, RpcConnection, RpcService, record, reply_accept

log = logging.getLogger("storaged.nfs")

MAX_DATAGRAM = 65507


class UdpRpc(asyncio.DatagramProtocol):
    """Answers each datagram with at most one datagram, from ``service``."""

    def __init__(self, service: RpcService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        reply = handle_datagram(self.service, data, (addr[0], addr[1]))
        if reply and self.transport is not None:
            self.transport.sendto(reply, addr)


def handle_datagram(service: RpcService, data: bytes, peer: tuple[str, int]) -> bytes:
    """The reply datagram for one call datagram (b"" when there is nothing to answer)."""
    if len(data) > MAX_DATAGRAM:
        return b""
    conn = RpcConnection(peer)
    conn.receive_data(record(data))
    for ev in conn.next_events():
        if not isinstance(ev, Call):
            return b""
        proc = service.lookup(ev)
        if isinstance(proc, tuple):
            conn.send(reply_accept(ev.xid, *proc))
        else:
            conn.send(service.run(ev, proc))
    out = b"".join(bytes(p) for p in conn.data_to_send())
    return out[4:] if len(out) > 4 else b""
