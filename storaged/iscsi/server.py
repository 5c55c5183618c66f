"""asyncio shell around the sans-IO iSCSI Connection.

It moves bytes between the socket and the core, runs SCSI commands the core
hands out, and drives timers.  Plain READ/WRITE(10/16) commands, nearly all
the data, never become events: the core hands them from its receive buffer
to ``IscsiServer.quick_command`` while it parses.
Page-cache reads and writes run inline on the event loop (cheaper than a
thread hop); commands that wait for the disk
(SYNCHRONIZE CACHE, FUA writes) run in a worker thread so one initiator's
flush never stalls another's I/O; concurrent READs and WRITEs of O_DIRECT LUs
have their disk accesses submitted as AIO (storaged.iscsi.direct).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from functools import partial

from storaged.block.base import BlockDeviceError
from storaged.block.file import FileBlockDevice
from storaged.iscsi.connection import QUEUED, Close, Connection, Execute, Task
from storaged.iscsi.direct import DirectIO
from storaged.iscsi.target import Registry
from storaged.metrics import LunMeter
from storaged.scsi import sense
from storaged.scsi.lu import LogicalUnit
from storaged.scsi.sbc import quick_check, quick_rw
from storaged.scsi.target import DIRECT_OTHER, DIRECT_READ, ScsiTarget
from storaged.scsi.types import ScsiResult

log = logging.getLogger("storaged.iscsi")

class PortalError(OSError):
    """A portal could not be opened (address in use, not local, no permission)."""


class IscsiProtocol(asyncio.BufferedProtocol):
    """One TCP connection; socket reads land directly in the core's buffer."""

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._flush_soon = False

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
                               nop_timeout=s.nop_timeout, now=time.monotonic(),
                               quick=s.quick_command if s.meter is not None else None)
        self.conn.on_drop = self._on_drop
        self.conn.on_output = self._output_ready
        transport.set_write_buffer_limits(high=8 << 20, low=1 << 20)
        s.protocols.add(self)

    def _on_drop(self, reason: str) -> None:
        # Called from inside the core (also for other sessions' reinstatement):
        # flush on the next pump, then close.
        asyncio.get_running_loop().call_soon(self.pump)

    def _output_ready(self) -> None:
        # Queued quick commands finish in bursts (one AIO reap): one send for all,
        # right after the burst.
        if not self._flush_soon:
            self._flush_soon = True
            self.server.direct.after_completions(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        self.pump()

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
        direct = self.server.direct
        while True:
            events = conn.next_events()
            out = conn.data_to_send()
            if out and not transport.is_closing():
                transport.writelines(out)
            if not events:
                break
            if len(events) > 1 or direct.busy or direct.waiting:
                if self._run_planned(events):
                    return
                continue
            ev = events[0]
            if isinstance(ev, Execute):
                self._execute(ev.task)
            elif isinstance(ev, Close):
                self._close()
                return

    def _close(self) -> None:
        conn = self.conn
        transport = self.transport
        assert conn is not None and transport is not None
        out = conn.data_to_send()
        if out and not transport.is_closing():
            transport.writelines(out)
        transport.close()

    def _run_planned(self, events: list) -> bool:
        """Act on several events, or on any while O_DIRECT I/O is in flight
        (storaged.iscsi.direct); True once the connection is closed."""
        plan = _Plan(self, events)
        try:
            for ev in events:
                if isinstance(ev, Execute):
                    plan.execute(ev.task)
                elif isinstance(ev, Close):
                    self._close()
                    return True
            return False
        finally:
            plan.submit()

    def _execute(self, task: Task) -> None:
        cmd = task.command
        assert cmd is not None and self.conn is not None
        target = self.conn.target
        if target is None:
            return
        if target.scsi.may_block(cmd):
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self.server.run_command, target.scsi, cmd,
                                       target.name)
            fut.add_done_callback(lambda f, t=task: self._done(t, f))
            return
        result = self.server.run_command(target.scsi, cmd, target.name)
        self.conn.complete(task, result)

    def _resume(self, task: Task) -> None:
        """Run a command held back while its LU had O_DIRECT I/O in flight."""
        if self.conn is None or self.conn.closed or task.aborted:
            return
        self._execute(task)
        self.pump()

    def _reads_done(self, dev: FileBlockDevice, data: dict[tuple[int, int], bytes],
                    tasks: list[Task]) -> None:
        """Run the READs of a batch now that their data has been read."""
        conn = self.conn
        if conn is None or conn.closed:
            return
        target = conn.target
        if target is None:
            return
        run = self.server.run_command
        dev.use_prefetched(data)
        try:
            for task in tasks:     # plain READs: never for the executor (see _Plan)
                if not task.aborted:
                    conn.complete(task, run(target.scsi, task.command, target.name))
        finally:
            dev.drop_prefetched()
        self.pump()

    def _writes_done(self, items: list[tuple[Task, ScsiResult]],
                     failed: BlockDeviceError | None) -> None:
        """Send the statuses of a batch of WRITEs whose data is in the file.

        If a write failed, none is acknowledged: the connection is dropped
        (at ERL 0 the initiator retries on a new session), so no write is
        acknowledged that did not reach the file."""
        conn = self.conn
        if conn is None or conn.closed:
            return
        if failed is not None:
            log.error("O_DIRECT write failed: %s; dropping the connection", failed)
            conn.data_to_send()
            if self.transport is not None:
                self.transport.abort()
            conn.drop(f"write error: {failed}")
            return
        for task, result in items:
            conn.complete(task, result)
        self.pump()

    def _done(self, task: Task, fut: asyncio.Future) -> None:
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


