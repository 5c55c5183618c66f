"""Cluster-wide POSIX byte-range locks (fcntl) and flock, through the DLM.

The DLM has no byte ranges, so a file's lock space is cut into resources
and locked with multiple-granularity locking (Gray et al.), whose intention
modes the DLM has: CR is "intention shared", CW "intention exclusive", PW
"shared + intention exclusive".  For inode ``i``:

* ``<tag>.p<i>.w`` covers the whole file.  A lock of the whole file
  (``l_start = 0, l_len = 0``) takes it PR (read lock) or EX (write lock);
  a lock of part of it takes it CR (read) or CW (write) first, then
* ``<tag>.p<i>.<k>`` for each of the first ``GRANULES`` bytes it covers
  (PR / EX), and ``<tag>.p<i>.r`` (PR / EX) if it reaches past them.

Two overlapping locks always meet on one resource in conflicting modes, so
the DLM enforces exclusion cluster-wide: every lock owner (a process's
``fl_owner`` as FUSE passes it) holds its own DLM locks, also against
owners on the same node.  Ranges beyond the first ``GRANULES`` bytes share
one resource: two write locks there conflict even if they do not overlap
(a false conflict: correct exclusion, less concurrency; ctdb's ping_pong
and the usual lock-file and record-0 uses lie inside the granules).

A waiting ``F_SETLKW`` is a waiting DLM request, so another node's unlock
wakes it (the DLM grants it); a dead node's locks go when the DLM purges
them (after fencing).  POSIX semantics per owner (merge, split, convert)
are computed here on the owner's range list; the DLM locks follow it.
``F_GETLK`` tests with NOQUEUE requests and reports the requested range
with ``l_pid = 0`` when the holder is on another node (libfuse answers
conflicts between owners on this node itself).

flock: one resource ``<tag>.f<i>``, PR for LOCK_SH and EX for LOCK_EX; a
conversion drops the old lock first, as Linux does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from typing import Any

from storaged.dlm.api import LockError, SyncLockspace
from storaged.dlm.modes import Flag, Mode, Status

GRANULES = 16
INF = (1 << 63) - 1
READ, WRITE = "R", "W"

# sup[a][b]: the weakest mode at least as strong as both a and b (NL..EX lattice).
_ORDER = {Mode.NL: 0, Mode.CR: 1, Mode.CW: 2, Mode.PR: 2, Mode.PW: 3, Mode.EX: 4}


def sup(a: Mode, b: Mode) -> Mode:
    """The join of two DLM modes (CW and PR join to PW)."""
    if {a, b} == {Mode.CW, Mode.PR}:
        return Mode.PW
    return a if _ORDER[a] >= _ORDER[b] else b


def covers(a: Mode, b: Mode) -> bool:
    """Whether holding ``a`` gives at least what ``b`` gives."""
    return sup(a, b) == a


Range = tuple[int, int, str]  # [start, end) and READ / WRITE


def apply(ranges: list[Range], start: int, end: int, kind: str | None) -> list[Range]:
    """An owner's ranges after locking [start, end) as ``kind`` (None: unlocking).

    POSIX: the new lock replaces whatever the owner held in the range (split
    where needed); adjacent ranges of one kind merge."""
    out: list[Range] = []
    for s, e, k in ranges:
        if e <= start or s >= end:
            out.append((s, e, k))
            continue
        if s < start:
            out.append((s, start, k))
        if e > end:
            out.append((end, e, k))
    if kind is not None:
        out.append((start, end, kind))
    out.sort()
    merged: list[Range] = []
    for s, e, k in out:
        if merged and merged[-1][2] == k and merged[-1][1] >= s:
            ps, pe, _ = merged[-1]
            merged[-1] = (ps, max(pe, e), k)
        else:
            merged.append((s, e, k))
    return merged


def needed(ranges: list[Range]) -> dict[str, Mode]:
    """The DLM mode of each resource suffix (``w``, ``0``..``GRANULES-1``, ``r``)."""
    want: dict[str, Mode] = {}

    def up(key: str, mode: Mode) -> None:
        want[key] = sup(want.get(key, Mode.NL), mode)

    for s, e, k in ranges:
        if s == 0 and e >= INF:
            up("w", Mode.PR if k == READ else Mode.EX)
            continue
        up("w", Mode.CR if k == READ else Mode.CW)
        leaf = Mode.PR if k == READ else Mode.EX
        for g in range(s, min(e, GRANULES)):
            up(str(g), leaf)
        if e > GRANULES:
            up("r", leaf)
    return want


def _order(key: str) -> int:
    return -1 if key == "w" else GRANULES if key == "r" else int(key)


class _Owner:
    __slots__ = ("ranges", "held", "mutex")

    def __init__(self) -> None:
        self.ranges: list[Range] = []
        self.held: dict[str, Any] = {}  # suffix -> PLock
        self.mutex = threading.Lock()


class PosixLocks:
    """fcntl byte-range locks and flock of one mount, in a DLM lockspace."""

    def __init__(self, sync: SyncLockspace, tag: str) -> None:
        self.sync = sync
        self.tag = tag
        self._mutex = threading.Lock()
        self._owners: dict[tuple[int, int], _Owner] = {}
        self._flocks: dict[tuple[int, int], Any] = {}
        self.stats = {"setlk": 0, "waits": 0, "conflicts": 0, "getlk": 0, "flock": 0}

    def _name(self, ino: int, key: str) -> str:
        return f"{self.tag}.p{ino}.{key}"

    def _owner(self, ino: int, owner: int) -> _Owner:
        with self._mutex:
            o = self._owners.get((ino, owner))
            if o is None:
                o = self._owners[(ino, owner)] = _Owner()
            return o

    @staticmethod
    def _fail(e: LockError) -> OSError:
        if e.status == Status.EAGAIN:
            return OSError(errno.EAGAIN, "lock held by another owner")
        if e.status == Status.EDEADLK:
            return OSError(errno.EDEADLK, os.strerror(errno.EDEADLK))
        return OSError(errno.ENOLCK, f"DLM: {e.status.name}")

    def _set_mode(self, ino: int, o: _Owner, key: str, mode: Mode, flags: int) -> None:
        lk = o.held.get(key)
        if mode == Mode.NL:
            if lk is not None:
                del o.held[key]
                self.sync.unlock(lk)
            return
        if lk is None:
            o.held[key] = self.sync.lock(self._name(ino, key), mode, flags=flags)
        else:
            self.sync.convert(lk, mode, flags=flags)

    def setlk(self, ino: int, owner: int, kind: str | None, start: int, end: int,
              wait: bool) -> None:
        """Lock [start, end) of inode ``ino`` for ``owner`` (``kind`` None: unlock).

        EAGAIN if it conflicts and not ``wait``; EDEADLK from a DLM conversion
        deadlock; ENOLCK if the lockspace is gone."""
        if start < 0 or end <= start:
            raise OSError(errno.EINVAL, "bad lock range")
        self.stats["setlk"] += 1
        o = self._owner(ino, owner)
        with o.mutex:
            new = apply(o.ranges, start, end, kind)
            want, have = needed(new), {k: lk.mode for k, lk in o.held.items()}
            ups = sorted((k for k in want if not covers(have.get(k, Mode.NL), want[k])),
                         key=_order)
            flags = 0 if wait else Flag.NOQUEUE
            done: list[tuple[str, Mode]] = []
            try:
                for k in ups:
                    if wait:
                        self.stats["waits"] += 1
                    target = sup(have.get(k, Mode.NL), want[k]) if k in have else want[k]
                    self._set_mode(ino, o, k, target, flags)
                    done.append((k, have.get(k, Mode.NL)))
            except LockError as e:
                self.stats["conflicts"] += 1
                for k, old in reversed(done):  # roll back: downward changes never wait
                    self._set_mode(ino, o, k, old, 0)
                raise self._fail(e) from None
            # downward changes (unlocks, splits): leaves before the whole-file lock
            for k in sorted(set(o.held) | set(want), key=_order, reverse=True):
                lk = o.held.get(k)
                w = want.get(k, Mode.NL)
                if lk is not None and lk.mode != w:
                    self._set_mode(ino, o, k, w, 0)
            o.ranges = new
            if not new:
                with self._mutex:
                    self._owners.pop((ino, owner), None)

    def getlk(self, ino: int, owner: int, kind: str, start: int, end: int
              ) -> tuple[str, int, int] | None:
        """A conflicting lock another owner holds as (kind, start, end), or None."""
        self.stats["getlk"] += 1
        o = self._owner(ino, owner)
        with o.mutex:
            probe = needed([(start, end, kind)])
            for k in sorted(probe, key=_order):
                mine = o.held.get(k)
                cur = Mode.NL if mine is None else mine.mode
                if covers(cur, probe[k]):
                    continue
                if not self._probe(ino, k, sup(cur, probe[k]), mine):
                    if kind == WRITE and self._probe(ino, k, sup(cur, _weaker(probe[k])),
                                                     mine):
                        return READ, start, end
                    return WRITE, start, end
        return None

    def _probe(self, ino: int, key: str, mode: Mode, mine: Any) -> bool:
        """Could ``mode`` on ``key`` be granted now?  (NOQUEUE, undone at once.)"""
        try:
            if mine is None:
                lk = self.sync.lock(self._name(ino, key), mode, flags=Flag.NOQUEUE)
                self.sync.unlock(lk)
            else:
                old = mine.mode
                self.sync.convert(mine, mode, flags=Flag.NOQUEUE)
                self.sync.convert(mine, old)
        except LockError as e:
            if e.status == Status.EAGAIN:
                return False
            raise self._fail(e) from None
        return True

    def release_owner(self, ino: int, owner: int) -> None:
        """Drop every byte-range lock ``owner`` holds on ``ino`` (close of the file)."""
        with self._mutex:
            known = (ino, owner) in self._owners
        if known:
            self.setlk(ino, owner, None, 0, INF, wait=False)

    # ---------------------------------------------------------------- flock
    def flock(self, ino: int, owner: int, op: int) -> None:
        """flock(2) for the open file ``owner``: LOCK_SH / LOCK_EX [| LOCK_NB] / LOCK_UN."""
        self.stats["flock"] += 1
        key = (ino, owner)
        with self._mutex:
            lk = self._flocks.pop(key, None)
        if op & fcntl.LOCK_UN:
            if lk is not None:
                self.sync.unlock(lk)
            return
        mode = Mode.EX if op & fcntl.LOCK_EX else Mode.PR
        if lk is not None:
            if lk.mode == mode:
                with self._mutex:
                    self._flocks[key] = lk
                return
            self.sync.unlock(lk)  # Linux converts by dropping the old lock first
        flags = Flag.NOQUEUE if op & fcntl.LOCK_NB else 0
        try:
            lk = self.sync.lock(f"{self.tag}.f{ino}", mode, flags=flags)
        except LockError as e:
            if e.status == Status.EAGAIN:
                raise OSError(errno.EWOULDBLOCK, "flock held by another open file") from None
            raise self._fail(e) from None
        with self._mutex:
            self._flocks[key] = lk

    def drop_all(self) -> None:
        """Release every lock of this mount (umount)."""
        with self._mutex:
            owners, self._owners = list(self._owners.values()), {}
            flocks, self._flocks = list(self._flocks.values()), {}
        for o in owners:
            for lk in o.held.values():
                try:
                    self.sync.unlock(lk)
                except LockError:
                    pass
        for lk in flocks:
            try:
                self.sync.unlock(lk)
            except LockError:
                pass


def _weaker(mode: Mode) -> Mode:
    """The read-side counterpart of a write-side mode (EX->PR, CW->CR)."""
    return {Mode.EX: Mode.PR, Mode.CW: Mode.CR, Mode.PW: Mode.PR}.get(mode, mode)
