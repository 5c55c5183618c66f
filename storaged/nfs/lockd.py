"""asyncio shell for NLM v4 and NSM: grace period timer, callbacks, SM_NOTIFY after restart.

``LockService`` adds the NLM (100021 v4) and NSM (100024 v1) programs to an
``NfsServer`` (so they share its listeners and portmapper registrations)
and, once started:

* bumps the persisted NSM state number and loads the hosts that were
  monitored before the restart (``NsmStore.restart``);
* if any host may have held locks, runs the grace period: only reclaims are
  served for ``grace`` seconds (Linux's default is 90 s);
* sends SM_NOTIFY to each of those hosts' statd, retrying with backoff for
  up to ``notify_for`` seconds like sm-notify(8) (15 minutes by default);
* delivers the calls the NLM core queues (GRANTED callbacks for blocked
  locks, *_RES answers to *_MSG calls).

Every call to a client goes to the portmapper on the client's address
(port 111, or ``STORAGED_CLIENT_PORTMAP_PORT`` for tests that run a fake
client on loopback) to find the client's NLM or statd, then over TCP.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from typing import Any

from storaged.nfs import portmap
from storaged.nfs.nlm import NLM_PROGRAM, NLM_V4, Nlm, OutCall
from storaged.nfs.nsm import SM_NOTIFY_PROC, SM_PROGRAM, SM_VERS, Nsm
from storaged.nfs.rpc import (
    SUCCESS,
    RecordReader,
    RpcError,
    RpcService,
    decode_reply,
    encode_authsys,
    encode_call,
    record,
)
from storaged.nfs.server import NfsServer
from storaged.nfs.udp import UdpRpc
from storaged.nfs.xdr import VOID, XdrError
from storaged.state.nsm import MemoryNsmStore, NsmMonitor, NsmStore

log = logging.getLogger("storaged.nfs.lockd")

DEFAULT_GRACE = 90.0
CALL_TIMEOUT = 5.0
_xids = itertools.count(0x4E4C0000)


def client_portmap_port() -> int:
    """Port of the portmapper on client hosts (111; overridable for loopback tests)."""
    try:
        return int(os.environ.get("STORAGED_CLIENT_PORTMAP_PORT", portmap.PMAP_PORT))
    except ValueError:
        return portmap.PMAP_PORT


async def rpc_call(host: str, prog: int, vers: int, proc: int, args: bytes,
                   res: Any = VOID, pmap_port: int = portmap.PMAP_PORT,
                   machine: str = "storaged", timeout: float = CALL_TIMEOUT) -> Any:
    """Call ``prog``/``vers``/``proc`` on ``host`` (port from its portmapper) over TCP.

    Returns the decoded result; OSError/XdrError/RpcError/TimeoutError on failure.
    """
    port = await asyncio.to_thread(portmap.getport, prog, vers, host, pmap_port)
    if not port:
        raise OSError(f"program {prog} v{vers} is not registered on {host}")
    xid = next(_xids) & 0xFFFFFFFF
    msg = encode_call(xid, prog, vers, proc, args,
                      cred=encode_authsys(0, 0, machine=machine.encode()[:255]))
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(record(msg))
            await writer.drain()
            rr = RecordReader()
            while True:
                data = await reader.read(65536)
                if not data:
                    raise OSError("connection closed before the reply")
                for rec in rr.feed(data):
                    rxid, stat, body = decode_reply(rec)
                    if rxid != xid:
                        continue
                    if stat != SUCCESS:
                        raise RpcError(stat, f"accept_stat {stat}")
                    return res.decode(body)
        finally:
            writer.close()


class LockService:
    """NLM + NSM attached to an NFS server, with persistent NSM state in ``store``."""

    def __init__(self, server: NfsServer, store: NsmStore | MemoryNsmStore | None = None,
                 name: str | None = None, pmap_port: int | None = None,
                 notify_for: float = 900.0) -> None:
        self.server = server
        self.store = store if store is not None else MemoryNsmStore()
        self.name = name or socket.gethostname()
        self.pmap_port = pmap_port if pmap_port is not None else client_portmap_port()
        self.notify_for = notify_for
        self.nlm = Nlm(server.exports, monitor=self.store.monitor)
        self.nlm.forget = self.store.forget
        self.nsm = Nsm(0, self.name, self.client_rebooted)
        server.add_program(self.nlm.program())
        server.add_program(self.nsm.program())
        self.started = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._grace_timer: asyncio.TimerHandle | None = None
        self.notified: list[str] = []
        self.udp: list[asyncio.DatagramTransport] = []
        self._udp_keys: list[tuple[int, int, int]] = []

    # -- lifecycle
    def start(self, grace: float = DEFAULT_GRACE) -> None:
        """Bump the NSM state, start the grace period and notify monitored hosts."""
        if self.started:
            return
        self.started = True
        loop = asyncio.get_running_loop()
        state, pending = self.store.restart()
        self.nsm.state = state
        self.nlm.wakeup = lambda: loop.call_soon(self._drain)
        if pending and grace > 0:
            self.nlm.in_grace = True
            self._grace_timer = loop.call_later(grace, self._end_grace)
            log.info("NLM grace period: %g s, %d host(s) to notify (NSM state %d)",
                     grace, len(pending), state)
        for host in pending:
            self._spawn(self._notify(host))

    async def listen_udp(self, host: str, port: int, pmap_port: int | None = None) -> None:
        """Serve NLM, NSM and the portmapper over UDP on ``port`` (the NFS port number)
        and, with ``pmap_port``, the portmapper on UDP ``pmap_port`` too (see udp.py)."""
        await self.close_udp()
        service = RpcService()
        service.add(self.nlm.program())
        service.add(self.nsm.program())
        for p in self.server.portmap.programs():
            service.add(p)
        loop = asyncio.get_running_loop()
        pm = self.server.portmap
        for p in (port, pmap_port):
            if p is None:
                continue
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpRpc(service), local_addr=(host, p))
            except OSError as e:
                log.warning("NLM/NSM: no UDP listener on %s:%d: %s", host, p, e)
                continue
            self.udp.append(transport)  # type: ignore[arg-type]
            progs = ([(NLM_PROGRAM, NLM_V4), (SM_PROGRAM, SM_VERS)] if p == port
                     else [(portmap.PMAP_PROGRAM, v) for v in (2, 3, 4)])
            for prog, vers in progs:
                key = (prog, vers, portmap.IPPROTO_UDP)
                if pm.set(prog, vers, portmap.IPPROTO_UDP, p, b"storaged"):
                    self._udp_keys.append(key)

    async def close_udp(self) -> None:
        """Close the UDP listeners and drop their portmapper entries."""
        for t in self.udp:
            t.close()
        self.udp = []
        for key in self._udp_keys:
            self.server.portmap.table.pop(key, None)
            self.server.portmap.owners.pop(key, None)
        self._udp_keys = []

    def _end_grace(self) -> None:
        self.nlm.in_grace = False
        log.info("NLM grace period over")

    async def stop(self) -> None:
        """Cancel timers and outstanding deliveries."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        await self.close_udp()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- NSM
    def client_rebooted(self, host: str) -> None:
        """A client's statd told us it restarted: its old locks are void."""
        self.nlm.free_host(host)

    async def _notify(self, host: NsmMonitor) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.notify_for
        delay = 0.5
        while True:
            try:
                await rpc_call(host.address, SM_PROGRAM, SM_VERS, SM_NOTIFY_PROC,
                               self.nsm.notify_args(), VOID, self.pmap_port, self.name)
            except (OSError, XdrError, RpcError, TimeoutError) as e:
                if loop.time() + delay > deadline:
                    log.warning("SM_NOTIFY to %s (%s) failed, giving up: %s", host.host,
                                host.address, e)
                    self.store.notified(host.host, keep=host.host in self.nlm.locks.hosts())
                    return
                log.debug("SM_NOTIFY to %s (%s) failed, retrying: %s", host.host,
                          host.address, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("SM_NOTIFY delivered to %s (%s), state %d", host.host, host.address,
                     self.nsm.state)
            self.notified.append(host.host)
            self.store.notified(host.host, keep=host.host in self.nlm.locks.hosts())
            return

    # -- NLM callbacks
    def _drain(self) -> None:
        out, self.nlm.outbox = self.nlm.outbox, []
        for call in out:
            self._spawn(self._deliver(call))

    async def _deliver(self, out: OutCall) -> None:
        delay = 0.5
        for attempt in range(out.attempts):
            try:
                res = await rpc_call(out.address, out.prog, out.vers, out.proc, out.args,
                                     out.res, self.pmap_port, self.name)
            except (OSError, XdrError, RpcError, TimeoutError) as e:
                log.debug("%s (attempt %d) failed: %s", out.what, attempt + 1, e)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if out.done is not None:
                out.done(res)
            return
        # A blocked client that never hears GRANTED keeps polling with LOCK, which
        # then succeeds: the lock stays granted.
        log.warning("%s to %s: undeliverable", out.what, out.address)
