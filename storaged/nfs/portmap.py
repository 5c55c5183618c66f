"""Portmapper / rpcbind (RFC 1833): program 100000 versions 2, 3 and 4.

Version 2 (PMAPPROC_*): SET, UNSET, GETPORT, DUMP.  Versions 3 and 4
(RPCBPROC_*): SET, UNSET, GETADDR, DUMP with universal addresses
(``h1.h2.h3.h4.p1.p2``, RFC 5665 §5.2.3.3).  CALLIT/indirect calls are not
offered (PROC_UNAVAIL): they are a known amplification vector.

``PortMap`` is the built-in service; SET/UNSET are accepted from loopback
clients only.  ``register``/``unregister`` talk to another portmapper (the
system rpcbind, or another storaged's) over TCP when port 111 is taken.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

from storaged.nfs.rpc import (
    SUCCESS,
    Call,
    Procedure,
    Program,
    RecordReader,
    decode_reply,
    encode_authsys,
    encode_call,
    record,
)
from storaged.nfs.xdr import BOOL, UINT32, VOID, List, String, Struct

PMAP_PROGRAM = 100000
PMAP_PORT = 111
IPPROTO_TCP = 6
IPPROTO_UDP = 17

MAPPING = Struct("mapping", ("prog", UINT32), ("vers", UINT32), ("prot", UINT32),
                 ("port", UINT32))
PMAPLIST = List(MAPPING, "pmaplist")
RPCB = Struct("rpcb", ("r_prog", UINT32), ("r_vers", UINT32), ("r_netid", String()),
              ("r_addr", String()), ("r_owner", String()))
RPCBLIST = List(RPCB, "rpcblist")

V2_PROCEDURES: dict[int, tuple[str, Any, Any]] = {
    0: ("NULL", VOID, VOID),
    1: ("SET", MAPPING, BOOL),
    2: ("UNSET", MAPPING, BOOL),
    3: ("GETPORT", MAPPING, UINT32),
    4: ("DUMP", VOID, PMAPLIST),
}
V34_PROCEDURES: dict[int, tuple[str, Any, Any]] = {
    0: ("NULL", VOID, VOID),
    1: ("SET", RPCB, BOOL),
    2: ("UNSET", RPCB, BOOL),
    3: ("GETADDR", RPCB, String()),
    4: ("DUMP", VOID, RPCBLIST),
}

_NETIDS = {IPPROTO_TCP: (b"tcp", b"tcp6"), IPPROTO_UDP: (b"udp", b"udp6")}
_PROTS = {b"tcp": IPPROTO_TCP, b"tcp6": IPPROTO_TCP, b"udp": IPPROTO_UDP,
          b"udp6": IPPROTO_UDP}


def uaddr(host: str, port: int) -> bytes:
    """Universal address of ``host:port`` (RFC 5665 §5.2.3.3)."""
    return f"{host}.{port >> 8}.{port & 0xFF}".encode()


def parse_uaddr(addr: bytes) -> tuple[str, int] | None:
    """``(host, port)`` from a universal address, or None."""
    try:
        host, hi, lo = addr.decode().rsplit(".", 2)
        return host, (int(hi) << 8) | int(lo)
    except ValueError:
        return None


def _local(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host == ""


class PortMap:
    """The registry of (prog, vers, prot) -> port and its RPC programs."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.table: dict[tuple[int, int, int], int] = {}
        self.owners: dict[tuple[int, int, int], bytes] = {}

    def set(self, prog: int, vers: int, prot: int, port: int, owner: bytes = b"") -> bool:
        key = (prog, vers, prot)
        if key in self.table:
            return self.table[key] == port
        self.table[key] = port
        self.owners[key] = owner
        return True

    def unset(self, prog: int, vers: int) -> bool:
        keys = [k for k in self.table if k[0] == prog and k[1] == vers]
        for k in keys:
            del self.table[k]
            self.owners.pop(k, None)
        return bool(keys)

    def programs(self) -> list[Program]:
        """Program 100000 versions 2, 3 and 4."""
        out = []
        v2 = Program(PMAP_PROGRAM, 2)
        for num, (name, args, res) in V2_PROCEDURES.items():
            v2.procs[num] = Procedure(name, args, res, getattr(self, f"v2_{name.lower()}"))
        out.append(v2)
        for vers in (3, 4):
            p = Program(PMAP_PROGRAM, vers)
            for num, (name, args, res) in V34_PROCEDURES.items():
                p.procs[num] = Procedure(name, args, res, getattr(self, f"v3_{name.lower()}"))
            out.append(p)
        return out

    # -- version 2
    def v2_null(self, call: Call, args: Any) -> None:
        return None

    def v2_set(self, call: Call, m: dict[str, int]) -> bool:
        if not _local(call.peer[0]):
            return False
        return self.set(m["prog"], m["vers"], m["prot"], m["port"])

    def v2_unset(self, call: Call, m: dict[str, int]) -> bool:
        if not _local(call.peer[0]):
            return False
        return self.unset(m["prog"], m["vers"])

    def v2_getport(self, call: Call, m: dict[str, int]) -> int:
        port = self.table.get((m["prog"], m["vers"], m["prot"]))
        if port is None and m["vers"] == 0:
            ports = [p for (pr, _v, pt), p in self.table.items()
                     if pr == m["prog"] and pt == m["prot"]]
            port = ports[0] if ports else None
        return port or 0

    def v2_dump(self, call: Call, args: Any) -> list[dict[str, int]]:
        return [{"prog": k[0], "vers": k[1], "prot": k[2], "port": p}
                for k, p in sorted(self.table.items())]

    # -- versions 3 and 4
    v3_null = v2_null

    def v3_set(self, call: Call, r: dict[str, Any]) -> bool:
        prot = _PROTS.get(r["r_netid"])
        addr = parse_uaddr(r["r_addr"])
        if not _local(call.peer[0]) or prot is None or addr is None:
            return False
        return self.set(r["r_prog"], r["r_vers"], prot, addr[1], r["r_owner"])

    def v3_unset(self, call: Call, r: dict[str, Any]) -> bool:
        if not _local(call.peer[0]):
            return False
        return self.unset(r["r_prog"], r["r_vers"])

    def v3_getaddr(self, call: Call, r: dict[str, Any]) -> bytes:
        prot = _PROTS.get(r["r_netid"], IPPROTO_TCP)
        port = self.table.get((r["r_prog"], r["r_vers"], prot))
        if port is None:
            return b""
        return uaddr(self.host, port)

    def v3_dump(self, call: Call, args: Any) -> list[dict[str, Any]]:
        out = []
        for (prog, vers, prot), port in sorted(self.table.items()):
            out.append({"r_prog": prog, "r_vers": vers, "r_netid": _NETIDS[prot][0]
                        if prot in _NETIDS else b"tcp", "r_addr": uaddr(self.host, port),
                        "r_owner": self.owners.get((prog, vers, prot), b"")})
        return out


