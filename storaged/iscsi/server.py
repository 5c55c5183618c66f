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
from concurrent.futures import ThreadPoolExecutor

from storaged.fastio import scsi_rw_decode
from storaged.iscsi.connection import Close, Connection, Execute, Task
from storaged.iscsi.target import Registry
from storaged.scsi import sense
from storaged.scsi.types import ScsiResult

# READ(10)/READ(16) and WRITE(10)/WRITE(16): what initiators send for data.
_READ_OPS = frozenset((0x28, 0x88))
_WRITE_OPS = frozenset((0x2A, 0x8A))

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
            batched = self._batch_io(events) if len(events) > 1 else None
            try:
                for ev in events:
                    if isinstance(ev, Execute):
                        self._execute(ev.task)
                    elif isinstance(ev, Close):
                        out = conn.data_to_send()
                        if out and not transport.is_closing():
                            transport.writelines(out)
                        transport.close()
                        return
            finally:
                if batched:
                    self._finish_batch(batched)

    def _finish_batch(self, devices: list) -> None:
        """Write the batch's deferred O_DIRECT writes, drop unused prefetches.

        Runs before the loop sends the statuses the batch queued; if a write
        fails, those statuses are thrown away and the connection is dropped
        (at ERL 0 the initiator retries on a new session), so no write is
        acknowledged that did not reach the file."""
        failed = None
        pool = self.server.read_pool()
        for dev in devices:
            try:
                dev.write_deferred(pool)
            except OSError as e:
                failed = e
            dev.drop_prefetched()
        if failed is not None and self.conn is not None:
            log.error("O_DIRECT write failed: %s; dropping the connection", failed)
            self.conn.data_to_send()
            if self.transport is not None:
                self.transport.abort()
            self.conn.drop(f"write error: {failed}")

    def _batch_io(self, events: list) -> list | None:
        """Overlap the disk accesses of a batch of O_DIRECT READs and WRITEs.

        O_DIRECT commands run inline (a thread hop per command cost more than
        it saved, docs/benchmarks.md), which alone would keep one request at
        the disk.  When one socket read brought several READs for an O_DIRECT
        LU, their reads are issued at once (``FileBlockDevice.prefetch``) and
        the commands then take their data from the device; several WRITEs
        (no FUA) are queued by the device (``defer_writes``) and written
        together by ``_finish_batch`` before any of their statuses is sent.
        The SCSI layer runs every command as usual (checks, ordering).
        """
        conn = self.conn
        target = conn.target if conn is not None else None
        if target is None:
            return None
        luns = target.scsi.luns
        ranges: dict[object, list[tuple[int, int]]] = {}
        writes: dict[object, int] = {}
        for ev in events:
            cmd = ev.task.command if isinstance(ev, Execute) else None
            if cmd is None or not cmd.cdb:
                continue
            op = cmd.cdb[0]
            if op not in _READ_OPS and op not in _WRITE_OPS:
                continue
            lu = luns.get(cmd.lun)
            dev = lu.device if lu is not None else None
            if not getattr(dev, "direct", False) or not hasattr(dev, "prefetch"):
                continue
            try:
                lba, blocks, flags = scsi_rw_decode(cmd.cdb)
            except ValueError:
                continue
            if op in _WRITE_OPS:
                if not flags & 0x08:  # FUA writes are written (and flushed) on their own
                    writes[dev] = writes.get(dev, 0) + 1
                continue
            bs = lu.block_size
            if blocks and (lba + blocks) * bs <= dev.size:
                ranges.setdefault(dev, []).append((lba * bs, blocks * bs))
        done = []
        for dev, rs in ranges.items():
            if len(rs) > 1:
                dev.prefetch(rs, self.server.read_pool())
                done.append(dev)
        for dev, n in writes.items():
            if n > 1:
                dev.defer_writes()
                if dev not in done:
                    done.append(dev)
        return done

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
        self._read_pool: ThreadPoolExecutor | None = None

    def read_pool(self) -> ThreadPoolExecutor:
        """Threads for batched O_DIRECT reads and writes (as many as tgt's rdwr
        backing store uses, 16: enough for a queue depth of 16-32 at the disk)."""
        if self._read_pool is None:
            self._read_pool = ThreadPoolExecutor(16, thread_name_prefix="direct-read")
        return self._read_pool

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
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=False)
            self._read_pool = None
        self.listeners.clear()
