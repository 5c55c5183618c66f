"""asyncio shell around the sans-IO iSCSI Connection.

It moves bytes between the socket and the core, runs SCSI commands the core
hands out, and drives timers.  Page-cache reads and writes run inline on the
event loop (cheaper than a thread hop); commands that wait for the disk
(SYNCHRONIZE CACHE, FUA writes) run in a worker thread so one initiator's
flush never stalls another's I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from storaged.iscsi.connection import Close, Connection, Execute, Task
from storaged.iscsi.target import Registry
from storaged.scsi import sense
from storaged.scsi.types import ScsiResult

log = logging.getLogger("storaged.iscsi")

class IscsiProtocol(asyncio.BufferedProtocol):
    """One TCP connection; socket reads land directly in the core's buffer."""

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.inflight = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        local = transport.get_extra_info("sockname")[:2]
        peer = transport.get_extra_info("peername")[:2]
        s = self.server
        self.conn = Connection(s.registry, local, peer, nop_interval=s.nop_interval,
                               nop_timeout=s.nop_timeout, now=time.monotonic())
        self.conn.on_drop = self._on_drop
        transport.set_write_buffer_limits(high=8 << 20, low=1 << 20)
        s.protocols.add(self)

    def _on_drop(self, reason: str) -> None:
        # Called from inside the core (also for other sessions' reinstatement):
        # flush on the next pump, then close.
        asyncio.get_running_loop().call_soon(self.pump)

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.conn is not None
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        assert conn is not None
        conn.touch(time.monotonic())
        conn.buffer_updated(nbytes)
        self.pump()

    def pump(self) -> None:
        """Send what the core produced and act on its events."""
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None:
            return
        while True:
            events = conn.next_events()
            out = conn.data_to_send()
            if out and not transport.is_closing():
                transport.writelines(out)
            if not events:
                break
            for ev in events:
                if isinstance(ev, Execute):
                    self._execute(ev.task)
                elif isinstance(ev, Close):
                    out = conn.data_to_send()
                    if out and not transport.is_closing():
                        transport.writelines(out)
                    transport.close()
                    return

    def _execute(self, task: Task) -> None:
        cmd = task.command
        assert cmd is not None and self.conn is not None
        target = self.conn.target
        if target is None:
            return
        if target.scsi.may_block(cmd):
            self.inflight += 1
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self.server.run_command, target.scsi, cmd,
                                       target.name)
            fut.add_done_callback(lambda f, t=task: self._done(t, f))
            return
        result = self.server.run_command(target.scsi, cmd, target.name)
        self.conn.complete(task, result)

    def _done(self, task: Task, fut: asyncio.Future) -> None:
        self.inflight -= 1
        if self.conn is None:
            return
        try:
            result = fut.result()
        except Exception:  # noqa: BLE001 - any failure becomes a SCSI error
            log.exception("command failed")
            result = sense.check(sense.Key.HARDWARE_ERROR, 0x44, 0x00)
        self.conn.complete(task, result)
        self.pump()

    def pause_writing(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.drop("connection lost" if exc is None else f"connection lost: {exc}")
        self.server.protocols.discard(self)
        self.server.on_session_change()

    def tick(self, now: float) -> None:
        if self.conn is not None:
            self.conn.tick(now)
            self.pump()


class IscsiServer:
    """All listening portals of the daemon and their connections."""

    def __init__(self, registry: Registry,
                 run_command: Callable[..., ScsiResult],
                 nop_interval: float = 15.0, nop_timeout: float = 30.0,
                 on_session_change: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.run_command = run_command
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.on_session_change = on_session_change
        self.listeners: dict[tuple[str, int], asyncio.AbstractServer] = {}
        self.protocols: set[IscsiProtocol] = set()
        self._ticker: asyncio.Task | None = None

    async def set_portals(self, portals: set[tuple[str, int]]) -> None:
        """Listen on exactly these portals (start new ones, stop removed ones)."""
        loop = asyncio.get_running_loop()
        for addr in list(self.listeners):
            if addr not in portals:
                srv = self.listeners.pop(addr)
                srv.close()
                log.info("stopped listening on %s:%d", *addr)
        for addr in sorted(portals):
            if addr in self.listeners:
                continue
            srv = await loop.create_server(lambda: IscsiProtocol(self), addr[0], addr[1],
                                           reuse_address=True, backlog=256)
            self.listeners[addr] = srv
            log.info("listening for iSCSI on %s:%d", *addr)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for proto in list(self.protocols):
                proto.tick(now)

    async def shutdown(self, grace: float = 2.0) -> None:
        """Ask initiators to log out, wait briefly, then close everything."""
        for srv in self.listeners.values():
            srv.close()
        for proto in list(self.protocols):
            if proto.conn is not None:
                proto.conn.request_logout(int(grace))
                proto.pump()
        deadline = time.monotonic() + grace
        while self.protocols and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        self.listeners.clear()
