"""asyncio shell around the sans-IO RPC core: NFSv3, MOUNT v3, NLM v4 and portmap.

One TCP listener serves every program (clients learn the port from the
portmapper, or are told with libnfs's ``nfsport``/``mountport``).  The
built-in portmapper additionally listens on port 111 when it is free;
otherwise the programs are registered with whatever portmapper owns 111 (the
system rpcbind) and unregistered at shutdown.

Page-cache reads and writes run inline on the event loop (cheaper than a
thread hop); procedures marked ``blocking`` (COMMIT) run in a worker thread
so one client's fsync does not stall everyone else.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from storaged.nas.exports import ExportTable
from storaged.nfs import portmap
from storaged.nfs.mount import MOUNT_PROGRAM, MOUNT_V3, Mount
from storaged.nfs.nfs3 import NFS_PROGRAM, NFS_V3, Nfs3, new_write_verifier
from storaged.nfs.quick import QuickIo
from storaged.nfs.rpc import Call, Close, FileRange, RpcConnection, RpcService, reply_accept

log = logging.getLogger("storaged.nfs")


class RpcProtocol(asyncio.BufferedProtocol):
    """One TCP connection: bytes in, calls to the service, replies out.

    A BufferedProtocol: the socket reads straight into the record reader's
    buffer, so a WRITE's data is not copied in user space before its pwrite.
    """

    def __init__(self, server: NfsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: RpcConnection | None = None
        self.sock_fd: int | None = None
        self.pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername") or ("", 0)
        self.conn = RpcConnection((peer[0], peer[1]))
        self.sock_fd = sock.fileno() if sock is not None else None
        self.conn.zero_copy = self.sock_fd is not None
        self.conn.inline = self.server.service.run_inline
        transport.set_write_buffer_limits(high=16 << 20, low=4 << 20)  # type: ignore[attr-defined]
        self.server.protocols.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.protocols.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.conn is not None
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        assert conn is not None
        conn.buffer_updated(nbytes)
        self.pump()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        conn.receive_data(data)
        self.pump()

    def pump(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        service = self.server.service
        for ev in conn.next_events():
            if isinstance(ev, Close):
                log.info("closing RPC connection from %s:%d: %s", *conn.peer, ev.reason)
                self._flush()
                transport.close()
                return
            proc = service.lookup(ev)
            if isinstance(proc, tuple):
                conn.send(reply_accept(ev.xid, *proc))
            elif proc.blocking:
                self.pending += 1
                asyncio.get_running_loop().create_task(self._blocking(ev, proc))
            else:
                conn.send(service.run(ev, proc))
        self._flush()
        self.server.nfs.prefetch_listing()  # replies are out: idle work

    async def _blocking(self, call: Call, proc) -> None:  # noqa: ANN001
        try:
            parts = await asyncio.to_thread(self.server.service.run, call, proc)
        finally:
            self.pending -= 1
        if self.conn is not None and self.transport is not None:
            self.conn.send(parts)
            self._flush()

    def _flush(self) -> None:
        out = self.conn.data_to_send() if self.conn else []
        transport = self.transport
        if not out:
            return
        if transport is None or transport.is_closing():
            for part in out:
                if type(part) is FileRange:
                    os.close(part.fd)
            return
        if FileRange not in map(type, out):  # the common case, without a Python loop
            self._write(transport, out)
            return
        plain: list = []
        for part in out:
            if type(part) is FileRange:
                self._send_range(transport, plain, part)
                plain = []
            else:
                plain.append(part)
        if plain:
            self._write(transport, plain)

    def _write(self, transport: asyncio.Transport, parts: list) -> bool:
        """Send ``parts`` now: one writev straight to the socket when the transport has
        nothing queued (uvloop would otherwise send at the end of the loop iteration,
        after the idle work in ``pump``); whatever the socket does not take, or
        everything when data is queued, goes through the transport in order.
        True if all of it went out directly."""
        fd = self.sock_fd
        if fd is None or len(parts) >= 256 or transport.get_write_buffer_size() != 0:
            transport.writelines(parts)
            return False
        try:
            k = os.writev(fd, parts)
        except OSError:  # EAGAIN, or a broken connection the transport will report
            k = 0
        if k and k == sum(map(len, parts)):
            return True
        for i, p in enumerate(parts):
            n = len(p)
            if k < n:
                rest = [memoryview(p)[k:], *parts[i + 1:]] if k else parts[i:]
                transport.writelines(rest)
                return False
            k -= n
        return True

    def _send_range(self, transport: asyncio.Transport, before: list,
                    part: FileRange) -> None:
        """Send ``before`` then the file range: sendfile from the page cache when
        everything before it went straight to the socket, else (and for whatever the
        socket did not take) read it and send it through the transport."""
        sent = 0
        try:
            if self._write(transport, before) and self.sock_fd is not None:
                while sent < part.count:
                    try:
                        k = os.sendfile(self.sock_fd, part.fd, part.offset + sent,
                                        part.count - sent)
                    except BlockingIOError:
                        break
                    if k == 0:
                        break
                    sent += k
            if sent < part.count:
                rest = os.pread(part.fd, part.count - sent, part.offset + sent)
                if len(rest) < part.count - sent:  # the file shrank meanwhile
                    rest += bytes(part.count - sent - len(rest))
                transport.write(rest)
        except OSError as e:
            log.warning("READ reply to %s:%d failed: %s", *self.conn.peer, e)
            transport.abort()  # the stream cannot be repaired mid-record
        finally:
            os.close(part.fd)


class NfsServer:
    """The RPC programs and their listeners."""

    def __init__(self, exports: ExportTable | None = None,
                 write_verifier: bytes | None = None) -> None:
        self.exports = exports or ExportTable()
        self.nfs = Nfs3(self.exports, write_verifier or new_write_verifier())
        self.mount = Mount(self.exports)
        self.portmap = portmap.PortMap()
        self.service = RpcService()
        nfs = self.nfs.program()
        QuickIo(self.nfs).bind(nfs)  # READ/WRITE in one step where they succeed
        self.service.add(nfs)
        self.service.add(self.mount.program())
        for p in self.portmap.programs():
            self.service.add(p)
        self.protocols: set[RpcProtocol] = set()
        self.listener: asyncio.AbstractServer | None = None
        self.pmap_listener: asyncio.AbstractServer | None = None
        self.pmap_listener6: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None
        self.registered: list[tuple[int, int, int]] = []
        self.portmap_mode = "off"

    def add_program(self, program) -> None:  # noqa: ANN001
        """Serve another RPC program (NLM) on the same listeners."""
        self.service.add(program)

    def mappings(self, port: int) -> list[tuple[int, int, int]]:
        """(prog, vers, port) of every program this server offers, portmap excluded."""
        out = []
        for prog, versions in sorted(self.service.programs.items()):
            if prog == portmap.PMAP_PROGRAM:
                continue
            for vers in sorted(versions):
                out.append((prog, vers, port))
        return out

    async def start(self, host: str, port: int, portmap_mode: str = "auto") -> None:
        """Listen on ``host:port`` and arrange for the portmapper to know about it."""
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(lambda: RpcProtocol(self), host, port,
                                                 reuse_address=True, backlog=256)
        sockname = self.listener.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self.portmap.host = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
        for prog, vers, p in self.mappings(self.address[1]):
            self.portmap.set(prog, vers, portmap.IPPROTO_TCP, p, b"storaged")
        for vers in (2, 3, 4):
            self.portmap.set(portmap.PMAP_PROGRAM, vers, portmap.IPPROTO_TCP,
                             portmap.PMAP_PORT, b"storaged")
        self.portmap_mode = "off"
        if portmap_mode in ("auto", "builtin"):
            try:
                self.pmap_listener = await loop.create_server(
                    lambda: RpcProtocol(self), host, portmap.PMAP_PORT, reuse_address=True)
                self.portmap_mode = "builtin"
            except OSError as e:
                if portmap_mode == "builtin" or e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    await self.stop()
                    raise
            # libtirpc (ganesha, rpcinfo) reaches "localhost" rpcbind over IPv6 first.
            twin = {"127.0.0.1": "::1", "0.0.0.0": "::"}.get(host)
            if self.pmap_listener is not None and twin:
                try:
                    self.pmap_listener6 = await loop.create_server(
                        lambda: RpcProtocol(self), twin, portmap.PMAP_PORT, reuse_address=True)
                except OSError:
                    pass
        if portmap_mode in ("auto", "system") and self.portmap_mode == "off":
            mappings = self.mappings(self.address[1])
            try:
                mappings = await asyncio.to_thread(_keep_system_statd, mappings)
                self.registered = await asyncio.to_thread(portmap.register, mappings)
                self.portmap_mode = "system"
            except OSError as e:
                log.warning("no portmapper on port 111 to register with (%s): clients "
                            "must be told the port (libnfs: ?nfsport=%d&mountport=%d)",
                            e, self.address[1], self.address[1])
        log.info("NFS on %s:%d (portmap: %s)", *self.address, self.portmap_mode)

    async def stop(self) -> None:
        """Close listeners and connections; unregister from a system portmapper."""
        listeners = (self.listener, self.pmap_listener, self.pmap_listener6)
        for lst in listeners:
            if lst is not None:
                lst.close()
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.abort()
        for lst in listeners:
            if lst is not None:
                try:
                    await asyncio.wait_for(lst.wait_closed(), 2)
                except TimeoutError:
                    pass
        if self.registered:
            await asyncio.to_thread(portmap.unregister, self.registered)
            self.registered = []
        self.listener = self.pmap_listener = self.pmap_listener6 = None
        self.address = None


def _keep_system_statd(mappings: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Drop NSM (100024) if the system portmapper already has a statd: never steal it."""
    out = []
    for prog, vers, port in mappings:
        if prog == 100024 and portmap.getport(prog, vers):
            log.warning("a system statd is registered: SM_NOTIFY from rebooting clients "
                        "goes to it, not to storaged")
            continue
        out.append((prog, vers, port))
    return out


__all__ = ["MOUNT_PROGRAM", "MOUNT_V3", "NFS_PROGRAM", "NFS_V3", "NfsServer", "RpcProtocol"]
