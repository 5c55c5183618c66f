"""A fake NFS *client host* for NLM/NSM tests: portmapper, NLM (GRANTED, *_RES) and statd.

Everything listens on one 127.0.0.1 port (its portmapper answers there too);
the server under test is pointed at it with ``LockService(pmap_port=...)``
or ``STORAGED_CLIENT_PORTMAP_PORT``.  ``ThreadedFake`` runs it on an event
loop in a background thread for tests that drive a daemon subprocess.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from typing import Any

from storaged.nfs import nlm, nsm
from storaged.nfs.nlm import NLM4_GRANTED, NLM_PROGRAM, NLM_V4
from storaged.nfs.rpc import Call, Procedure, Program, decode_reply, encode_call
from storaged.nfs.server import NfsServer

_NSM = {name: num for num, (name, _a, _r) in nsm.PROCEDURES.items()}


class NlmCalls:
    """Mixin for tests/nfs_client.py clients: ``c.nlm("LOCK", args)``, ``c.nsm(...)``."""

    def nlm(self, name: str, args: object) -> object:
        num = nlm.PROC_NUMBERS[name]
        _n, atype, rtype = nlm.PROCEDURES[num]
        stat, res = self.call(NLM_PROGRAM, NLM_V4, num, atype.encode(args))  # type: ignore
        assert stat == 0, f"NLM {name}: accept_stat {stat}"
        return rtype.decode(res)

    def nsm(self, name: str, args: object) -> object:
        num = _NSM[name]
        _n, atype, rtype = nsm.PROCEDURES[num]
        stat, res = self.call(nsm.SM_PROGRAM, nsm.SM_VERS, num, atype.encode(args))  # type: ignore
        assert stat == 0, f"NSM {name}: accept_stat {stat}"
        return rtype.decode(res)


def alock(fh: bytes, host: bytes = b"cl1", svid: int = 1, off: int = 0, ln: int = 0,
          oh: bytes = b"oh") -> dict:
    """An nlm4_lock value."""
    return {"caller_name": host, "fh": fh, "oh": oh, "svid": svid, "l_offset": off,
            "l_len": ln}


def lockargs(fh: bytes, excl: bool = True, block: bool = False, reclaim: bool = False,
             cookie: bytes = b"c1", **kw: object) -> dict:
    """nlm4_lockargs with an nlm4_lock from ``alock(fh, **kw)``."""
    return {"cookie": cookie, "block": block, "exclusive": excl, "alock": alock(fh, **kw),
            "reclaim": reclaim, "state": 1}


class FakeClientHost:
    """A client host on 127.0.0.1: portmapper + NLM (GRANTED) + statd (SM_NOTIFY)."""

    def __init__(self) -> None:
        self.server = NfsServer()
        self.server.service.clear()
        for p in self.server.portmap.programs():
            self.server.add_program(p)
        self.granted: list[dict] = []
        self.results: list[tuple[str, dict]] = []
        self.notifies: list[dict] = []
        self.answer = NLM4_GRANTED
        prog = Program(NLM_PROGRAM, NLM_V4)
        prog.procs[5] = Procedure("GRANTED", nlm.NLM4_TESTARGS, nlm.NLM4_RES, self._granted)
        for num in (11, 12, 13, 14):
            name, args, res = nlm.PROCEDURES[num]
            prog.procs[num] = Procedure(name, args, res,
                                        lambda call, a, n=name: self.results.append((n, a)))
        self.server.add_program(prog)
        statd = Program(nsm.SM_PROGRAM, nsm.SM_VERS)
        statd.procs[6] = Procedure("NOTIFY", nsm.STAT_CHGE, nlm.VOID,
                                   lambda call, a: self.notifies.append(a))
        self.server.add_program(statd)

    def _granted(self, call: Call, a: dict) -> dict:
        self.granted.append(a)
        return {"cookie": a["cookie"], "stat": self.answer}

    async def start(self) -> int:
        await self.server.start("127.0.0.1", 0, "off")
        assert self.server.address is not None
        return self.server.address[1]  # its portmapper answers on the same port


class ThreadedFake:
    """A FakeClientHost on its own event loop thread; ``port`` is its portmapper port."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = asyncio.run_coroutine_threadsafe(self._make(), self.loop).result(10)
        self.port = asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)

    @staticmethod
    async def _make() -> FakeClientHost:
        return FakeClientHost()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


_udp_xids = itertools.count(0x7700)


def udp_call(port: int, prog: int, vers: int, proc: int, args: bytes, res: Any,
             host: str = "127.0.0.1") -> Any:
    """One RPC call over UDP (one datagram each way); the decoded result."""
    xid = next(_udp_xids)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(encode_call(xid, prog, vers, proc, args), (host, port))
        data, _addr = s.recvfrom(65536)
    rxid, stat, body = decode_reply(data)
    assert rxid == xid and stat == 0, f"UDP call: xid {rxid}, accept_stat {stat}"
    return res.decode(body)
