"""DLM APIs: asyncio (:class:`Lockspace`) and thread-safe synchronous (:class:`SyncLockspace`).

Both wrap one :class:`~storaged.dlm.core.LockspaceCore` that lives on the
node's event loop.  A lock handle is the core's :class:`PLock`: ``mode``,
``lvb`` (bytes, when VALBLK was asked for), ``lvb_valid`` and ``demoted``
describe the last completion.

Blocking callbacks (``bast=callable(lock, mode)``) run on the event loop:
keep them short (typically: note that the lock is wanted and release or
down-convert it from the task that owns it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from storaged.dlm.core import DlmError, LockspaceCore, PLock
from storaged.dlm.modes import Flag, Mode, Status

__all__ = ["Flag", "LockError", "Lockspace", "Mode", "PLock", "Status", "SyncLockspace"]


class LockError(Exception):
    """A lock operation completed with an error ``status`` (EAGAIN, EDEADLK, ECANCEL...)."""

    def __init__(self, status: Status, message: str = "") -> None:
        self.status = Status(status)
        super().__init__(message or f"lock operation failed: {self.status.name}")


class Lockspace:
    """asyncio API of one lockspace.  Use from the node's event loop only."""

    def __init__(self, core: LockspaceCore, send: Callable[[list[tuple[int, dict[str, Any]]]],
                                                            None]) -> None:
        self.core = core
        self._send = send
        self.on_lost: Callable[[PLock], None] | None = None

    @property
    def name(self) -> str:
        return self.core.name

    def pump(self) -> None:
        """Send what the core produced and deliver its completions and callbacks."""
        core = self.core
        if core.out:
            out, core.out = core.out, []
            self._send(out)
        if not core.events:
            return
        events, core.events = core.events, []
        loop = None
        for ev in events:
            kind, lk = ev[0], ev[1]
            if kind == "cast":
                lk.status = ev[2]
                fut = lk.ctx
                if fut is not None:
                    lk.ctx = None
                    if not fut.done():
                        fut.set_result(ev[2])
            elif kind == "bast":
                if lk.bast is not None:
                    loop = loop or asyncio.get_running_loop()
                    loop.call_soon(lk.bast, lk, ev[2])
            else:  # lost
                fut = lk.ctx
                lk.ctx = None
                if fut is not None and not fut.done():
                    fut.set_result(Status.ENOLCK)
                if self.on_lost is not None:
                    self.on_lost(lk)
        if core.out:
            out, core.out = core.out, []
            self._send(out)

    async def _wait(self, lk: PLock, fut: asyncio.Future, timeout: float | None) -> Status:
        if fut.done():
            return fut.result()
        if timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            if self.core.cancel(lk):
                self.pump()
            status = await fut
            if status == Status.ECANCEL:
                raise TimeoutError(f"lock {lk.name!r} not granted within {timeout:g}s") from None
            return status

    async def lock(self, name: bytes | str, mode: Mode | str | int, *, flags: int = 0,
                   lvb: bytes | None = None, bast: Callable[[PLock, Mode], Any] | None = None,
                   timeout: float | None = None) -> PLock:
        """Acquire a lock; returns the granted handle or raises LockError / TimeoutError.

        A request a local master completes at once returns without suspending the
        caller and without a future (the local-master fast path)."""
        try:
            lk = self.core.lock(name, mode, flags, lvb)
        except DlmError as e:
            raise LockError(e.status, str(e)) from None
        lk.bast = bast
        self.pump()
        if lk.op is None:  # completed synchronously: its cast was delivered by pump()
            status = lk.status
        else:
            fut = asyncio.get_running_loop().create_future()
            lk.ctx = fut
            try:
                status = await self._wait(lk, fut, timeout)
            except asyncio.CancelledError:
                self._abandon(lk, fut)
                raise
        if status != Status.OK:
            raise LockError(status)
        return lk

    def request(self, name: bytes | str, mode: Mode | str | int, *, flags: int = 0,
                lvb: bytes | None = None, bast: Callable[[PLock, Mode], Any] | None = None
                ) -> tuple[PLock, asyncio.Future]:
        """Start a lock request without waiting: the handle (to ``cancel`` it) and a future
        that resolves to the completion :class:`Status`."""
        fut = asyncio.get_running_loop().create_future()
        try:
            lk = self.core.lock(name, Mode.parse(mode), flags, lvb)
        except DlmError as e:
            raise LockError(e.status, str(e)) from None
        lk.ctx = fut
        lk.bast = bast
        self.pump()
        return lk, fut

    def _abandon(self, lk: PLock, fut: asyncio.Future) -> None:
        """The awaiter of a lock request went away: cancel it, or release it once granted."""
        def release(f: asyncio.Future) -> None:
            if not f.cancelled() and f.result() == Status.OK and lk.op is None \
                    and self.core.locks.get(lk.lkid) is lk:
                lk.ctx = None
                self.core.unlock(lk)
                self.pump()
        if fut.done():
            release(fut)
            return
        fut.add_done_callback(release)
        if self.core.cancel(lk):
            self.pump()

    async def convert(self, lk: PLock, mode: Mode | str | int, *, flags: int = 0,
                      lvb: bytes | None = None, timeout: float | None = None) -> PLock:
        """Convert ``lk`` to ``mode`` (up or down); raises LockError on failure."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self.core.convert(lk, Mode.parse(mode), flags, lvb)
        except DlmError as e:
            raise LockError(e.status, str(e)) from None
        lk.ctx = fut
        self.pump()
        status = await self._wait(lk, fut, timeout)
        if status != Status.OK:
            raise LockError(status)
        return lk

    async def unlock(self, lk: PLock, *, lvb: bytes | None = None, flags: int = 0,
                     wait: bool = False) -> None:
        """Release ``lk``; with VALBLK from PW/EX the LVB given (or the lock's) is written.

        Asynchronous like ``dlm_unlock`` (whose completion comes by AST): this returns
        once the unlock is on its way to the master, so a lock+unlock pair costs one
        network round trip.  Ordering is kept because each node's channel to a master
        is FIFO: a later request from this node reaches the master after the unlock, so
        it never waits behind (or deadlocks with) the released lock; other nodes see the
        release when the master processes it.  Until then the handle shows
        ``op == "unlock"`` and recovery treats it as released (its LVB write is kept).
        ``wait=True`` waits for the master's completion and raises its error, if any.
        """
        try:
            self.core.unlock(lk, lvb, flags)
        except DlmError as e:
            raise LockError(e.status, str(e)) from None
        if not wait:
            lk.ctx = None
            self.pump()
            return
        fut = asyncio.get_running_loop().create_future()
        lk.ctx = fut
        self.pump()
        status = await fut if not fut.done() else fut.result()
        if status not in (Status.EUNLOCK, Status.OK):
            raise LockError(status)

    def cancel(self, lk: PLock) -> bool:
        """Cancel a waiting request or conversion; its awaiter gets LockError(ECANCEL)."""
        ok = self.core.cancel(lk)
        self.pump()
        return ok

    def describe(self) -> dict[str, Any]:
        """Snapshot of resources and locks (``storaged lock ls``)."""
        return self.core.describe()


class SyncLockspace:
    """Thread-safe blocking wrapper around a :class:`Lockspace` running on ``loop``."""

    def __init__(self, ls: Lockspace, loop: asyncio.AbstractEventLoop) -> None:
        self.ls = ls
        self.loop = loop

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def lock(self, name: bytes | str, mode: Mode | str | int, **kw: Any) -> PLock:
        """Blocking :meth:`Lockspace.lock`."""
        return self._run(self.ls.lock(name, mode, **kw))

    def convert(self, lk: PLock, mode: Mode | str | int, **kw: Any) -> PLock:
        """Blocking :meth:`Lockspace.convert`."""
        return self._run(self.ls.convert(lk, mode, **kw))

    def unlock(self, lk: PLock, **kw: Any) -> None:
        """:meth:`Lockspace.unlock` from another thread (returns once it is dispatched,
        or once the master completed it with ``wait=True``)."""
        return self._run(self.ls.unlock(lk, **kw))

    def cancel(self, lk: PLock) -> bool:
        """Thread-safe :meth:`Lockspace.cancel`."""
        async def _c() -> bool:
            return self.ls.cancel(lk)
        return self._run(_c())