# ------------------------------------------------------------------ client

_xids = itertools.count(0x5D000000)


def pmap_call(proc: int, args: bytes, host: str = "127.0.0.1", port: int = PMAP_PORT,
              timeout: float = 3.0, vers: int = 2) -> memoryview:
    """One call to a portmapper over TCP; returns the result bytes (OSError on failure)."""
    xid = next(_xids) & 0xFFFFFFFF
    msg = encode_call(xid, PMAP_PROGRAM, vers, proc, args,
                      cred=encode_authsys(0, 0, machine=socket.gethostname().encode()[:255]))
    reader = RecordReader()
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(record(msg))
        while True:
            data = s.recv(65536)
            if not data:
                raise OSError("portmapper closed the connection")
            recs = reader.feed(data)
            if recs:
                rxid, stat, res = decode_reply(recs[0])
                if rxid != xid or stat != SUCCESS:
                    raise OSError(f"portmapper answered accept_stat {stat}")
                return res


def register(mappings: list[tuple[int, int, int]], host: str = "127.0.0.1",
             pmap_port: int = PMAP_PORT) -> list[tuple[int, int, int]]:
    """PMAPPROC_SET each (prog, vers, port) for TCP with another portmapper.

    Existing registrations of the same program/version are replaced.  Returns
    the mappings that were accepted.
    """
    done = []
    for prog, vers, port in mappings:
        m = {"prog": prog, "vers": vers, "prot": IPPROTO_TCP, "port": port}
        pmap_call(2, MAPPING.encode(m), host, pmap_port)  # UNSET (all protocols)
        res = pmap_call(1, MAPPING.encode(m), host, pmap_port)
        if BOOL.decode(res):
            done.append((prog, vers, port))
    return done


def unregister(mappings: list[tuple[int, int, int]], host: str = "127.0.0.1",
               pmap_port: int = PMAP_PORT) -> None:
    """PMAPPROC_UNSET each (prog, vers) with another portmapper; errors are ignored."""
    for prog, vers, port in mappings:
        m = {"prog": prog, "vers": vers, "prot": IPPROTO_TCP, "port": port}
        try:
            pmap_call(2, MAPPING.encode(m), host, pmap_port)
        except OSError:
            pass


def getport(prog: int, vers: int, host: str = "127.0.0.1", pmap_port: int = PMAP_PORT) -> int:
    """PMAPPROC_GETPORT for TCP (0 if not registered)."""
    m = {"prog": prog, "vers": vers, "prot": IPPROTO_TCP, "port": 0}
    return UINT32.decode(pmap_call(3, MAPPING.encode(m), host, pmap_port))
