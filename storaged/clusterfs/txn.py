"""A transaction: the locks an operation holds and the blocks it read and changed.

Deadlock freedom without a global lock order in the code: a transaction
first takes the locks it learned from earlier attempts, sorted by name
(these may wait); every further lock is asked with NOQUEUE.  A busy one
raises :class:`Restart`: nothing was written yet, so the attempt is dropped,
its locks released, and the operation runs again with that lock in the
sorted set.  A transaction therefore only ever waits while holding a sorted
prefix of its locks, so no cycle of waiters can form.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from storaged.clusterfs.locks import EX, PR, WouldBlock

if TYPE_CHECKING:
    from storaged.clusterfs.fs import ClusterFS

T = TypeVar("T")
_RANK = {PR: 0, EX: 1}


class Restart(Exception):
    """A NOQUEUE lock was busy: run the operation again with it taken up front."""

    def __init__(self, name: str, mode: str) -> None:
        super().__init__(name)
        self.name = name
        self.mode = mode


class Txn:
    """Locks held and block images of one attempt of one operation."""

    def __init__(self, fs: ClusterFS) -> None:
        self.fs = fs
        self.held: dict[str, list[Any]] = {}  # name -> [handle, mode]
        self.blocks: dict[int, bytearray] = {}
        self.inodes: dict[int, Any] = {}
        self.dirty: set[int] = set()
        self.data: dict[int, bytes] = {}
        self.freed: list[int] = []
        self.owners: dict[int, str] = {}  # block -> name of the lock that protects it

    # ---------------------------------------------------------------- locks
    def lock(self, name: str, mode: str, wait: bool = False) -> None:
        """Hold ``name`` in at least ``mode`` (NOQUEUE unless ``wait`` or nothing is held)."""
        cur = self.held.get(name)
        locks = self.fs.locks
        if cur is not None:
            if _RANK[cur[1]] >= _RANK[mode]:
                return
            try:
                locks.convert(cur[0], mode, noqueue=not wait)
            except WouldBlock:
                raise Restart(name, mode) from None
            cur[1] = mode
            return
        try:
            handle = locks.lock(name, mode, noqueue=bool(self.held) and not wait)
        except WouldBlock:
            raise Restart(name, mode) from None
        self.held[name] = [handle, mode]

    def release(self) -> None:
        """Release every lock (after commit, or when the attempt is dropped)."""
        held, self.held = self.held, {}
        for handle, _mode in held.values():
            self.fs.locks.unlock(handle)

    # --------------------------------------------------------------- blocks
    def read(self, block: int, owner: str | None = None) -> bytearray:
        """This transaction's copy of ``block`` (read from the device once).

        ``owner`` names the lock (held by this transaction) that protects the
        block: then the node's block cache may answer, and keeps what was read."""
        buf = self.blocks.get(block)
        if owner is not None:
            self.owners[block] = owner
        if buf is None:
            cache = self.fs.cache
            img = cache.get(block, owner) if cache is not None and owner else None
            if img is None:
                img = self.fs.read_block(block)
                if cache is not None and owner:
                    cache.put(block, img, owner)
            buf = bytearray(img)
            self.blocks[block] = buf
        return buf

    def new(self, block: int, owner: str | None = None) -> bytearray:
        """A zeroed copy of ``block`` marked changed (a freshly allocated metadata block)."""
        buf = bytearray(self.fs.bs)
        self.blocks[block] = buf
        self.dirty.add(block)
        if owner is not None:
            self.owners[block] = owner
        return buf

    def change(self, block: int, owner: str | None = None) -> bytearray:
        """The copy of ``block`` to modify; it will be journaled at commit."""
        buf = self.read(block, owner)
        self.dirty.add(block)
        return buf

    def held_ex(self) -> list[Any]:
        """Handles of the locks this transaction holds in EX."""
        return [h for h, mode in self.held.values() if mode == EX]

    def write_data(self, block: int, data: bytes) -> None:
        """Queue a data block write (goes to the device before the journal record)."""
        self.data[block] = data

    def images(self) -> dict[int, bytes]:
        """The changed metadata blocks."""
        return {b: bytes(self.blocks[b]) for b in self.dirty}


def run(fs: ClusterFS, body: Callable[[Txn], T], first: tuple[tuple[str, str], ...] = ()
        ) -> T:
    """Run ``body`` as a transaction until it commits; returns its result."""
    want: dict[str, str] = dict(first)
    attempt = 0
    while True:
        txn = Txn(fs)
        try:
            for name in sorted(want):
                txn.lock(name, want[name], wait=True)
            result = body(txn)
            fs.commit(txn)
            return result
        except Restart as r:
            if _RANK[want.get(r.name, PR)] <= _RANK[r.mode]:
                want[r.name] = r.mode
            attempt += 1
            fs.stats["restarts"] += 1
        finally:
            txn.release()
        time.sleep(random.uniform(0, min(0.02, 0.0005 * attempt)))
