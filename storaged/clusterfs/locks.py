"""The lock layer clusterfs runs on: the storaged DLM, or local locks for one node.

Only two modes are used, as GFS2's glocks use them: ``PR`` (shared, to read)
and ``EX`` (exclusive, to change).  ``noqueue`` asks to fail at once with
:class:`WouldBlock` instead of waiting (DLM_LKF_NOQUEUE); the transaction
layer uses it for every lock after a transaction's first so that it never
waits while holding locks out of order (storaged.clusterfs.txn).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from storaged.dlm.api import LockError, SyncLockspace
from storaged.dlm.modes import Flag, Mode, Status

PR = "PR"
EX = "EX"


class WouldBlock(Exception):
    """A NOQUEUE request found the lock busy."""


class LockLost(Exception):
    """The lock layer lost a lock (lockspace stopped, node fenced): the mount withdraws."""


class LockLayer(Protocol):
    """What the filesystem needs from a lock manager."""

    def lock(self, name: str, mode: str, noqueue: bool = False) -> Any:
        """Take lock ``name`` in ``mode``; returns a handle.  WouldBlock with ``noqueue``."""
        ...

    def convert(self, handle: Any, mode: str, noqueue: bool = False) -> None:
        """Change a held lock's mode (PR to EX or back)."""
        ...

    def unlock(self, handle: Any) -> None:
        """Release a held lock."""
        ...


class _Local:
    __slots__ = ("name", "mode")

    def __init__(self, name: str, mode: str) -> None:
        self.name = name
        self.mode = mode


class LocalLocks:
    """Single-node locks (like GFS2's lock_nolock / ``localflocks``): a PR/EX table.

    Still real locks between the threads of one mount, since FUSE calls come
    from several threads at once.  ``caching=True`` says this layer is private
    to one mount of a device no other mount writes, so the mount may keep the
    blocks it read across operations (the CLI's ``-o local``); tests that share
    one LocalLocks between several mounts leave it False."""

    def __init__(self, caching: bool = False) -> None:
        self.caching = caching
        self.on_invalidate: Any = None
        self.before_release: Any = None  # never called: no other node takes these locks
        self._cond = threading.Condition()
        self._readers: dict[str, int] = {}
        self._writer: set[str] = set()
        self.stats = {"locks": 0, "waits": 0, "busy": 0}

    def _free(self, name: str, mode: str, mine: int = 0) -> bool:
        if name in self._writer:
            return False
        return mode == PR or self._readers.get(name, 0) == mine

    def _grant(self, name: str, mode: str) -> None:
        if mode == EX:
            self._writer.add(name)
        else:
            self._readers[name] = self._readers.get(name, 0) + 1

    def _drop(self, name: str, mode: str) -> None:
        if mode == EX:
            self._writer.discard(name)
        else:
            n = self._readers[name] - 1
            if n:
                self._readers[name] = n
            else:
                del self._readers[name]

    def lock(self, name: str, mode: str, noqueue: bool = False) -> _Local:
        with self._cond:
            self.stats["locks"] += 1
            if not self._free(name, mode):
                if noqueue:
                    self.stats["busy"] += 1
                    raise WouldBlock(name)
                self.stats["waits"] += 1
                while not self._free(name, mode):
                    self._cond.wait()
            self._grant(name, mode)
            return _Local(name, mode)

    def convert(self, handle: _Local, mode: str, noqueue: bool = False) -> None:
        with self._cond:
            if handle.mode == mode:
                return
            if mode == PR:  # down-conversion never waits
                self._drop(handle.name, EX)
                self._grant(handle.name, PR)
                handle.mode = PR
                self._cond.notify_all()
                return
            if not self._free(handle.name, EX, mine=1):
                if noqueue:
                    self.stats["busy"] += 1
                    raise WouldBlock(handle.name)
                while not self._free(handle.name, EX, mine=1):
                    self._cond.wait()
            self._drop(handle.name, PR)
            self._grant(handle.name, EX)
            handle.mode = EX

    def unlock(self, handle: _Local) -> None:
        with self._cond:
            self._drop(handle.name, handle.mode)
            self._cond.notify_all()


class DlmLocks:
    """clusterfs locks in a storaged DLM lockspace (thread-safe, blocking calls).

    ``sync`` is a :class:`~storaged.dlm.api.SyncLockspace` on the cluster
    node's event loop (an in-process :class:`~storaged.cluster.node.ClusterNode`)."""

    def __init__(self, sync: SyncLockspace) -> None:
        self.sync = sync
        self.stats = {"locks": 0, "busy": 0}

    @staticmethod
    def _fail(e: LockError, name: str) -> Exception:
        if e.status == Status.EAGAIN:
            return WouldBlock(name)
        return LockLost(f"lock {name}: {e.status.name}")

    def lock(self, name: str, mode: str, noqueue: bool = False) -> Any:
        self.stats["locks"] += 1
        try:
            return self.sync.lock(name, Mode[mode], flags=Flag.NOQUEUE if noqueue else 0)
        except LockError as e:
            if e.status == Status.EAGAIN:
                self.stats["busy"] += 1
            raise self._fail(e, name) from None

    def convert(self, handle: Any, mode: str, noqueue: bool = False) -> None:
        try:
            self.sync.convert(handle, Mode[mode], flags=Flag.NOQUEUE if noqueue else 0)
        except LockError as e:
            raise self._fail(e, handle.name) from None

    def unlock(self, handle: Any) -> None:
        try:
            self.sync.unlock(handle)
        except LockError as e:
            if e.status != Status.ENOENT:
                raise LockLost(f"unlock {handle.name}: {e.status.name}") from None