class _Plan:
    """How one batch of events meets the O_DIRECT LUs (storaged.iscsi.direct).

    Per command for an LU on an O_DIRECT device (``ScsiTarget.direct_io``):
    held back while the device has commands held or disk accesses in flight,
    unless it is a plain READ/WRITE that can join; such READ/WRITEs are
    claimed when the batch has several of them for the device or the device
    is busy anyway, and their disk accesses are submitted as AIO at
    ``submit``.  Anything else runs as usual.
    """

    __slots__ = ("proto", "direct", "scsi", "routes", "counts", "reads", "writes")

    def __init__(self, proto: IscsiProtocol, events: list) -> None:
        self.proto = proto
        self.direct = proto.server.direct
        conn = proto.conn
        target = conn.target if conn is not None else None
        self.scsi = target.scsi if target is not None else None
        self.routes: dict[int, tuple[FileBlockDevice, int, tuple[int, int] | None]] = {}
        """id(task) -> ``ScsiTarget.direct_io`` of its command."""
        self.counts: dict[FileBlockDevice, int] = {}
        self.reads: dict[FileBlockDevice, list[tuple[Task, tuple[int, int] | None]]] = {}
        self.writes: dict[FileBlockDevice, list[tuple[Task, ScsiResult]]] = {}
        scsi = self.scsi
        # Page-cache targets (the default) skip the per-command routing.
        if scsi is None or not any(getattr(lu.device, "direct", False)
                                   for lu in scsi.luns.values()):
            return
        for ev in events:
            if isinstance(ev, Execute) and ev.task.command is not None:
                route = scsi.direct_io(ev.task.command)
                if route is not None:
                    self.routes[id(ev.task)] = route
                    if route[1] != DIRECT_OTHER:
                        self.counts[route[0]] = self.counts.get(route[0], 0) + 1

    def execute(self, task: Task) -> None:
        proto = self.proto
        route = self.routes.get(id(task))
        if route is None:
            proto._execute(task)
            return
        dev, kind, rng = route
        direct = self.direct
        if dev in direct.waiting:
            direct.hold(dev, partial(proto._resume, task))
            return
        claimed = dev in self.reads or dev in self.writes
        if kind != DIRECT_OTHER and (claimed or self.counts[dev] > 1 or dev in direct.busy):
            if kind == DIRECT_READ:
                self.reads.setdefault(dev, []).append((task, rng))
            else:
                self._claim_write(dev, task)
        elif claimed or dev in direct.busy:
            direct.hold(dev, partial(proto._resume, task))
        else:
            proto._execute(task)

    def _claim_write(self, dev: FileBlockDevice, task: Task) -> None:
        """Run the WRITE now with its data queued by the device (written at ``submit``)."""
        items = self.writes.get(dev)
        if items is None:
            items = self.writes[dev] = []
            dev.defer_writes()
        target = self.proto.conn.target  # type: ignore[union-attr]
        items.append((task, self.proto.server.run_command(self.scsi, task.command,
                                                          target.name)))

    def submit(self) -> None:
        """Start the claimed commands' disk accesses."""
        proto = self.proto
        direct = self.direct
        for dev, items in self.writes.items():
            failed: BlockDeviceError | None = None
            try:
                pending = dev.take_deferred()
            except BlockDeviceError as e:
                pending, failed = [], e
            ops = dev.aio_writes(pending)

            def written(results: list[int], dev: FileBlockDevice = dev, ops: list = ops,
                        items: list = items, failed: BlockDeviceError | None = failed) -> None:
                error = dev.aio_writes_done(ops, results)
                proto._writes_done(items, failed or error)

            direct.submit(dev, ops, written)
        for dev, reads in self.reads.items():
            ops = dev.aio_reads([r for _t, r in reads if r is not None])

            def read(results: list[int], dev: FileBlockDevice = dev, ops: list = ops,
                     tasks: list = [t for t, _r in reads]) -> None:  # noqa: B006
                proto._reads_done(dev, dev.aio_read_data(ops, results), tasks)

            direct.submit(dev, ops, read)


