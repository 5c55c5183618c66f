"""The asyncio shell around ``InitiatorConnection``: sockets, timers, reconnect.

``IscsiClient`` owns one session to one target.  ``command`` may be called
many times concurrently (the core keeps them within the CmdSN window).  A
dropped connection is replaced by a new login with the same ISID (session
reinstatement, RFC 7143 §6.3.5) and every command without a response is
sent again on it; only after ``replacement_timeout`` without a working
connection do the waiting commands fail (open-iscsi's
node.session.timeo.replacement_timeout).  NOP-Out pings every
``noop_interval`` seconds of idleness detect a dead peer after
``noop_timeout`` (node.conn[0].timeo.noop_out_interval/timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from storaged.initiator import session as s

log = logging.getLogger("storaged.initiator")


class IscsiError(OSError):
    """The session cannot reach the target (login failure, timeout)."""


class LoginError(IscsiError):
    """Login refused; ``status`` is the iSCSI status class/detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"login failed: {message} (status 0x{status:04x})")
        self.status = status


@dataclass
class Timeouts:
    """open-iscsi-like defaults (iscsid.conf)."""

    replacement_timeout: float = 120.0
    noop_interval: float = 5.0
    noop_timeout: float = 5.0
    login_timeout: float = 15.0
    max_redirects: int = 4


def _path_text(path: list[tuple[str, int]]) -> str:
    return " -> ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in path)


class _Lost(Exception):
    pass