class IscsiServer:
    """All listening portals of the daemon and their connections."""

    def __init__(self, registry: Registry,
                 run_command: Callable[..., ScsiResult],
                 nop_interval: float = 15.0, nop_timeout: float = 30.0,
                 on_session_change: Callable[[], None] = lambda: None,
                 meter: Callable[[str, int], LunMeter] | None = None) -> None:
        self.registry = registry
        self.run_command = run_command
        self.meter = meter
        """The metrics of a target's LUN (the daemon's ``Runtime.meter``); with it
        the core hands plain READ/WRITEs to ``quick_command`` as it parses, and
        they are counted there as ``run_command`` counts the others."""
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.on_session_change = on_session_change
        self.listeners: dict[tuple[str, int], asyncio.AbstractServer] = {}
        self.protocols: set[IscsiProtocol] = set()
        self._ticker: asyncio.Task | None = None
        self.direct = DirectIO()

    def quick_command(self, scsi: ScsiTarget, target: str, nexus_key: tuple[str, str],
                      lun: int, cdb: bytes, expected: int, data: memoryview | None,
                      alone: bool, defer: Callable[[], Callable[[bytes | None], None]]
                      ) -> bytes | object | None:
        """The core's QuickCommand: ``storaged.scsi.sbc.quick_rw``, counted in
        ``meter``.  On an O_DIRECT LU a command that arrived alone while the
        LU is idle runs inline (lowest latency); others have their disk
        access submitted as AIO (storaged.iscsi.direct) and finish when it
        completes, unless commands are held for the LU (then they queue
        behind those, through the general path)."""
        lu = scsi.luns.get(lun)
        if lu is None:
            return None
        dev = lu.device
        if getattr(dev, "direct", False):
            if dev in self.direct.waiting:
                return None
            if not alone or dev in self.direct.busy:
                return self._quick_aio(lu, target, nexus_key, lun, cdb, expected, data, defer)
        started = time.perf_counter()
        result = quick_rw(lu, nexus_key, cdb, expected, data)
        if result is not None:
            self._count(target, lun, cdb, started, expected, data is not None)
        return result

    def _quick_aio(self, lu: LogicalUnit, target: str, nexus_key: tuple[str, str], lun: int,
                   cdb: bytes, expected: int, data: memoryview | None,
                   defer: Callable[[], Callable[[bytes | None], None]]) -> object | None:
        """Start the disk access of a quick command on an O_DIRECT LU."""
        offset = quick_check(lu, nexus_key, cdb, expected, data is not None)
        if offset is None or (data is not None and len(data) != expected):
            return None
        started = time.perf_counter()

        def finished(result: bytes | None) -> None:
            # Runs from the event loop once the disk access is over, always
            # after ``done`` below is bound.
            if result is not None:
                self._count(target, lun, cdb, started, expected, data is not None)
            done(result)

        if data is None:
            self.direct.read(lu.device, offset, expected, finished)
        else:
            try:
                self.direct.write(lu.device, offset, data,
                                  lambda ok: finished(b"" if ok else None))
            except BlockDeviceError:
                return None
        done = defer()
        return QUEUED

    def _count(self, target: str, lun: int, cdb: bytes, started: float, length: int,
               write: bool) -> None:
        self.meter(target, lun).record(  # type: ignore[misc]
            cdb[0], time.perf_counter() - started, 0 if write else length,
            length if write else 0, 0)

    async def set_portals(self, portals: set[tuple[str, int]]) -> None:
        """Listen on exactly these portals (start new ones, stop removed ones)."""
        loop = asyncio.get_running_loop()
        for addr in list(self.listeners):
            if addr not in portals:
                srv = self.listeners.pop(addr)
                srv.close()
                log.info("stopped listening on %s:%d", *addr)
        failed: list[str] = []
        for addr in sorted(portals):
            if addr in self.listeners:
                continue
            try:
                srv = await loop.create_server(lambda: IscsiProtocol(self), addr[0], addr[1],
                                               reuse_address=True, backlog=256)
            except OSError as e:
                why = os.strerror(e.errno) if e.errno else str(e)
                failed.append(f"{addr[0]}:{addr[1]}: {why}")
                continue
            self.listeners[addr] = srv
            log.info("listening for iSCSI on %s:%d", *addr)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop())
        if failed:
            raise PortalError("cannot listen for iSCSI on " + "; ".join(failed) +
                              " (is another target, such as tgtd or LIO, using the port? "
                              "free it, or drop the portal: storaged portal remove IQN ADDR)")

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
        self.direct.shutdown()
        self.listeners.clear()