class IscsiClient:
    """One session to ``options.target_name`` at ``host:port`` (or discovery)."""

    def __init__(self, host: str, port: int, options: s.LoginOptions,
                 timeouts: Timeouts | None = None) -> None:
        self.host, self.port = host, port
        self.portal = (host, port)
        self.connected_to: tuple[str, int] | None = None
        """The portal the current session logged in at (after any redirects)."""
        self.opt = options
        self.timeouts = timeouts or Timeouts()
        self.core: s.InitiatorConnection | None = None
        self.params: dict[str, str] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._noop_task: asyncio.Task | None = None
        self._waiters: dict[int, asyncio.Future] = {}    # core tag -> future
        self._jobs: dict[asyncio.Future, tuple] = {}      # future -> command args
        self._up = asyncio.Event()
        self._closing = False
        self._reconnecting: asyncio.Task | None = None
        self._last_rx = 0.0
        self.reconnects = 0
        self._flush_soon = False

    # ------------------------------------------------------------- session
    async def connect(self) -> None:
        """Log in (following redirections); raises LoginError/IscsiError."""
        await self._login()
        self._noop_task = asyncio.get_running_loop().create_task(self._keepalive())

    async def _login(self) -> None:
        """Log in at ``self.portal``, following at most ``max_redirects`` redirects
        (§6.2.1).  A permanent move (0x0102) replaces ``self.portal`` for later
        logins; after a temporary one (0x0101) they start at the original portal
        again.  A redirect back to a portal already tried is a loop: an error
        naming the portals, not a retry."""
        host, port = self.portal
        path = [self.portal]
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), self.timeouts.login_timeout)
            except (TimeoutError, OSError) as e:
                raise IscsiError(f"cannot connect to {host}:{port}: {e}") from e
            core = s.InitiatorConnection(self.opt)
            core.start()
            try:
                ev = await asyncio.wait_for(self._login_exchange(core, reader, writer),
                                            self.timeouts.login_timeout)
            except TimeoutError as e:
                writer.close()
                raise IscsiError(f"login to {host}:{port} timed out") from e
            except OSError as e:      # reset while logging in (target restarting)
                writer.close()
                raise IscsiError(f"login to {host}:{port}: {e}") from e
            if isinstance(ev, s.Redirected):
                writer.close()
                log.info("login to %s:%s redirected (0x%04x) to %s:%s", host, port,
                         ev.status, ev.host, ev.port)
                host, port = ev.host, ev.port
                looped = (host, port) in path
                path.append((host, port))
                if looped:
                    raise IscsiError("login redirection loop: " + _path_text(path))
                if len(path) - 1 > self.timeouts.max_redirects:
                    raise IscsiError(f"too many login redirections (more than "
                                     f"{self.timeouts.max_redirects}): {_path_text(path)}")
                if ev.status == s.MOVED_PERMANENTLY:
                    self.portal = (host, port)
                continue
            if isinstance(ev, s.LoginFailed):
                writer.close()
                raise LoginError(ev.status, ev.message)
            if isinstance(ev, s.Dropped):
                writer.close()
                raise IscsiError(f"login to {host}:{port}: {ev.reason}")
            assert isinstance(ev, s.LoginDone)
            self.core, self._writer = core, writer
            self.params = ev.params
            self.connected_to = (host, port)
            self._last_rx = asyncio.get_running_loop().time()
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_loop(core, reader))
            self._up.set()
            return

    async def _login_exchange(self, core: s.InitiatorConnection, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> s.Event:
        while True:
            writer.writelines(core.data_to_send())
            await writer.drain()
            for ev in core.next_events():
                if not isinstance(ev, (s.CommandDone, s.NopReply)):
                    return ev
            data = await reader.read(65536)
            if not data:
                return s.Dropped("target closed the connection during login")
            core.receive_data(data)

    async def _read_loop(self, core: s.InitiatorConnection, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        reason = "connection closed by the target"
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                self._last_rx = loop.time()
                core.receive_data(data)
                self._flush()
                if self._handle(core.next_events()):
                    reason = "connection dropped"
                    break
        except (OSError, asyncio.IncompleteReadError) as e:
            reason = str(e)
        if core is self.core:
            self._lost(reason)

    def _handle(self, events: list) -> bool:
        dropped = False
        for ev in events:
            if isinstance(ev, (s.CommandDone, s.NopReply, s.TmfDone, s.TextDone)):
                fut = self._waiters.pop(ev.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev)
            elif isinstance(ev, s.AsyncEvent):
                log.info("async event %d from the target", ev.event)
                if ev.event in (1, 2, 3):   # logout request / drop (§11.9.1)
                    dropped = True
            elif isinstance(ev, (s.Dropped, s.LoggedOut)):
                dropped = True
        return dropped

    def _flush_later(self) -> None:
        self._flush_soon = False
        self._flush()

    def _flush(self) -> None:
        if self.core is not None and self._writer is not None:
            out = self.core.data_to_send()
            if out and not self._writer.is_closing():
                self._writer.writelines(out)

    def _lost(self, reason: str) -> None:
        """The connection died: reconnect in the background unless closing."""
        if self._closing or self._reconnecting is not None:
            return
        log.warning("iSCSI connection to %s:%s lost: %s", self.host, self.port, reason)
        self._up.clear()
        if self._writer is not None:
            self._writer.close()
        self.core = None
        # Every command without a response is sent again after the new login.
        self._waiters.clear()
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.replacement_timeout
        delay = 0.1
        try:
            while not self._closing:
                try:
                    await self._login()    # same ISID, TSIH 0: reinstatement (§6.3.5)
                    self.reconnects += 1
                    break
                except (IscsiError, OSError) as e:
                    if isinstance(e, LoginError) and e.status >> 8 == 0x02:
                        # Initiator error class (§11.13.5): the target will keep
                        # refusing (e.g. our ACL was revoked by a fence), and the
                        # RFC says not to retry: fail now, not after the timeout.
                        log.error("iSCSI login to %s:%s refused on reconnect: %s",
                                  self.host, self.port, e)
                        self._fail_all(e)
                        return
                    if loop.time() + delay > deadline:
                        self._fail_all(IscsiError(
                            f"no connection to {self.host}:{self.port} within the "
                            f"replacement timeout ({self.timeouts.replacement_timeout:g} s): {e}"))
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self._reconnecting = None
        for fut, args in list(self._jobs.items()):
            if not fut.done():
                self._submit(fut, args)
        self._flush()

    def _fail_all(self, exc: Exception) -> None:
        for fut in list(self._jobs):
            if not fut.done():
                fut.set_exception(exc)
        self._jobs.clear()

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.timeouts
        while not self._closing:
            await asyncio.sleep(t.noop_interval)
            core = self.core
            if core is None or self._closing or loop.time() - self._last_rx < t.noop_interval:
                continue
            fut = loop.create_future()
            self._waiters[core.nop()] = fut
            self._flush()
            try:
                await asyncio.wait_for(asyncio.shield(fut), t.noop_timeout)
            except TimeoutError:
                if core is self.core:
                    self._lost(f"no NOP-In within {t.noop_timeout:g} s")

    # --------------------------------------------------------------- I/O
    def _submit(self, fut: asyncio.Future, args: tuple) -> None:
        core = self.core
        assert core is not None
        kind = args[0]
        if kind == "scsi":
            tag = core.submit(*args[1:])
        elif kind == "tmf":
            tag = core.task_management(*args[1:])
        else:
            tag = core.send_targets(*args[1:])
        self._waiters[tag] = fut

    async def _run(self, args: tuple) -> s.Event:
        if self._closing:
            raise IscsiError("session closed")
        if self.core is None and self._reconnecting is None:
            # The replacement timeout expired earlier: new I/O tries again
            # (and fails after another replacement_timeout).
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())
        fut = asyncio.get_running_loop().create_future()
        self._jobs[fut] = args
        try:
            if self.core is not None:
                self._submit(fut, args)
                if not self._flush_soon:
                    # One write for every command submitted in this loop turn.
                    self._flush_soon = True
                    asyncio.get_running_loop().call_soon(self._flush_later)
            return await fut
        finally:
            self._jobs.pop(fut, None)

    async def command(self, cdb: bytes, lun: int = 0, read_len: int = 0,
                      data_out: bytes | memoryview = b"") -> s.CommandDone:
        """Run one SCSI command; retried on a new connection if the old one
        died before the response (so a completed WRITE was answered GOOD)."""
        ev = await self._run(("scsi", bytes(cdb), lun, read_len, bytes(data_out)))
        assert isinstance(ev, s.CommandDone)
        return ev

    async def task_management(self, function: int, lun: int = 0) -> int:
        ev = await self._run(("tmf", function, lun))
        assert isinstance(ev, s.TmfDone)
        return ev.response

    async def send_targets(self) -> list[tuple[str, list[str]]]:
        ev = await self._run(("text", "All"))
        assert isinstance(ev, s.TextDone)
        return s.send_targets_result(ev.pairs)

    def drop_connection(self) -> None:
        """Abort the TCP connection (tests and path recovery use it)."""
        if self._writer is not None:
            self._writer.transport.abort()

    async def close(self) -> None:
        """Log out and close."""
        self._closing = True
        for t in (self._noop_task, self._reconnecting):
            if t is not None:
                t.cancel()
        core, writer = self.core, self._writer
        if core is not None and writer is not None and not writer.is_closing():
            fut = asyncio.get_running_loop().create_future()
            core.logout()
            self._flush()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain_logout(fut), 2.0)
        if writer is not None:
            writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        for fut in list(self._jobs):
            if not fut.done():
                fut.set_exception(IscsiError("session closed"))

    async def _drain_logout(self, fut: asyncio.Future) -> None:
        while self.core is not None and not self.core.closed:
            await asyncio.sleep(0.01)
